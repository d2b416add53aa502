"""Speculative decoding as an inference method: forward sampling whose LM sites are sampled
speculatively (:class:`~lmcascade.samplers.speculative.Speculative`).

Every emitted token is an exact draw from the site's own distribution, so the result is the
one forward sampling gives — only faster when the draft is good.  ``draft`` is a model
sharing the target's vocabulary, or ``"prompt_lookup"``.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [1.0, 0.0, -2.0 + 0.5 * len(ctx)])
>>> @lc.program
... def text():
...     return (yield lc.gen("t", lm, "ab", max_tokens=8, temperature=0))
>>> r = lc.infer(text(), method="speculative", draft="prompt_lookup", num_samples=1, seed=0)
>>> r.values == lc.infer(text(), method="forward", num_samples=1, seed=0).values
True
"""

from __future__ import annotations

from lmcascade.engine import Engine
from lmcascade.errors import OptionError
from lmcascade.inference.base import InferenceMethod, register
from lmcascade.inference.forward import finished, run_population, weighted_result
from lmcascade.program import BoundProgram
from lmcascade.result import Result
from lmcascade.samplers.speculative import Speculative


@register
class SpeculativeMethod(InferenceMethod):
    """``num_samples`` forward samples, each LM site drafted by ``draft`` and verified by its
    model (``lookahead`` tokens per block, ``adaptive`` lookahead)."""

    name = "speculative"
    options = {
        "draft": None,
        "lookahead": 4,
        "adaptive": True,
        "num_samples": 100,
        "batch_size": None,
    }

    def check_options(self) -> None:
        self.population("num_samples")
        if self.config["batch_size"] is not None:
            self.positive_int("batch_size")
        if self.config["draft"] is None:
            raise OptionError(
                "method 'speculative' needs draft=: a smaller model sharing the target's "
                "vocabulary, or 'prompt_lookup'"
            )
        try:
            Speculative(self.config["draft"], self.config["lookahead"], self.config["adaptive"])
        except OptionError as err:
            raise OptionError(f"method 'speculative': {err}") from None

    def run(self, bound: BoundProgram, seed: int) -> Result:
        cfg = self.config
        sampler = Speculative(cfg["draft"], cfg["lookahead"], cfg["adaptive"])
        sampler.seed = seed
        engine = Engine(sampler=sampler, seed=seed)
        with self.ticking(status=finished) as schedule:
            particles = run_population(
                bound, cfg["num_samples"], engine, cfg["batch_size"], schedule
            )
        result = weighted_result(particles, engine, "speculative sampling")
        result.stats.update(sampler.counters.as_dict())
        calls = result.stats.get("model_calls", 0) + 0
        if calls:
            result.stats["tokens_per_target_call"] = result.stats["tokens_generated"] / calls
        return result
