"""Chain of thought and self-consistency: think, then answer, then vote over the answers.

:func:`chain_of_thought` builds an ordinary program with two LM sites, a thought and an answer
that reads it, in a scope of its own (``cot[0]/thought``, ``cot[0]/answer``), so it runs under
any method and inside other programs via ``yield from``.  Self-consistency (Wang et al., 2023)
marginalises the thought: the distribution of the *answer* alone, summed over every thought
that led to it, whose most probable answer is the majority vote.  :func:`answer_distribution`
and :func:`majority_vote` read it off any :class:`~lmcascade.result.Result` (samples vote with
their weights; an enumeration gives the exact marginal); :func:`self_consistency` runs the
program and does both.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> from lmcascade.patterns.reasoning import chain_of_thought, self_consistency
>>> lm = ToyLM(["x", "y", "=", "<eos>"], lambda ctx: [0.5 * (ctx[-1] == 0), 0.0, -9.0, -1.0])
>>> cot = chain_of_thought(lm, "x", think="{question}", answer="{question}{thought}=",
...                        think_tokens=2, answer_tokens=1)
>>> vote = self_consistency(cot, method="enumerate")
>>> vote.answer, round(vote.confidence, 3)
('x', 0.422)
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lmcascade.distributions import LM
from lmcascade.errors import InferenceError, OptionError, SiteError
from lmcascade.program import BoundProgram, gen, scope
from lmcascade.program import program as _program
from lmcascade.result import Result, ValueKey, value_key

THINK_PROMPT = "{question}\nThink it through step by step, briefly."
"""The default thought prompt: ``{question}`` is filled in."""

ANSWER_PROMPT = "{question}\nReasoning: {thought}\nNow reply with just the final answer."
"""The default answer prompt: ``{question}`` and ``{thought}`` are filled in."""

Template = str | Callable[..., str]

_PUNCT = ".,;:!?\"'`"
_SPACES = re.compile(r"\s+")


def normalise(answer: Any) -> Any:
    """The usual answer normalisation before a vote: a string is stripped, lower-cased, its
    runs of whitespace made one space and its surrounding punctuation and quotes removed;
    anything else is returned unchanged.

    >>> normalise("  The  Answer: Paris. ")
    'the answer: paris'
    >>> normalise(42)
    42
    """
    if not isinstance(answer, str):
        return answer
    return _SPACES.sub(" ", answer.strip().lower()).strip(_PUNCT + " ")


def _fields(template: str, arg: str) -> set[str]:
    try:
        return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as err:
        raise OptionError(
            f"{arg}: {err} in template {template!r}; write literal braces as '{{{{' and '}}}}'"
        ) from None


def _check_template(template: Any, arg: str, allowed: tuple[str, ...]) -> None:
    if callable(template):
        return
    if not isinstance(template, str):
        raise OptionError(
            f"{arg} must be a format string (with {', '.join('{' + a + '}' for a in allowed)}) "
            f"or a function returning the prompt, got {type(template).__name__}"
        )
    unknown = _fields(template, arg) - set(allowed)
    if unknown:
        raise OptionError(
            f"{arg}: unknown field(s) {sorted(unknown)} in {template!r}; it may use "
            f"{', '.join('{' + a + '}' for a in allowed)} (write a literal brace as '{{{{')"
        )


def _fill(template: Template, **fields: str) -> str:
    if callable(template):
        prompt = template(*fields.values())
        if not isinstance(prompt, str):
            raise SiteError(
                f"a prompt template function must return a string, got {type(prompt).__name__}"
            )
        return prompt
    return template.format(**fields)


def _check_generation(
    what: str, model: Any, tokens: Any, stop: Any, options: dict, argument: str
) -> None:
    """Every option of one of ``what``'s generations (``{argument}_tokens``,
    ``{argument}_stop`` and the generation ``options``) checked now, not deep inside a run."""
    try:
        LM(model, "", max_tokens=tokens, stop=stop, **options)
    except TypeError as err:
        raise OptionError(
            f"{what}: {err}; generation options are those of lc.gen (temperature, top_k, "
            "top_p, min_tokens, alpha...)"
        ) from None
    except SiteError as err:
        raise OptionError(
            f"{what} ({argument}_tokens / {argument}_stop / options): {err}"
        ) from None


def chain_of_thought(
    model: Any,
    question: str,
    *,
    think: Template = THINK_PROMPT,
    answer: Template = ANSWER_PROMPT,
    think_tokens: int = 64,
    answer_tokens: int = 16,
    think_stop: str | list[str] | None = "\n\n",
    answer_stop: str | list[str] | None = "\n",
    chat: bool = True,
    name: str = "cot[]",
    **options: Any,
) -> BoundProgram:
    """A scratchpad program: generate a thought, then an answer that reads it; returns the
    answer text, stripped.

    ``think`` and ``answer`` are the prompts: format strings (``{question}``; the answer's may
    also use ``{thought}``) or functions ``think(question)`` and ``answer(question, thought)``.
    With ``chat=True`` a model that has a chat format (``model.chat``) gets each prompt as a
    user turn.  ``options`` (``temperature``, ``top_p``, ``alpha``...) apply to both
    generations.  The sites are ``thought`` and ``answer`` inside scope ``name``; the default
    ``"cot[]"`` numbers each call (``cot[0]``, ``cot[1]``...), so the pattern can be used twice
    in one program.

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["x", "y", "=", "<eos>"], lambda ctx: [0.0, 0.0, -9.0, -1.0])
    >>> cot = chain_of_thought(lm, "x", think="{question}", answer="{question}{thought}=",
    ...                        think_tokens=1, answer_tokens=1)
    >>> lc.infer(cot, method="forward", num_samples=1, seed=0).traces[0].names
    ['cot[0]/thought', 'cot[0]/answer']
    """
    if not isinstance(question, str):
        raise OptionError(f"question must be a string, got {type(question).__name__}")
    _check_template(think, "think", ("question",))
    _check_template(answer, "answer", ("question", "thought"))
    if not isinstance(chat, bool):
        raise OptionError(f"chat must be True or False, got {chat!r}")
    if not isinstance(name, str) or not name or "/" in name:
        raise OptionError(f"name must be a scope name without '/' (like 'cot[]'), got {name!r}")
    _check_generation("chain_of_thought", model, think_tokens, think_stop, options, "think")
    _check_generation("chain_of_thought", model, answer_tokens, answer_stop, options, "answer")
    wrap = getattr(model, "chat", None) if chat else None

    def prompt(text: str) -> str:
        return wrap(text) if wrap is not None else text

    @_program
    def chain_of_thought(question: str):
        with scope(name):
            thought = yield gen(
                "thought",
                model,
                prompt(_fill(think, question=question)),
                max_tokens=think_tokens,
                stop=think_stop,
                **options,
            )
            reply = yield gen(
                "answer",
                model,
                prompt(_fill(answer, question=question, thought=thought)),
                max_tokens=answer_tokens,
                stop=answer_stop,
                **options,
            )
        return reply.strip()

    return chain_of_thought(question)


# --- the vote -------------------------------------------------------------------------------


AnswerOf = str | Callable[[Any], Any] | None


def _answer_getter(answer: AnswerOf) -> Callable[[Any], Any]:
    """How to read the answer off a trace: its return value, a site's value, or a function
    of the return value."""
    if answer is None:
        return lambda trace: trace.value
    if isinstance(answer, str):

        def site_value(trace: Any) -> Any:
            if answer in trace:
                return trace[answer].value
            ends = [s.name for s in trace if s.name.endswith("/" + answer)]
            if len(ends) == 1:
                return trace[ends[0]].value
            raise SiteError(
                f"answer={answer!r}: the trace has "
                + (f"several such sites {ends}" if ends else "no such site")
                + f"; its sites are {trace.names}. Name one site in full"
            )

        return site_value
    if callable(answer):
        return lambda trace: answer(trace.value)
    raise OptionError(
        f"answer must be None (the return value), a site name or a function of the return "
        f"value, got {type(answer).__name__}"
    )


def _check_key(key: Any) -> Callable[[Any], Any]:
    if key is None:
        return lambda v: v
    if not callable(key):
        raise OptionError(
            f"key must be a function applied to each answer before the vote (normalise, str.lower"
            f"...) or None, got {type(key).__name__}"
        )
    return key


def weighted_answers(
    result: Result, key: Callable[[Any], Any] | None = normalise, answer: AnswerOf = None
) -> list[tuple[Any, float]]:
    """``(answer, probability)`` for each distinct answer of ``result``, in the order each
    first appears among the traces: the traces' normalised weights summed per answer (after
    ``key``), traces of weight zero left out.  :func:`answer_distribution` ranks them.

    >>> import math, lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["A", "a", "<eos>"], lambda ctx: [0.0, 0.0, -math.inf])
    >>> @lc.program
    ... def say():
    ...     return (yield lc.gen("say", lm, "A", max_tokens=1))
    >>> weighted_answers(lc.infer(say(), method="enumerate"))
    [('a', 1.0)]
    """
    if not isinstance(result, Result):
        raise OptionError(f"result must be an lmcascade Result, got {type(result).__name__}")
    key_fn, get = _check_key(key), _answer_getter(answer)
    weights = result.weights
    totals: dict[Any, list] = {}
    for trace, lw, w in zip(result.traces, result.log_weights, weights, strict=True):
        if lw == -math.inf or not w > 0:
            continue
        value = key_fn(get(trace))
        k = value_key(value)
        if k in totals:
            totals[k][1].append(float(w))
        else:
            totals[k] = [value, [float(w)]]
    total = math.fsum(math.fsum(ws) for _, ws in totals.values())
    return [(value, math.fsum(ws) / total) for value, ws in totals.values()]


def answer_distribution(
    result: Result, key: Callable[[Any], Any] | None = normalise, answer: AnswerOf = None
) -> dict:
    """The answer marginal of ``result``: answer (after ``key``) -> probability, most
    probable first (ties in the order the answers first appear).  Every other site — the
    thought — is summed out.  ``answer`` says where the answer is: ``None`` (the program's
    return value), a site name (``"answer"`` finds ``cot[0]/answer`` when it is the only such
    site), or a function of the return value.

    >>> import math, lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["x", "y", "<eos>"], lambda ctx: [1.0, 0.0, -math.inf])
    >>> @lc.program
    ... def guess():
    ...     return (yield lc.gen("g", lm, "x", max_tokens=1))
    >>> {a: round(p, 3) for a, p in answer_distribution(lc.infer(guess(), method="enumerate")).items()}
    {'x': 0.731, 'y': 0.269}
    """
    pairs = weighted_answers(result, key, answer)
    ranked = sorted(pairs, key=lambda vp: -vp[1])  # stable: ties keep first appearance
    return {value_key(v): p for v, p in ranked}


def majority_vote(
    result: Result, key: Callable[[Any], Any] | None = normalise, answer: AnswerOf = None
) -> Any:
    """The most probable answer of ``result`` (after ``key``): the self-consistency vote,
    each trace voting with its weight.  Ties go to the answer that appears first.

    >>> import math, lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["x", "y", "<eos>"], lambda ctx: [1.0, 0.0, -math.inf])
    >>> @lc.program
    ... def guess():
    ...     return (yield lc.gen("g", lm, "x", max_tokens=1))
    >>> majority_vote(lc.infer(guess(), method="forward", num_samples=20, seed=0))
    'x'
    """
    dist = answer_distribution(result, key, answer)
    if not dist:
        raise InferenceError("majority_vote: every trace has weight zero, so nothing votes")
    top = next(iter(dist))
    return top.value if isinstance(top, ValueKey) else top


@dataclass(frozen=True)
class Vote:
    """What :func:`self_consistency` found: the majority ``answer``, its probability
    (``confidence``), the whole answer ``distribution`` and the inference ``result``."""

    answer: Any
    confidence: float
    distribution: Mapping[Any, float]
    result: Result

    def summary(self, top: int = 10) -> str:
        """A table of the answers and their probabilities, most probable first."""
        rows = [(repr(a), p) for a, p in list(self.distribution.items())[:top]]
        width = min(50, max([len(r) for r, _ in rows] + [6]))
        lines = [f"self-consistency — method {self.result.method!r}, {len(self.result)} traces"]
        lines.append(f"  {'answer':<{width}}  probability")
        lines += [f"  {r[:width]:<{width}}  {p:.4f}" for r, p in rows]
        lines.append(f"  vote: {self.answer!r} (probability {self.confidence:.4f})")
        return "\n".join(lines)


def self_consistency(
    program: BoundProgram,
    *,
    method: str = "forward",
    key: Callable[[Any], Any] | None = normalise,
    answer: AnswerOf = None,
    **options: Any,
) -> Vote:
    """Runs ``program`` with ``method`` (and its ``options``: ``num_samples``, ``seed``...)
    and votes: the answer marginal, thought summed out, and its most probable answer.  Any
    method works: sampling methods vote by weight, ``"enumerate"`` gives the exact marginal.

    >>> import math, lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["x", "y", "<eos>"], lambda ctx: [1.0, 0.0, -math.inf])
    >>> @lc.program
    ... def guess():
    ...     return (yield lc.gen("g", lm, "x", max_tokens=1))
    >>> self_consistency(guess(), num_samples=30, seed=0).answer
    'x'
    """
    from lmcascade.inference import infer

    if not isinstance(program, BoundProgram):
        raise OptionError(
            f"program must be a bound program (call it with its arguments: prog(...)), got "
            f"{type(program).__name__}"
        )
    _check_key(key)
    _answer_getter(answer)
    result = infer(program, method=method, **options)
    dist = answer_distribution(result, key, answer)
    if not dist:
        raise InferenceError("self_consistency: every trace has weight zero, so nothing votes")
    top = next(iter(dist))
    return Vote(
        answer=top.value if isinstance(top, ValueKey) else top,
        confidence=dist[top],
        distribution=dist,
        result=result,
    )


__all__ = [
    "ANSWER_PROMPT",
    "THINK_PROMPT",
    "Vote",
    "answer_distribution",
    "chain_of_thought",
    "majority_vote",
    "normalise",
    "self_consistency",
    "weighted_answers",
]
