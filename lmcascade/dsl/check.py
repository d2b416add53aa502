"""Static checks of a parsed ``.lmc`` module, each failure a positioned ``DSLCheckError``.

Checked before anything runs: undefined variables (including ones set on only one branch of an
``if``), unknown models, distributions, tools and functions (with a suggestion), calls with the
wrong number of arguments, a sample statement whose right side is not a model or distribution,
the same site sampled twice where both can run in one execution (in straight-line code, in an
``if`` branch and again after it, in a loop and outside it; the two branches of one ``if`` may
share a name), type errors visible in literals, and what the loader could not represent: a
file without programs, a model declared twice, a program named like a Python special attribute
(``__class__``), a tree nested deeper than :data:`~lmcascade.dsl.parser.MAX_DEPTH`.  The walk
costs time linear in the size of the program: branches and loop bodies add a layer of names
over the enclosing ones instead of copying them.

>>> from lmcascade.dsl.parser import parse
>>> check(parse('program f() { return y }', filename="f.lmc"), models={}, tools={})
Traceback (most recent call last):
...
lmcascade.errors.DSLCheckError: f.lmc:1:22: undefined variable 'y'
  program f() { return y }
                       ^
"""

from __future__ import annotations

import difflib
from collections import ChainMap
from collections.abc import Iterable
from dataclasses import dataclass, field

from lmcascade.dsl import ast
from lmcascade.dsl.parser import MAX_DEPTH, depth_message, nesting
from lmcascade.errors import DSLCheckError

# name -> (min positional, max positional)
DISTRIBUTIONS = {
    "categorical": (2, 2),
    "bernoulli": (1, 1),
    "normal": (2, 2),
    "uniform": (2, 2),
    "beta": (2, 2),
    "poisson": (1, 1),
    "geometric": (1, 1),
    "binomial": (2, 2),
}
BUILTINS = {
    "len": (1, 1),
    "str": (1, 1),
    "int": (1, 1),
    "float": (1, 1),
    "round": (1, 2),
    "min": (1, 99),
    "max": (1, 99),
    "abs": (1, 1),
    "lower": (1, 1),
    "upper": (1, 1),
    "strip": (1, 1),
    "split": (1, 2),
    "join": (2, 2),
    "contains": (2, 2),
}
LM_OPTIONS = {"max_tokens", "min_tokens", "stop", "temperature", "top_k", "top_p"}


Entry = tuple[ast.Sample, int | None]


@dataclass
class Sampled:
    """The sample statements met so far on the way to a point of a program, by variable name:
    ``straight`` outside loops, ``looped`` inside them (their sites are ``x[0]``, ``x[1]``...).
    Each entry is the statement and the line of the ``if`` it sits in (None if in none).  A
    branch sees its enclosing entries through a ``ChainMap`` layer and writes only its own."""

    straight: ChainMap[str, Entry] = field(default_factory=ChainMap)
    looped: ChainMap[str, Entry] = field(default_factory=ChainMap)

    def copy(self) -> Sampled:
        """A layer for one branch of an ``if``: reads everything, writes its own entries."""
        return Sampled(self.straight.new_child(), self.looped.new_child())

    def merge(self, branch: Sampled, if_line: int) -> None:
        """Adds what one branch (a :meth:`copy` of this) of the ``if`` at ``if_line`` sampled."""
        for mine, theirs in ((self.straight, branch.straight), (self.looped, branch.looped)):
            for name, (node, where) in theirs.maps[0].items():
                mine.setdefault(name, (node, if_line if where is None else where))


class Names:
    """The variables defined at a point of a program: the current block's own names over the
    enclosing blocks' (a branch or a loop body is a new layer, so nothing is copied).

    >>> outer = Names(own={"x"})
    >>> inner = outer.child("i")
    >>> inner.own.add("y")
    >>> ("x" in inner, "y" in inner, "y" in outer, sorted(inner.all()))
    (True, True, False, ['i', 'x', 'y'])
    """

    def __init__(self, parent: Names | None = None, own: Iterable[str] = ()) -> None:
        self.parent, self.own = parent, set(own)

    def __contains__(self, name: object) -> bool:
        layer: Names | None = self
        while layer is not None:
            if name in layer.own:
                return True
            layer = layer.parent
        return False

    def child(self, *names: str) -> Names:
        """A new layer over this one, defining ``names``."""
        return Names(self, names)

    def all(self) -> set[str]:
        """Every name visible here (for suggestions)."""
        out: set[str] = set()
        layer: Names | None = self
        while layer is not None:
            out |= layer.own
            layer = layer.parent
        return out


def always_returns(body) -> bool:
    """Whether running ``body`` always ends in a return statement."""
    return any(
        isinstance(s, ast.Return)
        or (isinstance(s, ast.If) and always_returns(s.body) and always_returns(s.orelse))
        for s in body
    )


