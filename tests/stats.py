"""Statistical helpers for tests: goodness-of-fit tests whose error rates are stated.

The main tool is a chi-square goodness-of-fit test of **independent** draws against an exact
(enumerated) distribution.  Inference methods do not give independent draws directly: an SMC
or importance population is correlated (and an ESS is not an i.i.d. sample size), so the tests
turn populations into i.i.d. draws first:

- :func:`one_draw_per_run` -- R runs with different seeds, one value drawn from each run's
  weighted population (for SMC: one index by the final weights).  The R draws are i.i.d. from
  the method's sampling distribution ``q_N(x) = E[sum_i w_i 1{x_i = x}]``, which for a correct
  method differs from the posterior only by its finite-population bias (O(1/N) for SMC and
  self-normalised importance sampling).
- :func:`accepted_by_weight` -- an i.i.d. weighted population (forward / importance sampling)
  thinned by rejection: keep sample i with probability ``w_i / M`` for a known bound ``M`` on
  the weights.  If the samples and weights are right, the kept values are exact, i.i.d.
  posterior draws (no finite-population bias at all).

:func:`chi2_gof` then tests the draws: Pearson's statistic over cells expected to hold at least
5 draws (smaller outcomes are pooled; the pooling depends only on the exact distribution and
the number of draws, never on the data).

False-alarm rate.  At these sizes Pearson's statistic has a heavier tail than chi-square: at
the nominal chi-square 1e-3 quantile a correct sampler is rejected 1.2e-3 to 1.5e-3 of the time
(simulated).  The test therefore rejects above the chi-square quantile at ``ALPHA / 2``; one-off
simulations (10^6 correct samplers -- multinomial draws from the exact distribution -- for each
distribution and size the suite uses: the four SMC programs at 300 draws, chained_soft at 600
and 3000, hard_condition at 1000 and 3000, observe_bernoulli at 1400) gave false-alarm rates
of 6.2e-4 to 8.1e-4, all below ``ALPHA = 1e-3`` (Monte Carlo standard error 3e-5).
``test_more_cases.test_chi2_false_alarm_rate_and_power`` repeats this with fewer simulations
in the suite (:func:`false_alarm_rate`).

Power.  With ``df`` (cells - 1) and ``n`` draws the statistic is approximately noncentral
chi-square with noncentrality ``n * chi2(q || p)`` on the cells, so the test detects, with
probability ``power`` (0.9), any sampling distribution ``q`` whose chi-square divergence from
``p`` exceeds :func:`detectable_divergence`; since ``chi2(q||p) >= 4 TV(q,p)^2``, that includes
every ``q`` whose total-variation distance from ``p`` on the cells exceeds
:func:`detectable_tv`.  For 300 draws and 5-21 degrees of freedom (the SMC tests) that is a
divergence of 0.10-0.16, i.e. a TV distance of 0.16-0.20; for 3000 draws, about 0.06.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

ALPHA = 1e-3  # the false-alarm rate of every distribution test in the suite
MIN_EXPECTED = 5.0  # cells expected to hold fewer draws are merged


def tv_distance(p: dict, q: dict) -> float:
    """Total-variation distance between two distributions given as value -> probability."""
    keys = set(p) | set(q)
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in keys)


def tv_bound(n: float, k: int, delta: float = 1e-3) -> float:
    """A (1 - delta) bound on the TV distance between the empirical distribution of ``n``
    **independent** draws and the truth over ``k`` outcomes (Bretagnolle-Huber-Carol:
    P(TV > eps) <= 2^k exp(-2 n eps^2)).

    Valid only for i.i.d. draws (rejection sampling's accepted samples, :func:`one_draw_per_run`
    or :func:`accepted_by_weight`); an ESS of a weighted or resampled population is not an
    i.i.d. sample size and must not be plugged in here.
    """
    return math.sqrt((k * math.log(2) + math.log(1 / delta)) / (2 * n))


# --- chi-square distribution functions -----------------------------------------------------


def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for X ~ chi-square with ``df`` degrees of freedom."""
    if x <= 0:
        return 1.0
    a = torch.tensor(df / 2.0, dtype=torch.float64)
    return float(torch.special.gammaincc(a, torch.tensor(x / 2.0, dtype=torch.float64)))


