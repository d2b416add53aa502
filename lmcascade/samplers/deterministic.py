"""Deterministic choices: greedy (the arg-max token) and all children (exact enumeration).

Both weigh a run by its probability: the token's log-probability under ``q`` is 0, so a
particle's weight is the probability of its path under the site's distribution.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> from lmcascade.lm import LMRun
>>> from lmcascade.lm.step import step_runs
>>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [1.0, 0.0, -5.0])
>>> run = LMRun(lc.LM(lm, "", max_tokens=1))
>>> extra = step_runs([run], {}, sampler=AllChildren())
>>> sorted([run.value] + [r.value for r in extra[run]])
['', 'a', 'b']
"""

from __future__ import annotations

import math

import torch

from lmcascade.samplers.base import Choice, Draws, Rows, TokenSampler


class Greedy(TokenSampler):
    """The most probable allowed token of every run (first index on a tie)."""

    full_masks = True  # predicate constraints too: the arg-max must be an allowed token

    def choose(self, rows: Rows) -> Draws:
        tokens = rows.q.argmax(dim=-1)
        chosen = rows.p.gather(1, tokens[:, None]).squeeze(1)
        if rows.blocked is not None:
            chosen = torch.where(rows.blocked, float("-inf"), chosen)
        ids = tokens.cpu().tolist()
        lps = chosen.to(torch.float64).cpu().tolist()
        return Draws(ids, lps, [0.0] * len(ids))


class AllChildren(TokenSampler):
    """Every token with non-zero probability after shaping and constraints, as children."""

    full_masks = True

    def choose(self, rows: Rows) -> list[list[Choice]]:
        q = rows.q
        if rows.blocked is not None:
            q = q.masked_fill(rows.blocked[:, None], float("-inf"))
        p = rows.p.to(torch.float64).cpu()
        allowed = (q > -math.inf).cpu()
        out = []
        for i in range(len(rows.runs)):
            ids = torch.nonzero(allowed[i]).flatten().tolist()
            out.append([Choice([t], [float(p[i, t])], [0.0]) for t in ids])
        return out
