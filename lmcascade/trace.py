"""Traces: the complete, copyable record of one execution of a program.

A particle *is* its trace.  Sites are immutable, so copying a trace copies a list of
references, never model state; a copied trace resumes by replay (see :mod:`lmcascade.engine`).

>>> t = Trace()
>>> t.add(Site("x", "sample", 1, log_prob=-0.7, proposal_log_prob=-0.7))
>>> t.add(Site("ok", "condition", True, log_prob=0.0))
>>> t["x"].value, t.log_weight, [s.name for s in t]
(1, 0.0, ['x', 'ok'])
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lmcascade.errors import DuplicateSiteError, SiteError


@dataclass(frozen=True, slots=True)
class Site:
    """One effect as it happened.

    ``log_prob`` is the site's log-density under the program (the likelihood for an observe,
    the score for a factor, 0 or -inf for a condition, 0 for a call); ``proposal_log_prob`` is
    the log-density of the value under whatever proposed it (sample sites only);
    ``token_ids`` are an LM site's generated tokens (eos included when drawn), with each
    token's log-probability under the site's distribution (``token_log_probs``) and under the
    distribution it was drawn from (``token_proposal_log_probs``) — what a suffix move needs
    to compute its reverse move.  ``token_model_log_probs`` are the same tokens'
    log-probabilities under the model itself (before temperature, top-k, top-p, ``min_tokens``
    and constraints): what a program asking for ``details=True`` reads as its confidence.
    ``finish_reason`` says how an LM generation ended (``"eos"``, ``"stop"``,
    ``"max_tokens"``).  ``error`` is the exception a tool call raised (or the
    ``TimeoutError`` of one that took too long): such a call site has ``log_prob`` ``-inf``
    and ends its trace.
    """

    name: str
    kind: str
    value: Any
    log_prob: float = 0.0
    proposal_log_prob: float | None = None
    token_ids: tuple[int, ...] | None = None
    dist: Any = None
    token_log_probs: tuple[float, ...] | None = None
    token_proposal_log_probs: tuple[float, ...] | None = None
    token_model_log_probs: tuple[float, ...] | None = None
    finish_reason: str | None = None
    error: BaseException | None = None

    @property
    def log_weight(self) -> float:
        """This site's contribution to the trace's importance log-weight."""
        if self.kind != "sample":
            return self.log_prob
        if self.log_prob == -math.inf or self.proposal_log_prob is None:
            return self.log_prob if self.log_prob == -math.inf else 0.0
        return self.log_prob - self.proposal_log_prob

    def to_dict(self) -> dict:
        """A JSON-friendly view (the distribution is summarised by its parameters)."""
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "value": jsonable(self.value),
            "log_prob": jsonable(self.log_prob),
        }
        if self.proposal_log_prob is not None:
            out["proposal_log_prob"] = jsonable(self.proposal_log_prob)
        if self.token_ids is not None:
            out["token_ids"] = list(self.token_ids)
        if self.token_log_probs is not None:
            out["token_log_probs"] = [jsonable(x) for x in self.token_log_probs]
        if self.token_model_log_probs is not None:
            out["token_model_log_probs"] = [jsonable(x) for x in self.token_model_log_probs]
        if self.finish_reason is not None:
            out["finish_reason"] = self.finish_reason
        if self.dist is not None and hasattr(self.dist, "params"):
            out["dist"] = jsonable(self.dist.params())
        if self.error is not None:
            out["error"] = error_text(self.error)
        return out


VALUE_KINDS = ("sample", "call", "score")
"""The site kinds whose value is sent back to the program."""


def error_text(err: BaseException) -> str:
    """A one-line description of an exception: its type and message.

    >>> error_text(ValueError("invalid literal for int() with base 10: ''"))
    "ValueError: invalid literal for int() with base 10: ''"
    """
    message = safe_str(err)
    name = type(err).__name__
    return f"{name}: {message}" if message else name


class Trace:
    """Ordered sites of one execution, with the running log-weight and the return value.

    ``log_weight`` sums each site's importance weight (``log p - log q`` at samples, the
    log-prob of observes, factors and conditions, ``-inf`` for a failed tool call);
    ``log_joint`` sums ``log p`` of every site (tool calls and scores add 0, a failed call
    ``-inf``) — the program's joint density of the trace, which MCMC compares.
    """

    __slots__ = ("sites", "_index", "log_weight", "log_joint", "value", "done")

    def __init__(self) -> None:
        self.sites: list[Site] = []
        self._index: dict[str, int] = {}
        self.log_weight = 0.0
        self.log_joint = 0.0
        self.value: Any = None
        self.done = False

    def add(self, site: Site) -> None:
        """Appends ``site``; a name already in the trace is a :class:`DuplicateSiteError`."""
        if site.name in self._index:
            base = site.name.rsplit("/", 1)[-1]
            raise DuplicateSiteError(
                f"site {site.name!r} appears twice in one execution; site names must be unique. "
                f'In a loop, use f"{base}{{i}}" or the auto-index form "{base}[]"; to call a '
                'sub-program twice, give each call a scope: with lc.scope("first"): ...'
            )
        weight = self.log_weight + site.log_weight
        joint = self.log_joint + site.log_prob  # 0 at a call or score; -inf at a failed call
        if not (weight < math.inf and joint < math.inf):  # NaN or +inf
            raise SiteError(_non_finite(site, self.log_weight))
        self._index[site.name] = len(self.sites)
        self.sites.append(site)
        self.log_weight, self.log_joint = weight, joint

    def __getitem__(self, name: str) -> Site:
        try:
            return self.sites[self._index[name]]
        except KeyError:
            raise KeyError(f"no site {name!r} in this trace; sites: {list(self._index)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    @property
    def names(self) -> list[str]:
        return list(self._index)

    def values(self) -> dict[str, Any]:
        """Site name -> value, for the sites whose value the program receives (sample, call,
        score)."""
        return {s.name: s.value for s in self.sites if s.kind in VALUE_KINDS}

    def copy(self) -> Trace:
        """A shallow copy: shares the immutable sites, holds no model state."""
        new = Trace.__new__(Trace)
        new.sites = list(self.sites)
        new._index = dict(self._index)
        new.log_weight = self.log_weight
        new.log_joint = self.log_joint
        new.value = self.value
        new.done = self.done
        return new

    def prefix(self, n: int) -> Trace:
        """A new trace holding the first ``n`` sites (for resuming part-way)."""
        new = Trace()
        for site in self.sites[:n]:
            new.add(site)
        return new

    def to_dict(self) -> dict:
        return {
            "sites": [s.to_dict() for s in self.sites],
            "log_weight": jsonable(self.log_weight),
            "value": jsonable(self.value),
        }

    def __repr__(self) -> str:
        return f"Trace({len(self.sites)} sites, log_weight={self.log_weight:.4g})"


def _non_finite(site: Site, before: float) -> str:
    """Why adding ``site`` would give a trace a NaN or infinite weight."""
    what = f"site {site.name!r} ({site.kind})"
    if math.isnan(site.log_prob) or site.log_prob == math.inf:
        return (
            f"{what} has log-probability {site.log_prob}; a site's log-density must be finite "
            "or -inf (check the distribution's parameters and the observed value)"
        )
    if site.proposal_log_prob is not None and not math.isfinite(site.proposal_log_prob):
        return (
            f"{what}: its value was proposed with log-probability {site.proposal_log_prob}, "
            "which makes its importance weight undefined"
        )
    return (
        f"{what} adds {site.log_weight:.6g} to a log-weight of {before:.6g}, which overflows "
        "to infinity; keep factors and log-densities within a few thousand"
    )


JSON_DEPTH = 100


def jsonable(value: Any, _depth: int = 0) -> Any:
    """``value`` made JSON-serialisable: tensors to lists, unknown objects to ``repr``, and
    non-finite floats to the strings ``"inf"``, ``"-inf"`` and ``"nan"`` (strict JSON has no
    such numbers; ``float(s)`` reads them back).  Containers nested deeper than
    ``JSON_DEPTH`` are written as their (shortened) ``repr``, so no value is ever lost to
    formatting.

    >>> jsonable([1.5, float("-inf"), (2, "a")])
    [1.5, '-inf', [2, 'a']]
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if value.bit_length() < 4000 else safe_repr(value)  # JSON writes digits
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else repr(float(value))
    if _depth >= JSON_DEPTH:
        return safe_repr(value)
    try:
        if hasattr(value, "tolist"):
            return jsonable(value.tolist(), _depth + 1)
        if isinstance(value, list | tuple):
            return [jsonable(v, _depth + 1) for v in value]
        if isinstance(value, dict):
            return {safe_str(k): jsonable(v, _depth + 1) for k, v in value.items()}
    except Exception:  # a user object that fails on conversion: keep its repr instead
        pass
    return safe_repr(value)


def safe_str(value: Any) -> str:
    """``str(value)`` for a JSON key, or its :func:`safe_repr` when ``str`` fails."""
    if isinstance(value, str):
        return value
    try:
        if isinstance(value, int) and value.bit_length() >= 4000:
            return safe_repr(value)
        return str(value)
    except Exception:
        return safe_repr(value)


def safe_repr(value: Any, limit: int = 100_000) -> str:
    """``repr(value)``, shortened for values too deep or too long to print whole."""
    if isinstance(value, int) and value.bit_length() >= 4000:  # too many digits to print
        sign = "-" if value < 0 else ""
        return f"<int: {sign}2**{abs(value).bit_length() - 1} or more>"
    try:
        text = repr(value)
    except (RecursionError, MemoryError, ValueError):  # ValueError: an int too large to print
        short = reprlib.Repr()
        short.maxlevel, short.maxlist, short.maxstring, short.maxlong = 20, 50, 200, 200
        try:
            text = short.repr(value)
        except Exception as err:
            text = f"<{type(value).__name__} object; repr failed: {type(err).__name__}>"
    except Exception as err:  # a user object whose __repr__ fails
        text = f"<{type(value).__name__} object; repr failed: {type(err).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
