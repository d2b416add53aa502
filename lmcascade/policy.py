"""How a site gets its value: from the prior (:class:`Policy`) or from a recorded trace,
rescored under the program's current distributions (:func:`rescore`).

Every new site a particle reaches goes through one of them.  A policy returns a finished
:class:`~lmcascade.trace.Site`, a :class:`~lmcascade.requests.Pending` request for model work,
or a list of sites — alternatives, each continuing in its own particle (exact enumeration).

**Replay that rescores.**  A particle may carry a trace to take values from by site name
(importance sampling's proposal trace; an MCMC move's edited trace).  Such a value is kept
and scored under the distribution the program gives its site *now*: if an upstream change
altered that distribution (a new prompt, say), the site gets its new log-probability — or
``-inf`` when the value is impossible there, never an exception.  The value keeps the density
it was drawn from as its proposal density.

>>> import lmcascade as lc
>>> from pyro.distributions import Bernoulli
>>> site = rescore(lc.sample("x", Bernoulli(0.25)), "x",
...                lc.trace.Site("x", "sample", 1.0, -0.1, -0.1))
>>> round(site.log_prob, 4), site.proposal_log_prob
(-1.3863, -0.1)
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from typing import Any

from lmcascade.distributions import draw_value, is_lm, score
from lmcascade.errors import SiteError, TokenizationError
from lmcascade.program import Call, Condition, Effect, Factor, Observe, Score
from lmcascade.requests import Pending, continuation_score, generation, path_score, text_score
from lmcascade.trace import Site, safe_repr

ON_TOOL_ERROR: ContextVar[str] = ContextVar("lmcascade_on_tool_error", default="zero")
"""What a tool call that raises does: ``"zero"`` gives its trace weight zero (the run goes
on), ``"raise"`` stops the run with the error.  ``lc.infer`` sets it from its option.

>>> import lmcascade as lc
>>> site = Policy().call(lc.call("n", int, "four"), "n")
>>> site.log_prob, type(site.error).__name__
(-inf, 'ValueError')
>>> token = ON_TOOL_ERROR.set("raise")
>>> Policy().call(lc.call("n", int, "four"), "n")
Traceback (most recent call last):
...
ValueError: invalid literal for int() with base 10: 'four'
>>> ON_TOOL_ERROR.reset(token)
"""

TOOL_ERROR_MODES = ("zero", "raise")


class Policy:
    """How new sites are resolved.  This base class samples from the prior.

    Subclasses override :meth:`sample` (or others) to propose from elsewhere.
    """

    def resolve(self, eff: Effect, name: str) -> Site | Pending | list[Site]:
        if isinstance(eff, Factor):
            return self.factor(eff, name)
        if isinstance(eff, Condition):
            try:
                ok = bool(eff.ok)
            except (RuntimeError, TypeError, ValueError) as err:
                raise SiteError(
                    f"site {name!r}: condition needs a true/false value, got "
                    f"{safe_repr(eff.ok, 200)} ({err})"
                ) from None
            return Site(name, "condition", ok, 0.0 if ok else -math.inf)
        if isinstance(eff, Call):
            return self.call(eff, name)
        if isinstance(eff, Score):
            return self.score(eff, name)
        if isinstance(eff, Observe):
            return self.observe(eff, name)
        return self.sample(eff, name)

    def replay(self, eff: Effect, name: str, recorded: Site) -> Site | Pending | None:
        """The site ``eff`` gets from the replayed trace's site of the same name
        (:func:`rescore` here); None resolves it anew (:meth:`resolve`)."""
        return rescore(eff, name, recorded)

    def sample(self, eff: Any, name: str) -> Site | Pending | list[Site]:
        dist = eff.dist
        if is_lm(dist):
            return generation(name, dist)
        try:
            value, lp = draw_value(dist)
        except (RuntimeError, ValueError, NotImplementedError) as err:
            raise SiteError(
                f"site {name!r}: sampling {safe_repr(dist, 200)} failed: {err}"
            ) from err
        return Site(name, "sample", value, lp, lp, dist=dist)

    def observe(self, eff: Observe, name: str) -> Site | Pending:
        if is_lm(eff.dist):
            if not isinstance(eff.value, str):
                raise SiteError(
                    f"site {name!r}: observing an LM needs a string value, got "
                    f"{type(eff.value).__name__}"
                )
            return text_score(name, "observe", eff.dist, eff.value)
        try:
            lp = score(eff.dist, eff.value)
        except (RuntimeError, ValueError, TypeError, OverflowError) as err:
            raise SiteError(
                f"site {name!r}: cannot score value {safe_repr(eff.value, 200)} under "
                f"{safe_repr(eff.dist, 200)}: {err}"
            ) from err
        return Site(name, "observe", eff.value, lp, dist=eff.dist)

    def factor(self, eff: Factor, name: str) -> Site:
        try:
            if isinstance(eff.log_weight, str | bytes):
                raise TypeError("text is not a number")
            lw = float(eff.log_weight)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise SiteError(
                f"site {name!r}: factor needs a number (a log-weight) that a float can hold, "
                f"got {safe_repr(eff.log_weight, 200)}"
            ) from None
        if math.isnan(lw) or lw == math.inf:
            raise SiteError(f"site {name!r}: factor log-weight is {lw}; it must be finite or -inf")
        return Site(name, "factor", lw, lw)

    def call(self, eff: Call, name: str) -> Site:
        """Runs the tool.  One that raises (``Exception``; a ``TimeoutError`` from
        :func:`lmcascade.toolcall.tool` included) gives a site of weight zero holding the
        error — or, with :data:`ON_TOOL_ERROR` set to ``"raise"``, propagates with a note
        naming the site."""
        try:
            result = eff.fn(*eff.args, **eff.kwargs)
        except Exception as err:
            mode = ON_TOOL_ERROR.get()
            if mode not in TOOL_ERROR_MODES:
                raise SiteError(
                    f"site {name!r}: on_tool_error must be one of {', '.join(TOOL_ERROR_MODES)}, "
                    f"got {safe_repr(mode, 60)}"
                ) from err
            if mode == "raise":
                err.add_note(f"raised in lmcascade call site {name!r}")
                raise
            return Site(name, "call", None, -math.inf, error=err.with_traceback(None))
        return Site(name, "call", result)

    def score(self, eff: Score, name: str) -> Site | Pending:
        """A continuation score: model work, batched with the other particles'."""
        return continuation_score(name, eff.model, eff.prompt, eff.text)


