"""STaR rationalisation: a chain of thought conditioned on the answer it must reach.

STaR (Zelikman et al., 2022) collects rationales for a dataset of questions with known answers:
a rationale is kept when the answer the model writes after it is the right one, and for the
questions the model gets wrong it *rationalises*, writing a rationale with the right answer
given as a hint.  Read as a probabilistic program (Dohan et al., 2022, "Language Model
Cascades"), that is the chain of thought of :func:`~lmcascade.patterns.reasoning.
chain_of_thought` observed on its answer: the posterior over thoughts ``r`` given that the
answer equals the known ``y``,

    ``p(r | question, answer = y)  ∝  p(r | question) · P(answer = y | question, r)``.

:func:`rationalise` builds that program.  The thought is an ``lc.gen`` site and the answer an
``lc.observe`` of the known text under the answer's own LM distribution, so each trace is
weighted by the exact probability that the answer generation writes ``y`` (every way it can
end: end of text, a stop string, the length limit) — not a filter that rejects thoughts whose
sampled answer happened to differ.  It runs under any method: ``enumerate`` gives the exact
posterior on a small model, importance sampling and SMC weigh by that probability, rejection
sampling needs no option (an observed LM text has probability at most 1, so rejection knows
its bound on the weights, 0).  :func:`star_rationales` runs it over a dataset with
:func:`lc.infer_many <lmcascade.inference.many.infer_many>` and keeps each question's most
probable rationale: STaR's data-collection step.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["x", "y", "=", "<eos>"], lambda ctx: [1.5 if ctx[-2:] == (0, 2) else 0.0,
...                                                   0.0, -9.0, -1.0])
>>> why = rationalise(lm, "x", "x", think="{question}", answer_prompt="{question}{thought}=",
...                   think_tokens=1, answer_tokens=1, answer_stop=None)
>>> post = lc.infer(why, method="enumerate").distribution()
>>> max(post, key=post.get)   # a thought ending in "x" makes the answer "x" likelier
'x'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmcascade.distributions import LM
from lmcascade.errors import InferenceError, OptionError
from lmcascade.models.base import LanguageModel
from lmcascade.patterns.reasoning import (
    ANSWER_PROMPT,
    THINK_PROMPT,
    Template,
    _check_generation,
    _check_template,
    _fill,
)
from lmcascade.program import BoundProgram, gen, observe, scope
from lmcascade.program import program as _program
from lmcascade.result import Result

HINT_PROMPT = "{question}\nHint: the answer is {answer}.\nThink it through step by step, briefly."
"""The default thought prompt with ``hint=True``: ``{question}`` and ``{answer}`` are filled in."""


def _check_model(model: Any, what: str) -> None:
    """An OptionError from ``what`` unless ``model`` is a language model."""
    if not isinstance(model, LanguageModel):
        raise OptionError(
            f"{what}: model must be a LanguageModel (ToyLM, lc.models.load()...), got "
            f"{type(model).__name__}"
        )


def _check_prompt(what: str, template: Any, argument: str, fields: tuple[str, ...]) -> None:
    """A prompt template checked for its fields, the error naming ``what``."""
    try:
        _check_template(template, argument, fields)
    except OptionError as err:
        raise OptionError(f"{what}: {err}") from None


def _check_scope(what: str, name: Any, example: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or name == "[]":
        raise OptionError(
            f"{what}: name must be a scope name without '/' (like {example!r}), got {name!r}"
        )


def _check_flag(what: str, value: Any, argument: str) -> None:
    if not isinstance(value, bool):
        raise OptionError(f"{what}: {argument} must be True or False, got {value!r}")


def rationalise(
    model: Any,
    question: str,
    answer: str,
    *,
    hint: bool = False,
    think: Template = THINK_PROMPT,
    answer_prompt: Template = ANSWER_PROMPT,
    think_tokens: int = 64,
    answer_tokens: int = 16,
    think_stop: str | list[str] | None = "\n\n",
    answer_stop: str | list[str] | None = "\n",
    chat: bool = True,
    name: str = "star[]",
    **options: Any,
) -> BoundProgram:
    """A program whose target is the posterior over rationales given the known ``answer``;
    it returns the rationale (the thought's text).

    The program is :func:`~lmcascade.patterns.reasoning.chain_of_thought`'s, with its answer
    observed: ``thought = yield lc.gen("thought", ...)`` then ``yield lc.observe("answer",
    lc.LM(model, answer prompt, ...), answer)`` under ``lc.scope(name)`` (``star[0]/thought``,
    ``star[0]/answer``).  The target is

        ``p(thought | question, answer)  ∝  p(thought | think prompt) · P(answer | thought)``

    where ``P(answer | thought)`` is the exact probability that the answer generation (at most
    ``answer_tokens`` tokens, ended by ``answer_stop`` or end of text) writes exactly the text
    ``answer`` — pass it as the model would write it (``" 5"`` differs from ``"5"``).  The
    evidence ``Z`` a method estimates is the model's probability of answering ``answer`` at
    all, thought summed out.

    ``hint=True`` is STaR's rationalisation: the thought is written after a prompt that gives
    the answer away (``think`` may then use ``{answer}``; the default becomes
    :data:`HINT_PROMPT`), while the answer is still observed after the unhinted
    ``answer_prompt``.  The target is then the *hinted* model's rationale posterior,
    ``p(thought | question, hint) · P(answer | question, thought)`` normalised: rationales the
    model writes when it knows the answer, weighted by how well they lead to it without
    the hint.

    ``think`` and ``answer_prompt`` are format strings (``{question}``; ``{thought}`` in the
    answer's; ``{answer}`` in the thought's with a hint) or functions taking those fields in
    that order.  ``chat``, the token limits, stops and ``options`` (``temperature``...)
    mean what they mean for ``chain_of_thought``; the options apply to the observed answer's
    distribution too.

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["x", "y", "=", "<eos>"], lambda ctx: [0.0, 0.0, -9.0, -1.0])
    >>> why = rationalise(lm, "x", "y", think="{question}", answer_prompt="{question}{thought}=",
    ...                   think_tokens=1, answer_tokens=1)
    >>> lc.infer(why, method="forward", num_samples=1, seed=0).traces[0].names
    ['star[0]/thought', 'star[0]/answer']
    """
    what = "rationalise"
    _check_model(model, what)
    for argument, value in (("question", question), ("answer", answer)):
        if not isinstance(value, str):
            raise OptionError(f"{what}: {argument} must be a string, got {type(value).__name__}")
    _check_flag(what, hint, "hint")
    if hint and think is THINK_PROMPT:
        think = HINT_PROMPT
    _check_prompt(what, think, "think", ("question", "answer") if hint else ("question",))
    _check_prompt(what, answer_prompt, "answer_prompt", ("question", "thought"))
    _check_flag(what, chat, "chat")
    _check_scope(what, name, "star[]")
    _check_generation(what, model, think_tokens, think_stop, options, "think")
    _check_generation(what, model, answer_tokens, answer_stop, options, "answer")
    wrap = getattr(model, "chat", None) if chat else None

    def prompt(text: str) -> str:
        return wrap(text) if wrap is not None else text

    fields = {"question": question, "answer": answer} if hint else {"question": question}

    @_program
    def rationalise():
        with scope(name):
            thought = yield gen(
                "thought",
                model,
                prompt(_fill(think, **fields)),
                max_tokens=think_tokens,
                stop=think_stop,
                **options,
            )
            said = LM(
                model,
                prompt(_fill(answer_prompt, question=question, thought=thought)),
                max_tokens=answer_tokens,
                stop=answer_stop,
                **options,
            )
            yield observe("answer", said, answer)
        return thought

    return rationalise()


@dataclass(frozen=True)
class Rationale:
    """One question's kept rationale (:func:`star_rationales`): the ``rationale``, its
    probability under the run's posterior over rationales (``posterior``), the probability
    that the answer generation writes ``answer`` after it (``answer_prob``), and the
    run's ``result``."""

    question: str
    answer: str
    rationale: str
    posterior: float
    answer_prob: float
    result: Result


