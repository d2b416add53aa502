"""LMRun: the state machine of one generation under an LM distribution.

An :class:`LMRun` takes tokens with their log-probabilities — one at a time or a block at
once — tracks the decoded text incrementally, and knows when the generation has ended (eos,
a stop string, or ``max_tokens``).  The same machine *scores* a given token path by forcing
its tokens, so sampling and scoring can never disagree.  A run can be checkpointed and
restored to an earlier token position (speculative decoding rejects drafted tokens, MCMC
regenerates a suffix).

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> from lmcascade.lm.step import run_to_end
>>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, 0.0])
>>> run = LMRun(lc.LM(lm, "", max_tokens=2), forced=[0, 1])
>>> run_to_end([run], {})
>>> run.value, run.end, round(run.log_prob, 4)
('ab', 'max_tokens', -2.1972)
>>> live = LMRun(lc.LM(lm, "", max_tokens=4))
>>> mark = live.checkpoint()
>>> live.feed_block([0, 0], [-1.1, -1.1])
2
>>> live.restore(mark); live.tokens, live.text, live.log_prob
([], '', 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmcascade.errors import SiteError
from lmcascade.lm.detok import Detokenizer
from lmcascade.models.base import Context, LanguageModel
from lmcascade.trace import safe_repr

if TYPE_CHECKING:
    from lmcascade.distributions import LM


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Everything :meth:`LMRun.restore` needs to go back to a token position."""

    n: int
    log_prob: float
    log_q: float
    twist: float
    cstate: Any
    detok: tuple
    stop_scan: int


