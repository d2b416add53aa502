"""The embedded DSL: programs are generator functions that ``yield`` named effects.

>>> import lmcascade as lc
>>> from pyro.distributions import Bernoulli
>>> @lc.program
... def coin(p):
...     heads = yield lc.sample("heads", Bernoulli(p))
...     yield lc.condition("not_tails", heads == 1)
...     return "H"
>>> bound = coin(0.3)          # binds arguments; nothing runs yet
>>> bound
coin(0.3)
>>> lc.infer(bound, method="enumerate").distribution()
{'H': 1.0}

Effects (each a small frozen record) say what the program wants; inference methods decide
what they mean: sample from the prior, replay a recorded value, branch over every value...

Site names must be unique within one execution.  Inside loops, either build the name
(``f"step{i}"``) or end it with ``[]``: ``"step[]"`` becomes ``step[0]``, ``step[1]``, ...
in the order the sites occur.  :class:`scope` prefixes the names of the effects created
inside it (``with lc.scope("draft"):`` turns ``"text"`` into ``draft/text``), so a sub-program
can be called twice.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Generator, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from lmcascade.errors import ProgramError, SiteError

# The name scope the running code is in, outermost name first.  The engine makes a particle's
# scope current only while its generator runs (see :func:`send`); outside programs it is ().
_CURRENT: ContextVar[tuple[str, ...]] = ContextVar("lmcascade_scope", default=())


@dataclass(frozen=True, slots=True)
class Effect:
    """Base of every request a program yields; ``name`` identifies its site in the trace."""

    name: str

    kind = "effect"


@dataclass(frozen=True, slots=True)
class Sample(Effect):
    """A random choice ``x ~ dist``; the program receives the chosen value (for an LM site
    with ``details``, a :class:`~lmcascade.generation.Generation` describing it)."""

    dist: Any
    details: bool = False
    kind = "sample"


@dataclass(frozen=True, slots=True)
class Observe(Effect):
    """Conditioning on ``value`` having been drawn from ``dist``: adds ``dist.log_prob(value)``."""

    dist: Any
    value: Any
    kind = "observe"


@dataclass(frozen=True, slots=True)
class Factor(Effect):
    """Adds ``log_weight`` to the trace's log-weight (soft constraint, reward)."""

    log_weight: Any
    kind = "factor"


@dataclass(frozen=True, slots=True)
class Condition(Effect):
    """A hard constraint: the trace has weight zero unless ``ok`` is true."""

    ok: Any
    kind = "condition"


@dataclass(frozen=True, slots=True)
class Call(Effect):
    """A deterministic tool call ``fn(*args, **kwargs)``, recorded and memoised on replay."""

    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    kind = "call"


@dataclass(frozen=True, slots=True)
class Score(Effect):
    """The log-probability ``model`` gives ``text`` right after ``prompt``; the program
    receives it as a float and the trace's weight is unchanged."""

    model: Any
    prompt: str
    text: str
    kind = "score"


def _check_name(name: object) -> str:
    """The site's full name: ``name`` checked, behind the current scope's prefix."""
    if not isinstance(name, str) or not name:
        raise SiteError(f"a site name must be a non-empty string, got {name!r}")
    current = _CURRENT.get()
    return "/".join((*current, name)) if current else name


def sample(name: str, dist: Any) -> Sample:
    """``x = yield lc.sample(name, dist)``: a random choice from ``dist``.

    ``dist`` is an :class:`lc.LM` or any ``pyro.distributions`` distribution.

    >>> import lmcascade as lc
    >>> from pyro.distributions import Categorical
    >>> lc.sample("color", Categorical(probs=__import__("torch").tensor([0.5, 0.5]))).name
    'color'
    """
    name = _check_name(name)
    if not (getattr(dist, "is_lm", False) or hasattr(dist, "log_prob")):
        raise SiteError(
            f"site {name!r}: sample needs an lc.LM or a pyro distribution, got "
            f"{type(dist).__name__}"
        )
    return Sample(name, dist)


