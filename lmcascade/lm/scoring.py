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
from lmcascade.lm.shaping import shape_rows


def by_model(runs: Sequence[LMRun]) -> list[list[LMRun]]:
    """The runs grouped by model (first-seen order)."""
    groups: dict[int, list[LMRun]] = {}
    for run in runs:
        groups.setdefault(id(run.model), []).append(run)
    return list(groups.values())


def call_model(model, contexts, stats: dict | None, paths=None):
    """One batched model call with its counts added to ``stats``: ``next_logprobs`` of the
    contexts, or ``path_logprobs`` along ``paths`` when given."""
    if paths is None:
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
        both = torch.stack([proc.gather(1, tokens), raw.gather(1, tokens).to(proc.dtype)])
        chosen, model_lps = both.squeeze(-1).to(torch.float64).cpu().tolist()
        offset = 0
        for run, path in zip(todo, paths, strict=True):
            for j, tok in enumerate(path):
                if run.done:
                    break
                run.feed(tok, chosen[offset + j], None, model_lps[offset + j])
            offset += len(path)
            if not run.done:
                run.fail()


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
