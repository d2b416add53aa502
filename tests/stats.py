"""Statistical helpers for tests: distances and sample-size-derived bounds."""

from __future__ import annotations

import math


def tv_distance(p: dict, q: dict) -> float:
    """Total-variation distance between two distributions given as value -> probability."""
    keys = set(p) | set(q)
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in keys)


def tv_bound(n: float, k: int, delta: float = 1e-3) -> float:
    """A (1 - delta) bound on the TV distance between an empirical distribution of ``n``
    independent samples and the truth over ``k`` outcomes (Bretagnolle-Huber-Carol:
    P(TV > eps) <= 2^k exp(-2 n eps^2))."""
    return math.sqrt((k * math.log(2) + math.log(1 / delta)) / (2 * n))
