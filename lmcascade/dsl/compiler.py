"""Turning a checked ``.lmc`` module into ordinary lmcascade programs.

Each ``program`` becomes a :class:`~lmcascade.program.Program` whose body walks the syntax
tree and yields the same effects a Python program would, so every inference method runs a
``.lmc`` program unchanged.  Site names: a sample site is named by its variable (inside a loop
with an automatic index, ``x[0]``, ``x[1]``...); observe, condition and factor sites are
named by kind and line (``condition@7``; a second one on the same line adds its column,
``condition@7:30``), tool-call sites by tool, line and column, all indexed the same way in
loops.  A call of another program runs in a name scope named after the callee and the line
(``helper@7/x``; ``helper@7[0]/x``... in loops), so a sub-program can be called twice.  Only
the tools passed in are callable: a ``.lmc`` file cannot run arbitrary code.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> toy = ToyLM(["yes", "no", "<eos>"], lambda ctx: [0.0, 0.0, -1.0])
>>> progs = lc.load('program ask() { a ~ lm("yes", max_tokens=1) condition a != "" return a }',
...                 models={"lm": toy})
>>> sorted(lc.infer(progs.ask(), method="enumerate").distribution())
['no', 'yes']
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from lmcascade import program as effects
from lmcascade.distributions import (
    LM,
    Bernoulli,
    Beta,
    Binomial,
    Categorical,
    Geometric,
    Normal,
    Poisson,
    Uniform,
)
from lmcascade.dsl import ast
from lmcascade.errors import DSLRuntimeError, LMCascadeError
from lmcascade.program import Program

MAX_ITERATIONS = 1000


def _tensor(x: Any) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


DISTRIBUTIONS: dict[str, Callable[..., Any]] = {
    "categorical": lambda values, probs: ("categorical", list(values), Categorical(_tensor(probs))),
    "bernoulli": lambda p: ("bernoulli", None, Bernoulli(_tensor(p))),
    "normal": lambda mu, sigma: ("scalar", None, Normal(_tensor(mu), _tensor(sigma))),
    "uniform": lambda lo, hi: ("scalar", None, Uniform(_tensor(lo), _tensor(hi))),
    "beta": lambda a, b: ("scalar", None, Beta(_tensor(a), _tensor(b))),
    "poisson": lambda rate: ("count", None, Poisson(_tensor(rate))),
    "geometric": lambda p: ("count", None, Geometric(_tensor(p))),
    "binomial": lambda n, p: ("count", None, Binomial(int(n), _tensor(p))),
}
BUILTINS: dict[str, Callable[..., Any]] = {
    "len": len,
    "str": str,
    "int": int,
    "float": float,
    "round": round,
    "min": min,
    "max": max,
    "abs": abs,
    "lower": lambda s: s.lower(),
    "upper": lambda s: s.upper(),
    "strip": lambda s: s.strip(),
    "split": lambda s, sep=None: s.split(sep),
    "join": lambda sep, items: sep.join(map(str, items)),
    "contains": lambda a, b: b in a,
}
BINOPS = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "%": lambda a, b: a % b,
}
COMPARE = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "in": lambda a, b: a in b,
}


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
    for the second and later ones of a kind on one line (the kind of a call is its callee)."""
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
    return names


