"""Forward (ancestral) sampling — likelihood weighting from the prior.

Every random choice is drawn from the program's own distribution; observes, factors and
conditions are recorded in the weights, so the weighted samples target the posterior and
``log_evidence`` is log of the mean weight.

>>> import lmcascade as lc
>>> from pyro.distributions import Bernoulli
>>> @lc.program
... def coin():
...     x = yield lc.sample("x", Bernoulli(0.5))
...     yield lc.condition("heads", x == 1)
...     return int(x)
>>> r = lc.infer(coin(), method="forward", num_samples=200, seed=1)
>>> r.distribution(), round(float(r.log_evidence), 1)
({1: 1.0}, -0.7)
"""

from __future__ import annotations

from lmcascade.engine import Engine, Particle, Schedule
from lmcascade.inference.base import InferenceMethod, register, zero_weight_error
from lmcascade.program import BoundProgram
from lmcascade.result import Result, log_mean_exp


def run_population(
    bound: BoundProgram,
    n: int,
    engine: Engine,
    batch_size: int | None,
    schedule: Schedule | None = None,
) -> list[Particle]:
    """Runs ``n`` particles of ``bound`` to completion, ``batch_size`` at a time."""
    batch = batch_size or n
    particles: list[Particle] = []
    while len(particles) < n:
        chunk = [Particle(bound) for _ in range(min(batch, n - len(particles)))]
        particles.extend(engine.run(chunk, schedule))
    return particles


def finished(particles: list[Particle]) -> str:
    """A progress bar's status: how many of the population have finished."""
    return f"{sum(p.done for p in particles)}/{len(particles)} finished"


def weighted_result(particles: list[Particle], engine: Engine, what: str) -> Result:
    """A result of all particles weighted by their trace log-weights; an error if all are zero."""
    log_weights = [p.trace.log_weight for p in particles]
    if all(lw == float("-inf") for lw in log_weights):
        raise zero_weight_error(particles, what)
    stats = dict(engine.stats)
    stats["num_zero_weight"] = sum(p.dead for p in particles)
    return Result(
        [p.trace for p in particles],
        log_weights,
        log_evidence=log_mean_exp(log_weights),
        stats=stats,
    )


@register
class Forward(InferenceMethod):
    """``num_samples`` ancestral samples weighted by their factors and conditions."""

    name = "forward"
    options = {"num_samples": 100, "batch_size": None}

    def check_options(self) -> None:
        self.population("num_samples")
        if self.config["batch_size"] is not None:
            self.positive_int("batch_size")

    def run(self, bound: BoundProgram, seed: int) -> Result:
        engine = Engine(seed=seed)
        with self.ticking(status=finished) as schedule:
            particles = run_population(
                bound, self.config["num_samples"], engine, self.config["batch_size"], schedule
            )
        return weighted_result(particles, engine, "forward sampling")
