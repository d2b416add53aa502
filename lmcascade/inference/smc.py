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

With ``draft`` (a same-vocabulary model or ``"prompt_lookup"``, see
:data:`~lmcascade.inference.base.DRAFT_OPTIONS`) the LM sites are sampled speculatively: a
particle's step may then emit a block of several tokens, each an exact draw from its site, and
its weight gets every token of the block.  Resampling points fall between steps, so at block
boundaries: ``"token"`` resamples after every block, and a segment ends at the first block
boundary at or after its rule is met (``segment_tokens`` and ``segment_max`` may be passed by
up to the lookahead; a ``segment_stop`` string may be followed by the rest of its block).  The
weights stay exact and the evidence estimate unbiased: where the population resamples may
depend on the draws so far, never on what comes after.  ``segment_entropy`` needs the entropy
of every token's distribution, which a block does not report: it does not combine with a
draft.

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
import torch

from lmcascade.engine import Engine, Particle, Schedule
from lmcascade.errors import InferenceError, OptionError
from lmcascade.inference.base import (
    DRAFT_OPTIONS,
    InferenceMethod,
    register,
    zero_weight_error,
)
from lmcascade.inference.progress import progress_bar
from lmcascade.inference.resampling import scheme
from lmcascade.program import BoundProgram
from lmcascade.result import Result, effective_sample_size, log_mean_exp

MODES = ("token", "segment", "site")


@register
class SMC(InferenceMethod):
    """Sequential Monte Carlo with token, segment or site resampling; ``draft`` samples the LM
    sites speculatively (resampling at block boundaries, see the module docstring).

    >>> SMC(draft="prompt_lookup", resample_every="token").config["lookahead"]
    4
    """

    name = "smc"
    aliases = {"num_samples": "particles"}  # what every sampling method calls its size
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
        **DRAFT_OPTIONS,
    }

    def check_options(self) -> None:
        self.population("particles")
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
        if cfg["resample_every"] != "segment" and any(r is not None for r in rules):
            raise OptionError(
                "method 'smc': segment_tokens, segment_stop and segment_entropy only apply with "
                f"resample_every='segment' (it is {cfg['resample_every']!r})"
            )
        if cfg["segment_tokens"] is not None:
            self.positive_int("segment_tokens")
        if cfg["segment_entropy"] is not None and cfg["draft"] is not None:
            raise OptionError(
                "method 'smc': segment_entropy does not combine with draft=: the rule looks at "
                "the entropy of every token's distribution, but a speculative block reports "
                "only its first; use segment_tokens or segment_stop with a draft"
            )

    # -- the population loop -----------------------------------------------------------------

    def run(self, bound: BoundProgram, seed: int) -> Result:
        cfg = self.config
        engine = Engine(seed=seed, sampler=self.token_sampler(None, seed))
        schedule = SMCSchedule(cfg, np.random.default_rng(seed))
        if cfg["segment_entropy"] is not None:
            engine.observers.append(schedule.record_entropy)
        try:
            particles = engine.run([Particle(bound) for _ in range(cfg["particles"])], schedule)
        finally:
            schedule.bar.close()
        log_weights = [p.log_weight for p in particles]
        if all(lw == -math.inf for lw in log_weights):
            raise zero_weight_error(particles, "smc")
        stats = dict(engine.stats)
        stats.update(
            steps=schedule.steps,
            resamples=schedule.resamples,
            ess=schedule.ess_history,
            num_zero_weight=sum(lw == -math.inf for lw in log_weights),
            distinct_traces=len(
                {id(p.trace.sites[-1]) if p.trace.sites else None for p in particles}
            ),
        )
        result = Result(
            [p.trace for p in particles],
            log_weights,
            log_evidence=log_mean_exp(log_weights),
            stats=stats,
            ess=schedule.final_ess,
        )
        result.genealogy = schedule.genealogy
        return self.draft_stats(result, engine.sampler)