def question_answer_pairs(examples: Any, what: str) -> list[tuple[str, str]]:
    """``examples`` checked to be a list of ``(question, answer)`` pairs of strings (an
    :class:`~lmcascade.errors.OptionError` from ``what`` naming the bad item otherwise).

    >>> question_answer_pairs([("2 + 2?", "4")], "star_rationales")
    [('2 + 2?', '4')]
    """
    if isinstance(examples, str | bytes) or not isinstance(examples, Sequence):
        raise OptionError(
            f"{what}: examples must be a list of (question, answer) pairs of strings, "
            f"got {type(examples).__name__}"
        )
    out = []
    for i, item in enumerate(examples):
        if not (
            isinstance(item, tuple | list)
            and len(item) == 2
            and all(isinstance(s, str) for s in item)
        ):
            raise OptionError(
                f"{what}: examples[{i}] must be a (question, answer) pair of strings, got {item!r}"
            )
        out.append((item[0], item[1]))
    return out


_OWN_OPTIONS = {"method", "seed", "progress", "on_error"}
"""What :func:`star_rationales` passes to ``infer_many`` itself (not in ``method_options``)."""


def star_rationales(
    model: Any,
    examples: Sequence[tuple[str, str]],
    *,
    method: str = "importance",
    seed: int | None = None,
    method_options: dict | None = None,
    min_answer_prob: float = 0.0,
    **options: Any,
) -> list[Rationale]:
    """STaR's data-collection step: for every ``(question, answer)`` of ``examples``, runs
    :func:`rationalise` (its ``options``: ``hint``, ``think``, ``think_tokens``...) with
    ``method`` (and ``method_options``, e.g. ``{"num_samples": 8}``) through
    :func:`lc.infer_many <lmcascade.inference.many.infer_many>`, which batches the model calls
    of every question, and keeps the rationale of highest posterior probability in each
    result (the thought marginal read off the weighted traces: exact under ``"enumerate"``).

    A rationale is kept when the probability that the answer generation writes the known
    answer after it is at least ``min_answer_prob`` (STaR keeps only rationales that lead to
    the right answer; 0 keeps every question's best).  The result lists the kept rationales
    in the order of ``examples``.

    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["x", "y", "=", "<eos>"], lambda ctx: [1.5 if ctx[-2:] == (0, 2) else 0.0,
    ...                                                   1.5 if ctx[-2:] == (1, 2) else 0.0,
    ...                                                   -9.0, -1.0])
    >>> kept = star_rationales(lm, [("x", "x"), ("y", "y")], method="enumerate",
    ...                        think="{question}", answer_prompt="{question}{thought}=",
    ...                        think_tokens=1, answer_tokens=1, answer_stop=None)
    >>> [(r.question, r.rationale) for r in kept]
    [('x', 'x'), ('y', 'y')]
    """
    from lmcascade.inference.many import infer_many

    what = "star_rationales"
    _check_model(model, what)
    pairs = question_answer_pairs(examples, what)
    if method_options is None:
        method_options = {}
    if not isinstance(method_options, dict):
        raise OptionError(
            f"{what}: method_options must be a dict of the method's options (like "
            f"{{'num_samples': 8}}), got {type(method_options).__name__}"
        )
    taken = sorted(set(method_options) & _OWN_OPTIONS, key=str)
    if taken:
        raise OptionError(
            f"{what}: method_options cannot hold {taken}: give method and seed as "
            f"{what}'s own arguments (method=..., seed=...); it sets progress and on_error "
            "itself"
        )
    if (
        isinstance(min_answer_prob, bool)
        or not isinstance(min_answer_prob, int | float)
        or not 0.0 <= min_answer_prob <= 1.0
    ):
        raise OptionError(
            f"{what}: min_answer_prob must be a number in [0, 1], got {min_answer_prob!r}"
        )
    for question, answer in pairs[:1]:  # bad options fail here, before any model call
        try:
            rationalise(model, question, answer, **options)
        except OptionError as err:  # named after the function the user called
            raise OptionError(what + str(err).removeprefix("rationalise")) from None

    @_program
    def star_example(index: int, question: str, answer: str):
        return (yield from rationalise(model, question, answer, **options))

    inputs = [(i, q, a) for i, (q, a) in enumerate(pairs)]
    results: dict[int, Result] = {}
    for item, result in infer_many(
        star_example, inputs, method=method, seed=seed, progress=False, on_error="raise",
        **method_options,
    ):  # fmt: skip
        results[item[0]] = result
    kept = []
    for i, (question, answer) in enumerate(pairs):
        result = results[i]
        posterior = result.distribution()
        if not posterior:
            raise InferenceError(
                f"star_rationales: every trace for question {question!r} has weight zero: the "
                f"model cannot write the answer {answer!r} after any thought it drew"
            )
        rationale = max(posterior, key=posterior.get)
        trace = next(t for t in result.traces if t.value == rationale)
        observed = next(s for s in trace if s.kind == "observe")
        answer_prob = math.exp(observed.log_prob)
        if answer_prob >= min_answer_prob:
            kept.append(
                Rationale(question, answer, rationale, posterior[rationale], answer_prob, result)
            )
    return kept


__all__ = [
    "HINT_PROMPT",
    "Rationale",
    "question_answer_pairs",
    "rationalise",
    "star_rationales",
]