def chi2_critical(df: int, alpha: float = ALPHA) -> float:
    """The ``1 - alpha`` quantile of chi-square(``df``) (bisection on :func:`chi2_sf`)."""
    lo, hi = 0.0, df + 10.0 * math.sqrt(2 * df) + 60.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if chi2_sf(mid, df) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def ncx2_sf(x: float, df: int, nc: float) -> float:
    """P(X > x) for X ~ noncentral chi-square(``df``, noncentrality ``nc``): a Poisson mixture
    of central chi-squares with ``df + 2j`` degrees of freedom."""
    half = nc / 2.0
    top = int(half + 12 * math.sqrt(half + 1) + 30)
    j = torch.arange(top, dtype=torch.float64)
    log_pois = -half + j * math.log(half) - torch.lgamma(j + 1) if half > 0 else None
    a = df / 2.0 + j
    tails = torch.special.gammaincc(a, torch.tensor(x / 2.0, dtype=torch.float64))
    if log_pois is None:
        return float(tails[0])
    return float(torch.sum(torch.exp(log_pois) * tails))


def critical_value(df: int, alpha: float = ALPHA) -> float:
    """Where :func:`chi2_gof` rejects: the chi-square quantile at ``alpha / 2``, which keeps
    the simulated false-alarm rate of Pearson's statistic below ``alpha`` (module docstring)."""
    return chi2_critical(df, alpha / 2)


def detectable_divergence(df: int, n: int, alpha: float = ALPHA, power: float = 0.9) -> float:
    """The chi-square divergence ``chi2(q || p)`` (on the merged cells) that :func:`chi2_gof`
    with ``n`` draws and ``df`` degrees of freedom detects with probability ``power``."""
    crit = critical_value(df, alpha)
    lo, hi = 0.0, 10.0 * (crit + 10.0)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if ncx2_sf(crit, df, mid) < power:
            lo = mid
        else:
            hi = mid
    return hi / n


def detectable_tv(df: int, n: int, alpha: float = ALPHA, power: float = 0.9) -> float:
    """A total-variation distance (on the merged cells) detected with probability ``power``:
    every ``q`` at least this far from ``p`` has ``chi2(q||p) >= 4 TV^2 >=``
    :func:`detectable_divergence`."""
    return math.sqrt(detectable_divergence(df, n, alpha, power)) / 2.0


# --- the test ------------------------------------------------------------------------------


def merge_cells(probs: dict, n: int, min_expected: float = MIN_EXPECTED) -> list[list]:
    """Groups the outcomes of ``probs`` into cells expected to hold at least ``min_expected``
    of ``n`` draws: large outcomes alone, the small ones pooled into one cell (which is merged
    with the smallest kept cell if it is still too small).  Depends only on ``probs`` and ``n``."""
    ranked = sorted((k for k in probs if probs[k] > 0), key=lambda k: -probs[k])
    cells = [[k] for k in ranked if n * probs[k] >= min_expected]
    rest = [k for k in ranked if n * probs[k] < min_expected]
    if rest:
        cells.append(rest)
    while len(cells) > 1 and n * sum(probs[k] for k in cells[-1]) < min_expected:
        last = cells.pop()
        cells[-1] = cells[-1] + last
    return cells


@dataclass
class GofResult:
    """What :func:`chi2_gof` found: the statistic, its degrees of freedom and p-value,
    the draws outside the support of ``probs``, and the test's detectable errors."""

    statistic: float
    df: int
    p_value: float  # chi-square approximation, for reading only
    critical: float
    n: int
    impossible: list
    detectable_tv: float
    detectable_divergence: float

    def passed(self) -> bool:
        return not self.impossible and self.statistic < self.critical

    def __str__(self) -> str:
        return (
            f"chi2={self.statistic:.2f} (reject above {self.critical:.2f}) df={self.df} "
            f"p~{self.p_value:.3g} n={self.n} impossible={self.impossible[:3]} "
            f"(detects TV >= {self.detectable_tv:.3f})"
        )


