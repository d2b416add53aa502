"""Verifiers: a Python predicate, an LM judge, and verification-at-k.

Each is an ordinary program (or a function returning one) to call with ``yield from`` inside
your own program; its sites live under a scope numbered per execution (``verify[0]/...``,
``judge[1]/...``), so the same verifier can be used any number of times in one program.

- :func:`verify_with` — a hard check by a Python predicate: ``lc.condition`` on its verdict.
  The target becomes the program's distribution *conditioned on the predicate holding*.
- :func:`lm_judge` — a soft check by a language model: the trace's weight is multiplied by
  the judge's probability of answering "Yes" (:func:`judge_probability` computes it without
  weighting; :func:`judge_vote` samples one verdict instead).
- :func:`verification_at_k` — sample ``n`` candidates, score each with ``k`` verifier draws,
  compare the best ones pairwise (:func:`judge_compare`) and return the winner, as in
  "Sample, Scrutinize and Scale" (Zhao et al., 2025).

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["1", "2", "<eos>"], lambda ctx: [0.0, 0.0, -9.0])
>>> @lc.program
... def odd_digit():
...     text = yield lc.gen("text", lm, "1", max_tokens=1)
...     return (yield from verify_with(lambda t: int(t) % 2 == 1)(text))
>>> lc.infer(odd_digit(), method="enumerate").distribution()
{'1': 1.0}
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

from lmcascade.errors import SiteError
from lmcascade.generation import Generation
from lmcascade.models.base import LanguageModel
from lmcascade.program import BoundProgram, Program, call, condition, factor, gen, program, scope
from lmcascade.program import score as score_effect

__all__ = [
    "DEFAULT_COMPARE_TEMPLATE",
    "DEFAULT_JUDGE_TEMPLATE",
    "judge_compare",
    "judge_probability",
    "judge_vote",
    "lm_judge",
    "verification_at_k",
    "verify_with",
]

DEFAULT_JUDGE_TEMPLATE = (
    "Question: {question}\nProposed answer: {answer}\n"
    "Is the proposed answer correct? Reply with Yes or No."
)
DEFAULT_COMPARE_TEMPLATE = (
    "Question: {question}\nAnswer A: {first}\nAnswer B: {second}\n"
    "Which answer is correct? Reply with A or B."
)

Template = str | Callable[..., str]


# --- checks of arguments --------------------------------------------------------------------


def _scope_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or name == "[]":
        raise SiteError(
            f"{what}: name must be a non-empty scope name without '/' (ending in '[]' to "
            f"number each use), got {name!r}"
        )
    return name


def _text(value: Any, argument: str, what: str) -> str:
    if isinstance(value, Generation):
        return value.text
    if not isinstance(value, str):
        raise SiteError(
            f"{what}: {argument} must be a string (or the Generation lc.gen returns), got "
            f"{type(value).__name__}"
        )
    return value


def _model(model: Any, what: str) -> LanguageModel:
    if not isinstance(model, LanguageModel):
        raise SiteError(
            f"{what}: model must be a LanguageModel (ToyLM, lc.models.load()...), got "
            f"{type(model).__name__}"
        )
    return model


def _label(value: Any, argument: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise SiteError(f"{what}: {argument} must be a non-empty string, got {value!r}")
    return value


def _prompt(model: LanguageModel, template: Any, chat: bool, what: str, **fields: str) -> str:
    """The judge's prompt: ``template`` filled with ``fields`` (a format string, or a function
    taking them as keyword arguments), in the model's chat format if ``chat`` and it has one."""
    if callable(template):
        text = template(**fields)
        if not isinstance(text, str):
            raise SiteError(f"{what}: template returned {type(text).__name__}, not a string")
    elif isinstance(template, str):
        try:
            text = template.format(**fields)
        except (KeyError, IndexError, ValueError) as err:
            raise SiteError(
                f"{what}: template {template[:60]!r} cannot be filled ({err!r}); it may use "
                f"{', '.join('{' + k + '}' for k in fields)} (write {{{{ and }}}} for braces)"
            ) from None
    else:
        raise SiteError(
            f"{what}: template must be a format string or a function, got {type(template).__name__}"
        )
    if not isinstance(chat, bool):
        raise SiteError(f"{what}: chat must be True or False, got {chat!r}")
    if chat and callable(getattr(model, "chat", None)):
        return model.chat(text)
    return text


