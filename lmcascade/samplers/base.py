"""The token-sampler interface: the *choose* phase of a decoding step.

A sampler sees the :class:`Rows` of one model — every waiting run with its
next-token distribution ``p`` and the constraint-masked ``q`` — and returns, per run, a list
of :class:`Choice`: one (a draw), several (children to branch into), or none
(nothing is possible); a sampler that gives every run exactly one token returns the same as
columns, :class:`Draws` (the fast path of the feed phase).  A choice may hold several tokens (a block).  Each token carries its
log-probability under ``p`` (the site's distribution) and under ``q`` (what it was chosen
from: the run's weight gets ``p - q``; 0 for a deterministic choice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lmcascade.lm.run import LMRun
    from lmcascade.models.base import Context


@dataclass
class Rows:
    """The distributions phase for the runs of one model.

    ``p`` is each run's next-token log-density under its site's LM (what weights use:
    normalised, except for a power target, where it is ``alpha`` times the shaped model's);
    ``q`` what a sampler draws from: the site's proposal (``p`` itself, or a power target's
    renormalised) with constraint masks applied and renormalised (rows where the constraint
    allows nothing keep the unmasked proposal and are flagged in ``blocked``).
    ``empty`` lists the runs whose site allows no token at all (``min_tokens`` forbids the
    eos a model insists on): their rows are eos, and the step gives them weight zero.
    ``drafted`` (speculative samplers): per run, one ``(context, rows)`` pair per block the
    sampler drafted for it — the model context holding the block (the run's own for the
    first, a fork for each further one) and the model's raw log-probabilities after each of
    its tokens (``[len(block), vocab]``, computed in the same pass as ``p``) — or None for a
    run without a draft.
    """

    runs: list[LMRun]
    p: torch.Tensor
    q: torch.Tensor
    blocked: torch.Tensor | None
    generator: torch.Generator
    empty: list[LMRun] = field(default_factory=list)
    drafted: list[list[tuple[Context, torch.Tensor]] | None] | None = None


@dataclass
class Choice:
    """What a sampler gives one run: tokens in order, with log-probs under ``p`` and ``q``;
    the first ``in_context`` tokens are in the run's model context already (a speculative
    sampler verified them there), so feeding them appends nothing."""

    tokens: list[int]
    log_ps: list[float]
    log_qs: list[float]
    in_context: int = 0
    model_log_ps: list[float] | None = None  # the raw model's, where the sampler has them


@dataclass
class Draws:
    """The common case, columnar: exactly one token per run (``tokens[i]`` for run ``i``)."""

    tokens: list[int]
    log_ps: list[float]
    log_qs: list[float]


Chosen = Draws | list[list[Choice]]


def seeded_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A ``torch.Generator`` on ``device``, seeded with ``seed`` (from the OS when None).

    >>> a, b = seeded_generator(torch.device("cpu"), 3), seeded_generator(torch.device("cpu"), 3)
    >>> bool(torch.equal(torch.rand(2, generator=a), torch.rand(2, generator=b)))
    True
    """
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


class TokenSampler:
    """Base class.  ``full_masks``: predicate constraints are evaluated on the whole
    vocabulary (exact enumeration needs that; rejection-based samplers do not)."""

    full_masks = False

    def draft(self, runs: list[LMRun]) -> dict[LMRun, list[list[int]]]:
        """Blocks of tokens to verify after each run's next token (one or several per run),
        in the same model pass as its distribution (speculative samplers); none by default."""
        return {}

    def choose(self, rows: Rows) -> Chosen:
        """Per run, its choices — or :class:`Draws` when every run gets one token."""
        raise NotImplementedError