def observe(name: str, dist: Any, value: Any) -> Observe:
    """``yield lc.observe(name, dist, value)``: weight the trace by ``dist.log_prob(value)``.

    >>> import lmcascade as lc
    >>> from pyro.distributions import Bernoulli
    >>> lc.observe("saw_heads", Bernoulli(0.9), 1.0).kind
    'observe'
    """
    name = _check_name(name)
    if not (getattr(dist, "is_lm", False) or hasattr(dist, "log_prob")):
        raise SiteError(
            f"site {name!r}: observe needs an lc.LM or a pyro distribution, got "
            f"{type(dist).__name__}"
        )
    return Observe(name, dist, value)


def factor(name: str, log_weight: Any) -> Factor:
    """``yield lc.factor(name, log_weight)``: add a score to the trace's log-weight.

    >>> import lmcascade as lc
    >>> lc.factor("reward", -1.5).log_weight
    -1.5
    """
    return Factor(_check_name(name), log_weight)


def condition(name: str, ok: Any) -> Condition:
    """``yield lc.condition(name, ok)``: a hard constraint; the trace is rejected unless ``ok``.

    >>> import lmcascade as lc
    >>> lc.condition("is_number", "42".isdigit()).ok
    True
    """
    return Condition(_check_name(name), ok)


def call(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Call:
    """``y = yield lc.call(name, fn, *args)``: a recorded, replay-memoised tool call.

    ``fn(*args, **kwargs)`` runs once per execution; a replayed execution gets the recorded
    result.  A tool that raises (or, wrapped as ``lc.tool(fn, timeout=...)``, runs too long)
    gives the site weight zero with the exception in ``site.error`` and ends the trace; the
    run goes on (``lc.infer(..., on_tool_error="raise")`` stops it with the error instead).

    >>> import lmcascade as lc
    >>> lc.call("calc", eval, "1 + 1").fn is eval
    True
    """
    name = _check_name(name)
    if not callable(fn):
        raise SiteError(f"site {name!r}: call needs a callable, got {type(fn).__name__}")
    return Call(name, fn, tuple(args), dict(kwargs))


def gen(name: str, model: Any, prompt: str, *, details: bool = False, **params: Any) -> Sample:
    """``text = yield lc.gen(name, model, prompt, **params)``: sugar for
    ``lc.sample(name, lc.LM(model, prompt, **params))``.

    With ``details=True`` the program receives a :class:`~lmcascade.generation.Generation`
    instead of the text: the text with its tokens, their log-probabilities under the model,
    their mean and how the generation ended (``str(out)`` is the text).  The site's value in
    the trace stays the text.

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["a", "<eos>"], lambda ctx: [0.0, 0.0])
    >>> lc.gen("answer", lm, "a", max_tokens=4).dist.max_tokens
    4
    >>> lc.gen("answer", lm, "a", details=True).details
    True
    """
    from lmcascade.distributions import LM

    name = _check_name(name)
    if not isinstance(details, bool):
        raise SiteError(f"site {name!r}: details must be True or False, got {details!r}")
    try:
        dist = LM(model, prompt, **params)
    except TypeError as err:
        raise SiteError(
            f"site {name!r}: {err}; LM takes max_tokens, stop, temperature, top_k, top_p"
        ) from None
    except SiteError as err:
        raise SiteError(f"site {name!r}: {err}") from None
    return Sample(name, dist, details)


def score(name: str, model: Any, prompt: str, text: str) -> Score:
    """``lp = yield lc.score(name, model, prompt, text)``: the log-probability ``model``
    assigns to ``text`` as the continuation of ``prompt`` — the sum of its tokens'
    (``model.encode(text)``) log-probabilities under the model itself, with no end of text
    after them.  It is a deterministic computation, recorded as a ``"score"`` site: the
    trace's weight does not change (weigh with ``lc.factor`` if you want it to).  Particles
    waiting on scores share one batched model pass.

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["a", "<eos>"], lambda ctx: [0.0, 0.0])
    >>> lc.score("conf", lm, "a", "aa").kind
    'score'
    """
    name = _check_name(name)
    from lmcascade.models.base import LanguageModel

    if not isinstance(model, LanguageModel):
        raise SiteError(
            f"site {name!r}: score needs a LanguageModel (ToyLM, TransformersLM...), got "
            f"{type(model).__name__}"
        )
    for what, value in (("prompt", prompt), ("text", text)):
        if not isinstance(value, str):
            raise SiteError(
                f"site {name!r}: score's {what} must be a string, got {type(value).__name__}"
            )
    return Score(name, model, prompt, text)


class Program:
    """A probabilistic program: a generator function made callable as a model.

    Use :func:`program` as a decorator.  Calling the program binds arguments and returns a
    :class:`BoundProgram`; ``lc.infer`` runs it.
    """

    def __init__(self, fn: Callable[..., Generator]) -> None:
        if not inspect.isgeneratorfunction(fn):
            raise ProgramError(
                f"@lc.program needs a generator function; {getattr(fn, '__name__', fn)!r} "
                "has no `yield`. Write effects as `x = yield lc.sample(...)`."
            )
        self.fn = fn
        self.name = fn.__name__
        self.signature = inspect.signature(fn)
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> BoundProgram:
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as err:
            raise ProgramError(
                f"program {self.name!r} called with bad arguments: {err}; "
                f"its signature is {self.name}{self.signature}"
            ) from None
        return BoundProgram(self, args, kwargs)

    def __repr__(self) -> str:
        return f"<lmcascade program {self.name}{self.signature}>"


class BoundProgram:
    """A program with its arguments bound; iterate it (or ``yield from`` it) to run it."""

    def __init__(self, program: Program, args: tuple, kwargs: dict) -> None:
        self.program = program
        self.args = args
        self.kwargs = kwargs

    @property
    def name(self) -> str:
        return self.program.name

    def __iter__(self) -> Iterator:
        return self.program.fn(*self.args, **self.kwargs)

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.program.name}({', '.join(parts)})"