class LMRun:
    """One generation (sampled, or forced along ``forced`` token ids) under an LM distribution.

    ``log_prob`` sums the tokens' log-probabilities under the site's distribution, ``log_q``
    under the distribution they were drawn from (the constraint-masked one), and ``twist`` is
    the site's potential at the current prefix: ``log_weight`` is the run's contribution to
    its particle's weight while it is in progress.  A finished run's twist is the potential of
    its final text (a function potential is evaluated once more at a max_tokens or stop end,
    on the text with its last token and cut before a stop string; an LM potential's twist
    includes every token taken, eos too): the engine carries it in the particle's weight
    until the weight it anticipates arrives (see :data:`~lmcascade.engine.TWIST_ENDS`).
    ``token_log_probs`` and ``token_log_qs`` keep the same per token, and
    ``token_model_log_probs`` each token's log-probability under the model itself (before any
    shaping or constraint; NaN where the step that chose the token did not provide it).
    ``tag`` is what the inference method keeps for the run's particle (see ``Particle.tag``):
    a token sampler reads it.
    """

    __slots__ = (
        "dist",
        "model",
        "ctx",
        "forced",
        "tokens",
        "token_log_probs",
        "token_log_qs",
        "token_model_log_probs",
        "log_prob",
        "log_q",
        "twist",
        "cstate",
        "done",
        "end",
        "value",
        "expert",
        "tag",
        "_detok",
        "_stop_scan",
    )

    def __init__(
        self, dist: LM, ctx: Context | None = None, forced: Sequence[int] | None = None
    ) -> None:
        self.dist = dist
        self.model: LanguageModel = dist.model
        self.ctx = ctx if ctx is not None else self.model.open(dist.prompt_ids)
        self.forced = list(forced) if forced is not None else None
        self.tokens: list[int] = []
        self.token_log_probs: list[float] = []
        self.token_log_qs: list[float] = []
        self.token_model_log_probs: list[float] = []
        self.log_prob = 0.0
        self.log_q = 0.0
        # A potential is a function of the prefix, or another LM whose prefix probability
        # steers the run (its context, ``expert``, advances with this run's tokens).
        self.expert: Context | None = None
        self.twist = 0.0
        if getattr(dist.potential, "is_lm", False):
            if forced is None:
                self.expert = dist.potential.model.open(dist.potential.prompt_ids)
        elif dist.potential is not None:
            self.twist = self._potential("")
        self.cstate = dist.constraint.start(self.model) if dist.constraint is not None else None
        self.tag: Any = None
        self.done = False
        self.end: str | None = None
        self.value: str | None = None
        self._detok = Detokenizer(self.model.tokenizer)
        self._stop_scan = 0

    def _potential(self, text: str) -> float:
        """The site's potential of a prefix: a finite number, or a SiteError saying why not.
        A twist steers SMC and is removed after the site, so it cannot forbid a text
        (a -inf twist would drop particles the target keeps, a biased result)."""
        raw = self.dist.potential(text)
        try:
            value = math.nan if isinstance(raw, str | bool) else float(raw)
        except (TypeError, ValueError, OverflowError):
            value = math.nan
        if not math.isfinite(value):
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise SiteError(
                f"the potential returned {safe_repr(raw, 60)} for {shown!r}; a log-potential "
                "must be a finite number. A potential only steers SMC and is removed before the "
                "final weights, so it cannot forbid a text: forbid with a constraint, or with a "
                "condition or factor after the site"
            )
        return value

    @property
    def log_weight(self) -> float:
        """p/q of the tokens so far, times the potential of the prefix (log scale)."""
        if self.log_prob == -math.inf:
            return -math.inf
        return self.log_prob - self.log_q + self.twist

    @property
    def text(self) -> str:
        """The text decoded so far."""
        return self._detok.text

    def branch(self, ctx: Context) -> LMRun:
        """A copy of this run continuing on ``ctx`` (a fork of this run's context)."""
        twin = LMRun.__new__(LMRun)
        for slot in LMRun.__slots__:
            setattr(twin, slot, getattr(self, slot))
        twin.ctx = ctx
        if self.expert is not None:
            twin.expert = self.dist.potential.model.fork(self.expert)
        twin.tokens = list(self.tokens)
        twin.token_log_probs = list(self.token_log_probs)
        twin.token_log_qs = list(self.token_log_qs)
        twin.token_model_log_probs = list(self.token_model_log_probs)
        twin._detok = self._detok.copy()
        return twin

    # -- taking tokens ---------------------------------------------------------------------

    def feed(
        self,
        token_id: int,
        log_prob: float,
        log_q: float | None = None,
        model_log_prob: float = math.nan,
        in_context: bool = False,
    ) -> None:
        """Takes one token with its log-probability under the site's distribution (and under
        the distribution it was drawn from, when that differs; and under the raw model).
        ``in_context``: the model context holds the token already (a verified draft)."""
        log_q = log_prob if log_q is None else log_q
        self.tokens.append(token_id)
        self.token_log_probs.append(log_prob)
        self.token_log_qs.append(log_q)
        self.token_model_log_probs.append(model_log_prob)
        self.log_prob += log_prob
        self.log_q += log_q
        if log_prob == -math.inf:
            self._finish("impossible")
            return
        if self.dist.constraint is not None:
            c = self.dist.constraint
            if self.forced is not None and not bool(c.mask(self.model, self.cstate)[token_id]):
                self._finish("impossible")  # a scored path that breaks the constraint
                return
            self.cstate = c.advance(self.model, self.cstate, token_id)
        if token_id == self.model.eos_id:
            self._finish("eos")
            return
        delta = self._detok.push(token_id)
        if delta and self.dist.stop and self._find_stop() is not None:
            self._finish("stop")
            return
        if len(self.tokens) >= self.dist.max_tokens:
            self._finish("max_tokens")
            return
        if self.forced is None and self.dist.potential is not None:
            if self.expert is not None:
                self.expert.append(token_id)
            else:
                self.twist = self._potential(self._detok.text)
        if not in_context:
            self.ctx.append(token_id)

    def feed_block(
        self,
        tokens: Sequence[int],
        log_probs: Sequence[float],
        log_qs: Sequence[float] | None = None,
        model_log_probs: Sequence[float] | None = None,
        in_context: int = 0,
    ) -> int:
        """Takes several tokens in order, stopping early if the generation ends; returns how
        many were taken.  The first ``in_context`` of them are in the model context already."""
        taken = 0
        for i, tok in enumerate(tokens):
            if self.done:
                break
            self.feed(
                int(tok),
                log_probs[i],
                None if log_qs is None else log_qs[i],
                math.nan if model_log_probs is None else model_log_probs[i],
                i < in_context,
            )
            taken += 1
        return taken

    def _find_stop(self) -> int | None:
        text = self._detok.text
        start = max(0, self._stop_scan - self.dist.max_stop_len + 1)
        hits = [i for s in self.dist.stop if (i := text.find(s, start)) >= 0]
        self._stop_scan = len(text)
        return min(hits) if hits else None

    # -- going back ------------------------------------------------------------------------

    def checkpoint(self) -> Checkpoint:
        """The run's state at its current token position (cheap: a few numbers)."""
        if self.done:
            raise SiteError("cannot checkpoint a finished generation")
        return Checkpoint(
            len(self.tokens),
            self.log_prob,
            self.log_q,
            self.twist,
            self.cstate,
            self._detok.state(),
            self._stop_scan,
        )

    def restore(self, mark: Checkpoint) -> None:
        """Goes back to ``mark`` (taken on this run or the run it was branched from): tokens,
        text, stop scan, constraint state, weights and twist, and the model contexts (cropped
        without recomputation; re-opened if the run had finished and released them)."""
        if mark.n > len(self.tokens):
            raise SiteError(f"cannot restore to token {mark.n}: the run has {len(self.tokens)}")
        keep = self.tokens[: mark.n]
        ids = list(self.dist.prompt_ids) + keep
        if self.done:
            self.ctx = self.model.open(ids)
            if getattr(self.dist.potential, "is_lm", False) and self.forced is None:
                expert = self.dist.potential
                self.expert = expert.model.open(list(expert.prompt_ids) + keep)
        else:
            self.model.crop(self.ctx, len(ids))
            if self.expert is not None:
                self.dist.potential.model.crop(
                    self.expert, len(self.dist.potential.prompt_ids) + mark.n
                )
        del self.tokens[mark.n :]
        del self.token_log_probs[mark.n :]
        del self.token_log_qs[mark.n :]
        del self.token_model_log_probs[mark.n :]
        self.log_prob, self.log_q, self.twist = mark.log_prob, mark.log_q, mark.twist
        self.cstate = mark.cstate
        self._detok.restore(mark.detok)
        self._stop_scan = mark.stop_scan
        self.done, self.end, self.value = False, None, None

    # -- ending ----------------------------------------------------------------------------

    def release(self) -> None:
        """Gives the run's model contexts back (it will not be continued)."""
        self.model.release(self.ctx)
        if self.expert is not None:
            self.dist.potential.model.release(self.expert)
            self.expert = None

    def _finish(self, end: str) -> None:
        c = self.dist.constraint
        if (
            end in ("stop", "max_tokens")
            and c is not None
            and not c.complete(self.model, self.cstate)
        ):
            end = "impossible"  # ended before the constraint was satisfied (an unfinished match)
        self.done = True
        self.end = end
        self.release()
        if end == "impossible":
            self.log_prob = -math.inf
            return
        text = self.model.decode([t for t in self.tokens if t != self.model.eos_id])
        if self.dist.stop:
            hits = [i for s in self.dist.stop if (i := text.find(s)) >= 0]
            if hits:
                text = text[: min(hits)]
        self.value = text
        pot = self.dist.potential
        if self.forced is None and pot is not None and not getattr(pot, "is_lm", False):
            # The twist a finished run leaves (carried until the weight it anticipates) is the
            # potential of its final text: feed stops before the token that ends the run by
            # max_tokens or a stop string, and a stop cuts the text.  An eos adds no text, so
            # the twist of the text so far is already that (one call per finished run at most).
            if end != "eos" or text != self._detok.text:
                self.twist = self._potential(text)

    def fail(self) -> None:
        """Marks a forced run whose path does not end where it should (probability zero)."""
        self.release()
        self.done = True
        self.end = "impossible"
        self.twist = 0.0
        self.log_prob = -math.inf
