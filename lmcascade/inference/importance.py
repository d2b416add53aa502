"""Importance sampling, with the prior or a user proposal program as the proposal.

A ``proposal`` is another program that samples sites with the same names as the target's;
each target site it covers takes the proposal's value and is weighted by
``log p_target(value) - log q_proposal(value)``.  Sites it does not cover come from the prior.
``exp(log_evidence)`` (the mean weight) is an unbiased estimate of the evidence.

>>> import lmcascade as lc
>>> from pyro.distributions import Bernoulli
>>> @lc.program
... def target():
...     x = yield lc.sample("x", Bernoulli(0.1))
...     yield lc.condition("one", x == 1)
...     return int(x)
>>> @lc.program
... def guide():
...     yield lc.sample("x", Bernoulli(0.9))
>>> r = lc.infer(target(), method="importance", proposal=guide(), num_samples=500, seed=0)
>>> r.distribution(), abs(r.log_evidence - __import__("math").log(0.1)) < 0.1
({1: 1.0}, True)
"""

from __future__ import annotations

from lmcascade.engine import Engine, Particle, Schedule
from lmcascade.errors import OptionError
from lmcascade.inference.base import DRAFT_OPTIONS, InferenceMethod, register
from lmcascade.inference.forward import finished, run_population, weighted_result
from lmcascade.program import BoundProgram
from lmcascade.result import Result
from lmcascade.samplers.base import TokenSampler


@register
class Importance(InferenceMethod):
    """``num_samples`` weighted samples from the prior or from a ``proposal`` program.

    With ``draft`` (:data:`~lmcascade.inference.base.DRAFT_OPTIONS`) the LM sites that are
    sampled — the proposal program's, and the target's sites the proposal does not cover —
    are sampled speculatively: exact draws from each site's distribution, so the weights are
    unchanged.  Replayed sites are only scored (one pass each), with nothing to draft.

    >>> Importance(draft="prompt_lookup").config["adaptive"]
    True
    """

    name = "importance"
    options = {"num_samples": 100, "proposal": None, "batch_size": None, **DRAFT_OPTIONS}

    def check_options(self) -> None:
        self.population("num_samples")
        if self.config["batch_size"] is not None:
            self.positive_int("batch_size")
        proposal = self.config["proposal"]
        if proposal is not None and not isinstance(proposal, BoundProgram):
            raise OptionError(
                "method 'importance': option proposal must be a bound program (call it with its "
                f"arguments), got {type(proposal).__name__}"
            )

    def run(self, bound: BoundProgram, seed: int) -> Result:
        sampler = self.token_sampler(None, seed)  # one sampler for both engines: one count
        with self.ticking(status=finished) as schedule:
            return self.draft_stats(self._run(bound, seed, schedule, sampler), sampler)

    def _run(
        self,
        bound: BoundProgram,
        seed: int,
        schedule: Schedule,
        sampler: TokenSampler | None,
    ) -> Result:
        n, batch = self.config["num_samples"], self.config["batch_size"]
        proposal: BoundProgram | None = self.config["proposal"]
        if proposal is None:
            engine = Engine(seed=seed, sampler=sampler)
            return weighted_result(
                run_population(bound, n, engine, batch, schedule), engine, "importance sampling"
            )
        guide_engine = Engine(seed=seed, stop_dead=False, sampler=sampler)
        guides = run_population(proposal, n, guide_engine, batch, schedule)
        for g in guides:
            for site in g.trace:
                if site.kind in ("observe", "factor", "condition"):
                    raise OptionError(
                        f"proposal {proposal.name!r} has {site.kind} site {site.name!r}; a "
                        "proposal only samples (move weights into the target program)"
                    )
        # Each particle takes the proposal's values by name, rescored under the target
        # (the proposal's density of each value stays its proposal density).
        engine = Engine(seed=seed + 1, sampler=sampler)
        particles = engine.run([Particle(bound, replay=g.trace) for g in guides], schedule)
        for p, g in zip(particles, guides, strict=True):
            if p.dead:
                continue
            extra = [s.name for s in g.trace if s.kind == "sample" and s.name not in p.trace]
            if extra:
                raise OptionError(
                    f"proposal {proposal.name!r} samples site {extra[0]!r}, which the target "
                    f"{bound.name!r} never reaches; proposal sites must be target sites"
                )
        for key in ("model_calls", "tokens_generated", "tokens_scored"):
            engine.stats[key] += guide_engine.stats[key]
        return weighted_result(particles, engine, "importance sampling")