def program(fn: Callable[..., Generator]) -> Program:
    """Decorator: turns a generator function into an lmcascade :class:`Program`.

    >>> import lmcascade as lc
    >>> @lc.program
    ... def hello():
    ...     yield lc.factor("f", 0.0)
    ...     return "hi"
    >>> lc.infer(hello(), method="forward", num_samples=2, seed=0).values
    ['hi', 'hi']
    """
    return Program(fn)


EFFECT_TYPES = (Sample, Observe, Factor, Condition, Call, Score)


class _Scope(tuple):
    """A scope (its names, outermost first) that also carries the auto-index counters of the
    execution it belongs to, for scope names ending in ``[]``.  It starts afresh with every run
    of a generator (the engine starts each one in scope ``()``), so replay numbers alike."""

    counters: dict[str, int]


def _with_names(current: tuple[str, ...], names: tuple[str, ...]) -> tuple[str, ...]:
    counters = getattr(current, "counters", None)
    if counters is None:
        return tuple(names)
    out = _Scope(names)
    out.counters = counters
    return out


class scope:  # noqa: N801 - used like a function: ``with lc.scope("draft"):``
    """A name scope: the effects created inside get names prefixed ``name/``.

    Use it as a context manager around effects or sub-program calls, or as a decorator on a
    program (either side of ``@lc.program``) or a generator function; calling it on a bound
    program scopes that call.  Scopes nest (``a/b/x``), and a ``with`` block may span yields:
    each execution keeps its own scope, so interleaved particles never see each other's.
    A name ending in ``[]`` is numbered per execution, in the order the scopes are entered
    (``try[0]``, ``try[1]``, ...), which suits loops.  ``with`` gives the full prefix.

    >>> import lmcascade as lc
    >>> from pyro.distributions import Bernoulli
    >>> @lc.program
    ... def flip():
    ...     return (yield lc.sample("x", Bernoulli(0.5)))
    >>> @lc.program
    ... def two():
    ...     with lc.scope("first"):
    ...         a = yield from flip()
    ...     for _ in range(2):
    ...         with lc.scope("again[]"):
    ...             b = yield from flip()
    ...     return int(a + b)
    >>> lc.infer(two(), method="forward", num_samples=1, seed=0).traces[0].names
    ['first/x', 'again[0]/x', 'again[1]/x']
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name or "/" in name or name == "[]":
            raise SiteError(
                f"a scope name must be a non-empty string without '/', got {name!r}; "
                'nest scopes instead: with lc.scope("a"): with lc.scope("b"): ...'
            )
        self.name = name

    def __enter__(self) -> str:
        current = _CURRENT.get()
        if self.name.endswith("[]"):
            base = self.name[:-2]
            counters = getattr(current, "counters", None)
            if counters is None:
                counters = {}
            key = "/".join((*current, base))
            index = counters.get(key, 0)
            counters[key] = index + 1
            new: tuple[str, ...] = _Scope((*current, f"{base}[{index}]"))
            new.counters = counters  # type: ignore[attr-defined]
        else:
            new = _with_names(current, (*current, self.name))
        _CURRENT.set(new)
        return "/".join(new)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and issubclass(exc_type, GeneratorExit):
            # A generator being closed (or collected): whatever runs now is not that
            # execution, and its scope dies with it.
            return
        current = _CURRENT.get()
        last = current[-1] if current else None
        if self.name.endswith("[]"):
            ok = last is not None and last.startswith(self.name[:-1]) and last.endswith("]")
        else:
            ok = last == self.name
        if ok:
            _CURRENT.set(_with_names(current, current[:-1]))
        elif exc_type is None:
            raise ProgramError(
                f"scope {self.name!r} ended inside scope {'/'.join(current) or '()'!r}; "
                "enter scopes with `with lc.scope(...)` inside the program that runs them"
            )

    def __call__(self, target: Any) -> Any:
        """Scopes a program, a generator function or a plain function (as a decorator), or a
        bound program (one call)."""
        if isinstance(target, BoundProgram):
            return BoundProgram(self(target.program), target.args, target.kwargs)
        if isinstance(target, Program):
            return Program(self(target.fn))
        if inspect.isgeneratorfunction(target):

            @functools.wraps(target)
            def scoped_generator(*args: Any, **kwargs: Any) -> Generator:
                with self:
                    return (yield from target(*args, **kwargs))

            return scoped_generator
        if callable(target):

            @functools.wraps(target)
            def scoped(*args: Any, **kwargs: Any) -> Any:
                with self:
                    return target(*args, **kwargs)

            return scoped
        raise ProgramError(
            f"lc.scope({self.name!r}) applies to a program, a function or a bound program, "
            f"not {type(target).__name__}; around effects, write `with lc.scope(...):`"
        )

    def __repr__(self) -> str:
        return f"lc.scope({self.name!r})"


def current_scope() -> str:
    """The prefix the running code's site names get (``""`` outside any scope)."""
    return "/".join(_CURRENT.get())


def send(gen: Iterator, value: Any, scope: tuple[str, ...]) -> tuple[Any, tuple[str, ...]]:
    """Resumes a program's generator with ``value`` inside name scope ``scope``; returns the
    next thing it yields and the scope it is in then.  (StopIteration propagates.)

    Many programs' generators are interleaved by the engine, so the scope a generator is in
    travels with its particle and is only current while the generator runs: the caller's
    scope is restored afterwards, however the generator stops.
    """
    outer = _CURRENT.get()
    _CURRENT.set(scope)
    try:
        return gen.send(value), _CURRENT.get()
    finally:
        _CURRENT.set(outer)
