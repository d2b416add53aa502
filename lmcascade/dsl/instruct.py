"""The ``.lmc`` builtins for instruct models: ``chat``, ``match`` and the constraints.

``chat(lm, user, system=...)`` is the model's chat prompt (:func:`apply_chat`);
``match(pattern, text)`` extracts with a regular expression (:func:`match`); ``regex``,
``json_schema``, ``forbid``, ``allow`` and ``max_word_length`` build the constraints of
:mod:`lmcascade.constraints` for a model's ``constraint=`` option (:data:`CONSTRAINTS`).

A ``.lmc`` file may come from someone else, so every pattern is bounded before it is
compiled: at most :data:`MAX_PATTERN_CHARS` characters, and counted repetitions may not
expand it past :data:`MAX_EXPANSION` items (``(a{1000}){1000}`` would take the regular
expression compiler seconds, and a token automaton far longer); a JSON schema has at most
:data:`MAX_SCHEMA_CHARS` characters and nests at most :data:`MAX_SCHEMA_DEPTH` levels.
``match`` runs on the ``regex`` module with a timeout of :data:`MATCH_TIMEOUT_S` seconds, so
a pattern that backtracks without end (``(x+x+)+y``) stops instead of hanging; all the
searches of one run share ``Limits.match_seconds`` (5 s), so a loop cannot repeat a slow one
for minutes.

>>> from lmcascade.dsl.limits import Budget, Limits
>>> budget = Budget(Limits())
>>> match(budget, r"answer: (\\d+)", "so the answer: 42.")
'42'
>>> match(budget, r"\\d+", "no digits") is None
True
>>> expansion("(a{10}){20}b")
201
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from collections.abc import Callable
from typing import Any

import regex

from lmcascade import constraints
from lmcascade.dsl.limits import Budget, OverLimit, Refusal, over
from lmcascade.dsl.values import Mismatch, kind_of
from lmcascade.trace import safe_repr

MAX_PATTERN_CHARS = 1_000
"""The longest pattern ``match`` and ``regex`` accept, in characters."""
MAX_EXPANSION = 10_000
"""How many items counted repetitions may expand a pattern to (see :func:`expansion`)."""
MAX_SCHEMA_CHARS = 10_000
"""The longest JSON schema ``json_schema`` accepts, in characters."""
MAX_SCHEMA_DEPTH = 20
"""How deeply a JSON schema may nest (objects and lists)."""
MATCH_TIMEOUT_S = 1.0
"""How long one ``match`` may search before it gives up (an :class:`OverLimit`)."""

_QUANTIFIER = re.compile(r"\{(\d*)(?:,(\d*))?\}")
_BRACED_ESCAPE = re.compile(r"\\[pPNxuUgk]\{[^}]*\}")


def _text(fn: str, what: str, value: Any) -> str:
    if not isinstance(value, str):
        raise Mismatch(f"{fn}'s {what} must be text, got {kind_of(value)} {safe_repr(value, 40)}")
    return value


def expansion(pattern: str) -> int:
    """About how many items a pattern holds once counted repetitions are expanded: each
    ``{m}`` or ``{m,n}`` multiplies the atom or group before it by its larger bound, nested
    counts multiply, everything else counts one (alternatives add up).  An over-estimate is
    fine: it only decides what is refused."""
    pattern = _BRACED_ESCAPE.sub("e", pattern)  # \\p{L}, \\x{41}...: one atom each
    levels: list[list[int]] = [[0, 0]]  # per open group: [total so far, cost of the last atom]
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        top = levels[-1]
        counted = _QUANTIFIER.match(pattern, i) if ch == "{" else None
        if counted and top[1]:
            bounds = [int(x) for x in counted.groups() if x]
            times = max(bounds, default=1)
            top[0] += top[1] * (times - 1)
            top[1] *= times
            i = counted.end()
            continue
        if ch == "(":
            levels.append([0, 0])
        elif ch == ")" and len(levels) > 1:
            cost = max(levels.pop()[0], 1)
            levels[-1][0] += cost
            levels[-1][1] = cost
        elif ch in "*+?|":
            pass
        else:
            if ch == "\\":
                i += 1
            elif ch == "[":
                i = _class_end(pattern, i)
            top[0] += 1
            top[1] = 1
        i += 1
    return sum(level[0] for level in levels)


def _class_end(pattern: str, start: int) -> int:
    """The index of the ``]`` that closes the character class opened at ``start``."""
    i = start + 1
    if i < len(pattern) and pattern[i] == "^":
        i += 1
    if i < len(pattern) and pattern[i] == "]":
        i += 1
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i


def bounded_pattern(fn: str, pattern: Any) -> str:
    """``pattern`` if ``fn`` may compile it: text, not empty, within the length and
    expansion limits; a :class:`Refusal` saying which otherwise.

    >>> bounded_pattern("match", "[0-9]+")
    '[0-9]+'
    """
    _text(fn, "pattern", pattern)
    if not pattern:
        raise Refusal(f'{fn}\'s pattern is empty; give a regular expression, e.g. "[0-9]+"')
    if len(pattern) > MAX_PATTERN_CHARS:
        raise Refusal(
            f"{fn}'s pattern has {len(pattern):,} characters; the limit is {MAX_PATTERN_CHARS:,}"
        )
    size = expansion(pattern)
    if size > MAX_EXPANSION:
        raise Refusal(
            f"{fn}'s pattern expands to about {size:,} items through its counted repetitions "
            f"({{m}} and {{m,n}}), over the limit of {MAX_EXPANSION:,}; use * or + for long "
            "runs"
        )
    return pattern


@functools.lru_cache(maxsize=256)
def compiled(pattern: str, fn: str = "match") -> Any:
    """``pattern`` compiled by the ``regex`` module (cached); a :class:`Refusal` saying why
    it is not a regular expression (``fn``'s pattern).

    >>> compiled("a+").groups
    0
    """
    try:
        return regex.compile(pattern)
    except (regex.error, OverflowError, RecursionError) as err:
        raise Refusal(
            f"{fn}'s pattern {safe_repr(pattern, 60)} is not a valid regular expression: {err}"
        ) from None


def unanchored(pattern: str) -> str:
    """A ``regex(...)`` constraint's pattern without a leading ``^`` or a trailing ``$``: the
    generated text must match all of the pattern anyway, so they change nothing, and the
    token automaton refuses them (an escaped ``\\$`` stays).

    >>> unanchored("^[0-9]+$"), unanchored(r"cost \\$"), unanchored(r"a\\\\$")
    ('[0-9]+', 'cost \\\\$', 'a\\\\\\\\')
    """
    if pattern.startswith("^"):
        pattern = pattern[1:]
    if pattern.endswith("$"):
        body = pattern[:-1]
        if (len(body) - len(body.rstrip("\\"))) % 2 == 0:  # the $ itself is not escaped
            pattern = body
    return pattern


def regex_pattern(pattern: Any) -> str:
    """The pattern a ``regex(...)`` constraint compiles: bounded (:func:`bounded_pattern`),
    without the anchors :func:`unanchored` drops, and a valid regular expression."""
    text = unanchored(bounded_pattern("regex", pattern))
    if not text:
        raise Refusal(
            f"regex's pattern {safe_repr(pattern, 20)} allows only the empty text; give a "
            'pattern the answer must match, e.g. "[0-9]+"'
        )
    compiled(text, "regex")
    return text


def match(budget: Budget, pattern: Any, text: Any) -> str | None:
    """The first match of ``pattern`` in ``text``: its first group when the pattern has
    groups (none if that group took no part), else the whole match; none when nothing
    matches.  Gives up (an :class:`OverLimit`) after :data:`MATCH_TIMEOUT_S` seconds, or
    sooner when the run's searches together reach ``budget.limits.match_seconds``."""
    pattern_re = compiled(bounded_pattern("match", pattern))
    _text("match", "text to search", text)
    allowed = budget.limits.match_seconds
    timeout = min(MATCH_TIMEOUT_S, allowed - budget.match_seconds)
    if timeout <= 0:
        raise _spent(allowed)
    start = time.perf_counter()
    try:
        found = pattern_re.search(text, timeout=timeout)
    except TimeoutError:
        if timeout < MATCH_TIMEOUT_S:
            raise _spent(allowed) from None
        raise OverLimit(
            f"match gave up after {MATCH_TIMEOUT_S:g} s on a text of {len(text):,} characters: "
            f"the pattern {safe_repr(pattern, 60)} backtracks too much (nested repetition such "
            "as (a+)+ does); write a simpler pattern"
        ) from None
    finally:
        budget.match_seconds += time.perf_counter() - start
    if found is None:
        return None
    return found.group(1) if pattern_re.groups else found.group(0)


def _spent(allowed: float) -> OverLimit:
    """The refusal for a run whose ``match`` searches took ``allowed`` seconds in all."""
    return over(
        "match_seconds",
        f"the match searches of this run took {allowed:g} s in all (the limit of one run); "
        "a pattern that backtracks much (nested repetition such as (a+)+) is searched again "
        "and again",
    )


def apply_chat(model: Any, user: Any, system: Any = None) -> str:
    """``model``'s chat prompt for the ``user`` message (and the ``system`` one), ending where
    the assistant's reply begins: ``model.chat(user, system=system)``.  A model without a chat
    format (a ToyLM, a base model without a template) gets ``user`` back unchanged, as
    ``TransformersLM.chat`` does for a model without a template.

    >>> apply_chat(object(), "Hi", system="Be brief.")
    'Hi'
    """
    _text("chat", "user message", user)
    if system is not None:
        _text("chat", "system message", system)
    method = getattr(model, "chat", None)
    if not callable(method):
        return user
    prompt = method(user, system=system)
    if not isinstance(prompt, str):
        raise Mismatch(f"the model's chat template gave {kind_of(prompt)}, not text")
    return prompt


# --- constraints -------------------------------------------------------------------------------


def _regex(pattern: Any) -> constraints.Constraint:
    return constraints.regex(regex_pattern(pattern))


def _json_schema(schema: Any) -> constraints.Constraint:
    _text("json_schema", "schema", schema)
    if len(schema) > MAX_SCHEMA_CHARS:
        raise Refusal(
            f"json_schema's schema has {len(schema):,} characters; the limit is "
            f"{MAX_SCHEMA_CHARS:,}"
        )
    try:
        parsed = json.loads(schema)
    except (ValueError, RecursionError) as err:
        raise Refusal(f"json_schema's schema is not JSON text: {err}") from None
    depth = _depth(parsed)
    if depth > MAX_SCHEMA_DEPTH:
        raise Refusal(
            f"json_schema's schema nests {depth} levels deep; the limit is {MAX_SCHEMA_DEPTH}"
        )
    made = constraints.json_schema(schema)
    size = expansion(made.pattern)
    if size > MAX_EXPANSION:
        raise Refusal(
            f"json_schema's schema makes a pattern of about {size:,} items (long maxLength or "
            f"maxItems?), over the limit of {MAX_EXPANSION:,}"
        )
    return made


def _depth(value: Any) -> int:
    """How deeply a parsed JSON value nests (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item
        if isinstance(item, dict | list):
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _forbid(*substrings: Any) -> constraints.Constraint:
    for s in substrings:
        if not _text("forbid", "argument", s):
            raise Refusal("forbid's texts must not be empty")
    return constraints.forbid(*substrings)


def _allow(texts: Any) -> constraints.Constraint:
    if not isinstance(texts, list | tuple) or not texts:
        raise Mismatch('allow needs a non-empty list of texts, e.g. allow(["yes", "no"])')
    for t in texts:
        _text("allow", "list item", t)
    return constraints.allow(texts)


def _max_word_length(n: Any) -> constraints.Constraint:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise Refusal(f"max_word_length needs a whole number >= 1, got {safe_repr(n, 40)}")
    return constraints.max_word_length(n)


CONSTRAINTS: dict[str, Callable[..., constraints.Constraint]] = {
    "regex": _regex,
    "json_schema": _json_schema,
    "forbid": _forbid,
    "allow": _allow,
    "max_word_length": _max_word_length,
}
"""The constraint builders a ``.lmc`` program may call, by name."""


# --- a model's options --------------------------------------------------------------------------

CONSTRAINT_BUILDERS = (
    "regex(...), json_schema(...), forbid(...), allow([...]) or max_word_length(n)"
)


def _whole(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _number(value: Any, test: Callable[[float], bool]) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and test(value)
    )


def _stop(value: Any) -> bool:
    texts = value if isinstance(value, list | tuple) else [value]
    return bool(texts) and all(isinstance(t, str) and t for t in texts)


LM_OPTIONS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_tokens": (lambda v: _whole(v, 1), "a whole number >= 1, e.g. max_tokens=32"),
    "min_tokens": (lambda v: _whole(v, 0), "a whole number >= 0 (at most max_tokens)"),
    "stop": (_stop, 'a text or a list of texts, none of them empty, e.g. stop="\\n"'),
    "temperature": (lambda v: _number(v, lambda x: x >= 0), "a number >= 0 (0 is greedy)"),
    "top_k": (lambda v: _whole(v, 1), "a whole number >= 1"),
    "top_p": (lambda v: _number(v, lambda x: 0 < x <= 1), "a number in (0, 1]"),
    "alpha": (lambda v: _number(v, lambda x: x > 0), "a number > 0 (the power of p(text))"),
    "proposal_temperature": (lambda v: _number(v, lambda x: x > 0), "a number > 0"),
    "constraint": (
        lambda v: isinstance(v, constraints.Constraint),
        f"a constraint: {CONSTRAINT_BUILDERS}",
    ),
    "potential": (
        lambda v: callable(v) or getattr(v, "is_lm", False),
        "a tool named bare (a function of the partial text) or a model call, "
        'e.g. potential=lm2("...")',
    ),
}
"""Each option of a model's site: what its value must pass, and what it must be (in words)."""


def lm_option(model: str, key: str, value: Any) -> None:
    """Refuses ``value`` for option ``key`` of a site of ``model`` unless it is one the model
    takes (none leaves an option unset), saying in the DSL's words what it must be.

    >>> lm_option("lm", "stop", 3)
    Traceback (most recent call last):
    ...
    lmcascade.dsl.values.Mismatch: lm's stop= must be a text or a list of texts, none of them \
empty, e.g. stop="\\n"; got a whole number 3
    """
    test, wanted = LM_OPTIONS[key]
    if value is None or test(value):
        return
    got = "a constraint" if isinstance(value, constraints.Constraint) else kind_of(value)
    raise Mismatch(f"{model}'s {key}= must be {wanted}; got {got} {safe_repr(value, 40)}")


def _frozen(value: Any) -> Any:
    return tuple(map(_frozen, value)) if isinstance(value, list | tuple) else value


@functools.lru_cache(maxsize=256)
def _cached(name: str, key: tuple) -> constraints.Constraint:
    return CONSTRAINTS[name](*(value for _, value in key))


def constraint(budget: Budget, name: str, *args: Any) -> constraints.Constraint:
    """The constraint ``name(*args)``, one object per distinct call: every trace of a program
    gets the same object, so a regex is compiled for a model once, not once per trace.

    >>> constraint(None, "regex", "[0-9]+") is constraint(None, "regex", "[0-9]+")
    True
    """
    key = tuple((type(a), _frozen(a)) for a in args)  # true and 1 are equal, not the same
    try:
        hash(key)
    except TypeError:
        return CONSTRAINTS[name](*args)
    return _cached(name, key)
