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
