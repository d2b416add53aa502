"""Exact inference by enumerating every trace of a program with finite choices.

It is the engine's stepping loop with two pluggable parts: a policy that answers a scalar
choice with every value of its ``enumerate_support`` (each continuing in its own particle) and
the :class:`~lmcascade.samplers.AllChildren` token sampler, which branches an LM site on every
token with non-zero probability after temperature, top-k, top-p and constraints — all open
branches advance together, one batched model call per model per token depth.  Each complete trace is weighted by its
joint probability (including observes, factors and conditions), so the normalised weights are
the exact posterior and ``log_evidence`` is the exact log Z.  This is the oracle every other
method is tested against.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> inf = float("inf")
>>> lm = ToyLM(["yes", "no", "<eos>"],
...            lambda ctx: [0.0, 0.0, -inf] if len(ctx) == 0 else [-inf, -inf, 0.0])
>>> @lc.program
... def answer():
...     a = yield lc.gen("a", lm, "", max_tokens=2)
...     yield lc.factor("prefer_yes", 0.0 if a == "yes" else -1.0)
...     return a
>>> r = lc.infer(answer(), method="enumerate")
>>> {k: round(v, 4) for k, v in r.distribution().items()}
{'yes': 0.7311, 'no': 0.2689}
"""

from __future__ import annotations

import math

import torch

from lmcascade.distributions import is_lm, score, support
from lmcascade.engine import Engine, Particle, Schedule
from lmcascade.errors import NotEnumerableError, TooManyTracesError
from lmcascade.inference.base import InferenceMethod, register, zero_weight_error
from lmcascade.policy import Policy
from lmcascade.program import BoundProgram
from lmcascade.requests import Pending, generation
from lmcascade.result import Result
from lmcascade.samplers import AllChildren
from lmcascade.trace import Site


class EnumeratePolicy(Policy):
    """Answers every scalar sample site with all its values (of non-zero probability)."""

    def sample(self, eff, name) -> Site | Pending | list[Site]:
        dist = eff.dist
        if is_lm(dist):
            return generation(name, dist)
        if not getattr(dist, "has_enumerate_support", False) or tuple(dist.batch_shape) != ():
            raise NotEnumerableError(
                f"site {name!r}: {type(dist).__name__} has no finite support to enumerate "
                "(enumerate handles LM sites and scalar Categorical/Bernoulli-like choices); "
                "use a sampling method such as 'importance'"
            )
        sites = []
        for value in support(dist):
            lp = score(dist, value)
            if lp > -math.inf:
                sites.append(Site(name, "sample", value, lp, 0.0, dist=dist))
        return sites


class Bounded(Schedule):
    """Keeps the enumeration within ``limit`` live traces; traces of weight zero leave the
    population as soon as they die (counted in ``dead``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.dead = 0
        self.dead_sample: list[Particle] = []  # kept to name the sites that zero the weights

    def prune(self, particles: list[Particle]) -> list[Particle]:
        alive = []
        for p in particles:
            if p.dead:
                self.dead += 1
                if len(self.dead_sample) < 1000:
                    self.dead_sample.append(p)
                p.release()
            else:
                alive.append(p)
        if len(alive) > self.limit:
            sites = sorted(
                {p.waiting.runs[0].dist.prompt for p in alive if p.waiting and p.waiting.runs}
            )
            where = f" inside LM sites (prompts {sites[:3]!r})" if sites else ""
            raise TooManyTracesError(
                f"enumeration exceeds max_traces={self.limit} traces{where}; shorten max_tokens, "
                "shrink the vocabulary or the program's choices, or raise max_traces"
            )
        return alive

    def select(self, engine, particles, waiting):
        alive = self.prune(particles)
        return alive, [p for p in alive if p.waiting is not None]

    def after_step(self, engine, particles):
        return self.prune(particles)


@register
class Enumerate(InferenceMethod):
    """The exact posterior of a program whose random choices are all finite."""

    name = "enumerate"
    options = {"max_traces": 100_000}

    def check_options(self) -> None:
        self.positive_int("max_traces")

    def run(self, bound: BoundProgram, seed: int) -> Result:
        limit = self.config["max_traces"]
        engine = Engine(
            EnumeratePolicy(), sampler=AllChildren(limit), seed=seed, max_particles=limit
        )
        bounded = Bounded(limit)
        with self.ticking(bounded, status=lambda ps: f"{len(ps)} traces open") as schedule:
            particles = engine.run([Particle(bound)], schedule)
        complete = [p for p in particles if not p.dead]
        bounded.dead += len(particles) - len(complete)
        if not complete:
            raise zero_weight_error(bounded.dead_sample + particles, "enumeration")
        # Each site's proposal log-prob is 0, so a trace's weight is its joint probability.
        log_weights = [p.trace.log_weight for p in complete]
        stats = dict(engine.stats)
        stats.update(num_traces=len(complete), zero_weight_traces=bounded.dead)
        log_z = torch.logsumexp(torch.tensor(log_weights, dtype=torch.float64), 0).item()
        return Result([p.trace for p in complete], log_weights, log_evidence=log_z, stats=stats)
