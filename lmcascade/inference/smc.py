"""Sequential Monte Carlo over LM programs: a population steered while it generates.

``particles`` executions advance together (one batched model call per token for all of them).
At resampling points the population's ESS is checked; below ``ess_threshold * particles`` it is
resampled with the chosen scheme and every weight is reset to the log-mean-exp of the weights
before resampling, so ``exp(log_evidence)`` (the mean final weight) stays an unbiased estimate
of the evidence.  Resampling points are set by ``resample_every``:

- ``"token"`` — after every decoding step, inside LM sites;
- ``"segment"`` — when every particle has ended a segment: ``segment_tokens`` tokens, a
  ``segment_stop`` string, or (Cascade Reward Sampling's rule) a token drawn where the
  next-token entropy exceeded ``segment_entropy`` (at least ``segment_min`` and at most
  ``segment_max`` tokens per segment); a site's start and end are boundaries too;
- ``"site"`` — when every particle has reached the start of a new LM site (or finished):
  cascade-level SMC over whole generations.

A progress bar appears on runs longer than two seconds in a terminal (``progress=False``
turns it off).  Particles that are ahead wait at their boundary while the others catch up; finished particles
wait until the end.  Constraints (``lc.LM(..., constraint=...)``) and potentials
(``potential=f``) enter the weights token by token; see :mod:`lmcascade.constraints`.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, -1.0])
>>> @lc.program
... def no_b():
...     text = yield lc.gen("text", lm, "", max_tokens=4, constraint=lc.constraints.forbid("b"))
...     return text
>>> r = lc.infer(no_b(), method="smc", particles=64, ess_threshold=1.0, seed=0)
>>> all("b" not in v for v in r.values), r.stats["resamples"] == len(r.genealogy) > 0
(True, True)
"""

from __future__ import annotations

import math

import numpy as np
from tqdm.auto import tqdm

from lmcascade.engine import Engine, Particle, Pending, Policy
from lmcascade.errors import OptionError
from lmcascade.inference.base import InferenceMethod, register, zero_weight_error
from lmcascade.inference.resampling import scheme
from lmcascade.program import BoundProgram
from lmcascade.result import Result, effective_sample_size, log_mean_exp

MODES = ("token", "segment", "site")