# --- the predicate --------------------------------------------------------------------------


def verify_with(predicate: Callable[[Any], Any], *, name: str = "verify[]") -> Program:
    """A program that checks a value with ``predicate`` and conditions on the verdict:
    ``value = yield from verify_with(pred)(value)``.

    It yields ``lc.call("predicate", predicate, value)`` then ``lc.condition("ok", verdict)``
    under ``lc.scope(name)`` and returns ``value`` unchanged.  The trace keeps its weight when
    the predicate returns something true and gets weight zero otherwise — or when the
    predicate raises (a tool error, counted in ``stats["tool_errors"]``; use
    ``on_tool_error="raise"`` to debug a predicate).  So the program's target is exactly its
    distribution conditioned on the predicate: the same as writing ``lc.condition`` yourself,
    with the predicate's verdict recorded in the trace and not re-run on replay.

    >>> import lmcascade as lc
    >>> check = verify_with(str.isdigit)
    >>> @lc.program
    ... def twice():
    ...     a = yield from check("12")
    ...     b = yield from check("7")
    ...     return a + b
    >>> r = lc.infer(twice(), method="forward", num_samples=1, seed=0)
    >>> r.values, r.traces[0].names
    (['127'], ['verify[0]/predicate', 'verify[0]/ok', 'verify[1]/predicate', 'verify[1]/ok'])
    """
    if not callable(predicate):
        raise SiteError(
            f"verify_with: predicate must be a function of the value returning true or "
            f"false, got {type(predicate).__name__}"
        )
    name = _scope_name(name, "verify_with")

    @program
    def verified(value):
        with scope(name):
            verdict = yield call("predicate", predicate, value)
            yield condition("ok", bool(verdict))
        return value

    verified.name = f"verify_with({getattr(predicate, '__name__', 'predicate')})"
    return verified


# --- the LM judge ---------------------------------------------------------------------------


@program
def _judge(model, prompt, yes, no, normalize, weigh, name):
    with scope(name):
        log_yes = yield score_effect("yes", model, prompt, yes)
        log_p = log_yes
        if normalize:
            log_no = yield score_effect("no", model, prompt, no)
            top = max(log_yes, log_no)
            if top == -math.inf:
                log_p = -math.inf  # the judge can say neither: it does not say Yes
            else:
                log_p = log_yes - (top + math.log(math.exp(log_yes - top) + math.exp(log_no - top)))
        if weigh:
            yield factor("judged", log_p)
    return math.exp(log_p)


def _judge_program(
    model, question, answer, template, yes, no, normalize, chat, name, weigh, what
) -> BoundProgram:
    model = _model(model, what)
    question, answer = _text(question, "question", what), _text(answer, "answer", what)
    yes, no = _label(yes, "yes", what), _label(no, "no", what)
    if normalize and yes == no:
        raise SiteError(f"{what}: yes and no must differ, both are {yes!r}")
    if not isinstance(normalize, bool):
        raise SiteError(f"{what}: normalize must be True or False, got {normalize!r}")
    prompt = _prompt(model, template, chat, what, question=question, answer=answer)
    return _judge(model, prompt, yes, no, normalize, weigh, _scope_name(name, what))


def judge_probability(
    model: LanguageModel,
    question: str,
    answer: str,
    *,
    template: Template = DEFAULT_JUDGE_TEMPLATE,
    yes: str = "Yes",
    no: str = "No",
    normalize: bool = True,
    chat: bool = True,
    name: str = "judge[]",
) -> BoundProgram:
    """A program returning the judge's probability that ``answer`` is right, without
    changing the trace's weight: ``p = yield from judge_probability(lm, q, a)``.

    The judge is asked ``template`` (``{question}`` and ``{answer}`` filled in; a function
    ``template(question=..., answer=...)`` works too), in the model's chat format when
    ``chat`` and the model has one (``TransformersLM.chat``; a ``ToyLM`` gets the text as is).
    Two ``lc.score`` sites (``yes`` and ``no``) give ``log P(yes | prompt)`` and
    ``log P(no | prompt)``: the model's own probabilities (temperature 1) of continuing the
    prompt with those texts' tokens.  ``p = P(yes) / (P(yes) + P(no))`` — the judge made to
    reply one or the other — or, with ``normalize=False``, ``p = P(yes)`` (one score site).
    A judge that can say neither gives ``p = 0``.  On a transformer the second score reuses
    the prompt's cache, so it costs one token.

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> judge = ToyLM(["Yes", "No", "a", "?", "<eos>"], lambda ctx: [1.0, 0.0, -9.0, -9.0, 0.0])
    >>> p = lc.infer(judge_probability(judge, "a", "a", template="{question}{answer}?"),
    ...              method="enumerate").values[0]
    >>> round(p, 4), round(math.e / (math.e + 1), 4)
    (0.7311, 0.7311)
    """
    return _judge_program(
        model, question, answer, template, yes, no, normalize, chat, name, False,
        "judge_probability",
    )  # fmt: skip


