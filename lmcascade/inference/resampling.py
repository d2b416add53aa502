"""Resampling schemes: ancestor indices from normalised weights.

Each scheme returns ``N`` indices whose expected offspring counts are ``N * w``: multinomial
(independent draws), stratified (one uniform in each of ``N`` equal strata), systematic (one
uniform shifted across the ``N`` strata) and residual (``floor(N w)`` copies, then multinomial
on the remainders).  Stratified, systematic and residual have lower variance than multinomial.

>>> import numpy as np
>>> w = np.array([0.5, 0.25, 0.25, 0.0])
>>> systematic(w, np.random.default_rng(0)).tolist()
[0, 0, 1, 2]
"""

from __future__ import annotations

import numpy as np

from lmcascade.errors import OptionError


def _cdf(weights: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    cdf[-1] = 1.0
    return cdf


def _locate(weights: np.ndarray, points: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(_cdf(weights), points, side="right")
    return np.minimum(idx, len(weights) - 1)


def multinomial(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``N`` independent draws from the weights."""
    n = len(weights)
    return np.sort(_locate(weights, rng.random(n)))


def stratified(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One uniform in each stratum ``[i/N, (i+1)/N)``."""
    n = len(weights)
    return _locate(weights, (np.arange(n) + rng.random(n)) / n)


def systematic(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One uniform ``u``; points ``(i + u) / N``."""
    n = len(weights)
    return _locate(weights, (np.arange(n) + rng.random()) / n)


def residual(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``floor(N w_i)`` copies of each ``i``, the rest multinomial on the remainders."""
    n = len(weights)
    scaled = n * np.asarray(weights, dtype=np.float64)
    counts = np.floor(scaled).astype(np.int64)
    rest = n - int(counts.sum())
    idx = np.repeat(np.arange(n), counts)
    if rest > 0:
        remainder = scaled - counts
        extra = _locate(remainder, rng.random(rest))
        idx = np.sort(np.concatenate([idx, extra]))
    return idx


SCHEMES = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}


def scheme(name: str):
    """The resampling function called ``name``."""
    if name not in SCHEMES:
        raise OptionError(
            f"method 'smc': unknown resampling {name!r}; choose one of {', '.join(SCHEMES)}"
        )
    return SCHEMES[name]
