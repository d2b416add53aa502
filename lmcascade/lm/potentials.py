"""Potentials that need a model: another LM steering a run token by token.

A site's ``potential`` may be a function of the partial text (the run evaluates it as text
grows) or another :class:`~lmcascade.LM` sharing the tokenizer: the twist is then that LM's
log-probability of the prefix, which grows by the expert's log-probability of each chosen
token — one batched call per expert model per decoding step, made after the tokens are
chosen and before they are fed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lmcascade.errors import SiteError
from lmcascade.lm.scoring import call_model
from lmcascade.lm.shaping import shape_rows

if TYPE_CHECKING:
    from lmcascade.lm.run import LMRun
    from lmcascade.samplers.base import Choice


def expert_increments(
    runs: Sequence[LMRun], choices: Sequence[Sequence[Choice]], stats: dict | None
) -> list[list[float]] | None:
    """For runs steered by another LM: that LM's log-probability of each choice's token
    (``[run][choice]``; 0 for runs without one); None when no run has one."""
    steered = [i for i, r in enumerate(runs) if r.expert is not None and choices[i]]
    if not steered:
        return None
    out = [[0.0] * len(c) for c in choices]
    groups: dict[int, list[int]] = {}
    for i in steered:
        if any(len(c.tokens) != 1 for c in choices[i]):
            raise SiteError("an LM potential steers one token at a time; blocks are not supported")
        groups.setdefault(id(runs[i].dist.potential.model), []).append(i)
    for rows in groups.values():
        experts = [runs[i].dist.potential for i in rows]
        model = experts[0].model
        logprobs = call_model(model, [runs[i].expert for i in rows], stats)
        shaped = shape_rows(logprobs, experts, [len(runs[i].tokens) for i in rows], model.eos_id)
        cpu = shaped.to(torch.float64)
        for n, i in enumerate(rows):
            ids = torch.tensor([c.tokens[0] for c in choices[i]], device=cpu.device)
            out[i] = cpu[n].gather(0, ids).cpu().tolist()
    return out
