"""Turning a checked ``.lmc`` module into ordinary lmcascade programs.

Each ``program`` becomes a :class:`~lmcascade.program.Program` whose body walks the syntax
tree and yields the same effects a Python program would, so every inference method runs a
``.lmc`` program unchanged.  Only the tools passed in are callable: a ``.lmc`` file cannot run
arbitrary code.

Site names are unique by construction.  A sample site is named by its variable (inside a loop
with an automatic index, ``x[0]``, ``x[1]``...; the checker rejects a variable sampled twice
where both can run).  Every observe, condition and factor statement gets a name of its own
from its kind and line (``condition@7``; the second and later of that kind on the same line
add their column, ``condition@7:30``), and tool-call sites are named by tool, line and column;
all are indexed the same way in loops.  A call of another program runs in a name scope named
the same way after the callee (``helper@7/x``; ``helper@7[0]/x``... in loops), so a
sub-program can be called twice.

Every run of a program (every trace) gets a fresh :class:`~lmcascade.dsl.limits.Budget` of
steps, value sizes, digits, call depth and loop iterations; a called program shares its
caller's.  Running over one, and every failure of an operation in the program (a type error,
a bad index, a division by zero, bad distribution parameters...), is a
:class:`~lmcascade.errors.DSLRuntimeError` with the file, line and column, never a Python
traceback; ``try ... else ...`` catches all but a spent budget (a :class:`BudgetError`).  A
tool that raises outside ``try`` is the core's to handle, as for a Python program: its trace
gets weight zero (or, under ``on_tool_error="raise"``, the run stops with a located error).

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> toy = ToyLM(["yes", "no", "<eos>"], lambda ctx: [0.0, 0.0, -1.0])
>>> progs = lc.load('program ask() { a ~ lm("yes", max_tokens=1) condition a != "" return a }',
...                 models={"lm": toy})
>>> sorted(lc.infer(progs.ask(), method="enumerate").distribution())
['no', 'yes']
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import torch

from lmcascade import program as effects
from lmcascade.distributions import (
    LM,
    Beta,
    Binomial,
    Categorical,
    Delta,
    Geometric,
    Normal,
    Poisson,
    Uniform,
)
from lmcascade.dsl import ast
from lmcascade.dsl.instruct import CONSTRAINTS, apply_chat, constraint, lm_option, match
from lmcascade.dsl.limits import SIZE_PER_STEP, Budget, Limits, OverLimit, Refusal, over
from lmcascade.dsl.tools import calc
from lmcascade.dsl.values import Mismatch, kind_of
from lmcascade.errors import DSLError, DSLRuntimeError, LMCascadeError
from lmcascade.policy import ON_TOOL_ERROR
from lmcascade.program import Program
from lmcascade.trace import safe_repr

Effects = Generator[Any, Any, Any]


# --- values ------------------------------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def binop(budget: Budget, op: str, a: Any, b: Any) -> Any:
    """``a op b`` for ``+ - * / %``; a string, list or whole number too large for the limits
    is refused before it is built."""
    if op == "+":
        if isinstance(a, str | list | tuple) and type(a) is type(b):
            budget.build(budget.measure(a) + budget.measure(b), f"{kind_of(a)} joined by +")
        return a + b
    if op == "*":
        seq, n = (a, b) if isinstance(a, str | list | tuple) else (b, a)
        if isinstance(seq, str | list | tuple) and isinstance(n, int):
            budget.build(budget.measure(seq) * max(n, 0), f"{kind_of(seq)} repeated {n:,} times")
        elif isinstance(a, int) and isinstance(b, int):
            budget.check_product(a, b)
        return a * b
    if op == "%" and isinstance(a, str):
        raise Refusal(
            "% is the remainder of two numbers; to put values into text, write a template: "
            '"... {name} ..."'
        )
    if op == "-":
        return a - b
    if op == "/":
        return a / b
    if op == "%":
        return a % b
    raise Refusal(f"unknown operator {op!r}")  # pragma: no cover - the grammar has no other


COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "in": lambda a, b: a in b,
}


def render(budget: Budget, value: Any, used: int = 0) -> str:
    """``value`` as text (for templates, ``str`` and ``join``), refused when the text so far
    (``used`` characters before it) would pass the size limit."""
    text = value if isinstance(value, str) else str(value)
    budget.check_size(used + len(text), "the text")
    budget.charge(1 + len(text) // SIZE_PER_STEP)  # each value put into text is a step
    return text


def _round(budget: Budget, x: Any, ndigits: Any = None) -> Any:
    if ndigits is not None:
        if not isinstance(ndigits, int) or abs(ndigits) > budget.limits.digits:
            raise over(
                "digits",
                f"round's digits must be a whole number from -{budget.limits.digits:,} to "
                f"{budget.limits.digits:,}, got {ndigits!r}",
            )
    return round(x, ndigits)


def _int(budget: Budget, x: Any) -> int:
    if isinstance(x, str) and len(x.strip()) > budget.limits.digits + 1:
        raise over(
            "digits",
            f"int of a text of {len(x.strip()):,} characters would have more than "
            f"{budget.limits.digits:,} digits",
        )
    return int(x)


def _join(budget: Budget, sep: Any, items: Any) -> str:
    if not isinstance(sep, str):
        raise Mismatch(f"join's separator must be text, got {kind_of(sep)}")
    if not isinstance(items, list | tuple):
        raise Mismatch(f"join needs a list to join, got {kind_of(items)}")
    size = budget.measure(items) + len(sep) * max(len(items) - 1, 0)
    budget.check_size(size, "the joined text")
    return render(budget, sep.join(map(str, items)))


def _text(fn: Callable[[str], Any]) -> Callable[[Budget, Any], Any]:
    def method(budget: Budget, s: Any) -> Any:
        if not isinstance(s, str):
            raise Mismatch(f"{fn.__name__} needs text, got {kind_of(s)}")
        return fn(s)

    return method


def _split(budget: Budget, s: Any, sep: Any = None) -> list[str]:
    if not isinstance(s, str):
        raise Mismatch(f"split needs text to split, got {kind_of(s)}")
    if not (sep is None or isinstance(sep, str)):
        raise Mismatch(f"split's separator must be text, got {kind_of(sep)}")
    if sep == "":
        raise ValueError('the separator is empty; split on a character or word, e.g. " "')
    return s.split(sep)


def _contains(budget: Budget, a: Any, b: Any) -> bool:
    return b in a


BUILTINS: dict[str, Callable[..., Any]] = {
    "len": lambda budget, x: len(x),
    "str": lambda budget, x: render(budget, x),
    "int": _int,
    "float": lambda budget, x: float(x),
    "round": _round,
    "min": lambda budget, *xs: min(*xs),
    "max": lambda budget, *xs: max(*xs),
    "abs": lambda budget, x: abs(x),
    "lower": _text(str.lower),
    "upper": _text(str.upper),
    "strip": _text(str.strip),
    "split": _split,
    "join": _join,
    "contains": _contains,
    "match": match,
    **{
        name: lambda budget, *args, name=name: constraint(budget, name, *args)
        for name in CONSTRAINTS
    },
}


def explain(err: Exception) -> str:
    """A Python exception from an operation, as a sentence with a hint where one helps."""
    if isinstance(err, Refusal):
        return str(err)
    text = str(err) or type(err).__name__
    if isinstance(err, ZeroDivisionError):
        return "division by zero"
    if isinstance(err, OverflowError):
        return f"a number is too large or infinite ({text})"
    if isinstance(err, RecursionError):
        return (
            "program calls and expressions nest too deeply here for Python's stack; nest less "
            "(a program call costs about as much as five nested expressions)"
        )
    if isinstance(err, KeyError):
        return f"no item {text}"
    if isinstance(err, ValueError) and "int_max_str_digits" in text:
        return "a whole number of more than 4,300 digits cannot be turned into text"
    return text


# --- distributions -----------------------------------------------------------------------------


def _number(dist: str, param: str, x: Any, test: Callable[[float], bool], want: str) -> float:
    """Parameter ``param`` of ``dist`` as a float, refused unless it is a finite number
    that passes ``test``."""
    if not _is_number(x):
        raise Refusal(f"{dist}'s {param} must be {want}, got {kind_of(x)} {_short(x)}")
    value = float(x)
    if not math.isfinite(value) or not test(value):
        raise Refusal(f"{dist}'s {param} must be {want}, got {x!r}")
    return value


def _prob(dist: str, x: Any) -> float:
    return _number(dist, "p", x, lambda p: 0 <= p <= 1, "a probability from 0 to 1")


def _positive(dist: str, param: str, x: Any) -> float:
    return _number(dist, param, x, lambda v: v > 0, "a number > 0")


def _scale(dist: str, param: str, x: Any) -> float:
    """A scale whose square a float holds (below 1e-150 it underflows, and densities are
    NaN), and whose square does not overflow."""
    return _number(dist, param, x, lambda v: 1e-150 <= v <= 1e150, "a number from 1e-150 to 1e150")


def _shape(dist: str, param: str, x: Any) -> float:
    """A shape parameter torch samples faithfully: below 0.01 its draws collapse (a beta of
    1e-5 draws 0.5 almost always), so smaller ones are refused rather than sampled wrong."""
    return _number(dist, param, x, lambda v: v >= 0.01, "a number >= 0.01")


def _real(dist: str, param: str, x: Any) -> float:
    return _number(dist, param, x, lambda v: True, "a finite number")


def _short(x: Any) -> str:
    return safe_repr(x, 40)


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


@dataclass(frozen=True)
class Site:
    """The right side of ``~``, evaluated: the distribution, what kind of values it draws
    (``lm``, ``categorical``, ``bernoulli``, ``count``, ``scalar``) and, for a categorical,
    its values and their probabilities as given."""

    dist: Any
    kind: str
    values: list | None = None
    weights: list[float] | None = None

    def value(self, raw: Any) -> Any:
        """The variable's value for the raw value the site produced (a categorical draws an
        index into its values)."""
        if self.values is not None:
            return self.values[int(raw)]
        return CONVERT[self.kind](raw)

    def observed(self, value: Any) -> tuple[Any, Any]:
        """The distribution and raw value that score ``value`` at an observe site.

        A categorical scores the *value*: its probability is the total probability of the
        entries equal (``==``) to it, zero when there is none.  The site observes 0 under a
        point mass that carries exactly that log-probability.  A value another distribution
        cannot draw (``observe 3 ~ bernoulli(0.5)``) has weight zero too.
        """
        if self.values is not None and self.weights is not None:
            hit = math.fsum(
                w for v, w in zip(self.values, self.weights, strict=True) if _equal(v, value)
            )
            lp = math.log(hit / math.fsum(self.weights)) if hit > 0 else -math.inf
            return Delta(_t(0.0), log_density=_t(lp)), 0.0
        if self.kind == "lm":
            if not isinstance(value, str):
                raise Refusal(f"observing a model needs text, got {kind_of(value)}")
            return self.dist, value
        if not isinstance(value, int | float) or math.isnan(value):
            raise Refusal(f"observing a {self.kind} value needs a number, got {_short(value)}")
        if not bool(self.dist.support.check(_t(float(value)))):
            return Delta(_t(0.0), log_density=_t(-math.inf)), 0.0  # a value it cannot draw
        return self.dist, float(value)


def _categorical(values: Any, probs: Any) -> Site:
    if not isinstance(values, list):
        raise Refusal(f"categorical's values must be a list, got {kind_of(values)}")
    if not isinstance(probs, list):
        raise Refusal(f"categorical's probabilities must be a list, got {kind_of(probs)}")
    if len(values) != len(probs):
        raise Refusal(
            f"categorical has {len(values)} values but {len(probs)} probabilities; "
            "give one probability per value"
        )
    weights = [
        _number("categorical", f"probability {i}", p, lambda v: v >= 0, "a number >= 0")
        for i, p in enumerate(probs)
    ]
    if not math.fsum(weights) > 0:
        raise Refusal("categorical's probabilities must not all be zero")
    # probabilities as logits: torch clamps probabilities to [eps, 1 - eps], so a zero would
    # be possible and 1e-20 would score as 2e-16; a log is exact (and log 0 is impossible)
    dist = Categorical(logits=torch.tensor(weights, dtype=torch.float64).log())
    return Site(dist, "categorical", values, weights)


def _bernoulli(p: Any) -> Site:
    """A coin as a categorical over false and true: exact at 0, 1 and tiny probabilities."""
    prob = _prob("bernoulli", p)
    site = _categorical([False, True], [1.0 - prob, prob])
    return Site(site.dist, "bernoulli", site.values, site.weights)


def _logits(p: float) -> torch.Tensor:
    """The log-odds of ``0 < p < 1``, exactly (torch would clamp a probability to eps)."""
    return _t(math.log(p) - math.log1p(-p))


def _geometric(p: float) -> Site:
    """Failures before the first success; certain to be 0 when ``p`` is 1."""
    return _point(0) if p == 1.0 else Site(Geometric(logits=_logits(p)), "count")


def _point(value: int) -> Site:
    """A count that is certain (a binomial with p 0 or 1, a geometric with p 1)."""
    return _categorical([value], [1.0])


def _uniform(lo: Any, hi: Any) -> Site:
    low, high = _real("uniform", "low", lo), _real("uniform", "high", hi)
    if not low < high:
        raise Refusal(f"uniform needs low < high, got {lo!r} and {hi!r}")
    if not math.isfinite(high - low):  # its density, 1 / (high - low), would be 0
        raise Refusal(f"uniform's width {high} - {low} overflows; keep it below 1e308")
    return Site(Uniform(_t(low), _t(high)), "scalar")


_MAX_COUNT = 1e9  # binomial's n and poisson's rate: larger ones are not a program's business


def _binomial(n: Any, p: Any) -> Site:
    count = _number(
        "binomial", "n", n, lambda v: 0 <= v <= _MAX_COUNT and v % 1 == 0, _COUNT_WANTED
    )
    prob = _prob("binomial", p)
    if prob in (0.0, 1.0):
        return _point(int(count) if prob else 0)
    return Site(Binomial(int(count), logits=_logits(prob)), "count")


def _poisson(rate: Any) -> Site:
    wanted = "a number from 0 to 1e9"
    return Site(Poisson(_t(_number("poisson", "rate", rate, _in_count, wanted))), "count")


def _in_count(v: float) -> bool:
    return 0 <= v <= _MAX_COUNT


_COUNT_WANTED = "a whole number from 0 to 1,000,000,000"

DISTRIBUTIONS: dict[str, Callable[..., Site]] = {
    "categorical": _categorical,
    "bernoulli": _bernoulli,
    "normal": lambda mu, sigma: Site(
        Normal(_t(_real("normal", "mu", mu)), _t(_scale("normal", "sigma", sigma))), "scalar"
    ),
    "uniform": _uniform,
    "beta": lambda a, b: Site(
        Beta(_t(_shape("beta", "a", a)), _t(_shape("beta", "b", b))), "scalar"
    ),
    "poisson": _poisson,
    "geometric": lambda p: _geometric(
        _number("geometric", "p", p, lambda v: 0 < v <= 1, "a number in (0, 1]")
    ),
    "binomial": _binomial,
}
# how a site's raw value becomes the variable's value, by kind
CONVERT: dict[str, Callable[[Any], Any]] = {
    "bernoulli": bool,
    "count": int,
    "scalar": float,
    "lm": lambda v: v,
}


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a host value whose == fails is simply not equal
        return False


# --- site names ----------------------------------------------------------------------------


def _walk(node: object):
    """Every syntax node under ``node`` (itself included), in source order."""
    if isinstance(node, ast.Node):
        yield node
        for value in vars(node).values():
            yield from _walk(value)
    elif isinstance(node, tuple):
        for item in node:
            yield from _walk(item)


def site_names(module: ast.Module) -> dict[int, str]:
    """The base site name of every observe, condition and factor statement and the scope name
    of every call of another program, by ``id(node)``: ``kind@line``, or ``kind@line:col``
    for the second and later ones of a kind on one line (the kind of a call is its callee).
    Two nodes of one kind never share a line and a column, so no two names are equal."""
    programs = {p.name for p in module.programs}
    names: dict[int, str] = {}
    seen: set[tuple[str, int]] = set()
    for node in _walk(module.programs):
        if isinstance(node, ast.Observe | ast.Condition | ast.Factor):
            kind = type(node).__name__.lower()
        elif isinstance(node, ast.Call) and node.func in programs:
            kind = node.func
        else:
            continue
        key = (kind, node.line)
        names[id(node)] = f"{kind}@{node.line}:{node.col}" if key in seen else f"{kind}@{node.line}"
        seen.add(key)
    if len(set(names.values())) != len(names):  # pragma: no cover - a broken invariant
        raise AssertionError("two sites of one module got the same name")
    return names


# --- the interpreter ---------------------------------------------------------------------------


class _ToolFailed:
    """What a tool call inside ``try`` (or under ``on_tool_error="raise"``) returns when the
    tool raised, recorded as the call site's value: the program then goes to the ``else``
    branch, or fails at the call with its position."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"<tool failed: {type(self.error).__name__}: {safe_repr(str(self.error), 80)}>"