def lm_judge(
    model: LanguageModel,
    question: str,
    answer: str,
    *,
    template: Template = DEFAULT_JUDGE_TEMPLATE,
    yes: str = "Yes",
    no: str = "No",
    normalize: bool = True,
    chat: bool = True,
    name: str = "judge[]",
) -> BoundProgram:
    """A program that multiplies the trace's weight by the judge's probability ``p`` that
    ``answer`` is right and returns ``p``: ``yield from lm_judge(lm, question, answer)``.

    ``p`` is :func:`judge_probability`'s (same arguments): ``P(yes) / (P(yes) + P(no))`` by
    default, ``P(yes)`` with ``normalize=False``.  It is added as ``lc.factor("judged",
    log p)`` after the two (or one) ``lc.score`` sites, under ``lc.scope(name)``.

    Semantics.  With ``x`` the program's choices so far and ``p(x)`` the judge's probability
    for the answer they produced, the program's target becomes

        ``P(x | judge says yes)  ∝  P(x) · p(x)``,

    the posterior given that a judge, asked about this answer, replied "Yes" (with
    ``normalize=True``: a judge that must reply "Yes" or "No"), and the evidence ``Z`` that
    methods estimate is the prior probability of that reply, ``E[p(x)]``.  It is the target
    of sampling one verdict (:func:`judge_vote`) and conditioning on it, with the verdict
    summed out exactly: the same posterior, no rejected traces, lower variance.  Under
    ``enumerate`` it is exact; under forward sampling each trace's weight is ``p(x)``; SMC
    resamples on it like on any factor; rejection sampling needs ``max_log_weight=0.0``
    (``log p <= 0``).

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> judge = ToyLM(["Yes", "No", "a", "b", "<eos>"],
    ...               lambda ctx: [2.0 if 3 in ctx else 0.0, 0.0, -9, -9, -9])
    >>> writer = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, -99.0])
    >>> @lc.program
    ... def judged():
    ...     answer = yield lc.gen("answer", writer, "a", max_tokens=1)
    ...     yield from lm_judge(judge, "a", answer, template="{question}{answer}")
    ...     return answer
    >>> exact = lc.infer(judged(), method="enumerate").distribution()
    >>> pa, pb = 0.5, 1 / (1 + math.exp(-2))     # P(Yes | "a" answered), P(Yes | "b")
    >>> round(exact["b"], 6) == round(pb / (pa + pb), 6)
    True
    """
    return _judge_program(
        model, question, answer, template, yes, no, normalize, chat, name, True, "lm_judge"
    )


@program
def _vote(model, prompt, yes, max_tokens, temperature, name):
    with scope(name):
        verdict = yield gen(
            "verdict", model, prompt, max_tokens=max_tokens, temperature=temperature
        )
    return 1.0 if verdict.strip().startswith(yes.strip()) else 0.0


