"""Potentials that need a model: another LM steering a run token by token.

A site's ``potential`` may be a function of the partial text (the run evaluates it as text
grows) or another :class:`~lmcascade.LM` sharing the tokenizer: the twist is then that LM's
log-probability of the prefix, which grows by the expert's log-probability of each chosen
token — one batched call per expert model per decoding step, made after the tokens are
chosen and before they are fed.  Such an LM may not rule tokens out (``lc.LM`` refuses its
temperature, top-k, top-p, min_tokens and constraints): a twist steers and is removed
before the final weights (it is carried past the site's end until the next observe, factor
or condition, :data:`~lmcascade.engine.TWIST_ENDS`), and an infinite one would drop
particles the target keeps.  A probability that underflows to zero adds :data:`FLOOR`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lmcascade.lm.scoring import call_model
from lmcascade.lm.shaping import shape_rows

if TYPE_CHECKING:
    from lmcascade.lm.run import LMRun

FLOOR = -1e4
"""The twist increment of a token the steering LM gives probability zero (log scale)."""


def expert_increments(
    runs: Sequence[LMRun], tokens: Sequence[Sequence[int]], stats: dict | None
) -> list[list[float]]:
    """For runs steered by another LM: that LM's log-probability of each candidate next token
    (``tokens[run]``, one per choice), as ``[run][choice]``; 0 for runs without one."""
    steered = [i for i, r in enumerate(runs) if r.expert is not None and tokens[i]]
    out = [[0.0] * len(t) for t in tokens]
    groups: dict[int, list[int]] = {}
    for i in steered:
        groups.setdefault(id(runs[i].dist.potential.model), []).append(i)
    for rows in groups.values():
        experts = [runs[i].dist.potential for i in rows]
        model = experts[0].model
        logprobs = call_model(model, [runs[i].expert for i in rows], stats)
        shaped = shape_rows(logprobs, experts, [len(runs[i].tokens) for i in rows], model.eos_id)
        cpu = shaped.to(torch.float64)
        for n, i in enumerate(rows):
            ids = torch.tensor(list(tokens[i]), device=cpu.device)
            out[i] = cpu[n].gather(0, ids).clamp(min=FLOOR).cpu().tolist()
    return out
