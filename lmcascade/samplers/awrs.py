"""Adaptive weighted rejection sampling (AWRS) for Python predicate constraints.

Candidates are drawn without replacement (Gumbel-max order, computed on the device) and the
predicate is tested on the host one candidate at a time; the accepted token is an exact draw
from the constrained distribution and the weight gets an unbiased estimate of the allowed
mass (Lipkin et al. 2025).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lmcascade.lm.run import LMRun
    from lmcascade.samplers.base import Rows


def by_rejection(run: LMRun) -> bool:
    """Whether the run's constraint is sampled by rejection (a Python predicate)."""
    return getattr(run.dist.constraint, "by_rejection", False)


AWRS_CANDIDATES = 32


def awrs(run: LMRun, order: list[int], logp: list[float], more) -> tuple[int, float]:
    """Recursive adaptive weighted rejection sampling for one run.

    ``order`` lists candidate tokens in Gumbel-max order (a sample without replacement from
    the run's distribution) with their log-probabilities ``logp``; ``more()`` returns the full
    order when the candidates run out.  Returns the first token the predicate accepts — an
    exact draw from the constrained distribution — and ``log Z_hat``, an unbiased estimate of
    the allowed probability mass (``-inf`` when nothing is allowed).
    """
    c, model, state = run.dist.constraint, run.model, run.cstate
    rejected, log_m, j = 0.0, 0.0, 0
    while True:
        if j + 1 >= len(order) and len(order) < run.model.vocab_size:
            order, logp = more()
        if j >= len(order) or logp[j] == -math.inf:
            return int(order[max(j - 1, 0)]), -math.inf
        tok, lp = int(order[j]), logp[j]
        last = j + 1 == len(order) or logp[j + 1] == -math.inf
        log_q = 0.0 if last else min(lp - math.log1p(-rejected), 0.0)
        if c.accepts(model, state, tok):
            if last or c.accepts(model, state, int(order[j + 1])):
                return tok, log_m
            return tok, log_m + log_q
        if last or rejected + math.exp(lp) >= 1 - 1e-9:
            return tok, -math.inf
        log_m += math.log1p(-math.exp(log_q))
        rejected += math.exp(lp)
        j += 1


def awrs_rows(rows: Rows, indices: list[int]) -> dict[int, tuple[int, float, float]]:
    """AWRS for the runs ``indices`` of ``rows``: Gumbel-max candidate orders are computed on
    the device (the top few per row read back), the predicate is tested on the host.  Returns
    ``index -> (token, log p, log q)``: ``log q`` is the token's proposal log-probability minus
    the log of the unbiased allowed-mass estimate (``log p = -inf`` when nothing is allowed)."""
    index = torch.tensor(indices, device=rows.p.device)
    # Candidates come from the proposal (predicate rows are not masked in q); the chosen
    # token's weight uses the target p (they differ only for a power target).
    logp = rows.q.index_select(0, index).to(torch.float64)
    target = rows.p.index_select(0, index).to(torch.float64)
    u = torch.rand(logp.shape, generator=rows.generator, device=logp.device, dtype=torch.float64)
    keys = logp - torch.log(-torch.log(u.clamp_min(1e-300)))
    k = min(AWRS_CANDIDATES, logp.shape[-1])
    top = keys.topk(k, dim=-1).indices
    ids = top.cpu().tolist()
    lps = logp.gather(1, top).cpu().tolist()
    out = {}
    for n, i in enumerate(indices):

        def more(n=n):
            full = keys[n].argsort(descending=True)
            return full.cpu().tolist(), logp[n, full].cpu().tolist()

        tok, log_z = awrs(rows.runs[i], ids[n], lps[n], more)
        if log_z == -math.inf:
            out[i] = (tok, -math.inf, 0.0)
        else:
            out[i] = (tok, float(target[n, tok]), float(logp[n, tok]) - log_z)
    return out