@register
class SMC(InferenceMethod):
    """Sequential Monte Carlo with token, segment or site resampling."""

    name = "smc"
    options = {
        "particles": 16,
        "ess_threshold": 0.5,
        "resampling": "systematic",
        "resample_every": "token",
        "segment_tokens": None,
        "segment_stop": None,
        "segment_entropy": None,
        "segment_min": 1,
        "segment_max": 64,
        "max_steps": 100_000,
        "progress": True,
    }

    def check_options(self) -> None:
        self.positive_int("particles")
        self.positive_int("max_steps")
        self.positive_int("segment_min")
        self.positive_int("segment_max")
        cfg = self.config
        if not (isinstance(cfg["ess_threshold"], int | float) and 0 <= cfg["ess_threshold"] <= 1):
            raise OptionError(
                f"method 'smc': ess_threshold must be in [0, 1], got {cfg['ess_threshold']!r}"
            )
        scheme(cfg["resampling"])
        if cfg["resample_every"] not in MODES:
            raise OptionError(
                f"method 'smc': resample_every must be one of {', '.join(MODES)}, got "
                f"{cfg['resample_every']!r}"
            )
        rules = [cfg["segment_tokens"], cfg["segment_stop"], cfg["segment_entropy"]]
        if cfg["resample_every"] == "segment" and all(r is None for r in rules):
            raise OptionError(
                "method 'smc': resample_every='segment' needs a segment rule: segment_tokens, "
                "segment_stop or segment_entropy"
            )
        if cfg["segment_tokens"] is not None:
            self.positive_int("segment_tokens")

    # -- the population loop -----------------------------------------------------------------

    def run(self, bound: BoundProgram, seed: int) -> Result:
        cfg = self.config
        n = cfg["particles"]
        mode = cfg["resample_every"]
        resample = scheme(cfg["resampling"])
        rng = np.random.default_rng(seed)
        engine = Engine(Policy(), seed=seed)
        engine.want_entropy = cfg["segment_entropy"] is not None
        particles = [Particle(bound) for _ in range(n)]
        genealogy: list[list[int]] = []
        ess_history: list[float] = []
        steps = resamples = 0
        bar = tqdm(
            desc="smc",
            unit="step",
            delay=2.0,
            leave=False,
            disable=None if cfg["progress"] else True,
        )

        while True:
            for p in particles:
                engine.advance(p)
            live = [p for p in particles if isinstance(p.waiting, Pending)]
            if not live:
                break
            if mode == "token":
                to_step = live
            else:
                to_step = [p for p in live if not self._held(p)]
            if not to_step:  # everyone is at a boundary: a resampling point
                particles, did = self._resampling_point(
                    particles, resample, rng, genealogy, ess_history
                )
                resamples += did
                live = [p for p in particles if isinstance(p.waiting, Pending)]
                for p in live:
                    p.waiting.released = True  # type: ignore[union-attr]
                    for r in p.waiting.runs:  # type: ignore[union-attr]
                        r.segment = 0
                        r.seg_start = len(r.text)
                to_step = live
            engine.step(to_step)
            steps += 1
            bar.update(1)
            if steps % 8 == 0 and ess_history:
                bar.set_postfix(live=len(live), ess=f"{ess_history[-1]:.1f}", refresh=False)
            if steps > cfg["max_steps"]:
                raise OptionError(f"method 'smc': more than max_steps={cfg['max_steps']} steps")
            if mode == "token":
                for p in particles:
                    engine.advance(p)
                particles, did = self._resampling_point(
                    particles, resample, rng, genealogy, ess_history
                )
                resamples += did

        bar.close()
        log_weights = [p.log_weight for p in particles]
        if all(lw == -math.inf for lw in log_weights):
            raise zero_weight_error(particles, "smc")
        stats = dict(engine.stats)
        stats.update(
            steps=steps,
            resamples=resamples,
            ess=ess_history,
            num_zero_weight=sum(lw == -math.inf for lw in log_weights),
        )
        result = Result(
            [p.trace for p in particles],
            log_weights,
            log_evidence=log_mean_exp(log_weights),
            stats=stats,
        )
        result.genealogy = genealogy
        return result

    def _held(self, p: Particle) -> bool:
        """Whether ``p`` waits at a boundary for the rest of the population."""
        pending = p.waiting
        if not pending.released:  # type: ignore[union-attr]
            return True  # a new site has just started
        if self.config["resample_every"] != "segment":
            return False
        cfg = self.config
        for r in pending.runs:  # type: ignore[union-attr]
            if r.done or r.segment == 0:
                continue
            if r.segment >= cfg["segment_max"]:
                return True
            if cfg["segment_tokens"] is not None and r.segment >= cfg["segment_tokens"]:
                return True
            stop = cfg["segment_stop"]
            if stop is not None and stop in r.text[r.seg_start :]:
                return True
            limit = cfg["segment_entropy"]
            if limit is not None and r.segment >= cfg["segment_min"] and r.entropy > limit:
                return True
        return False

    def _resampling_point(self, particles, resample, rng, genealogy, ess_history):
        """Checks the ESS and resamples below the threshold; returns (particles, resampled)."""
        n = len(particles)
        log_weights = np.array([p.log_weight for p in particles])
        if np.all(log_weights == -np.inf):
            raise zero_weight_error(particles, "smc")
        ess = effective_sample_size(log_weights)
        ess_history.append(ess)
        threshold = self.config["ess_threshold"]
        if not (threshold >= 1 or ess < threshold * n):
            return particles, False
        weights = log_weights - log_weights.max()
        weights = np.exp(weights) / np.exp(weights).sum()
        ancestors = resample(weights, rng)
        lme = log_mean_exp(log_weights)
        used: set[int] = set()
        new = []
        for a in ancestors:
            parent = particles[a]
            child = parent if a not in used else parent.clone()
            used.add(int(a))
            child.log_offset += lme - child.log_weight
            new.append(child)
        for i, p in enumerate(particles):
            if i not in used:
                if isinstance(p.waiting, Pending):
                    for r in p.waiting.runs:
                        r.release()
                p.close()
        genealogy.append([int(a) for a in ancestors])
        return new, True
