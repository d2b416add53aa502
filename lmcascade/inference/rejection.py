"""Rejection sampling: exact posterior samples, accepted in proportion to their weights.

Traces are drawn from the prior (constrained LM sites from their constrained distribution) in
batches, and each is accepted with probability ``exp(w - B)``, where ``w`` is its log-weight
and ``B`` an upper bound on every trace's log-weight.  Accepted traces are exact, independent
posterior samples, so they carry equal weights; ``log_evidence`` is
``log(acceptance rate) + B``.

The bound is known, and ``B = 0``, when every soft weight comes from a site whose weight is a
probability: a constrained LM site (its weight is the log of the probability the constraint
allows, at most 0), an observe of an LM or of a discrete distribution, and conditions (0 or
weight zero).  Such programs need no option.  A factor, or an observe of a continuous density,
has no known bound: with a soft weight there the run stops at once, at that site, asking for
``max_log_weight`` (an upper bound on every trace's log-weight, which then replaces 0).

>>> import lmcascade as lc
>>> from pyro.distributions import Categorical
>>> import torch
>>> @lc.program
... def die():
...     x = yield lc.sample("x", Categorical(torch.ones(6) / 6))
...     yield lc.condition("even", x % 2 == 0)
...     return x + 1
>>> r = lc.infer(die(), method="rejection", num_samples=300, seed=0)
>>> sorted(r.distribution()), 0.4 < r.stats["acceptance_rate"] < 0.6
([1, 3, 5], True)
"""

from __future__ import annotations

import math

import numpy as np

from lmcascade.distributions import is_lm
from lmcascade.engine import Engine, Particle
from lmcascade.errors import (
    InferenceError,
    LMCascadeError,
    NothingAcceptedError,
    OptionError,
)
from lmcascade.inference.base import (
    DRAFT_OPTIONS,
    InferenceMethod,
    register,
    zero_weight_error,
)
from lmcascade.policy import Policy
from lmcascade.program import BoundProgram, Factor, Observe
from lmcascade.requests import Pending
from lmcascade.result import Result
from lmcascade.trace import Site

MAX_BATCH = 4096

ROUNDING = 1e-4
"""How far (in log-weight) a trace may exceed the bound and still count as at the bound: a
constrained site's weight is a log-mass computed in the model's float32, so a constraint that
allows every token can give ``+1e-7`` per token instead of 0."""


class KnownBounds(Policy):
    """The prior, refusing at once a soft weight whose upper bound is unknown: a factor, or an
    observe of a continuous density, whose log-weight is neither 0 nor ``-inf``.  (Every other
    site's weight is at most 0: see the module docstring.)"""

    def factor(self, eff: Factor, name: str) -> Site:
        return unbounded(super().factor(eff, name), "a factor")

    def observe(self, eff: Observe, name: str) -> Site | Pending:
        out = super().observe(eff, name)
        if isinstance(out, Site) and not is_probability(eff.dist):
            return unbounded(out, "an observe of a continuous density")
        return out


def is_probability(dist: object) -> bool:
    """Whether ``dist``'s log-density is a log-probability (at most 0): an LM, or a
    distribution with discrete support."""
    return is_lm(dist) or bool(getattr(getattr(dist, "support", None), "is_discrete", False))


def unbounded(site: Site, what: str) -> Site:
    """``site``, unless its soft weight needs a bound the run was not given."""
    if site.log_prob in (0.0, -math.inf):
        return site
    raise InferenceError(
        f"rejection: site {site.name!r} is {what} with log-weight {site.log_prob:.4g}, which "
        "has no known upper bound, so rejection cannot make it an acceptance probability. Pass "
        "max_log_weight, an upper bound on every trace's total log-weight (0 if every such "
        "weight is at most 0), or use method='importance' or 'smc'"
    )