def rescore(eff: Effect, name: str, recorded: Site) -> Site | Pending | None:
    """The site ``eff`` gets from a recorded one of the same name, scored under ``eff``'s
    distribution; None when the record does not apply: a site of another kind, or one that is
    recomputed from the program (observe, factor, condition, and tool calls, whose arguments
    may have changed)."""
    if recorded.kind != "sample" or eff.kind != "sample":
        return None
    dist, value = eff.dist, recorded.value  # type: ignore[attr-defined]
    q = recorded.log_prob if recorded.proposal_log_prob is None else recorded.proposal_log_prob
    if recorded.log_prob == -math.inf:  # the recorded value was itself impossible
        return Site(name, "sample", value, -math.inf, 0.0, recorded.token_ids, dist)
    if not is_lm(dist):
        if isinstance(value, str):
            raise SiteError(f"the replayed value {value!r} is text, but {dist!r} is not an LM")
        try:
            p = score(dist, value)
        except (RuntimeError, ValueError, TypeError):
            p = -math.inf  # outside the support of the new distribution
        return Site(name, "sample", value, p if not math.isnan(p) else -math.inf, q, dist=dist)
    if not isinstance(value, str):
        raise SiteError(
            f"the replayed value {value!r} ({type(value).__name__}) is not text, but the site "
            "is an LM site"
        )
    if (
        recorded.token_ids is not None
        and is_lm(recorded.dist)
        and same_vocabulary(recorded.dist.model, dist.model)
    ):
        return path_score(name, dist, value, recorded.token_ids, q)
    try:
        return text_score(name, "sample", dist, value, q)
    except TokenizationError:
        return Site(name, "sample", value, -math.inf, q, dist=dist)  # not a text it can make


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two models share a vocabulary (so a token path means the same in both).

    Tokens with text must have the same bytes; a special token may have no text in one
    model and its marker's text in the other (llama.cpp and transformers read the same GGUF's
    control tokens differently).
    """
    if a is b:
        return True
    if a.vocab_size != b.vocab_size or a.eos_id != b.eos_id:
        return False
    return all(
        x == y or x is None or y is None
        for x, y in zip(a.token_bytes(), b.token_bytes(), strict=True)
    )
