"""The distribution a token is drawn from: eos masking, temperature, top-k and top-p.

All functions work on a whole batch at once with per-row parameters, so particles of
different LM sites (different temperatures, say) share one call.  The order and the tie rules
are those of Hugging Face ``generate`` (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper`` with ``min_tokens_to_keep=1``): temperature, then top-k, which keeps
every token tied with the k-th, then top-p; greedy decoding (temperature 0) takes the first
arg-max.

>>> import torch
>>> lp = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
>>> process_logprobs(lp, torch.tensor([1.0]), torch.tensor([2]), torch.tensor([1.0])).exp()
tensor([[0.6250, 0.3750, 0.0000]])
>>> tie = torch.log(torch.tensor([[0.4, 0.3, 0.3]]))  # top-k 2 keeps both tokens tied second
>>> process_logprobs(tie, torch.tensor([1.0]), torch.tensor([2]), torch.tensor([1.0])).exp()
tensor([[0.4000, 0.3000, 0.3000]])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lmcascade.distributions import LM


FROZEN = 1e-20
"""Temperatures below this are their limit: scores divided by them overflow the float range
(or leave every gap between distinct scores beyond ``exp``'s reach), so the distribution is
exactly uniform over the tokens tied at the maximum."""


def process_logprobs(
    logprobs: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
) -> torch.Tensor:
    """Normalised log-probabilities after temperature, top-k and top-p, row by row.

    ``temperature`` 0 means greedy (all mass on the first arg-max); a positive temperature
    below :data:`FROZEN` is its limit (uniform over the tied arg-maxes); ``top_k`` 0 means no
    top-k, otherwise every token scoring at least the k-th highest is kept (ties included);
    ``top_p`` < 1 drops, from the least likely up, the tokens whose cumulative mass (in
    ascending order) is at most ``1 - top_p``, always keeping the most likely token.  These
    are Hugging Face's rules computed the same way, so the kept sets agree with its warpers;
    where a group of exactly tied tokens straddles the top-p cut, the ascending sort is
    stable (lower ids are dropped first), which is what HF's sort does whenever it is stable.
    """
    device = logprobs.device
    n_vocab = logprobs.shape[-1]
    # Per-row parameters are read on the CPU (no device round trips for the decisions).
    t = temperature.detach().to(device="cpu", dtype=torch.float64)
    k = top_k.detach().to(device="cpu", dtype=torch.long)
    p = top_p.detach().to(device="cpu", dtype=torch.float64)
    greedy = t == 0
    scaled = ~greedy & (t != 1)
    need_k = (k > 0) & (k < n_vocab) & ~greedy
    need_p = (p < 1.0) & ~greedy
    scores = logprobs
    frozen = scaled & (t < FROZEN)
    if bool(frozen.any()):  # the T -> 0 limit: uniform over the tied arg-maxes
        top = logprobs.max(dim=-1, keepdim=True).values
        limit = torch.where(logprobs == top, 0.0, float("-inf")).to(logprobs.dtype)
        scores = torch.where(frozen.to(device)[:, None], limit, scores)
        scaled = scaled & ~frozen
    if bool(scaled.any()):  # HF adds no temperature warper at 1
        scores = _divide(scores, torch.where(scaled, t, torch.ones_like(t)))
    if bool(need_k.any()):
        k = torch.where(need_k, k, torch.ones_like(k))
        kmax = int(k.max())
        if kmax * 8 < n_vocab:
            best = torch.topk(scores, kmax, dim=-1).values
        else:
            best = torch.sort(scores, dim=-1, descending=True).values
        kth = best.gather(1, (k - 1).to(device)[:, None])
        remove = (scores < kth) & need_k.to(device)[:, None]
        scores = scores.masked_fill(remove, float("-inf"))
    if bool(need_p.any()):
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False, stable=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        cut = (1.0 - p).to(device=device, dtype=scores.dtype)[:, None]
        drop = (cumulative <= cut) & need_p.to(device)[:, None]
        drop[:, -1] = False  # min_tokens_to_keep = 1
        remove = torch.zeros_like(drop).scatter_(1, order, drop)
        scores = scores.masked_fill(remove, float("-inf"))
    out = torch.log_softmax(scores, dim=-1)
    if bool(greedy.any()):
        best = logprobs.argmax(dim=-1, keepdim=True)
        onehot = torch.full_like(out, float("-inf")).scatter_(1, best, 0.0)
        out = torch.where(greedy.to(device)[:, None], onehot, out)
    return out


def _divide(scores: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``scores / t`` row by row, rounded exactly as ``scores / t`` with a Python float ``t``
    (HF's temperature warper): in the op's math type (float32 for float32 and bfloat16,
    float64 for float64), on CUDA as a multiplication by the reciprocal."""
    math_type = torch.float64 if scores.dtype == torch.float64 else torch.float32
    t = temperature.to(dtype=math_type)  # on the CPU
    x = scores.to(math_type)
    if scores.device.type == "cuda":
        inverse = (torch.ones_like(t) / t).to(scores.device)
        out = x * inverse[:, None]
    else:
        out = x / t.to(scores.device)[:, None]
    return out.to(scores.dtype)


def shape_rows(
    logprobs: torch.Tensor, dists: Sequence[LM], positions: Sequence[int], eos_id: int
) -> torch.Tensor:
    """Row ``i`` of ``logprobs`` as the site ``dists[i]`` scores its token number
    ``positions[i]``: eos masked below ``min_tokens``, then temperature, top-k, top-p — times
    the site's ``alpha`` for a power target (then no longer normalised)."""
    early = [pos < d.min_tokens for d, pos in zip(dists, positions, strict=True)]
    if any(early):
        # Like HF's min-new-tokens processor: eos is set to -inf, nothing renormalised until
        # the warpers have run (process_logprobs normalises at the end).
        rows = torch.tensor(early, device=logprobs.device)
        eos = torch.zeros(logprobs.shape[-1], dtype=torch.bool, device=logprobs.device)
        eos[eos_id] = True
        logprobs = logprobs.masked_fill(rows[:, None] & eos[None, :], float("-inf"))
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
    out = process_logprobs(logprobs, temps, top_k, top_p)
    powers = [getattr(d, "alpha", 1.0) for d in dists]  # any object with LM's parameters
    if any(a != 1.0 for a in powers):
        alpha = torch.tensor(powers, dtype=out.dtype, device=out.device)
        out = out * alpha[:, None]
    return out


def proposal_rows(target: torch.Tensor, dists: Sequence[LM]) -> torch.Tensor:
    """The proposal's log-probabilities from rows of the target's (:func:`shape_rows`): the
    same rows where a site proposes from its target, else ``target * proposal_scale``
    renormalised (a power target's default proposal is its target renormalised token by
    token: the model at temperature ``1 / alpha``)."""
    if not any(d.separate_proposal for d in dists):
        return target
    scale = torch.tensor([d.proposal_scale for d in dists], dtype=target.dtype)
    return torch.log_softmax(target * scale.to(target.device)[:, None], dim=-1)