def chi2_gof(draws: Sequence[Hashable], probs: dict, alpha: float = ALPHA) -> GofResult:
    """Pearson's chi-square test of i.i.d. ``draws`` against the exact distribution ``probs``.

    False-alarm rate at most ``alpha`` (verified by simulation, :func:`false_alarm_rate`); a
    draw outside the support of ``probs`` fails the test outright.  See the module docstring
    for the power (the detectable errors are in the result).
    """
    n = len(draws)
    counts = Counter(draws)
    impossible = [v for v in counts if probs.get(v, 0.0) <= 0.0]
    cells = merge_cells(probs, n)
    observed = np.array([sum(counts[k] for k in cell) for cell in cells], dtype=np.float64)
    expected = np.array([n * sum(probs[k] for k in cell) for cell in cells])
    expected *= n / expected.sum()  # probs may sum to 1 only up to rounding
    stat = float(np.sum((observed - expected) ** 2 / expected))
    df = max(len(cells) - 1, 1)
    return GofResult(
        statistic=stat,
        df=df,
        p_value=chi2_sf(stat, df),
        critical=critical_value(df, alpha),
        n=n,
        impossible=impossible,
        detectable_tv=detectable_tv(df, n, alpha),
        detectable_divergence=detectable_divergence(df, n, alpha),
    )


def assert_matches(draws: Sequence[Hashable], probs: dict, alpha: float = ALPHA) -> GofResult:
    """Fails (false-alarm rate ``alpha``) unless i.i.d. ``draws`` fit ``probs``."""
    result = chi2_gof(draws, probs, alpha)
    assert result.passed(), str(result)
    return result


def false_alarm_rate(
    probs: dict, n: int, sims: int = 100_000, alpha: float = ALPHA, seed: int = 0
) -> float:
    """The fraction of ``sims`` simulated correct samplers (``n`` i.i.d. draws from ``probs``
    itself) that :func:`chi2_gof` rejects at level ``alpha``: its false-alarm rate (impossible
    values cannot occur, so only the statistic matters)."""
    cells = merge_cells(probs, n)
    p = np.array([sum(probs[k] for k in cell) for cell in cells])
    p /= p.sum()
    rng = np.random.default_rng(seed)
    df = max(len(cells) - 1, 1)
    crit = critical_value(df, alpha)
    rejected = 0
    for start in range(0, sims, 20_000):
        counts = rng.multinomial(n, p, size=min(20_000, sims - start))
        stats = np.sum((counts - n * p) ** 2 / (n * p), axis=1)
        rejected += int(np.sum(stats >= crit))
    return rejected / sims


# --- turning populations into i.i.d. draws --------------------------------------------------


def one_draw_per_run(results: Iterable, seed: int = 0) -> list:
    """One value from each result, drawn by its normalised weights: i.i.d. across results
    (runs with different seeds) from the method's sampling distribution."""
    rng = np.random.default_rng(seed)
    draws = []
    for r in results:
        w = np.asarray(r.weights, dtype=np.float64)
        draws.append(r.traces[int(rng.choice(len(w), p=w / w.sum()))].value)
    return draws


def accepted_by_weight(result, log_bound: float, seed: int = 0) -> list:
    """Values of an i.i.d. weighted population (forward or importance sampling) kept with
    probability ``exp(log_w - log_bound)``: exact i.i.d. posterior draws when the samples and
    weights are right.  ``log_bound`` must bound every log-weight (checked)."""
    lw = np.asarray(result.log_weights, dtype=np.float64)
    assert np.all(lw <= log_bound + 1e-9), (lw.max(), log_bound)
    keep = np.random.default_rng(seed).random(len(lw)) < np.exp(lw - log_bound)
    return [t.value for t, k in zip(result.traces, keep, strict=True) if k]


# --- evidence ------------------------------------------------------------------------------


def evidence_check(estimates: Sequence[float], z: float, max_detectable: float) -> float:
    """Checks that the mean of unbiased evidence estimates ``estimates`` (one per seed) is
    within 3 standard errors of the exact ``z``, and returns the relative bias this detects
    with probability about 0.9: ``(3 + 1.28) * se / z``.  That number must be at most
    ``max_detectable`` (the figure a test states), so a test cannot silently lose power."""
    est = np.asarray(estimates, dtype=np.float64)
    se = float(est.std(ddof=1) / math.sqrt(len(est)))
    detectable = (3 + 1.28) * se / z
    assert detectable <= max_detectable, f"only detects relative bias {detectable:.3f}"
    assert abs(est.mean() - z) < 3 * se + 1e-12 * z, (est.mean(), z, se)
    return detectable


def assert_same_exact(a, b, tol: float = 1e-9) -> None:
    """Two exact (enumerated) results agree: evidence, support and every probability."""
    assert abs(a.log_evidence - b.log_evidence) <= tol, (a.log_evidence, b.log_evidence)
    da, db = a.distribution(), b.distribution()
    assert set(da) == set(db), set(da) ^ set(db)
    for k in db:
        assert abs(da[k] - db[k]) <= tol, (k, da[k], db[k])
