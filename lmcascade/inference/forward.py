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

``codes="arithmetic"`` draws the LM tokens of the ``num_samples`` samples from one shared
quasi-random code (arithmetic sampling, :mod:`lmcascade.samplers.arithmetic`): every sample is
still an exact draw with the same weights, but the samples repeat far less often.  Scalar
choices are drawn independently as before.  See ``docs/diverse.md``.

>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [2.0, 0.0, 0.0 if ctx else -9.0])
>>> @lc.program
... def word():
...     return (yield lc.gen("w", lm, "", max_tokens=4))
>>> r = lc.infer(word(), method="forward", codes="arithmetic", num_samples=8, seed=0)
>>> len(set(r.values)) > len(set(lc.infer(word(), num_samples=8, seed=0).values))
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lmcascade.engine import Engine, Particle, Schedule
from lmcascade.errors import OptionError
from lmcascade.inference.base import DRAFT_OPTIONS, InferenceMethod, register, zero_weight_error
from lmcascade.program import BoundProgram
from lmcascade.result import Result, log_mean_exp
from lmcascade.samplers.arithmetic import Arithmetic, codes
from lmcascade.trace import safe_repr

CODES = ("independent", "arithmetic")
"""The values of forward sampling's ``codes`` option."""


def run_population(
    bound: BoundProgram,
    n: int,
    engine: Engine,
    batch_size: int | None,
    schedule: Schedule | None = None,
    tag: Callable[[int], Any] | None = None,
) -> list[Particle]:
    """Runs ``n`` particles of ``bound`` to completion, ``batch_size`` at a time; particle
    ``i`` (counting over all batches) gets ``tag(i)`` as its ``Particle.tag`` when given."""
    batch = batch_size or n
    particles: list[Particle] = []
    while len(particles) < n:
        chunk = []
        for i in range(len(particles), len(particles) + min(batch, n - len(particles))):
            p = Particle(bound)
            if tag is not None:
                p.tag = tag(i)
            chunk.append(p)
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
    """``num_samples`` ancestral samples weighted by their factors and conditions.

    ``codes``: ``"independent"`` (the default) draws every token with its own uniform;
    ``"arithmetic"`` drives the samples' tokens with the codes ``(j / N + u) mod 1`` of one
    shared uniform ``u`` (``N = num_samples``, over all batches when ``batch_size`` splits
    the run), drawn from the engine's seeded generator: each sample is still exact, the
    population is more diverse.

    ``draft`` (:data:`~lmcascade.inference.base.DRAFT_OPTIONS`) samples the LM sites
    speculatively: the same exact samples, fewer target calls with a good draft.

    >>> Forward(codes="arithmetic").config["num_samples"]
    100
    >>> Forward(draft="prompt_lookup", lookahead=6).config["lookahead"]
    6
    """

    name = "forward"
    options = {"num_samples": 100, "batch_size": None, "codes": "independent", **DRAFT_OPTIONS}
    what = "forward sampling"  # names the method in an all-weights-zero error

    def check_options(self) -> None:
        self.population("num_samples")
        if self.config["batch_size"] is not None:
            self.positive_int("batch_size")
        if not isinstance(self.config["codes"], str) or self.config["codes"] not in CODES:
            raise OptionError(
                f"method {self.name!r}: option codes must be 'independent' (every token drawn "
                "with its own uniform) or 'arithmetic' (the samples share one quasi-random "
                f"code: exact and more diverse), got {safe_repr(self.config['codes'], 100)}"
            )
        if self.config["codes"] == "arithmetic" and self.config["draft"] is not None:
            raise OptionError(
                f"method {self.name!r}: codes='arithmetic' and draft= do not combine: a "
                "speculative block draws its tokens with the draft's and its own uniforms, not "
                "with the sample's arithmetic code; use one or the other"
            )

    def run(self, bound: BoundProgram, seed: int) -> Result:
        n = self.config["num_samples"]
        tag = None
        if self.config.get("codes") == "arithmetic":
            engine = Engine(sampler=Arithmetic(), seed=seed)
            shared = engine.generator(torch.device("cpu"))
            u = float(torch.rand((), generator=shared, dtype=torch.float64))
            tag = codes(n, u).__getitem__
        else:
            sampler = self.token_sampler(None, seed)
            engine = Engine(sampler=sampler, seed=seed)
        with self.ticking(status=finished) as schedule:
            particles = run_population(bound, n, engine, self.config["batch_size"], schedule, tag)
        return self.draft_stats(weighted_result(particles, engine, self.what), engine.sampler)
