"""Rejection sampling: exact posterior samples under hard conditions.

Traces are drawn from the prior in batches; a trace that violates a condition is rejected.
Programs with soft weights (factors, observes) need ``max_log_weight``, an upper bound on
every trace's log-weight: a trace is then accepted with probability ``exp(w - max_log_weight)``.
Accepted traces are exact posterior samples, so they carry equal weights;
``log_evidence`` is log(acceptance rate) + ``max_log_weight``.

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

from lmcascade.engine import Engine, Particle
from lmcascade.errors import InferenceError, NothingAcceptedError, OptionError
from lmcascade.inference.base import InferenceMethod, register, zero_weight_error
from lmcascade.program import BoundProgram
from lmcascade.result import Result

MAX_BATCH = 4096


@register
class Rejection(InferenceMethod):
    """``num_samples`` exact posterior samples within a budget of ``max_attempts`` traces."""

    name = "rejection"
    options = {
        "num_samples": 100,
        "max_attempts": 100_000,
        "max_log_weight": None,
        "batch_size": None,
    }

    def check_options(self) -> None:
        self.population("num_samples")
        self.positive_int("max_attempts")
        if self.config["batch_size"] is not None:
            self.positive_int("batch_size")
        bound = self.config["max_log_weight"]
        if bound is not None and not (isinstance(bound, int | float) and math.isfinite(bound)):
            raise OptionError(
                f"method 'rejection': max_log_weight must be a finite number, got {bound!r}"
            )

    def run(self, bound: BoundProgram, seed: int) -> Result:
        want = self.config["num_samples"]
        budget = self.config["max_attempts"]
        max_lw = self.config["max_log_weight"]
        fixed_batch = self.config["batch_size"]
        rng = np.random.default_rng(seed)
        engine = Engine(seed=seed)
        accepted: list[Particle] = []
        attempts = n_ok = 0
        rejected_sample: list[Particle] = []
        while len(accepted) < want and attempts < budget:
            need = want - len(accepted)
            if fixed_batch:
                size = fixed_batch
            elif n_ok:
                rate = n_ok / attempts
                size = int(math.ceil(1.2 * need / rate)) + 1
            else:
                size = want if attempts == 0 else 2 * attempts
            size = max(1, min(size, budget - attempts, MAX_BATCH))
            batch = engine.run([Particle(bound) for _ in range(size)])
            attempts += size
            for p in batch:
                lw = p.trace.log_weight
                if lw == -math.inf:
                    if len(rejected_sample) < 1000:
                        rejected_sample.append(p)
                    continue
                if max_lw is None:
                    if lw != 0.0:
                        site = next(s.name for s in p.trace if s.log_weight not in (0.0,))
                        raise InferenceError(
                            f"rejection: site {site!r} gives a soft weight ({lw:.4g}); pass "
                            "max_log_weight (an upper bound on every trace's log-weight) or use "
                            "method='importance'"
                        )
                    ok = True
                else:
                    if lw > max_lw + 1e-9:
                        raise OptionError(
                            f"rejection: a trace has log-weight {lw:.6g} > max_log_weight "
                            f"{max_lw}; the bound must hold for every trace"
                        )
                    ok = rng.random() < math.exp(lw - max_lw)
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
        )
        log_z = math.log(n_ok / attempts) + (max_lw or 0.0)
        return Result(
            [p.trace for p in accepted], [0.0] * len(accepted), log_evidence=log_z, stats=stats
        )