def judge_vote(
    model: LanguageModel,
    question: str,
    answer: str,
    *,
    template: Template = DEFAULT_JUDGE_TEMPLATE,
    yes: str = "Yes",
    temperature: float = 1.0,
    chat: bool = True,
    name: str = "vote[]",
) -> BoundProgram:
    """A program that samples one verdict from the judge and returns 1.0 if it starts with
    ``yes`` (spaces aside), else 0.0 — a random verification, for :func:`verification_at_k`.

    The verdict is an ``lc.gen("verdict", ...)`` site of as many tokens as ``yes`` has, at
    ``temperature``; at temperature 1 and a one-token ``yes``, the vote is 1 with probability
    ``P(yes | prompt)`` (the ``normalize=False`` :func:`judge_probability`).  The weight is
    unchanged.  Prompt arguments as in :func:`judge_probability`.

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> judge = ToyLM(["Yes", "No", "a", "<eos>"], lambda ctx: [0.0, 0.0, -99.0, -99.0])
    >>> vote = judge_vote(judge, "a", "a", template="{question}{answer}")
    >>> lc.infer(vote, method="enumerate").distribution()
    {1.0: 0.5, 0.0: 0.5}
    """
    what = "judge_vote"
    model = _model(model, what)
    question, answer = _text(question, "question", what), _text(answer, "answer", what)
    yes = _label(yes, "yes", what)
    prompt = _prompt(model, template, chat, what, question=question, answer=answer)
    max_tokens = max(len(model.encode(yes)), 1)
    return _vote(model, prompt, yes, max_tokens, temperature, _scope_name(name, what))


@program
def _compare(model, prompt, first, second, name):
    with scope(name):
        log_first = yield score_effect("first", model, prompt, first)
        log_second = yield score_effect("second", model, prompt, second)
    return log_first >= log_second


def judge_compare(
    model: LanguageModel,
    question: str,
    first: str,
    second: str,
    *,
    template: Template = DEFAULT_COMPARE_TEMPLATE,
    labels: tuple[str, str] = ("A", "B"),
    chat: bool = True,
    name: str = "compare[]",
) -> BoundProgram:
    """A program that asks the judge which of two answers is right and returns True when it
    prefers ``first``: ``P(labels[0] | prompt) >= P(labels[1] | prompt)`` from two
    ``lc.score`` sites (deterministic; the weight is unchanged).  ``template`` may use
    ``{question}``, ``{first}`` and ``{second}``.  The pairwise step of
    :func:`verification_at_k`.

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> judge = ToyLM(["A", "B", "x", "y", "<eos>"], lambda ctx: [0.0, 1.0, -9, -9, -9])
    >>> pick = judge_compare(judge, "x", "x", "y", template="{question}{first}{second}")
    >>> lc.infer(pick, method="enumerate").values
    [False]
    """
    what = "judge_compare"
    model = _model(model, what)
    question = _text(question, "question", what)
    first, second = _text(first, "first", what), _text(second, "second", what)
    if not (isinstance(labels, tuple | list) and len(labels) == 2):
        raise SiteError(f"{what}: labels must be two strings, like ('A', 'B'), got {labels!r}")
    a, b = (_label(label, "labels", what) for label in labels)
    if a == b:
        raise SiteError(f"{what}: the two labels must differ, both are {a!r}")
    prompt = _prompt(model, template, chat, what, question=question, first=first, second=second)
    return _compare(model, prompt, a, b, _scope_name(name, what))


# --- verification at k ----------------------------------------------------------------------


def _verifier_score(value: Any) -> float:
    if hasattr(value, "item") and not isinstance(value, bool | int | float):
        try:
            value = value.item()  # a numpy or torch scalar
        except (TypeError, ValueError, RuntimeError):
            pass
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and 0.0 <= value <= 1.0:
        return float(value)
    raise SiteError(
        f"verification_at_k: a verifier returned {value!r}; it must return a bool or a "
        "number in [0, 1]"
    )


def _sub(fn: Callable[..., Any], args: tuple, role: str) -> BoundProgram:
    bound = fn(*args)
    if not isinstance(bound, BoundProgram):
        raise SiteError(
            f"verification_at_k: {role} must return a program (a bound @lc.program call, "
            f"like judge_vote(...)), got {type(bound).__name__}"
        )
    return bound


@program
def _verification_at_k(candidate, verifier, n, k, top, margin, compare, name):
    with scope(name):
        answers = []
        for _ in range(n):
            with scope("candidate[]"):
                answers.append((yield from candidate))
        scores = []
        for answer in answers:
            with scope("verify[]"):
                total = 0.0
                for _ in range(k):
                    with scope("draw[]"):
                        total += _verifier_score((yield from _sub(verifier, (answer,), "verifier")))
            scores.append(total / k)
        ranked = sorted(range(n), key=lambda i: (-scores[i], i))
        finalists = [
            i for i in ranked[:top] if margin is None or scores[i] >= scores[ranked[0]] - margin
        ]
        wins = dict.fromkeys(finalists, 0)
        if compare is not None:
            for i, j in itertools.combinations(finalists, 2):
                if answers[i] == answers[j]:
                    continue  # nothing to compare
                with scope("compare[]"):
                    first_better = yield from _sub(compare, (answers[i], answers[j]), "compare")
                wins[i if first_better else j] += 1
    best = max(finalists, key=lambda i: (wins[i], scores[i], -i))
    return answers[best]


