"""Ancestral sampling: one token per run drawn from its distribution, on the device.

Runs under a predicate constraint are handed to adaptive weighted rejection sampling
(:mod:`lmcascade.samplers.awrs`); every other run gets one inverse-CDF draw from ``q``, and
only the chosen ids and their log-probs are read back.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> draw(torch.log(torch.tensor([[0.0, 1.0, 0.0]])), g).tolist()
[1]
"""

from __future__ import annotations

import torch

from lmcascade.samplers.awrs import awrs_rows, by_rejection
from lmcascade.samplers.base import Draws, Rows, TokenSampler

BLOCK = 256
"""Tokens per block of :func:`draw`'s two-level search."""


def draw(logprobs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row from ``logprobs`` (normalised or not), drawn on their device.

    Inverse-CDF sampling, one uniform per row, in two levels: the row's probabilities are
    summed in blocks of :data:`BLOCK` tokens, the uniform is located among the blocks (in
    float64), then inside its block (many times faster than ``torch.multinomial`` over a large
    vocabulary, and no full-vocabulary float64 copies: on a CPU each fresh buffer that size
    costs more in page faults than the arithmetic).  A token of probability zero is never
    returned.
    """
    n, v = logprobs.shape
    if logprobs.dtype not in (torch.float32, torch.float64):
        logprobs = logprobs.float()
    device = logprobs.device
    top = logprobs.amax(dim=-1, keepdim=True)  # shifted: exp neither overflows nor underflows
    probs = (logprobs - torch.where(torch.isfinite(top), top, 0.0)).exp_()
    full = v // BLOCK * BLOCK
    sums = probs[:, :full].reshape(n, full // BLOCK, BLOCK).sum(-1)
    if full < v:
        sums = torch.cat([sums, probs[:, full:].sum(-1, keepdim=True)], dim=1)
    sums = sums.to(torch.float64)
    u = torch.rand((n, 1), generator=generator, device=device, dtype=torch.float64)
    block, rest = _locate(sums, u)
    block = block.clamp_(max=sums.shape[1] - 1)  # (a NaN row: no index is found)
    cols = block * BLOCK + torch.arange(BLOCK, device=device)
    inner = probs.gather(1, cols.clamp(max=v - 1)).to(torch.float64)
    inner = inner.masked_fill(cols >= v, 0.0)
    within, _ = _locate(inner, rest, scaled=False)
    return (block * BLOCK + within).clamp_(max=v - 1).squeeze(-1)


def _locate(
    weights: torch.Tensor, u: torch.Tensor, scaled: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the index ``i`` whose cumulative interval of ``weights`` holds ``u * total``
    (``scaled``) or ``u`` itself, never one of weight zero, and how far into it the point
    lies.  A point at or past the total (rounding) gets the last index of positive weight."""
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    point = u * total if scaled else u
    i = torch.searchsorted(cdf, point, right=True)
    i = torch.minimum(i, torch.searchsorted(cdf, total, right=False))
    before = torch.where(i > 0, cdf.gather(1, (i - 1).clamp(min=0)), 0.0)
    return i, point - before


class Ancestral(TokenSampler):
    """One token per run drawn from ``q`` (the constraint-masked distribution).

    ``exact_masks=True`` evaluates predicate constraints on the whole vocabulary instead of
    by rejection, so every token's proposal log-probability is exact rather than an unbiased
    estimate (MCMC needs the proposal's density; AWRS only estimates it).

    >>> Ancestral(exact_masks=True).full_masks
    True
    """

    def __init__(self, exact_masks: bool = False) -> None:
        self.full_masks = exact_masks

    def choose(self, rows: Rows) -> Draws:
        tokens = draw(rows.q, rows.generator)
        chosen_p = rows.p.gather(1, tokens[:, None]).squeeze(1)
        chosen_q = rows.q.gather(1, tokens[:, None]).squeeze(1)
        if rows.blocked is not None:
            chosen_p = torch.where(rows.blocked, float("-inf"), chosen_p)
        back = torch.stack(
            [tokens.to(torch.float64), chosen_p.to(torch.float64), chosen_q.to(torch.float64)]
        )
        ids, lps, lqs = back.cpu().tolist()
        rejection = (
            [] if self.full_masks else [i for i, r in enumerate(rows.runs) if by_rejection(r)]
        )
        if rejection:
            for i, (tok, lp, lq) in awrs_rows(rows, rejection).items():
                ids[i], lps[i], lqs[i] = tok, lp, lq
        return Draws([int(t) for t in ids], lps, lqs)
