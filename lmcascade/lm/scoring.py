"""Teacher-forced scoring of token paths (forced runs), one batched pass per model.

Scoring a *text* — every path that can produce it — is :mod:`lmcascade.lm.text_score`.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "<eos>"], lambda ctx: [0.0, 0.0])
>>> run = LMRun(lc.LM(lm, "a", max_tokens=2), forced=[0, 1])   # "a", then eos
>>> score_forced([run])
>>> run.value, round(path_log_prob(run, "a"), 4)
('a', -1.3863)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lmcascade.lm.run import LMRun
from lmcascade.lm.shaping import proposal_rows, shape_rows


def by_model(runs: Sequence[LMRun]) -> list[list[LMRun]]:
    """The runs grouped by model (first-seen order)."""
    groups: dict[int, list[LMRun]] = {}
    for run in runs:
        groups.setdefault(id(run.model), []).append(run)
    return list(groups.values())


def call_model(model, contexts, stats: dict | None, paths=None, counts=None):
    """One batched model call with its counts added to ``stats``: ``next_logprobs`` of the
    contexts, ``path_logprobs`` along ``paths``, or ``block_logprobs`` of the last
    ``counts`` positions."""
    if counts is not None:
        logprobs = model.block_logprobs(contexts, counts)
    elif paths is None:
        logprobs = model.next_logprobs(contexts)
    else:
        logprobs = model.path_logprobs(contexts, paths)
    if stats is not None:
        for key, n in model.pop_counters().items():
            stats[key] = stats.get(key, 0) + n
        stats["model_calls"] = stats.get("model_calls", 0) + 1
    return logprobs


def score_forced(runs: Sequence[LMRun], stats: dict | None = None) -> None:
    """Finishes forced runs by teacher forcing: one batched pass per model scores every
    position of every path, then each run takes its tokens through the ending rules."""
    for group in by_model(runs):
        model = group[0].model
        todo = []
        for r in group:
            if len(r.forced or ()) > len(r.tokens):
                todo.append(r)
            else:
                r.fail()  # nothing left to force, yet the generation has not ended
        if not todo:
            continue
        paths = [r.forced[len(r.tokens) :] for r in todo]  # type: ignore[index]
        rows = call_model(model, [r.ctx for r in todo], stats, paths)
        if stats is not None:
            stats["tokens_scored"] = stats.get("tokens_scored", 0) + sum(map(len, paths))
        dists = [r.dist for r, p in zip(todo, paths, strict=True) for _ in p]
        positions = [
            len(r.tokens) + j for r, p in zip(todo, paths, strict=True) for j in range(len(p))
        ]
        raw = torch.cat(rows)
        proc = shape_rows(raw, dists, positions, model.eos_id)
        tokens = torch.tensor([t for p in paths for t in p], device=proc.device)[:, None]
        q = proposal_along(todo, paths, proc, dists)
        picked = [proc.gather(1, tokens), raw.gather(1, tokens).to(proc.dtype)]
        if q is not None:
            picked.append(q.gather(1, tokens))
        both = torch.stack(picked).squeeze(-1).to(torch.float64).cpu().tolist()
        chosen, model_lps = both[0], both[1]
        log_qs = both[2] if q is not None else chosen
        offset = 0
        for run, path in zip(todo, paths, strict=True):
            for j, tok in enumerate(path):
                if run.done:
                    break
                run.feed(tok, chosen[offset + j], log_qs[offset + j], model_lps[offset + j])
            offset += len(path)
            if not run.done:
                run.fail()


def proposal_along(
    runs: Sequence[LMRun], paths: Sequence[Sequence[int]], target: torch.Tensor, dists: list
) -> torch.Tensor | None:
    """The proposal's log-probabilities at every position of forced ``paths`` (rows as in
    ``target``), for the sites that would draw these tokens from something other than their
    target: a power target or a constraint (masks walked along each path, as sampling
    applies them).  None when every run proposes from its target: then ``q = p``.  This is
    the density a fresh draw would have given the path now — what an MCMC move needs for
    its reverse proposal."""
    if not any(r.dist.separate_proposal or r.dist.constraint is not None for r in runs):
        return None
    q = proposal_rows(target, dists)
    allowed = torch.ones(q.shape, dtype=torch.bool, device=q.device)
    offset = 0
    for run, path in zip(runs, paths, strict=True):
        c = run.dist.constraint
        if c is not None:
            state = run.cstate
            for j, tok in enumerate(path):
                allowed[offset + j] = c.mask(run.model, state)
                if not bool(allowed[offset + j, tok]) or j + 1 == len(path):
                    break  # the path leaves the constraint here: it scores -inf anyway
                state = c.advance(run.model, state, tok)
        offset += len(path)
    masked = q.masked_fill(~allowed, float("-inf"))
    blocked = torch.isneginf(masked).all(dim=-1, keepdim=True)
    return torch.where(blocked, q, torch.log_softmax(masked, dim=-1))


def path_log_prob(run: LMRun, expected_value: str | None = None) -> float:
    """Log-probability of a finished forced run: its token path, if it ends exactly there.

    A path that ends early or late, or whose value differs from ``expected_value``, has
    probability zero under the distribution.
    """
    if not run.done or run.end == "impossible":
        return -math.inf
    if run.forced is not None and len(run.tokens) != len(run.forced):
        return -math.inf
    if expected_value is not None and run.value != expected_value:
        return -math.inf
    return run.log_prob
