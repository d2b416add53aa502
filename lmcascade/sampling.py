"""Token-level sampling on the model's device: temperature, top-k, top-p and the draw.

All functions work on a whole batch at once with per-row parameters, so particles of
different LM sites (different temperatures, say) share one call.  The order is the one
Hugging Face ``generate`` uses: temperature, then top-k, then top-p.

>>> import torch
>>> lp = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
>>> process_logprobs(lp, torch.tensor([1.0]), torch.tensor([2]), torch.tensor([1.0])).exp()
tensor([[0.6250, 0.3750, 0.0000]])
"""

from __future__ import annotations

import torch


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


def draw(logprobs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row from normalised ``logprobs``, drawn on their device.

    Inverse-CDF sampling in float64: one uniform per row located in the cumulative
    distribution (many times faster than ``torch.multinomial`` over a large vocabulary).
    A token of probability zero is never returned.
    """
    probs = logprobs.to(torch.float64).exp()
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(
        (probs.shape[0], 1), generator=generator, device=probs.device, dtype=torch.float64
    )
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[1] - 1)
    ok = probs.gather(1, idx) > 0
    return torch.where(ok, idx, probs.argmax(dim=-1, keepdim=True)).squeeze(-1)