def verification_at_k(
    candidate: BoundProgram,
    verifier: Callable[[Any], BoundProgram],
    *,
    n: int = 4,
    k: int = 2,
    top: int = 2,
    margin: float | None = None,
    compare: Callable[[Any, Any], BoundProgram] | None = None,
    name: str = "vatk[]",
) -> BoundProgram:
    """Sample-and-verify (Zhao et al., 2025, "Sample, Scrutinize and Scale"), as a program:
    ``best = yield from verification_at_k(answer(q), lambda a: judge_vote(lm, q, a))``.

    1. Runs ``candidate`` (a bound program returning an answer) ``n`` times, under
       ``candidate[0]``, ``candidate[1]``, ...
    2. Scores each answer with ``k`` runs of ``verifier(answer)`` (a program returning a bool
       or a number in [0, 1], e.g. :func:`judge_vote` or :func:`judge_probability`), under
       ``verify[i]/draw[j]``: the score is their mean.
    3. Keeps the ``top`` best (ties: the earlier candidate), and of those, with ``margin``,
       only the ones within ``margin`` of the best score.
    4. With ``compare`` (a function ``(first, second) -> program returning True when first is
       better``, e.g. ``lambda a, b: judge_compare(lm, q, a, b)``), compares every pair of
       finalists with different answers once, under ``compare[m]``.
    5. Returns the finalist with the most wins (ties: the higher score, then the earlier).

    What it targets.  The program's return value is the selected answer, a deterministic
    function of the candidates' and the verifiers' draws; if neither the candidate, the
    verifier nor ``compare`` conditions or weighs (use :func:`judge_vote` or
    :func:`judge_probability` as verifiers, **not** :func:`lm_judge`, which weighs), every
    trace has weight one and ``result.distribution()`` is the *selection distribution*:
    the probability that one run of the procedure returns each answer (exact under
    ``enumerate``; estimated by its frequencies under ``forward``, each trace one
    independent run of the procedure).  Conditions and factors inside the candidate program
    make the target that law conditioned on them (importance and SMC then reweight), like
    any effects of the program.

    >>> import lmcascade as lc
    >>> from pyro.distributions import Bernoulli
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["x", "y", "<eos>"], lambda ctx: [0.0, 0.0, -99.0])
    >>> @lc.program
    ... def guess():
    ...     return (yield lc.gen("guess", lm, "x", max_tokens=1))
    >>> @lc.program
    ... def noisy_check(answer):   # says "right" 90% of the time for "y", 20% for "x"
    ...     return (yield lc.sample("ok", Bernoulli(0.9 if answer == "y" else 0.2))) == 1
    >>> best = verification_at_k(guess(), noisy_check, n=2, k=1)  # P(y) = 1/4 + 1/4 * (0.72 + 0.98)
    >>> round(lc.infer(best, method="enumerate").distribution()["y"], 4)
    0.675
    """
    what = "verification_at_k"
    if not isinstance(candidate, BoundProgram):
        raise SiteError(
            f"{what}: candidate must be a bound program that returns one answer "
            f"(e.g. answer(question)), got {type(candidate).__name__}"
        )
    if not callable(verifier):
        raise SiteError(
            f"{what}: verifier must be a function of an answer returning a program "
            f"(e.g. lambda a: judge_vote(lm, question, a)), got {type(verifier).__name__}"
        )
    if compare is not None and not callable(compare):
        raise SiteError(
            f"{what}: compare must be None or a function of two answers returning a program, "
            f"got {type(compare).__name__}"
        )
    for argument, value in (("n", n), ("k", k), ("top", top)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SiteError(f"{what}: {argument} must be a whole number >= 1, got {value!r}")
    if margin is not None and (
        isinstance(margin, bool) or not isinstance(margin, int | float) or not margin >= 0
    ):
        raise SiteError(f"{what}: margin must be None or a number >= 0, got {margin!r}")
    return _verification_at_k(
        candidate, verifier, n, k, top, margin, compare, _scope_name(name, what)
    )
