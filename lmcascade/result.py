"""Result: what every inference method returns — weighted traces and what follows from them.

>>> import math
>>> from lmcascade.trace import Trace
>>> def trace(value):
...     t = Trace(); t.value = value; t.done = True; return t
>>> r = Result([trace("a"), trace("b"), trace("a")], [0.0, math.log(3), 0.0], method="demo")
>>> {k: round(p, 6) for k, p in r.distribution().items()}
{'b': 0.6, 'a': 0.4}
>>> r.best(), round(r.ess, 3)
('b', 2.273)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from lmcascade.trace import JSON_DEPTH, Trace, jsonable, safe_repr


def value_key(value: Any) -> Any:
    """A hashable stand-in for ``value`` so that equal values merge: the value itself when it
    is hashable (every NaN is one key), else a :class:`ValueKey` equal exactly for equal
    values of the same types (the list ``[1, 2]`` never merges with the text ``"[1, 2]"``).

    >>> value_key([1, 2]) == value_key([1, 2]) != value_key("[1, 2]")
    True
    """
    if isinstance(value, float) and math.isnan(value):
        return math.nan  # one object, so every NaN result lands on one key
    if not isinstance(value, np.ndarray | torch.Tensor):  # arrays hash by identity, or not at all
        try:
            hash(value)
            return value
        except Exception:
            pass
    try:
        return ValueKey(value, _canonical(value, 0))
    except Exception:  # too deep or unconvertible: a key of its own, merging with nothing
        return ValueKey(value, None)


def _canonical(value: Any, depth: int) -> Any:
    """A hashable form of ``value`` that keeps its types (tags) and ignores dict order."""
    if depth > JSON_DEPTH:
        raise ValueError("too deep to key")
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    if not isinstance(value, np.ndarray | torch.Tensor):
        try:
            hash(value)
            return (type(value).__name__, value)
        except TypeError:
            pass
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(_canonical(v, depth + 1) for v in value))
    if isinstance(value, dict):
        items = frozenset(
            (_canonical(k, depth + 1), _canonical(v, depth + 1)) for k, v in value.items()
        )
        return ("dict", items)
    if isinstance(value, set):
        return ("set", frozenset(_canonical(v, depth + 1) for v in value))
    if hasattr(value, "tolist"):
        return (type(value).__name__, _canonical(value.tolist(), depth + 1))
    raise TypeError(f"cannot key {type(value).__name__}")


class ValueKey:
    """The distribution key of an unhashable value: equal to the key of an equal value (same
    types all the way down), shown as the value itself; ``value`` is the original."""

    __slots__ = ("value", "_canon")

    def __init__(self, value: Any, canonical: Any) -> None:
        self.value, self._canon = value, canonical

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ValueKey):
            return NotImplemented
        if self._canon is None or other._canon is None:
            return self is other
        return self._canon == other._canon

    def __hash__(self) -> int:
        return id(self) if self._canon is None else hash(self._canon)

    def __repr__(self) -> str:
        return safe_repr(self.value)


class Rejected:
    """The type of :data:`REJECTED`: one object, falsy like ``None``, shown as ``REJECTED``."""

    __slots__ = ()
    _instance: Rejected | None = None

    def __new__(cls) -> Rejected:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "REJECTED"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "REJECTED"  # unpickles as the module's one object


REJECTED = Rejected()
"""What :attr:`Result.values` holds for a trace of weight zero (a failed condition, a
constraint that could not be met, a dead particle), so that it differs from a program that
returned ``None``.

>>> REJECTED, REJECTED is Rejected(), bool(REJECTED)
(REJECTED, True, False)
"""


def log_mean_exp(log_weights: Sequence[float] | np.ndarray) -> float:
    """log(mean(exp(w))), stable; ``-inf`` when every weight is zero."""
    lw = np.asarray(log_weights, dtype=np.float64)
    if lw.size == 0 or np.all(lw == -np.inf):
        return -math.inf
    m = lw.max()
    return float(m + np.log(np.mean(np.exp(lw - m))))


def normalise(log_weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """Normalised weights from log-weights (all ``nan`` if every weight is zero)."""
    lw = np.asarray(log_weights, dtype=np.float64)
    if lw.size == 0 or np.all(lw == -np.inf):
        return np.full(lw.shape, np.nan)
    w = np.exp(lw - lw.max())
    return w / w.sum()


def effective_sample_size(log_weights: Sequence[float] | np.ndarray) -> float:
    """(sum w)^2 / sum w^2 — the number of equally weighted samples these are worth."""
    w = normalise(log_weights)
    if np.isnan(w).any():
        return 0.0
    return float(1.0 / np.sum(w**2))


def _short_stat(value: Any) -> str:
    """A stat for the summary line: floats to 4 digits, a list by its length and last item."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        last = f", last {_short_stat(value[-1])}" if value else ""
        return f"[{len(value)} values{last}]"
    return safe_repr(value, 60)