class SMCSchedule(Schedule):
    """SMC's part of the engine loop: holds particles at their resampling boundaries, checks
    the ESS there and resamples.  Its bookkeeping lives in each site-in-progress's ``meta``:
    ``released`` (allowed past the site's start) and where the current segment began."""

    def __init__(self, cfg: dict, rng: np.random.Generator) -> None:
        self.cfg = cfg
        self.mode = cfg["resample_every"]
        self.resample = scheme(cfg["resampling"])
        self.rng = rng
        self.genealogy: list[list[int]] = []
        self.ess_history: list[float] = []
        self.final_ess: float | None = None  # the ESS before a resample of finished particles
        self.steps = self.resamples = 0
        # run -> entropy of the distribution it drew its latest token from (kept for the runs
        # still in progress; a run held at a boundary keeps its last value)
        self.entropy: dict = {}
        self._fresh: dict = {}
        self.bar = progress_bar("smc", cfg["progress"])

    def record_entropy(self, rows) -> None:
        """An engine observer: the entropy of each run's next-token distribution ``q``."""
        q = rows.q
        h = (-(q.exp() * q).nan_to_num(0.0).sum(dim=-1)).to(torch.float64).cpu().tolist()
        self._fresh.update(zip(rows.runs, h, strict=True))

    def select(self, engine, particles, waiting):
        if self.mode == "token":
            return particles, waiting
        to_step = [p for p in waiting if not self._held(p)]
        if not to_step:  # everyone is at a boundary: a resampling point
            particles = self._resampling_point(particles)
            to_step = [p for p in particles if p.waiting is not None]
            for p in to_step:
                meta = p.waiting.meta
                meta["released"] = True
                run = p.waiting.runs[0] if p.waiting.runs else None
                meta["segment_tokens"] = len(run.tokens) if run else 0
                meta["segment_text"] = len(run.text) if run else 0
        return particles, to_step

    def after_step(self, engine, particles):
        self.steps += 1
        engine.stats["resamples"] = self.resamples  # progress, should the run be interrupted
        if self._fresh:
            live = {id(r) for p in particles if p.waiting is not None for r in p.waiting.runs}
            merged = {**self.entropy, **self._fresh}
            self.entropy = {r: h for r, h in merged.items() if id(r) in live}
            self._fresh = {}
        self.bar.update(1)
        if self.steps % 8 == 0 and self.ess_history:
            self.bar.set_postfix(ess=f"{self.ess_history[-1]:.1f}", refresh=False)
        if self.steps > self.cfg["max_steps"]:
            raise OptionError(f"method 'smc': more than max_steps={self.cfg['max_steps']} steps")
        if self.mode == "token":
            particles = self._resampling_point(engine.advance_all(particles))
        return particles

    def _held(self, p: Particle) -> bool:
        """Whether ``p`` waits at a boundary for the rest of the population."""
        meta = p.waiting.meta  # type: ignore[union-attr]
        if not meta.get("released"):
            return True  # a new site has just started
        if self.mode != "segment":
            return False
        cfg = self.cfg
        for r in p.waiting.runs:  # type: ignore[union-attr]
            segment = len(r.tokens) - meta["segment_tokens"]
            if r.done or segment == 0:
                continue
            if segment >= cfg["segment_max"]:
                return True
            if cfg["segment_tokens"] is not None and segment >= cfg["segment_tokens"]:
                return True
            stop = cfg["segment_stop"]
            if stop is not None and stop in r.text[meta["segment_text"] :]:
                return True
            limit = cfg["segment_entropy"]
            if (
                limit is not None
                and segment >= cfg["segment_min"]
                and self.entropy.get(r, 0.0) > limit
            ):
                return True
        return False

    def _resampling_point(self, particles: list[Particle]) -> list[Particle]:
        """Checks the ESS and resamples below the threshold."""
        n = len(particles)
        log_weights = np.array([p.log_weight for p in particles])
        if np.all(log_weights == -np.inf):
            raise zero_weight_error(particles, "smc")
        broken = np.flatnonzero(~(log_weights < np.inf))  # NaN or +inf
        if broken.size:
            i = int(broken[0])
            raise InferenceError(
                f"smc: particle {i} has log-weight {log_weights[i]} after sites "
                f"{particles[i].trace.names[-3:]}; a weight must be finite or zero (a potential "
                "or model returned NaN or infinity)"
            )
        ess = effective_sample_size(log_weights)
        self.ess_history.append(ess)
        threshold = self.cfg["ess_threshold"]
        if not (threshold >= 1 or ess < threshold * n):
            return particles
        weights = log_weights - log_weights.max()
        weights = np.exp(weights) / np.exp(weights).sum()
        ancestors = self.resample(weights, self.rng)
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
                p.release()
        self.genealogy.append([int(a) for a in ancestors])
        self.resamples += 1
        if all(p.done for p in particles):  # the final resample: copies are not new samples
            self.final_ess = ess
        return new
