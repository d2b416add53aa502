"""Ancestral sampling: one token per run drawn from its distribution, on the device.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> draw(torch.log(torch.tensor([[0.0, 1.0, 0.0]])), g).tolist()
[1]
"""

from __future__ import annotations

import torch


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