class Checker:
    """Walks one module; ``errors`` collects every problem (the first is raised)."""

    def __init__(self, module: ast.Module, models: Iterable[str], tools: dict) -> None:
        self.module = module
        self.models = set(models) | {m.name for m in module.models}
        self.tools = tools
        self.programs = {p.name: p for p in module.programs}

    def fail(self, node: ast.Node, message: str) -> DSLCheckError:
        return DSLCheckError(
            message,
            filename=self.module.filename,
            line=node.line,
            col=node.col,
            source=self.module.source,
        )

    def run(self) -> None:
        depth, deepest = nesting(self.module)
        if depth > MAX_DEPTH and deepest is not None:
            raise self.fail(deepest, depth_message(depth))
        if not self.module.programs:
            raise self.fail(
                self.module,
                "this file defines no program; write one as `program NAME(PARAMS) { ... }`",
            )
        declared: dict[str, ast.ModelDecl] = {}
        for decl in self.module.models:
            if decl.name in declared:
                first = declared[decl.name]
                raise self.fail(
                    decl,
                    f"model {decl.name!r} is declared twice (first at {first.line}:{first.col})",
                )
            declared[decl.name] = decl
        seen: dict[str, ast.ProgramDef] = {}
        for prog in self.module.programs:
            if prog.name in seen:
                raise self.fail(prog, f"program {prog.name!r} is defined twice")
            if prog.name.startswith("__") and prog.name.endswith("__"):
                raise self.fail(
                    prog,
                    f"program name {prog.name!r} is reserved: names that begin and end with "
                    "'__' are Python's special attributes; rename it",
                )
            seen[prog.name] = prog
            self.block(prog.body, Names(own=prog.params), loop=False, sampled=Sampled())

    # statements: each adds the names it defines to ``defined`` (the current block's layer)
    def block(self, body, defined: Names, loop: bool, sampled: Sampled) -> None:
        for stmt in body:
            self.stmt(stmt, defined, loop, sampled)

    def duplicate(self, s: ast.Sample, loop: bool, sampled: Sampled) -> None:
        """Fails if the site of sample ``s`` can meet an earlier one in one execution."""
        name = s.target
        hint = f"rename the second sample, e.g. `{name}2 ~ {s.call.func}(...)`"
        if loop:
            if name in sampled.straight:
                first, _ = sampled.straight[name]
                raise self.fail(
                    s,
                    f"site {name!r} is sampled in a loop here (sites {name}[0], {name}[1], ...) "
                    f"and before it, at {first.line}:{first.col}; {hint}",
                )
            sampled.looped.setdefault(name, (s, None))
            return
        if name in sampled.straight:
            first, if_line = sampled.straight[name]
            where = f"{first.line}:{first.col}" + ("" if if_line is None else " in an `if` branch")
            raise self.fail(s, f"site {name!r} is sampled twice (first at {where}); {hint}")
        if name in sampled.looped:
            first, _ = sampled.looped[name]
            raise self.fail(
                s,
                f"site {name!r} is sampled in a loop at {first.line}:{first.col} (sites "
                f"{name}[0], {name}[1], ...) and again here, after it; {hint}",
            )
        sampled.straight[name] = (s, None)

    def stmt(self, s, defined: Names, loop: bool, sampled: Sampled) -> None:
        if isinstance(s, ast.Sample):
            self.site_call(s.call, defined)
            self.duplicate(s, loop, sampled)
            defined.own.add(s.target)
        elif isinstance(s, ast.Assign):
            self.expr(s.value, defined)
            defined.own.add(s.target)
        elif isinstance(s, ast.Observe):
            self.expr(s.value, defined)
            self.site_call(s.call, defined)
        elif isinstance(s, ast.Condition | ast.Factor | ast.Return):
            self.expr(s.value, defined)
            if isinstance(s, ast.Factor) and isinstance(s.value, ast.Str | ast.ListExpr):
                raise self.fail(s.value, "factor needs a number (a log-weight)")
        elif isinstance(s, ast.If):
            self.expr(s.test, defined)
            # the two branches may share names (only one runs); what either samples may meet
            # what follows the if, unless that branch always returns
            outcomes = []
            for body in (s.body, s.orelse):
                seen, layer = sampled.copy(), defined.child()
                self.block(body, layer, loop, seen)
                outcomes.append((layer.own, seen, always_returns(body)))
            for _, seen, returns in outcomes:
                if not returns:
                    sampled.merge(seen, s.line)
            (left, _, left_returns), (right, _, right_returns) = outcomes
            if left_returns != right_returns:
                defined.own |= right if left_returns else left
            else:
                defined.own |= left & right
        elif isinstance(s, ast.For):
            self.expr(s.iterable, defined)
            if isinstance(s.iterable, ast.Num | ast.Bool):
                raise self.fail(s.iterable, "for needs a list or a string to loop over")
            self.block(s.body, defined.child(s.var), True, sampled)
        elif isinstance(s, ast.Repeat):
            self.expr(s.count, defined)
            if isinstance(s.count, ast.Str | ast.ListExpr | ast.Bool) or (
                isinstance(s.count, ast.Num) and (s.count.value < 0 or s.count.value % 1)
            ):
                raise self.fail(s.count, "repeat needs a whole number of times")
            self.block(s.body, defined.child(), True, sampled)
        else:  # pragma: no cover
            raise self.fail(s, f"unsupported statement {type(s).__name__}")

    def site_call(self, call: ast.Call, defined: Names) -> None:
        """The right side of ``~``: a model or a distribution."""
        if call.func in self.models:
            if len(call.args) != 1:
                raise self.fail(
                    call,
                    f"model {call.func!r} takes one prompt, got "
                    f"{len(call.args)} positional arguments",
                )
            for key, _ in call.kwargs:
                if key not in LM_OPTIONS:
                    raise self.fail(
                        call,
                        f"unknown option {key!r} for model {call.func!r}; "
                        f"options: {', '.join(sorted(LM_OPTIONS))}",
                    )
        elif call.func in DISTRIBUTIONS:
            self.arity(call, DISTRIBUTIONS[call.func], "distribution")
        else:
            known = sorted(self.models | set(DISTRIBUTIONS))
            raise self.fail(
                call,
                f"{call.func!r} is not a model or distribution"
                f"{self.suggest(call.func, known)}; declare models with "
                '`model NAME = "..."` or bind them when loading',
            )
        for arg in call.args:
            self.expr(arg, defined)
        for _, value in call.kwargs:
            self.expr(value, defined)

    def arity(self, call: ast.Call, bounds: tuple[int, int], what: str) -> None:
        low, high = bounds
        n = len(call.args)
        if not low <= n <= high:
            want = str(low) if low == high else f"{low} to {high}"
            raise self.fail(call, f"{what} {call.func!r} takes {want} arguments, got {n}")

    def expr(self, e, defined: Names) -> None:
        if isinstance(e, ast.Var):
            if e.name not in defined:
                known = sorted(defined.all())
                raise self.fail(e, f"undefined variable {e.name!r}{self.suggest(e.name, known)}")
        elif isinstance(e, ast.Str):
            for part in e.parts:
                if isinstance(part, ast.Var):
                    self.expr(part, defined)
        elif isinstance(e, ast.ListExpr):
            for item in e.items:
                self.expr(item, defined)
        elif isinstance(e, ast.BinOp):
            self.expr(e.left, defined)
            self.expr(e.right, defined)
            lits = (e.left, e.right)
            if any(isinstance(x, ast.Str) for x in lits) and any(
                isinstance(x, ast.Num | ast.Bool) for x in lits
            ):
                raise self.fail(
                    e,
                    f"cannot use {e.op!r} between text and a number; "
                    "convert with str(...) or int(...)",
                )
        elif isinstance(e, ast.Compare):
            self.expr(e.left, defined)
            self.expr(e.right, defined)
        elif isinstance(e, ast.BoolOp):
            for v in e.values:
                self.expr(v, defined)
        elif isinstance(e, ast.Not | ast.Neg):
            self.expr(e.value, defined)
        elif isinstance(e, ast.Index):
            self.expr(e.value, defined)
            self.expr(e.index, defined)
        elif isinstance(e, ast.Call):
            self.call(e, defined)

    def call(self, call: ast.Call, defined: Names) -> None:
        """A call inside an expression: a tool, a builtin or another program."""
        if call.func in self.programs:
            params = self.programs[call.func].params
            self.arity(call, (len(params), len(params)), "program")
        elif call.func in BUILTINS:
            self.arity(call, BUILTINS[call.func], "function")
        elif call.func in self.tools:
            pass
        elif call.func in self.models or call.func in DISTRIBUTIONS:
            raise self.fail(
                call,
                f"{call.func!r} draws a random value: use it in a sample "
                f"statement, `x ~ {call.func}(...)`",
            )
        else:
            known = sorted(set(self.programs) | set(BUILTINS) | set(self.tools))
            raise self.fail(
                call,
                f"unknown function or tool {call.func!r}"
                f"{self.suggest(call.func, known)}; pass tools to "
                "lc.load(..., tools={...})",
            )
        if call.kwargs and call.func not in self.tools:
            raise self.fail(call, f"{call.func!r} takes no keyword arguments")
        for arg in call.args:
            self.expr(arg, defined)
        for _, value in call.kwargs:
            self.expr(value, defined)

    @staticmethod
    def suggest(name: str, known: list[str]) -> str:
        close = difflib.get_close_matches(name, known, n=1)
        return f" (did you mean {close[0]!r}?)" if close else ""


def check(module: ast.Module, *, models: Iterable[str], tools: dict) -> None:
    """Raises the first :class:`~lmcascade.errors.DSLCheckError` found in ``module``."""
    Checker(module, models, tools).run()