class Interpreter:
    """Runs one module's programs as generators of effects."""

    def __init__(self, module: ast.Module, models: dict, tools: dict) -> None:
        self.module, self.models, self.tools = module, models, tools
        self.programs: dict[str, Program] = {}
        self.names = site_names(module)

    def fail(self, node: ast.Node, message: str) -> DSLRuntimeError:
        return DSLRuntimeError(
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
            value = yield from interp.block(definition.body, env, 0)
            return value[1] if isinstance(value, tuple) else None

        run.__name__ = run.__qualname__ = definition.name
        run.__signature__ = signature  # type: ignore[attr-defined]
        return Program(run)

    # statements: a block returns ("return", value) when a return statement ran
    def block(self, body, env: dict, depth: int):
        for stmt in body:
            out = yield from self.stmt(stmt, env, depth)
            if out is not None:
                return out
        return None

    def site(self, base: str, depth: int) -> str:
        return f"{base}[]" if depth else base

    def stmt(self, s, env: dict, depth: int):
        if isinstance(s, ast.Sample):
            dist, post = yield from self.distribution(s.call, env, depth)
            value = yield effects.sample(self.site(s.target, depth), dist)
            env[s.target] = post(value)
        elif isinstance(s, ast.Assign):
            env[s.target] = yield from self.expr(s.value, env, depth)
        elif isinstance(s, ast.Observe):
            value = yield from self.expr(s.value, env, depth)
            dist, _ = yield from self.distribution(s.call, env, depth)
            yield effects.observe(self.site(self.names[id(s)], depth), dist, value)
        elif isinstance(s, ast.Condition):
            ok = yield from self.expr(s.value, env, depth)
            yield effects.condition(self.site(self.names[id(s)], depth), bool(ok))
        elif isinstance(s, ast.Factor):
            weight = yield from self.expr(s.value, env, depth)
            yield effects.factor(self.site(self.names[id(s)], depth), weight)
        elif isinstance(s, ast.If):
            test = yield from self.expr(s.test, env, depth)
            return (yield from self.block(s.body if test else s.orelse, env, depth))
        elif isinstance(s, ast.For):
            items = yield from self.expr(s.iterable, env, depth)
            if len(items) > MAX_ITERATIONS:
                raise self.fail(
                    s, f"for loops over {len(items)} items; the limit is {MAX_ITERATIONS}"
                )
            for item in items:
                env[s.var] = item
                out = yield from self.block(s.body, env, depth + 1)
                if out is not None:
                    return out
        elif isinstance(s, ast.Repeat):
            count = yield from self.expr(s.count, env, depth)
            if not isinstance(count, int) or count < 0 or count > MAX_ITERATIONS:
                raise self.fail(
                    s, f"repeat needs a whole number from 0 to {MAX_ITERATIONS}, got {count!r}"
                )
            for _ in range(count):
                out = yield from self.block(s.body, env, depth + 1)
                if out is not None:
                    return out
        elif isinstance(s, ast.Return):
            return ("return", (yield from self.expr(s.value, env, depth)))
        return None

    def arguments(self, call: ast.Call, env: dict, depth: int):
        """A call's positional and keyword argument values, evaluated left to right."""
        args = []
        for a in call.args:
            args.append((yield from self.expr(a, env, depth)))
        kwargs = {}
        for key, v in call.kwargs:
            kwargs[key] = yield from self.expr(v, env, depth)
        return args, kwargs

    def distribution(self, call: ast.Call, env: dict, depth: int):
        """The distribution of a site, and how to turn its raw value into the variable."""
        args, kwargs = yield from self.arguments(call, env, depth)
        try:
            if call.func in self.models:
                return LM(self.models[call.func], args[0], **kwargs), lambda v: v
            kind, values, dist = DISTRIBUTIONS[call.func](*args, **kwargs)
        except LMCascadeError as err:
            raise self.fail(call, str(err)) from None
        except (TypeError, ValueError, RuntimeError) as err:
            raise self.fail(call, f"bad arguments for {call.func!r}: {err}") from None
        if kind == "categorical":
            return dist, lambda i: values[int(i)]
        if kind in ("bernoulli",):
            return dist, lambda v: bool(v)
        if kind == "count":
            return dist, lambda v: int(v)
        return dist, lambda v: float(v)

    def expr(self, e, env: dict, depth: int):
        if isinstance(e, ast.Num | ast.Bool):
            return e.value
        if isinstance(e, ast.Var):
            return env[e.name]
        if isinstance(e, ast.Str):
            return "".join(p if isinstance(p, str) else str(env[p.name]) for p in e.parts)
        if isinstance(e, ast.ListExpr):
            out = []
            for item in e.items:
                out.append((yield from self.expr(item, env, depth)))
            return out
        if isinstance(e, ast.BoolOp):
            value = None
            for v in e.values:
                value = yield from self.expr(v, env, depth)
                if (e.op == "and" and not value) or (e.op == "or" and value):
                    return value
            return value
        if isinstance(e, ast.Not):
            return not (yield from self.expr(e.value, env, depth))
        if isinstance(e, ast.Neg):
            return -(yield from self.expr(e.value, env, depth))
        try:
            if isinstance(e, ast.BinOp):
                a = yield from self.expr(e.left, env, depth)
                b = yield from self.expr(e.right, env, depth)
                return BINOPS[e.op](a, b)
            if isinstance(e, ast.Compare):
                a = yield from self.expr(e.left, env, depth)
                b = yield from self.expr(e.right, env, depth)
                return COMPARE[e.op](a, b)
            if isinstance(e, ast.Index):
                container = yield from self.expr(e.value, env, depth)
                index = yield from self.expr(e.index, env, depth)
                return container[index]
        except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError) as err:
            raise self.fail(e, f"cannot evaluate: {err}") from None
        if isinstance(e, ast.Call):
            return (yield from self.call(e, env, depth))
        raise self.fail(e, f"unsupported expression {type(e).__name__}")  # pragma: no cover

    def call(self, call: ast.Call, env: dict, depth: int):
        args, kwargs = yield from self.arguments(call, env, depth)
        if call.func in self.programs:
            with effects.scope(self.site(self.names[id(call)], depth)):
                return (yield from self.programs[call.func](*args))
        if call.func in self.tools:
            site = f"{call.func}@{call.line}:{call.col}[]"
            return (yield effects.call(site, self.tools[call.func], *args, **kwargs))
        try:
            return BUILTINS[call.func](*args)
        except (TypeError, ValueError, AttributeError) as err:
            raise self.fail(call, f"{call.func}(...) failed: {err}") from None
