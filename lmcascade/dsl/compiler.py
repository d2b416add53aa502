"""Turning a checked ``.lmc`` module into ordinary lmcascade programs.

Each ``program`` becomes a :class:`~lmcascade.program.Program` whose body walks the syntax
tree and yields the same effects a Python program would, so every inference method runs a
``.lmc`` program unchanged.  Site names: a sample site is named by its variable (inside a loop
with an automatic index, ``x[0]``, ``x[1]``...); observe, condition, factor and tool-call
sites are named by kind and line (``condition@7``), indexed the same way in loops.  Only the
tools passed in are callable: a ``.lmc`` file cannot run arbitrary code.

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
import os
from collections.abc import Callable
from types import SimpleNamespace
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
from lmcascade.dsl.check import check
from lmcascade.dsl.parser import parse
from lmcascade.dsl.tools import DEFAULT_TOOLS
from lmcascade.errors import DSLError, DSLRuntimeError, LMCascadeError
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


class Interpreter:
    """Runs one module's programs as generators of effects."""

    def __init__(self, module: ast.Module, models: dict, tools: dict) -> None:
        self.module, self.models, self.tools = module, models, tools
        self.programs: dict[str, Program] = {}

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
            dist, post = yield from self.distribution(s.call, env)
            value = yield effects.sample(self.site(s.target, depth), dist)
            env[s.target] = post(value)
        elif isinstance(s, ast.Assign):
            env[s.target] = yield from self.expr(s.value, env)
        elif isinstance(s, ast.Observe):
            value = yield from self.expr(s.value, env)
            dist, _ = yield from self.distribution(s.call, env)
            yield effects.observe(self.site(f"observe@{s.line}", depth), dist, value)
        elif isinstance(s, ast.Condition):
            ok = yield from self.expr(s.value, env)
            yield effects.condition(self.site(f"condition@{s.line}", depth), bool(ok))
        elif isinstance(s, ast.Factor):
            weight = yield from self.expr(s.value, env)
            yield effects.factor(self.site(f"factor@{s.line}", depth), weight)
        elif isinstance(s, ast.If):
            test = yield from self.expr(s.test, env)
            return (yield from self.block(s.body if test else s.orelse, env, depth))
        elif isinstance(s, ast.For):
            items = yield from self.expr(s.iterable, env)
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
            count = yield from self.expr(s.count, env)
            if not isinstance(count, int) or count < 0 or count > MAX_ITERATIONS:
                raise self.fail(
                    s, f"repeat needs a whole number from 0 to {MAX_ITERATIONS}, got {count!r}"
                )
            for _ in range(count):
                out = yield from self.block(s.body, env, depth + 1)
                if out is not None:
                    return out
        elif isinstance(s, ast.Return):
            return ("return", (yield from self.expr(s.value, env)))
        return None

    def arguments(self, call: ast.Call, env: dict):
        """A call's positional and keyword argument values, evaluated left to right."""
        args = []
        for a in call.args:
            args.append((yield from self.expr(a, env)))
        kwargs = {}
        for key, v in call.kwargs:
            kwargs[key] = yield from self.expr(v, env)
        return args, kwargs

    def distribution(self, call: ast.Call, env: dict):
        """The distribution of a site, and how to turn its raw value into the variable."""
        args, kwargs = yield from self.arguments(call, env)
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

    def expr(self, e, env: dict):
        if isinstance(e, ast.Num | ast.Bool):
            return e.value
        if isinstance(e, ast.Var):
            return env[e.name]
        if isinstance(e, ast.Str):
            return "".join(p if isinstance(p, str) else str(env[p.name]) for p in e.parts)
        if isinstance(e, ast.ListExpr):
            out = []
            for item in e.items:
                out.append((yield from self.expr(item, env)))
            return out
        if isinstance(e, ast.BoolOp):
            value = None
            for v in e.values:
                value = yield from self.expr(v, env)
                if (e.op == "and" and not value) or (e.op == "or" and value):
                    return value
            return value
        if isinstance(e, ast.Not):
            return not (yield from self.expr(e.value, env))
        if isinstance(e, ast.Neg):
            return -(yield from self.expr(e.value, env))
        try:
            if isinstance(e, ast.BinOp):
                a = yield from self.expr(e.left, env)
                b = yield from self.expr(e.right, env)
                return BINOPS[e.op](a, b)
            if isinstance(e, ast.Compare):
                a = yield from self.expr(e.left, env)
                b = yield from self.expr(e.right, env)
                return COMPARE[e.op](a, b)
            if isinstance(e, ast.Index):
                container = yield from self.expr(e.value, env)
                index = yield from self.expr(e.index, env)
                return container[index]
        except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError) as err:
            raise self.fail(e, f"cannot evaluate: {err}") from None
        if isinstance(e, ast.Call):
            return (yield from self.call(e, env))
        raise self.fail(e, f"unsupported expression {type(e).__name__}")  # pragma: no cover

    def call(self, call: ast.Call, env: dict):
        args, kwargs = yield from self.arguments(call, env)
        if call.func in self.programs:
            return (yield from self.programs[call.func](*args))
        if call.func in self.tools:
            site = f"{call.func}@{call.line}:{call.col}[]"
            return (yield effects.call(site, self.tools[call.func], *args, **kwargs))
        try:
            return BUILTINS[call.func](*args)
        except (TypeError, ValueError, AttributeError) as err:
            raise self.fail(call, f"{call.func}(...) failed: {err}") from None


def load(
    source: str | os.PathLike,
    *,
    models: dict | None = None,
    tools: dict[str, Callable[..., Any]] | None = None,
) -> SimpleNamespace:
    """Parses, checks and compiles a ``.lmc`` file (or source text) into its programs.

    ``models`` binds model names (host bindings win over the file's ``model`` declarations,
    which are loaded from the registry otherwise); ``tools`` are the only functions the file
    may call.  Returns a namespace with one attribute per program.
    """
    path = os.fspath(source)
    if "\n" not in path and "{" not in path and os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            text, filename = fh.read(), path
    elif isinstance(source, str) and ("{" in source or "\n" in source or "program" in source):
        text, filename = source, "<string>"
    else:
        raise DSLError(f"no .lmc file at {path!r}")
    module = parse(text, filename=filename)
    bound = dict(models or {})
    tools = {**DEFAULT_TOOLS, **(tools or {})}
    check(module, models=set(bound) | {m.name for m in module.models}, tools=tools)
    for decl in module.models:
        if decl.name not in bound:
            from lmcascade.models.registry import load as load_model

            try:
                bound[decl.name] = load_model(decl.ref)
            except LMCascadeError as err:
                raise DSLError(
                    str(err), filename=filename, line=decl.line, col=decl.col, source=text
                ) from None
    programs = Interpreter(module, bound, tools).build()
    return SimpleNamespace(**programs)
