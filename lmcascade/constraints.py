"""Token-level constraints on LM sites: masks computed once per model, on its device.

A constraint restricts which tokens an LM site may generate; the text must satisfy it.  It
acts as a hard condition on the site: the site's probability is the model's ``p(text)`` when
the text satisfies the constraint and 0 otherwise, so inference targets the *global*
conditional ``p(text | constraint)``.  Samplers draw from the locally masked distribution and
multiply the weight by the allowed probability mass at every step — masking without that
correction would sample a different, biased distribution.

A constraint is a small state machine over tokens: ``start`` gives the initial state,
``mask(model, state)`` the allowed tokens (cached per model and state), ``advance`` the next
state.  eos is always allowed.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["ab", "cd", "e", " ", "<eos>"], lambda ctx: [0.0] * 5)
>>> forbid("e").mask(lm, None).tolist()
[True, True, False, True, True]
>>> c = max_word_length(2)
>>> state = c.advance(lm, c.start(lm), 0)      # "ab": the current word has 2 letters
>>> c.mask(lm, state).tolist()                  # only a space (or eos) may follow
[False, False, False, True, True]
"""

from __future__ import annotations

import re
import sys
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from lmcascade.errors import SiteError


class Constraint:
    """Base class: a stateless vocabulary mask (subclasses override :meth:`allowed`)."""

    def __init__(self) -> None:
        # Everything derived from a model lives as long as the model does (never keyed by
        # id(), which a later model can reuse).
        self._per_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __getstate__(self) -> dict:
        """Pickled (a result coming back from a Ray worker): the per-model caches stay."""
        state = self.__dict__.copy()
        state["_per_model"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._per_model = weakref.WeakKeyDictionary()

    def cache(self, model) -> dict:
        """This constraint's cache for ``model`` (masks by state, token texts, automata)."""
        found = self._per_model.get(model)
        if found is None:
            found = self._per_model[model] = {"masks": {}}
        return found

    def token_texts(self, model) -> list[str]:
        """Each token's text, from its exact bytes (cached per model)."""
        cache = self.cache(model)
        if "texts" not in cache:
            cache["texts"] = [
                b.decode("utf-8", errors="replace") if b else "" for b in model.token_bytes()
            ]
        return cache["texts"]

    def start(self, model) -> Any:
        return None

    def advance(self, model, state: Any, token_id: int) -> Any:
        return state

    def allowed(self, text: str, state: Any) -> bool:
        raise NotImplementedError

    def mask(self, model, state: Any) -> torch.Tensor:
        """Boolean mask over the vocabulary on the model's device (eos always allowed)."""
        masks = self.cache(model)["masks"]
        cached = masks.get(state)
        if cached is None:
            texts = self.token_texts(model)
            allowed = [self.allowed(t, state) for t in texts]
            allowed[model.eos_id] = True
            cached = torch.tensor(allowed, dtype=torch.bool, device=model.device)
            masks[state] = cached
        return cached

    def complete(self, model, state: Any) -> bool:
        """Whether a text ending in ``state`` satisfies the constraint (regexes need a full
        match; vocabulary masks are always satisfied)."""
        return True


class Forbid(Constraint):
    """No generated token may contain any of ``substrings``."""

    def __init__(self, substrings: Iterable[str]) -> None:
        super().__init__()
        self.substrings = tuple(substrings)

    def allowed(self, text: str, state: Any) -> bool:
        return not any(s in text for s in self.substrings)

    def __repr__(self) -> str:
        return f"forbid({', '.join(map(repr, self.substrings))})"


class Allow(Constraint):
    """Only tokens whose text is in ``texts`` may be generated."""

    def __init__(self, texts: Iterable[str]) -> None:
        super().__init__()
        self.texts = frozenset(texts)

    def allowed(self, text: str, state: Any) -> bool:
        return text in self.texts

    def __repr__(self) -> str:
        return f"allow({sorted(self.texts)!r})"


class MaxWordLength(Constraint):
    """No word (a run of non-space characters) longer than ``n``; the state is the length of
    the word in progress."""

    def __init__(self, n: int) -> None:
        super().__init__()
        if not isinstance(n, int) or n < 1:
            raise SiteError(f"max_word_length needs a positive integer, got {n!r}")
        self.n = n

    def start(self, model) -> int:
        return 0

    def advance(self, model, state: int, token_id: int) -> int:
        if token_id == model.eos_id:
            return state
        runs = re.split(r"\s", self.token_texts(model)[token_id])
        return state + len(runs[0]) if len(runs) == 1 else len(runs[-1])

    def allowed(self, text: str, state: int) -> bool:
        runs = re.split(r"\s", text)
        return state + len(runs[0]) <= self.n and all(len(r) <= self.n for r in runs[1:])

    def __repr__(self) -> str:
        return f"max_word_length({self.n})"


class Predicate(Constraint):
    """An arbitrary Python test of the partial text, sampled by adaptive weighted rejection.

    ``prefix_ok(text)`` says whether a partial text can still be extended to a valid one;
    ``complete_ok(text)`` (default: ``prefix_ok``) whether a finished text is valid.  Samplers
    never evaluate it on the whole vocabulary: candidates are drawn without replacement
    (Gumbel-max order) and tested one at a time until one passes, and the weight gets an
    unbiased estimate of the allowed probability mass (Lipkin et al. 2025, recursive AWRS).
    Exact enumeration and scoring, which need the full allowed set, evaluate every token.
    The state is the text generated so far.
    """

    by_rejection = True

    def __init__(self, prefix_ok, complete_ok=None) -> None:
        super().__init__()
        if not callable(prefix_ok) or (complete_ok is not None and not callable(complete_ok)):
            raise SiteError("predicate needs functions of the partial text returning bool")
        self.prefix_ok = prefix_ok
        self.complete_ok = complete_ok or prefix_ok
        self.calls = 0

    def start(self, model) -> bytes:
        return b""

    def _bytes(self, model) -> list[bytes]:
        cache = self.cache(model)
        if "bytes" not in cache:
            cache["bytes"] = [b or b"" for b in model.token_bytes()]
        return cache["bytes"]

    def advance(self, model, state: bytes, token_id: int) -> bytes:
        if token_id == model.eos_id:
            return state
        return state + self._bytes(model)[token_id]

    @staticmethod
    def _text(data: bytes) -> str:
        # an incomplete character at the end is left out until its last byte arrives
        return data.decode("utf-8", errors="ignore")

    def accepts(self, model, state: bytes, token_id: int) -> bool:
        """One evaluation of the predicate: may ``token_id`` follow ``state``?"""
        self.calls += 1
        if token_id == model.eos_id:
            return bool(self.complete_ok(self._text(state)))
        return bool(self.prefix_ok(self._text(state + self._bytes(model)[token_id])))

    def complete(self, model, state: bytes) -> bool:
        return bool(self.complete_ok(self._text(state)))

    def mask(self, model, state: Any) -> torch.Tensor:
        masks = self.cache(model)["masks"]
        cached = masks.get(state)
        if cached is None:
            allowed = [self.accepts(model, state, i) for i in range(model.vocab_size)]
            cached = torch.tensor(allowed, dtype=torch.bool, device=model.device)
            if len(masks) > 10_000:
                masks.clear()
            masks[state] = cached
        return cached

    def __repr__(self) -> str:
        return f"predicate({getattr(self.prefix_ok, '__name__', 'fn')})"


def predicate(prefix_ok, complete_ok=None) -> Predicate:
    """A constraint given by Python functions of the partial (and of the finished) text.

    >>> predicate(lambda text: text.count("a") <= 1)
    predicate(<lambda>)
    """
    return Predicate(prefix_ok, complete_ok)


_COMPILING: dict[tuple, tuple[threading.Thread, dict]] = {}
_COMPILING_LOCK = threading.Lock()


COMPILE_TIMEOUT_S = 300.0
"""How long a constraint may take to compile (seconds) before it is refused with a
:class:`~lmcascade.errors.SiteError`; ``None`` waits for ever.  Some short regexes make an
automaton that grows exponentially (``[a-z]*a[a-z]{20}``: about an hour on a real
vocabulary); large JSON schemas can legitimately take minutes."""


def compile_index(index_type: Any, pattern: str, vocabulary: Any, model: Any) -> Any:
    """``index_type(pattern, vocabulary)``, built in a worker thread so that Ctrl-C still
    interrupts the wait (outlines-core releases the GIL; a large JSON schema can take
    minutes), saying on stderr that it is compiling when that takes more than two seconds.
    A compilation cannot be cancelled half-way: after Ctrl-C it finishes in the background,
    and asking again for the same pattern and model waits for that one instead of starting
    a second.  Waiting longer than :data:`COMPILE_TIMEOUT_S` is a :class:`SiteError` (the
    compilation goes on in the background, as after Ctrl-C)."""
    key = (id(index_type), pattern, id(model))
    model_name = getattr(model, "name", model)
    with _COMPILING_LOCK:
        found = _COMPILING.get(key)
        if found is None:
            box: dict[str, Any] = {}

            def work() -> None:
                try:
                    box["index"] = index_type(pattern, vocabulary)
                except BaseException as err:  # handed to the caller's thread
                    box["error"] = err

            worker = threading.Thread(target=work, name="lmcascade-regex-compile", daemon=True)
            found = _COMPILING[key] = (worker, box)
            worker.start()
    worker, box = found
    start = time.monotonic()
    said = False
    while worker.is_alive():
        worker.join(0.1)
        waited = time.monotonic() - start
        if COMPILE_TIMEOUT_S is not None and waited > COMPILE_TIMEOUT_S and worker.is_alive():
            raise SiteError(
                f"compiling the constraint {pattern[:200]!r} for model {model_name!r} took more "
                f"than {COMPILE_TIMEOUT_S:g} s; its automaton is too large (a repetition such as "
                "`.*a.{20}` grows exponentially): simplify it, or raise "
                "lmcascade.constraints.COMPILE_TIMEOUT_S"
            )
        if not said and worker.is_alive() and time.monotonic() - start > 2.0:
            print(
                f"lmcascade: compiling a constraint for model {model_name!r} "
                f"({len(pattern)}-character pattern); large schemas take minutes, Ctrl-C stops "
                "waiting",
                file=sys.stderr,
            )
            said = True
    with _COMPILING_LOCK:
        _COMPILING.pop(key, None)
    if "error" in box:
        raise box["error"]
    return box["index"]


SENTINEL = "\ue000"  # appended to regexes that match the empty string (see Regex)


def _unanchored(pattern: str) -> str:
    """``pattern`` without a leading ``^`` or a trailing (unescaped) ``$``: a regex constraint
    always matches the whole text, and the automaton compiler refuses anchors.

    >>> _unanchored("^[0-9]+$"), _unanchored(r"cost \\$")
    ('[0-9]+', 'cost \\\\$')
    """
    if pattern.startswith("^"):
        pattern = pattern[1:]
    if pattern.endswith("$"):
        escapes = len(pattern) - 1 - len(pattern[:-1].rstrip("\\"))
        if escapes % 2 == 0:
            pattern = pattern[:-1]
    if not pattern:
        raise SiteError("regex needs a pattern besides its anchors ^ and $")
    return pattern


class Regex(Constraint):
    """The text must fully match a regular expression, enforced token by token.

    The expression is compiled against each model's vocabulary (token bytes) into a
    token-level automaton by ``outlines-core``; states are automaton states and eos is allowed
    only where the text so far is a complete match.  The pattern is anchored as ``(?:R)$``
    (without the end anchor the automaton drops tokens that extend an already complete
    match); a pattern that matches the empty string is compiled with a sentinel token
    appended instead, and a state is complete when the sentinel could follow.
    """

    def __init__(self, pattern: str) -> None:
        super().__init__()
        if not isinstance(pattern, str) or not pattern:
            raise SiteError(f"regex needs a non-empty pattern string, got {pattern!r}")
        self.pattern = _unanchored(pattern)

    _SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> pattern -> cache
    SHARED_PATTERNS = 32  # compiled patterns kept per model, most recent first

    def cache(self, model) -> dict:
        """The cache of this pattern for ``model``, shared by every ``regex`` object with the
        same pattern: compiling an automaton for a real vocabulary takes seconds, so a
        program that builds ``regex(p)`` afresh per input compiles it once."""
        per = Regex._SHARED.get(model)
        if per is None:
            per = Regex._SHARED[model] = {}
        found = per.pop(self.pattern, None)
        if found is None:
            found = {"masks": {}}
        per[self.pattern] = found  # most recent last
        while len(per) > self.SHARED_PATTERNS:
            del per[next(iter(per))]
        return found

    def _index(self, model) -> tuple[Any, int | None]:
        cache = self.cache(model)
        if "index" not in cache:
            from outlines_core import Index, Vocabulary

            pieces = model.token_bytes()
            table: dict[bytes, list[int]] = {}
            for i, piece in enumerate(pieces):
                if piece:
                    table.setdefault(piece, []).append(i)
            try:
                index = compile_index(
                    Index, f"(?:{self.pattern})$", Vocabulary(model.eos_id, table), model
                )
                sentinel = None
            except ValueError as err:
                if "universal start state" not in str(err):
                    raise SiteError(
                        f"regex {self.pattern!r} cannot be compiled for model {model.name!r}: {err}"
                    ) from None
                mark = SENTINEL.encode("utf-8")
                sentinel = len(pieces)
                table = {b: ids for b, ids in table.items() if b"\xee" not in b}
                table[mark] = [sentinel]
                try:
                    index = compile_index(
                        Index,
                        f"(?:{self.pattern}){SENTINEL}",
                        Vocabulary(model.eos_id, table),
                        model,
                    )
                except ValueError as again:
                    raise SiteError(
                        f"regex {self.pattern!r} cannot be compiled for model {model.name!r}: "
                        f"{again}"
                    ) from None
            cache["index"] = (index, sentinel)
        return cache["index"]

    def start(self, model) -> int:
        return self._index(model)[0].get_initial_state()

    def advance(self, model, state: int, token_id: int) -> int:
        if token_id == model.eos_id:
            return state
        nxt = self._index(model)[0].get_next_state(state, token_id)
        return state if nxt is None else nxt

    def complete(self, model, state: int) -> bool:
        index, sentinel = self._index(model)
        if sentinel is None:
            return bool(index.is_final_state(state))
        after = index.get_next_state(state, sentinel)
        return after is not None and bool(index.is_final_state(after))

    def mask(self, model, state: Any) -> torch.Tensor:
        masks = self.cache(model)["masks"]
        cached = masks.get(state)
        if cached is None:
            index, sentinel = self._index(model)
            allowed = torch.zeros(model.vocab_size, dtype=torch.bool)
            ids = [i for i in (index.get_allowed_tokens(state) or []) if i != sentinel]
            allowed[torch.tensor(ids, dtype=torch.long)] = True
            allowed[model.eos_id] = self.complete(model, state)
            cached = allowed.to(model.device)
            masks[state] = cached
        return cached

    def __repr__(self) -> str:
        return f"regex({self.pattern!r})"


def regex(pattern: str) -> Regex:
    """The generated text must fully match ``pattern`` (compiled with outlines-core).

    >>> regex(r"[0-9]+")
    regex('[0-9]+')
    """
    return Regex(pattern)


def json_schema(schema: Any, *, whitespace: str = "") -> Regex:
    """The generated text must be JSON valid under ``schema`` (a dict or a JSON string);
    ``whitespace`` is the regex allowed between tokens of the JSON ("" for compact JSON).
    Keywords the compiler cannot enforce (:data:`UNENFORCED_KEYWORDS`: ``minimum``,
    ``maximum``, ``multipleOf``, ``uniqueItems``...) are refused rather than ignored.

    >>> json_schema({"type": "integer"})
    regex('(-)?(0|[1-9][0-9]*)')
    """
    import json

    from outlines_core.json_schema import build_regex_from_schema

    try:
        text = schema if isinstance(schema, str) else json.dumps(schema)
        _refuse_unenforced(json.loads(text))
        pattern = build_regex_from_schema(text, whitespace_pattern=whitespace)
    except (ValueError, TypeError, RecursionError) as err:
        raise SiteError(f"cannot turn this JSON schema into a constraint: {err}") from None
    try:
        admits_empty = re.fullmatch(pattern, "") is not None
    except (re.error, RecursionError, OverflowError):
        admits_empty = False  # a pattern Python cannot read: outlines-core checks it later
    if admits_empty:  # no JSON text is empty: the schema admits no value (e.g. an empty enum)
        raise SiteError(f"the JSON schema {text[:200]!r} admits no value; nothing can match it")
    return Regex(pattern)


UNENFORCED_KEYWORDS = frozenset(
    {
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "if",
        "then",
        "else",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "propertyNames",
        "unevaluatedItems",
        "unevaluatedProperties",
    }
)
"""JSON-schema keywords the automaton compiler (outlines-core) does not enforce: a schema
using one is refused, since text generated under it could break the schema."""

_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_DATA_KEYWORDS = ("enum", "const", "default", "examples", "description", "title")


def _refuse_unenforced(schema: Any, where: str = "") -> None:
    """Raises a :class:`SiteError` naming the first keyword of :data:`UNENFORCED_KEYWORDS`
    in ``schema`` (a parsed JSON schema), with its path."""
    stack = [(schema, where)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, list):
            stack.extend((v, f"{path}/{i}") for i, v in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            here = f"{path}/{key}"
            if key in UNENFORCED_KEYWORDS:
                raise SiteError(
                    f"JSON schema keyword {key!r} (at {here}) is not enforced by the constraint "
                    "compiler, so generated JSON could break it; remove it and check the value "
                    "after generation (lc.condition), or express it with enum, pattern, "
                    "minLength/maxLength or minItems/maxItems"
                )
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                stack.extend((v, f"{here}/{k}") for k, v in value.items())
            elif key not in _DATA_KEYWORDS:
                stack.append((value, here))


def forbid(*substrings: str) -> Forbid:
    """Tokens containing any of ``substrings`` (characters or longer) are never generated.

    >>> forbid("e", "E")
    forbid('e', 'E')
    """
    if not substrings or any(not isinstance(s, str) or not s for s in substrings):
        raise SiteError("forbid needs one or more non-empty strings")
    return Forbid(substrings)


def allow(texts: Iterable[str]) -> Allow:
    """Only tokens whose text is one of ``texts`` are generated.

    >>> allow(["yes", "no"])
    allow(['no', 'yes'])
    """
    return Allow(texts)


def max_word_length(n: int) -> MaxWordLength:
    """No word longer than ``n`` characters.

    >>> max_word_length(5)
    max_word_length(5)
    """
    return MaxWordLength(n)
