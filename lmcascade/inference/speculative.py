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

from lmcascade.errors import OptionError
from lmcascade.inference.base import DRAFT_OPTIONS, register
from lmcascade.inference.forward import Forward


@register
class SpeculativeMethod(Forward):
    """``num_samples`` forward samples, each LM site drafted by ``draft`` and verified by its
    model (``lookahead`` tokens per block, ``adaptive`` lookahead): ``method="forward"`` with
    a draft it cannot do without.

    >>> SpeculativeMethod(draft="prompt_lookup").config["lookahead"]
    4
    """

    name = "speculative"
    options = {**DRAFT_OPTIONS, "num_samples": 100, "batch_size": None}
    what = "speculative sampling"

    def check_draft(self) -> None:
        if self.config["draft"] is None:
            raise OptionError(
                "method 'speculative' needs draft=: a smaller model sharing the target's "
                "vocabulary, or 'prompt_lookup'"
            )
        super().check_draft()

    def check_options(self) -> None:
        self.population("num_samples")
        if self.config["batch_size"] is not None:
            self.positive_int("batch_size")