@register
class Rejection(InferenceMethod):
    """``num_samples`` exact posterior samples within a budget of ``max_attempts`` traces.

    With ``draft`` (:data:`~lmcascade.inference.base.DRAFT_OPTIONS`) the proposed traces'
    LM sites are sampled speculatively: exact prior draws still, so acceptance is unchanged.
    ``stats["acceptance_rate"]`` stays the traces'; the draft's is
    ``stats["draft_acceptance_rate"]``.

    >>> Rejection(draft="prompt_lookup").config["draft"]
    'prompt_lookup'
    """

    name = "rejection"
    options = {
        "num_samples": 100,
        "max_attempts": 100_000,
        "max_log_weight": None,
        "batch_size": None,
        **DRAFT_OPTIONS,
    }

    def check_options(self) -> None:
        self.population("num_samples")
        self.positive_int("max_attempts")
        if self.config["batch_size"] is not None:
            self.positive_int("batch_size")
        bound = self.config["max_log_weight"]
        if bound is not None and (
            isinstance(bound, bool) or not (isinstance(bound, int | float) and math.isfinite(bound))
        ):
            raise OptionError(
                f"method 'rejection': max_log_weight must be a finite number, got {bound!r}"
            )

    def run(self, bound: BoundProgram, seed: int) -> Result:
        want = self.config["num_samples"]
        budget = self.config["max_attempts"]
        declared = self.config["max_log_weight"]
        max_lw = 0.0 if declared is None else float(declared)
        rng = np.random.default_rng(seed)
        policy = Policy() if declared is not None else KnownBounds()
        engine = Engine(policy, sampler=self.token_sampler(None, seed), seed=seed)
        accepted: list[Particle] = []
        attempts = n_ok = 0
        rejected_sample: list[Particle] = []

        def status(_: list) -> str:
            return f"{len(accepted)}/{want} accepted of {attempts} tried"

        with self.ticking(status=status) as schedule:
            while len(accepted) < want and attempts < budget:
                size = self._batch_size(want - len(accepted), attempts, n_ok, budget)
                batch = engine.run([Particle(bound) for _ in range(size)], schedule)
                attempts += size
                for p in batch:
                    lw = p.trace.log_weight
                    if lw == -math.inf:
                        if len(rejected_sample) < 1000:
                            rejected_sample.append(p)
                        continue
                    if lw > max_lw + ROUNDING:
                        raise self._bound_broken(p, lw, declared)
                    ok = lw >= max_lw or rng.random() < math.exp(lw - max_lw)
                    n_ok += ok
                    if ok and len(accepted) < want:
                        accepted.append(p)
        if not accepted:
            err = zero_weight_error(rejected_sample, f"rejection after {attempts} attempts")
            raise NothingAcceptedError(
                str(err) + ". No sample was accepted: raise max_attempts or try method='smc'",
                tuple(err.traces),
            )
        stats = dict(engine.stats)
        stats.update(
            attempts=attempts,
            accepted=len(accepted),
            acceptance_rate=n_ok / attempts,
            shortfall=want - len(accepted),
            log_weight_bound=max_lw,
        )
        log_z = math.log(n_ok / attempts) + max_lw
        result = Result(
            [p.trace for p in accepted], [0.0] * len(accepted), log_evidence=log_z, stats=stats
        )
        return self.draft_stats(result, engine.sampler)

    def _batch_size(self, need: int, attempts: int, n_ok: int, budget: int) -> int:
        """How many traces to draw next: enough for ``need`` more at the rate seen so far."""
        if self.config["batch_size"]:
            size = self.config["batch_size"]
        elif n_ok:
            size = int(math.ceil(1.2 * need / (n_ok / attempts))) + 1
        else:
            size = need if attempts == 0 else 2 * attempts
        return max(1, min(size, budget - attempts, MAX_BATCH))

    @staticmethod
    def _bound_broken(p: Particle, lw: float, declared: float | None) -> LMCascadeError:
        """The error for a trace whose log-weight exceeds the bound."""
        if declared is not None:
            return OptionError(
                f"rejection: a trace has log-weight {lw:.6g} > max_log_weight {declared}; the "
                "bound must hold for every trace"
            )
        site = max(p.trace, key=lambda s: s.log_weight)
        return InferenceError(
            f"rejection: a trace has log-weight {lw:.6g} > 0 (largest at site {site.name!r}), "
            "but every site's weight should be at most 0 here; pass max_log_weight, an upper "
            "bound on every trace's log-weight"
        )
