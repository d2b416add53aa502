"""The distribution a token is drawn from: eos masking, temperature, top-k and top-p.

All functions work on a whole batch at once with per-row parameters, so particles of
different LM sites (different temperatures, say) share one call.  The order is the one
Hugging Face ``generate`` uses: temperature, then top-k, then top-p.

>>> import torch
>>> lp = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
>>> process_logprobs(lp, torch.tensor([1.0]), torch.tensor([2]), torch.tensor([1.0])).exp()
tensor([[0.6250, 0.3750, 0.0000]])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lmcascade.distributions import LM


def process_logprobs(
    logprobs: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
) -> torch.Tensor:
    """Normalised log-probabilities after temperature, top-k and top-p, row by row.

    ``temperature`` 0 means greedy (all mass on the arg-max); ``top_k`` 0 means no top-k;
    ``top_p`` keeps the smallest prefix of the sorted distribution whose mass reaches ``top_p``.
    """
    device = logprobs.device
    temperature = temperature.to(device=device, dtype=logprobs.dtype)
    greedy = temperature == 0
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature)
    out = torch.log_softmax(logprobs / safe_t[:, None], dim=-1)
    if bool(greedy.any()):
        best = logprobs.argmax(dim=-1, keepdim=True)
        onehot = torch.full_like(out, float("-inf")).scatter_(1, best, 0.0)
        out = torch.where(greedy[:, None], onehot, out)
    top_k = top_k.to(device)
    top_p = top_p.to(device=device, dtype=logprobs.dtype)
    need_k = (top_k > 0) & (top_k < out.shape[-1])
    need_p = top_p < 1.0
    if not bool((need_k | need_p).any()):
        return out
    sorted_lp, order = torch.sort(out, dim=-1, descending=True, stable=True)
    rank = torch.arange(out.shape[-1], device=device)[None, :]
    k = torch.where(need_k, top_k, torch.full_like(top_k, out.shape[-1]))
    keep = rank < k[:, None]
    probs = torch.where(keep, sorted_lp.exp(), torch.zeros_like(sorted_lp))
    probs = probs / probs.sum(dim=-1, keepdim=True)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep &= mass_before < top_p[:, None]
    keep_orig = torch.zeros_like(keep).scatter_(1, order, keep)
    return torch.log_softmax(out.masked_fill(~keep_orig, float("-inf")), dim=-1)


def shape_rows(
    logprobs: torch.Tensor, dists: Sequence[LM], positions: Sequence[int], eos_id: int
) -> torch.Tensor:
    """Row ``i`` of ``logprobs`` as the distribution ``dists[i]`` draws its token number
    ``positions[i]`` from: eos masked below ``min_tokens``, then temperature, top-k, top-p."""
    early = [pos < d.min_tokens for d, pos in zip(dists, positions, strict=True)]
    if any(early):
        rows = torch.tensor(early, device=logprobs.device)
        eos = torch.zeros(logprobs.shape[-1], dtype=torch.bool, device=logprobs.device)
        eos[eos_id] = True
        logprobs = torch.log_softmax(
            logprobs.masked_fill(rows[:, None] & eos[None, :], float("-inf")), dim=-1
        )
    n = len(dists)
    if all(d is dists[0] for d in dists):
        d = dists[0]
        temps = torch.full((n,), d.temperature, dtype=torch.float64)
        top_k = torch.full((n,), d.top_k or 0, dtype=torch.long)
        top_p = torch.full((n,), d.top_p, dtype=torch.float64)
    else:
        temps = torch.tensor([d.temperature for d in dists], dtype=torch.float64)
        top_k = torch.tensor([d.top_k or 0 for d in dists], dtype=torch.long)
        top_p = torch.tensor([d.top_p for d in dists], dtype=torch.float64)
    return process_logprobs(logprobs, temps, top_k, top_p)