def _idle_counter(key: str, value: Any) -> bool:
    """A counter at zero (no tokens scored, no tool errors), left off the summary line; the
    seed always shows."""
    return key != "seed" and type(value) is int and value == 0


class Result:
    """Weighted traces from one inference run.

    ``values`` are the programs' return values (:data:`REJECTED` for a trace of weight zero,
    which stopped before it returned), ``log_weights`` their unnormalised log-weights and
    ``weights`` the normalised ones (numpy float64).  ``log_evidence`` estimates log Z (``nan``
    where a method does not estimate it).  ``estimator`` says what :meth:`expectation`
    computes: ``"self-normalised"`` (every method but one) or ``"horvitz-thompson"``
    (stochastic beam search, whose ``exp(log_weights)`` are unbiased inverse-inclusion
    weights); :meth:`to_dict` and :meth:`to_json` record it when it is not the default.
    """

    ESTIMATORS = ("self-normalised", "horvitz-thompson")

    def __init__(
        self,
        traces: Sequence[Trace],
        log_weights: Sequence[float],
        *,
        log_evidence: float = math.nan,
        stats: dict | None = None,
        method: str = "",
        options: dict | None = None,
        ess: float | None = None,
        estimator: str = "self-normalised",
    ) -> None:
        if estimator not in self.ESTIMATORS:
            raise ValueError(f"estimator must be one of {self.ESTIMATORS}, got {estimator!r}")
        self.estimator = estimator
        self.traces = list(traces)
        self.log_weights = np.asarray(log_weights, dtype=np.float64)
        self.log_evidence = float(log_evidence)
        self.stats: dict[str, Any] = dict(stats or {})
        self.method = method
        self.options = dict(options or {})
        self.genealogy: list[list[int]] = []  # ancestor indices per resampling (SMC)
        self._ess = ess

    @property
    def values(self) -> list:
        """Each trace's return value, in the order of ``traces``; :data:`REJECTED` where the
        trace has weight zero.

        >>> from lmcascade.trace import Trace
        >>> t = Trace(); t.done = True  # returned None
        >>> Result([t, Trace()], [0.0, -math.inf]).values
        [None, REJECTED]
        """
        return [
            REJECTED if lw == -math.inf else t.value
            for t, lw in zip(self.traces, self.log_weights, strict=True)
        ]

    @property
    def num_rejected(self) -> int:
        """How many traces have weight zero (their ``values`` are :data:`REJECTED`)."""
        return int(np.sum(self.log_weights == -np.inf))

    @property
    def weights(self) -> np.ndarray:
        return normalise(self.log_weights)

    @property
    def ess(self) -> float:
        """The effective sample size of the weights; for SMC whose last step resampled the
        finished population, the ESS before that resample (the copies it made are not new
        samples)."""
        return effective_sample_size(self.log_weights) if self._ess is None else self._ess

    def __len__(self) -> int:
        return len(self.traces)

    def distribution(self) -> dict:
        """Value -> probability, equal values merged, most probable first.  A value that
        cannot be a dict key (a list, a dict, an array) is keyed by a :class:`ValueKey`,
        which prints as the value and holds it in ``.value``."""
        totals: dict[Any, list] = {}
        for trace, w in zip(self.traces, self.weights, strict=True):
            if not w > 0:
                continue
            key = value_key(trace.value)
            if key in totals:
                totals[key][1] += float(w)
            else:
                totals[key] = [trace.value, float(w)]
        total = math.fsum(p for _, p in totals.values())
        ranked = sorted(totals.values(), key=lambda vw: -vw[1])
        return {value_key(v): p / total for v, p in ranked}

    def expectation(self, f: Callable[[Any], Any]) -> Any:
        """The estimate of an expectation of ``f(value)`` from the weighted traces (traces of
        weight zero left out, so ``f`` never sees :data:`REJECTED`).

        For most methods it is self-normalised, ``sum_i weights[i] * f(value_i)``: the
        posterior expectation (exact for enumeration, consistent for sampling methods).  For
        stochastic beam search (``estimator == "horvitz-thompson"``) it is
        ``sum_i exp(log_weights[i]) * f(value_i)``, each kept trace's proposal probability
        times its importance weight over its inclusion probability: unbiased for
        ``sum_y gamma(y) f(y) = Z * E_posterior[f]``, ``gamma`` the program's unnormalised
        target and ``Z`` its evidence (``exp(log_evidence)`` estimates it; divide by it for a
        consistent posterior estimate).  That is ``E_p[f]`` only where every importance
        weight is 1: no observes, factors, conditions or constraints, and ``alpha = 1`` at
        every site.  When every trace has weight zero it is 0 (an estimate, not a failure).
        ``f`` may return a number, a bool or an array.

        >>> import math
        >>> from lmcascade.trace import Trace
        >>> def trace(value):
        ...     t = Trace(); t.value = value; t.done = True; return t
        >>> r = Result([trace(1), trace(3)], [0.0, math.log(3)])
        >>> float(r.expectation(lambda v: v))
        2.5
        >>> ht = Result([trace(1), trace(3)], [math.log(0.5), math.log(0.2)],
        ...             estimator="horvitz-thompson")
        >>> round(float(ht.expectation(lambda v: v)), 6)
        1.1
        """
        if self.estimator == "horvitz-thompson":
            scale = np.exp(self.log_weights)
        else:
            scale = self.weights
        total: Any = 0.0
        for trace, w, lw in zip(self.traces, scale, self.log_weights, strict=True):
            if lw == -math.inf or not w > 0:
                continue
            total = total + float(w) * np.asarray(f(trace.value), dtype=np.float64)
        return float(total) if np.ndim(total) == 0 else total

    def best(self) -> Any:
        """The most probable value (by merged weight), as the program returned it."""
        dist = self.distribution()
        if not dist:
            return None
        key = next(iter(dist))
        return key.value if isinstance(key, ValueKey) else key

    def sample(self, n: int, seed: int | None = None) -> list:
        """``n`` values drawn with replacement in proportion to their weights."""
        w = self.weights
        if np.isnan(w).any():
            return []
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(self.traces), size=n, p=w)
        return [self.traces[i].value for i in idx]

    def summary(self, top: int = 10) -> str:
        """A readable table: the most probable values, evidence and ESS, then the stats on one
        line (lists by their length and last item, counters at zero left off; all of them are
        in ``stats``)."""
        rejected = self.num_rejected
        head = f"lmcascade result — method {self.method!r}, {len(self.traces)} traces"
        lines = [head + (f" ({rejected} rejected: weight zero)" if rejected else "")]
        dist = self.distribution()
        shown = [(safe_repr(v, 1000), p) for v, p in list(dist.items())[:top]]
        width = min(60, max((len(text) for text, _ in shown), default=5))
        lines.append(f"  {'value':<{width}}  probability")
        for text, p in shown:
            if len(text) > width:
                text = text[: width - 3] + "..."
            lines.append(f"  {text:<{width}}  {p:.4f}")
        if len(dist) > top:
            lines.append(f"  ... {len(dist) - top} more values")
        lines.append(f"  log evidence: {self.log_evidence:.6g}    ESS: {self.ess:.2f}")
        stats = ", ".join(
            f"{k}={_short_stat(v)}" for k, v in self.stats.items() if not _idle_counter(k, v)
        )
        lines.append(f"  stats: {stats}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The result as plain data (what :meth:`to_json` writes).

        >>> from lmcascade.trace import Trace
        >>> t = Trace(); t.value = "a"; t.done = True
        >>> d = Result([t], [0.5], estimator="horvitz-thompson").to_dict()
        >>> d["estimator"], d["traces"][0]["log_weight"], d["traces"][0]["result_log_weight"]
        ('horvitz-thompson', 0.0, 0.5)
        >>> "estimator" in Result([t], [0.5]).to_dict()  # the default is left out
        False
        """
        out: dict[str, Any] = {
            "method": self.method,
            "options": jsonable(self.options),
            "log_evidence": jsonable(self.log_evidence),
            "ess": jsonable(self.ess),
        }
        if self.estimator != "self-normalised":
            out["estimator"] = self.estimator
        out["distribution"] = [
            {"value": jsonable(v.value if isinstance(v, ValueKey) else v), "probability": p}
            for v, p in self.distribution().items()
        ]
        out["traces"] = [
            {
                **t.to_dict(),
                "result_log_weight": jsonable(float(lw)),
                "weight": jsonable(float(w)),
                "rejected": bool(lw == -math.inf),
            }
            for t, w, lw in zip(self.traces, self.weights, self.log_weights, strict=True)
        ]
        out["stats"] = jsonable(self.stats)
        return out

    def to_json(self, indent: int | None = 2) -> str:
        """The full result as strict JSON (values, weights, traces, stats).

        Each trace has its own ``"log_weight"`` (the sum over its sites: what the program gave
        it) and ``"result_log_weight"``, ``log_weights[i]``: what the method gave it, the
        unnormalised weight that ``"weight"`` normalises (the two differ for beam search's
        length-penalised scores and stochastic beam's Horvitz-Thompson weights).
        ``"estimator"`` says what :meth:`expectation` computes when it is not the default
        ``"self-normalised"`` (stochastic beam: ``"horvitz-thompson"``).  Each trace says
        whether it was ``"rejected"`` (weight zero; its ``"value"`` is then ``null``, as it
        never returned).  Numbers that JSON cannot hold are strings: a zero-weight trace's
        log-weight is ``"-inf"``, an estimate a method does not make is ``"nan"``
        (``float(s)`` reads either back); values nested too deep are written as their
        ``repr``."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def __repr__(self) -> str:
        return (
            f"Result(method={self.method!r}, traces={len(self.traces)}, "
            f"log_evidence={self.log_evidence:.4g}, ess={self.ess:.3g})"
        )
