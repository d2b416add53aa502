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

from lmcascade.errors import TooManyTracesError
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
    """Every token with non-zero probability after shaping and constraints, as children.

    With a ``limit`` (enumeration's ``max_traces``) a step whose children would pass it is
    refused before anything branches, and so is one that allows *every* token of the
    vocabulary while more tokens may follow: a model whose softmax gives every token some
    probability (every transformer) makes a tree of ``vocab ** max_tokens`` paths, and
    finding that out a level later costs a forward pass over the whole vocabulary.
    """

    full_masks = True

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit

    def choose(self, rows: Rows) -> list[list[Choice]]:
        q = rows.q
        if rows.blocked is not None:
            q = q.masked_fill(rows.blocked[:, None], float("-inf"))
        p = rows.p.to(torch.float64).cpu()
        allowed = (q > -math.inf).cpu()
        if self.limit is not None:
            self._check(rows, allowed.sum(dim=-1).tolist())
        out = []
        for i in range(len(rows.runs)):
            ids = torch.nonzero(allowed[i]).flatten().tolist()
            out.append([Choice([t], [float(p[i, t])], [0.0]) for t in ids])
        return out

    def _check(self, rows: Rows, counts: list[int]) -> None:
        total = sum(counts)
        vocab = rows.p.shape[-1]
        full = [
            r
            for r, c in zip(rows.runs, counts, strict=True)
            if c == vocab and r.dist.max_tokens - len(r.tokens) > 1
        ]
        if total <= self.limit and not (full and total * vocab > self.limit):
            return
        run = full[0] if full else rows.runs[0]
        steps = run.dist.max_tokens - len(run.tokens)
        digits = steps * math.log10(max(vocab, 2))
        raise TooManyTracesError(
            f"enumeration would expand up to {vocab:,}^{steps} (about 10^{digits:.0f}) token "
            f"paths on model {run.model.name!r}, more than max_traces={self.limit:,}: "
            "enumeration is for small vocabularies or constrained sites — constrain the site "
            "(lc.constraints.allow([...]), regex), lower max_tokens, or use smc or forward"
        )