class BudgetError(DSLRuntimeError):
    """A run went over one of its budgets (or Python's stack): ``try`` does not catch it.

    >>> issubclass(BudgetError, DSLRuntimeError)
    True
    """


def _guarded(fn: Callable[..., Any], caught: type[Exception] = Exception) -> Callable[..., Any]:
    """``fn`` returning what it raised of ``caught`` as a :class:`_ToolFailed` (any other
    exception propagates, and the core gives the trace weight zero)."""

    def tool(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except caught as err:
            return _ToolFailed(err)

    return tool


@dataclass
class Frame:
    """Where a program's body is running: its variables, its trace's budget, and how many
    loops deep it is (sites inside loops are numbered)."""

    env: dict
    budget: Budget
    loop: int = 0
    catching: bool = False  # inside ``try``: a failing tool goes to its else branch


class Interpreter:
    """Runs one module's programs as generators of effects, each run under its own budget."""

    def __init__(
        self, module: ast.Module, models: dict, tools: dict, *, limits: Limits | None = None
    ) -> None:
        self.module, self.models = module, models
        self.limits = limits if limits is not None else Limits()
        self.tools = {name: _with_limits(fn, self.limits) for name, fn in tools.items()}
        self.guarded = {name: _guarded(fn) for name, fn in self.tools.items()}
        self.budgeted = {name: _guarded(fn, OverLimit) for name, fn in self.tools.items()}
        self.definitions = {p.name: p for p in module.programs}
        self.programs: dict[str, Program] = {}
        self.names = site_names(module)
        self.potentials: dict[int, Callable[[str], float]] = {}  # potential= tools, by node
        self.peak_steps = 0  # the most steps any run has taken so far (for tests and tuning)

    def __setstate__(self, state: dict) -> None:
        """Unpickled (sent to a Ray worker): the tables keyed by ``id(node)`` are built again,
        for the nodes are new objects there."""
        self.__dict__.update(state)
        self.names = site_names(self.module)
        self.potentials = {}

    def fail(self, node: ast.Node, message: str, *, fatal: bool = False) -> DSLRuntimeError:
        """The located error at ``node``; ``fatal`` ones (a budget spent) escape ``try``."""
        return (BudgetError if fatal else DSLRuntimeError)(
            message,
            filename=self.module.filename,
            line=node.line,
            col=node.col,
            source=self.module.source,
        )

    def build(self) -> dict[str, Program]:
        for definition in self.module.programs:
            self.programs[definition.name] = self._program(definition)
        return self.programs

    def _program(self, definition: ast.ProgramDef) -> Program:
        interp = self
        signature = inspect.Signature(
            [
                inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                for p in definition.params
            ]
        )

        def run(*args, **kwargs):
            env = dict(signature.bind(*args, **kwargs).arguments)
            budget = Budget(interp.limits)
            try:
                return (yield from interp.invoke(definition, env, budget))
            except RecursionError:
                raise interp.fail(definition, explain(RecursionError()), fatal=True) from None
            finally:
                interp.peak_steps = max(interp.peak_steps, budget.steps)

        run.__name__ = run.__qualname__ = definition.name
        run.__signature__ = signature  # type: ignore[attr-defined]
        return Program(run)

    def invoke(self, definition: ast.ProgramDef, env: dict, budget: Budget) -> Effects:
        """Runs one program's body; its return value (None if it has no return)."""
        out = yield from self.block(definition.body, Frame(env, budget))
        return out[1] if out is not None else None

    # statements: a block returns ("return", value) when a return statement ran.  Each level
    # of nesting costs Python frames; a program nested too deeply for Python's stack fails at
    # the innermost statement that can still report it.
    def block(self, body: tuple, f: Frame) -> Effects:
        for stmt in body:
            try:
                out = yield from self.stmt(stmt, f)
            except RecursionError:
                raise self.fail(stmt, explain(RecursionError()), fatal=True) from None
            if out is not None:
                return out
        return None

    def site(self, base: str, f: Frame) -> str:
        return f"{base}[]" if f.loop else base

    def tick(self, node: ast.Node, f: Frame) -> None:
        """One step of the budget, spent at ``node``."""
        budget = f.budget
        budget.steps += 1
        if budget.steps > budget.limits.steps:
            self.guard(node, budget.charge, 0)

    def guard(self, node: ast.Node, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, any failure of it a DSLRuntimeError at ``node``: the one place
        where the interpreter runs an operation of the program."""
        try:
            return fn(*args)
        except DSLError:
            raise
        except LMCascadeError as err:
            raise self.fail(node, str(err)) from None
        except Exception as err:  # noqa: BLE001 - every failure becomes a located error
            cause = None if isinstance(err, Refusal) else err
            fatal = isinstance(err, OverLimit)
            raise self.fail(node, self.describe(node, err), fatal=fatal) from cause

    def describe(self, node: ast.Node, err: Exception) -> str:
        """The message for ``err`` raised by the operation at ``node``."""
        if isinstance(err, Refusal):
            return str(err)
        what = {
            ast.BinOp: lambda n: f"{n.op!r}",
            ast.Compare: lambda n: f"{n.op!r}",
            ast.Neg: lambda n: "negation (-)",
            ast.Index: lambda n: "indexing [...]",
            ast.Call: lambda n: f"{n.func}(...)",
            ast.For: lambda n: "the for loop",
        }.get(type(node))
        return f"{what(node)} failed: {explain(err)}" if what else explain(err)

    def stmt(self, s: Any, f: Frame) -> Effects:
        self.tick(s, f)
        if isinstance(s, ast.Assign):
            f.env[s.target] = yield from self.expr(s.value, f)
        elif isinstance(s, ast.Sample):
            site = yield from self.distribution(s.call, f)
            raw = yield effects.sample(self.site(s.target, f), site.dist)
            f.env[s.target] = self.guard(s, site.value, raw)
        elif isinstance(s, ast.Observe):
            value = yield from self.expr(s.value, f)
            site = yield from self.distribution(s.call, f)
            dist, raw = self.guard(s, site.observed, value)
            yield effects.observe(self.site(self.names[id(s)], f), dist, raw)
        elif isinstance(s, ast.Condition):
            ok = yield from self.expr(s.value, f)
            yield effects.condition(self.site(self.names[id(s)], f), self.guard(s, bool, ok))
        elif isinstance(s, ast.Factor):
            weight = yield from self.expr(s.value, f)
            yield effects.factor(
                self.site(self.names[id(s)], f), self.guard(s, _log_weight, weight)
            )
        elif isinstance(s, ast.If):
            test = yield from self.expr(s.test, f)
            return (yield from self.block(s.body if self.guard(s, bool, test) else s.orelse, f))
        elif isinstance(s, ast.For | ast.Repeat):
            if isinstance(s, ast.For):
                items = self.guard(s, self.loop_items, (yield from self.expr(s.iterable, f)))
            else:
                count = yield from self.expr(s.count, f)
                items = range(self.guard(s, self.repeat_count, count))
            inner = Frame(f.env, f.budget, f.loop + 1, f.catching)
            for item in items:
                if isinstance(s, ast.For):
                    f.env[s.var] = item
                out = yield from self.block(s.body, inner)
                if out is not None:
                    return out
        elif isinstance(s, ast.Return):
            return ("return", (yield from self.expr(s.value, f)))
        return None

    def loop_items(self, items: Any) -> Any:
        """What a ``for`` loop runs over: a list or a text, within the iteration limit."""
        if not isinstance(items, list | tuple | str | dict):
            raise Refusal(f"for loops over a list or a text, not over {kind_of(items)}")
        limit = self.limits.iterations
        if len(items) > limit:
            raise over(
                "iterations",
                f"for loops over {len(items):,} items, over the limit of {limit:,} per loop",
            )
        return items

    def repeat_count(self, count: Any) -> int:
        """How many times a ``repeat`` runs: a whole number within the iteration limit."""
        limit = self.limits.iterations
        wanted = f"repeat needs a whole number from 0 to {limit}, got {_short(count)}"
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise Refusal(wanted)
        if count > limit:
            raise over("iterations", f"{wanted} (the limit of one loop)")
        return count

    def arguments(self, call: ast.Call, f: Frame) -> Effects:
        """A call's positional and keyword argument values, evaluated left to right (a
        model's ``potential=`` as :meth:`potential` reads it)."""
        args = []
        for a in call.args:
            args.append((yield from self.expr(a, f)))
        kwargs = {}
        for key, v in call.kwargs:
            if key == "potential" and call.func in self.models:
                kwargs[key] = yield from self.potential(v, f)
            else:
                kwargs[key] = yield from self.expr(v, f)
        return args, kwargs

    def potential(self, e: ast.Expr, f: Frame) -> Effects:
        """A model's ``potential=``: a tool named bare (a function of the partial text), a
        model call (that LM steers, as a product of experts), or any other value."""
        if isinstance(e, ast.Var) and e.name not in f.env and e.name in self.tools:
            if id(e) not in self.potentials:  # one function per site: every trace shares it
                self.potentials[id(e)] = self.located_potential(e)
            return self.potentials[id(e)]
        if isinstance(e, ast.Call) and e.func in self.models:
            return (yield from self.distribution(e, f)).dist
        return (yield from self.expr(e, f))

    def located_potential(self, name: ast.Var) -> Callable[[str], float]:
        """The tool ``name`` as a potential whose failures point at ``potential=name``: one
        that raises, or returns anything but a finite number, is a DSLRuntimeError naming
        the tool, with the line and column (the potential runs while the model generates,
        outside the program's statements)."""
        fn = self.tools[name.name]

        def potential(text: str) -> float:
            shown = safe_repr(text, 60)
            try:
                raw = fn(text)
            except Exception as err:  # noqa: BLE001 - reported, located
                message = f"potential tool {name.name!r} failed on the text {shown}: {explain(err)}"
                if not isinstance(err, ValueError | LMCascadeError):
                    message += f" ({type(err).__name__})"
                raise _keeps_place(self.fail(name, message), self.module.source) from err
            value = float(raw) if _is_number(raw) else math.nan
            if not math.isfinite(value):
                message = (
                    f"potential tool {name.name!r} returned {_short(raw)} for the text {shown}; "
                    "a log-potential must be a finite number (to forbid a text, use a "
                    "constraint, or a condition or factor after the site)"
                )
                raise _keeps_place(self.fail(name, message), self.module.source)
            return value

        functools.update_wrapper(potential, fn)  # __wrapped__ is the tool itself
        potential.__name__ = potential.__qualname__ = name.name
        return potential

    def distribution(self, call: ast.Call, f: Frame) -> Effects:
        """The evaluated right side of ``~``: a model or a named distribution."""
        self.tick(call, f)
        args, kwargs = yield from self.arguments(call, f)
        if call.func in self.models:
            model = self.models[call.func]
            for key, node in call.kwargs:  # the checker allows only the model's options
                self.guard(node, lm_option, call.func, key, kwargs[key])
            dist = self.guard(call, lambda: LM(model, *args, **kwargs))
            if dist.constraint is not None:  # a bad pattern fails here, located
                self.guard(call, dist.constraint.start, model)
            return Site(dist, "lm")
        return self.guard(call, lambda: DISTRIBUTIONS[call.func](*args, **kwargs))

    def expr(self, e: Any, f: Frame) -> Effects:
        self.tick(e, f)
        if isinstance(e, ast.Num | ast.Bool):
            return e.value
        if isinstance(e, ast.NoneLit):
            return None
        if isinstance(e, ast.Try):
            return (yield from self.attempt(e, f))
        if isinstance(e, ast.Var):
            return self.lookup(e, f)
        if isinstance(e, ast.Str):
            return self.guard(e, self.template, e, f)
        if isinstance(e, ast.BinOp):
            a = yield from self.expr(e.left, f)
            b = yield from self.expr(e.right, f)
            return self.guard(e, self.arith, e.op, a, b, f.budget)
        if isinstance(e, ast.Compare):
            a = yield from self.expr(e.left, f)
            b = yield from self.expr(e.right, f)
            return self.guard(e, self.compare, e.op, a, b, f.budget)
        if isinstance(e, ast.BoolOp):
            value = None
            for v in e.values:
                value = yield from self.expr(v, f)
                if self.guard(e, bool, value) == (e.op == "or"):
                    return value
            return value
        if isinstance(e, ast.Not):
            return not self.guard(e, bool, (yield from self.expr(e.value, f)))
        if isinstance(e, ast.Neg):
            value = yield from self.expr(e.value, f)
            return self.guard(e, self.negate, value, f.budget)
        if isinstance(e, ast.Index):
            container = yield from self.expr(e.value, f)
            index = yield from self.expr(e.index, f)
            return self.guard(e, self.index, container, index)
        if isinstance(e, ast.ListExpr):
            out = []
            for item in e.items:
                out.append((yield from self.expr(item, f)))
            self.guard(e, lambda: f.budget.build(f.budget.measure(out), "the list"))
            return out
        if isinstance(e, ast.Call):
            return (yield from self.call(e, f))
        raise self.fail(e, f"unsupported expression {type(e).__name__}")  # pragma: no cover

    def lookup(self, var: ast.Var, f: Frame) -> Any:
        try:
            return f.env[var.name]
        except KeyError:
            raise self.fail(var, f"variable {var.name!r} has no value here") from None

    def template(self, e: ast.Str, f: Frame) -> str:
        """A string with its ``{name}`` placeholders filled in, within the size limit."""
        parts, used = [], 0
        for p in e.parts:
            parts.append(p if isinstance(p, str) else render(f.budget, self.lookup(p, f), used))
            used += len(parts[-1])
        return "".join(parts)

    @staticmethod
    def arith(op: str, a: Any, b: Any, budget: Budget) -> Any:
        try:
            value = binop(budget, op, a, b)
        except TypeError:
            raise Mismatch(f"{op} does not apply to {kind_of(a)} and {kind_of(b)}") from None
        return budget.check_int(value) if type(value) is int else value

    @staticmethod
    def compare(op: str, a: Any, b: Any, budget: Budget) -> Any:
        budget.measure(a)  # comparing large values costs in proportion
        budget.measure(b)
        try:
            return COMPARE[op](a, b)
        except TypeError:
            raise Mismatch(f"{op} does not apply to {kind_of(a)} and {kind_of(b)}") from None

    @staticmethod
    def negate(value: Any, budget: Budget) -> Any:
        if not isinstance(value, int | float):
            raise Mismatch(f"only numbers can be negated, not {kind_of(value)}")
        return -value

    @staticmethod
    def index(container: Any, index: Any) -> Any:
        if not isinstance(container, list | tuple | str | dict):
            raise Mismatch(f"only a list or a text can be indexed, not {kind_of(container)}")
        if isinstance(container, list | tuple | str):
            if isinstance(index, bool) or not isinstance(index, int):
                raise Mismatch(f"a list or text is indexed by a whole number, not {kind_of(index)}")
            if not -len(container) <= index < len(container):
                raise IndexError(
                    f"index {index} is out of range for {kind_of(container)} of length "
                    f"{len(container)}"
                )
        return container[index]

    def attempt(self, e: ast.Try, f: Frame) -> Effects:
        """``try body else orelse``: the body's value, or the else branch's when the body
        fails (a tool raised, an operation failed); a spent budget is not caught."""
        try:
            return (yield from self.expr(e.body, Frame(f.env, f.budget, f.loop, True)))
        except BudgetError:
            raise
        except DSLRuntimeError:
            return (yield from self.expr(e.orelse, f))

    def chat(self, call: ast.Call, f: Frame) -> Effects:
        """``chat(model, user, system=...)``: the model's chat prompt (the model is named, not
        evaluated)."""
        model = self.models[call.args[0].name]  # the checker makes it a model's name
        user = yield from self.expr(call.args[1], f)
        system = None
        for _, v in call.kwargs:  # only system=
            system = yield from self.expr(v, f)
        for value in (user, system):
            self.guard(call, f.budget.measure, value)
        prompt = self.guard(call, apply_chat, model, user, system)
        return self.guard(call, self.admit, prompt, f.budget)

    def tool(self, call: ast.Call, f: Frame, args: list, kwargs: dict) -> Effects:
        """A tool call, a site of its own.  Outside ``try`` a tool that raises is the core's
        to handle: its trace gets weight zero and the run goes on (under
        ``on_tool_error="raise"``, a located error here instead); inside ``try`` the failure
        is recorded as the site's value and the else branch runs.  A tool that runs over a
        budget of the run (``calc`` past the digit limit: an :class:`OverLimit`) stops the
        run wherever it is, as the interpreter's own budgets do."""
        site = f"{call.func}@{call.line}:{call.col}[]"
        catching = f.catching or ON_TOOL_ERROR.get() == "raise"
        fn = (self.guarded if catching else self.budgeted)[call.func]
        result = yield effects.call(site, fn, *args, **kwargs)
        if isinstance(result, _ToolFailed):
            err = result.error
            if isinstance(err, OverLimit):  # calc past the digit limit: a budget, not caught
                raise self.fail(call, f"tool {call.func!r} failed: {err}", fatal=True) from None
            message = f"tool {call.func!r} failed: {explain(err)}"
            if not isinstance(err, ValueError | LMCascadeError):
                message += f" ({type(err).__name__})"
            raise self.fail(call, message) from err
        return result

    def call(self, call: ast.Call, f: Frame) -> Effects:
        if call.func == "chat" and call.func not in self.definitions:
            return (yield from self.chat(call, f))
        args, kwargs = yield from self.arguments(call, f)
        if call.func in self.definitions:  # another program: its own scope, one level deeper
            definition = self.definitions[call.func]
            if len(args) != len(definition.params):  # the checker stops this
                raise self.fail(call, f"{call.func!r} takes {len(definition.params)} arguments")
            self.guard(call, f.budget.enter)
            env = dict(zip(definition.params, args, strict=True))
            inner = Frame(env, f.budget, catching=f.catching)
            try:
                with effects.scope(self.site(self.names[id(call)], f)):
                    out = yield from self.block(definition.body, inner)
            finally:
                f.budget.depth -= 1
            return out[1] if out is not None else None
        if call.func in self.tools:
            return (yield from self.tool(call, f, args, kwargs))
        if call.func not in BUILTINS:
            raise self.fail(call, f"unknown function {call.func!r}")  # the checker stops this
        budget = f.budget
        for arg in args:  # a builtin's work grows with the size of its arguments
            self.guard(call, budget.measure, arg)
        value = self.guard(call, self.builtin, call.func, budget, args)
        return self.guard(call, self.admit, value, budget)

    @staticmethod
    def builtin(name: str, budget: Budget, args: list) -> Any:
        """A builtin function applied; a type error names the kinds of values it got."""
        try:
            return BUILTINS[name](budget, *args)
        except Mismatch:
            raise
        except TypeError as err:
            kinds = ", ".join(kind_of(a) for a in args)
            raise TypeError(f"{err} (it got {kinds})") from None

    @staticmethod
    def admit(value: Any, budget: Budget) -> Any:
        """A value a builtin produced, checked against the size and digit limits."""
        if type(value) is int:
            return budget.check_int(value)
        if isinstance(value, str | list):
            budget.check_size(budget.measure(value), f"the result ({kind_of(value)})")
        return value


def _log_weight(weight: Any) -> float:
    """A factor's value as a log-weight: a number, finite or -inf (weight zero)."""
    if not _is_number(weight):
        raise Refusal(
            f"factor needs a number (a log-weight), got {kind_of(weight)} {_short(weight)}"
        )
    value = float(weight)
    if math.isnan(value) or value == math.inf:
        raise Refusal(
            f"factor's log-weight is {value}; it must be a finite number, or -inf for weight zero"
        )
    return value


def _keeps_place(err: DSLRuntimeError, source: str | None) -> DSLRuntimeError:
    """``err``, made to keep its file, line and column when the engine puts the site's name in
    front of its message: the engine builds a new error of the same type from the message
    alone (as for any error raised while it resolves a site, where a potential runs), and
    this one's type then reads its place back.

    >>> err = _keeps_place(DSLRuntimeError("bad", line=2, col=5), "a\\nbb = 1")
    >>> again = type(err)("site 'x': " + str(err))
    >>> (again.line, again.col, again.reason, isinstance(again, DSLRuntimeError))
    (2, 5, "site 'x': bad", True)
    >>> str(again).splitlines()[0]
    "<string>:2:5: site 'x': bad"
    """
    reason = err.reason
    place = {"filename": err.filename, "line": err.line, "col": err.col, "source": source}

    class Located(DSLRuntimeError):
        text = ""  # how the error reads, once made

        def __init__(self, message: str, **where: Any) -> None:
            if not where and Located.text and message.endswith(Located.text):
                message, where = message[: -len(Located.text)] + reason, place
            super().__init__(message, **where)

    Located.__name__ = Located.__qualname__ = DSLRuntimeError.__name__
    Located.__module__ = DSLRuntimeError.__module__
    made = Located(reason, **place)
    Located.text = str(made)
    return made


def _with_limits(fn: Callable[..., Any], limits: Limits) -> Callable[..., Any]:
    """The built-in ``calc`` bound to the program's limits; any other tool as it is."""
    if fn is calc:
        return lambda *args, **kwargs: calc(*args, limits=limits, **kwargs)
    return fn
