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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lmcascade.errors import DuplicateSiteError


@dataclass(frozen=True, slots=True)
class Site:
    """One effect as it happened.

    ``log_prob`` is the site's log-density under the program (the likelihood for an observe,
    the score for a factor, 0 or -inf for a condition, 0 for a call); ``proposal_log_prob`` is
    the log-density of the value under whatever proposed it (sample sites only);
    ``token_ids`` are an LM site's generated tokens (eos included when drawn), with each
    token's log-probability under the site's distribution (``token_log_probs``) and under the
    distribution it was drawn from (``token_proposal_log_probs``) — what a suffix move needs
    to compute its reverse move.
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
            "log_prob": self.log_prob,
        }
        if self.proposal_log_prob is not None:
            out["proposal_log_prob"] = self.proposal_log_prob
        if self.token_ids is not None:
            out["token_ids"] = list(self.token_ids)
        if self.token_log_probs is not None:
            out["token_log_probs"] = [jsonable(x) for x in self.token_log_probs]
        if self.dist is not None and hasattr(self.dist, "params"):
            out["dist"] = self.dist.params()
        return out


class Trace:
    """Ordered sites of one execution, with the running log-weight and the return value.

    ``log_weight`` sums each site's importance weight (``log p - log q`` at samples, the
    log-prob of observes, factors and conditions); ``log_joint`` sums ``log p`` of every
    site but tool calls — the program's joint density of the trace, which MCMC compares.
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
        self._index[site.name] = len(self.sites)
        self.sites.append(site)
        self.log_weight += site.log_weight
        if site.kind != "call":
            self.log_joint += site.log_prob

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
        """Site name -> value, for sample and call sites."""
        return {s.name: s.value for s in self.sites if s.kind in ("sample", "call")}

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
            "log_weight": self.log_weight,
            "value": jsonable(self.value),
        }

    def __repr__(self) -> str:
        return f"Trace({len(self.sites)} sites, log_weight={self.log_weight:.4g})"


def jsonable(value: Any) -> Any:
    """``value`` made JSON-serialisable (tensors to lists, unknown objects to repr)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if hasattr(value, "tolist"):
        return jsonable(value.tolist())
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return repr(value)
