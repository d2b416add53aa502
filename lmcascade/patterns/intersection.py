"""Prompt intersection: a text that two prompts both find likely, ``p(x) ∝ p1(x) p2(x)``.

:func:`prompt_intersection` generates under the first prompt and weighs the text by its
probability under the second (an ``lc.observe`` of a second ``lc.LM``): the program's
posterior is the normalised product of the two distributions over texts, and its evidence
``sum_x p1(x) p2(x)`` says how much the two prompts overlap.  The two may be one model with
two prompts, or two models that share a vocabulary.

While the text is written, the second prompt also *steers* it: the generation's potential is
the second LM (``lc.LM(..., potential=second)``), so SMC's weights include the second
prompt's probability of each prefix, token by token, and resampling drops prefixes it finds
unlikely long before the text is done.  The potential's last value is carried until the
observe supplies the exact factor, which replaces it (so SMC never resamples finished and
unfinished texts on unequal footing), and the target does not depend on the steering:
every method targets the same product (forward and importance sampling weigh whole texts;
``method="smc"``, resampling every token, is the one the steering helps).

>>> import math
>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["x", "y", "z", "<eos>"], lambda ctx: [2.0, 0.0, -1.0, 0.0]
...            if ctx[0] == 0 else [-1.0, 0.0, 2.0, 0.0])
>>> exact = lc.infer(prompt_intersection(lm, "x", "z", max_tokens=1), method="enumerate")
>>> {k: round(v, 3) for k, v in exact.distribution().items()}  # "x" and "z" each favour one
{'x': 0.366, 'z': 0.366, 'y': 0.134, '': 0.134}
"""

from __future__ import annotations

from typing import Any

from lmcascade.errors import SiteError
from lmcascade.models.base import LanguageModel
from lmcascade.program import BoundProgram, gen, observe, program, scope

SCOPE = "intersection"
"""The scope of the sites, numbered per execution: ``intersection[0]/text`` (generated under
the first prompt) and ``intersection[0]/other`` (the second prompt's observe)."""


def prompt_intersection(
    model: LanguageModel,
    prompt: str,
    other_prompt: str,
    *,
    other_model: LanguageModel | None = None,
    steer: bool = True,
    **gen_params: Any,
) -> BoundProgram:
    """A text distributed as ``p1(x) p2(x) / Z``: ``p1`` is ``model`` after ``prompt``, ``p2``
    is ``other_model`` (default: ``model``) after ``other_prompt``, both with ``gen_params``
    (``max_tokens``, ``stop``, ``temperature``...), so both end texts by the same rules.

    The text is generated under ``prompt`` and observed under ``other_prompt`` (site
    ``intersection[k]/other``, which multiplies the weight by ``p2(x)``); with ``steer=True``
    (the default) the second model and prompt are also the generation's potential, so SMC
    resamples on the second prompt's opinion of every prefix.  Steering needs the two models
    to share a vocabulary; ``steer=False`` drops it (any two models; the target is the same).
    ``log_evidence`` estimates ``log sum_x p1(x) p2(x)``.

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["x", "y", "<eos>"], lambda ctx: [1.0, 0.0, 0.0] if ctx[0] == 0 else [0.0, 1.0, 0.0])
    >>> r = lc.infer(prompt_intersection(lm, "x", "y", max_tokens=2), method="smc",
    ...              particles=32, seed=0)
    >>> r.traces[0].names
    ['intersection[0]/text', 'intersection[0]/other']
    """  # noqa: E501
    from lmcascade.distributions import LM

    other_model = model if other_model is None else other_model
    for name, m in (("model", model), ("other_model", other_model)):
        if not isinstance(m, LanguageModel):
            raise SiteError(
                f"prompt_intersection: {name} must be a LanguageModel (ToyLM, TransformersLM, "
                f"lc.models.load()...), got {type(m).__name__}"
            )
    for name, p in (("prompt", prompt), ("other_prompt", other_prompt)):
        if not isinstance(p, str):
            raise SiteError(f"prompt_intersection: {name} must be a string, got {type(p).__name__}")
    if not isinstance(steer, bool):
        raise SiteError(f"prompt_intersection: steer must be True or False, got {steer!r}")
    for own in ("potential", "details"):
        if own in gen_params:
            raise SiteError(
                f"prompt_intersection: {own} is set by the pattern itself"
                + ("; steer=False turns the steering off" if own == "potential" else "")
            )
    try:
        other = LM(other_model, other_prompt, **gen_params)
        LM(model, prompt, **gen_params)
    except TypeError as err:
        raise SiteError(f"prompt_intersection: {err}") from None
    except SiteError as err:
        raise SiteError(f"prompt_intersection: {err}") from None
    guide = None
    if steer:
        if other_model.vocab_size != model.vocab_size or other_model.eos_id != model.eos_id:
            raise SiteError(
                "prompt_intersection: steering needs other_model to share model's vocabulary "
                f"({model.vocab_size} vs {other_model.vocab_size} tokens); pass steer=False to "
                "weigh whole texts by the other model without steering"
            )
        guide = LM(other_model, other_prompt, max_tokens=other.max_tokens)
    return _intersection(model, prompt, other, guide, gen_params)


@program
def _intersection(model, prompt, other, guide, gen_params):
    with scope(SCOPE + "[]"):
        text = yield gen("text", model, prompt, potential=guide, **gen_params)
        yield observe("other", other, text)
    return text


__all__ = ["prompt_intersection"]
