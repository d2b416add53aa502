"""Static checks of a parsed ``.lmc`` module: every problem, each a positioned ``DSLCheckError``.

Checked before anything runs, every problem of the file reported (not only the first): undefined variables (including ones set on only one branch of an
``if``), unknown models, distributions, tools and functions (with a suggestion), calls with the
wrong number of arguments, a sample statement whose right side is not a model or distribution,
the same site sampled twice where both can run in one execution (in straight-line code, in an
``if`` branch and again after it, in a loop and outside it; the two branches of one ``if`` may
share a name), type errors visible in literals, and what the loader could not represent: a
file without programs, a model declared twice, a program named like a Python special attribute
(``__class__``), a tree nested deeper than :data:`~lmcascade.dsl.parser.MAX_DEPTH`; misuse of
``chat``, ``match`` and the constraint builders (patterns written in the source are compiled
now); comparisons between values of known different kinds and ``+ - /`` between text and a
number (:mod:`lmcascade.dsl.kinds`).  The walk
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
import json
from collections import ChainMap
from collections.abc import Iterable
from dataclasses import dataclass, field

from lmcascade.dsl import ast, instruct, kinds
from lmcascade.dsl.parser import MAX_DEPTH, depth_message, nesting
from lmcascade.errors import DSLCheckError, LMCascadeError

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
BUILTINS.update(
    {
        "match": (2, 2),
        "regex": (1, 1),
        "json_schema": (1, 1),
        "forbid": (1, 99),
        "allow": (1, 1),
        "max_word_length": (1, 1),
    }
)
LM_OPTIONS = {
    "max_tokens",
    "min_tokens",
    "stop",
    "temperature",
    "top_k",
    "top_p",
    "constraint",
    "potential",
    "alpha",
    "proposal_temperature",
}


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
    """The variables defined at a point of a program, with the kinds of their values where the
    source shows them: the current block's own names over the enclosing blocks' (a branch or
    a loop body is a new layer, so nothing is copied).

    >>> outer = Names(own={"x"})
    >>> inner = outer.child("i")
    >>> inner.define("y", frozenset({"text"}))
    >>> ("x" in inner, "y" in inner, "y" in outer, sorted(inner.all()), inner.kind("y"))
    (True, True, False, ['i', 'x', 'y'], frozenset({'text'}))
    """

    def __init__(self, parent: Names | None = None, own: Iterable[str] = ()) -> None:
        self.parent, self.own = parent, set(own)
        self.kinds: dict[str, kinds.Kinds] = {}

    def __contains__(self, name: object) -> bool:
        return self._layer(name) is not None

    def _layer(self, name: object) -> Names | None:
        layer: Names | None = self
        while layer is not None:
            if name in layer.own:
                return layer
            layer = layer.parent
        return None

    def define(self, name: str, kind: kinds.Kinds = None) -> None:
        """Defines ``name`` in this layer, holding a value of ``kind`` (None: unknown)."""
        self.own.add(name)
        self.kinds[name] = kind

    def kind(self, name: str) -> kinds.Kinds:
        """The kinds of ``name``'s value here (None when unknown or undefined)."""
        layer = self._layer(name)
        return None if layer is None else layer.kinds.get(name)

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


def assigned(body) -> set[str]:
    """Every variable a block sets (through nested blocks).

    >>> from lmcascade.dsl.parser import parse
    >>> sorted(assigned(parse("program f() { x = 1 if x { y ~ bernoulli(0.5) } }").programs[0].body))
    ['x', 'y']
    """
    out: set[str] = set()
    stack = list(body)
    while stack:
        s = stack.pop()
        if isinstance(s, ast.Sample | ast.Assign):
            out.add(s.target)
        elif isinstance(s, ast.If):
            stack.extend(s.body + s.orelse)
        elif isinstance(s, ast.For | ast.Repeat):
            stack.extend(s.body)
            if isinstance(s, ast.For):
                out.add(s.var)
    return out


class Checker:
    """Walks one module and collects every problem in ``errors``, in source order."""

    def __init__(self, module: ast.Module, models: Iterable[str], tools: dict) -> None:
        self.module = module
        self.models = set(models) | {m.name for m in module.models}
        self.tools = tools
        self.programs = {p.name: p for p in module.programs}
        self.errors: list[DSLCheckError] = []
        self.unknown: set[str] = set()  # undefined names already reported in this program

    def report(self, node: ast.Node, message: str) -> None:
        self.errors.append(
            DSLCheckError(
                message,
                filename=self.module.filename,
                line=node.line,
                col=node.col,
                source=self.module.source,
            )
        )

    def run(self) -> list[DSLCheckError]:
        """Every problem of the module, in source order."""
        depth, deepest = nesting(self.module)
        if depth > MAX_DEPTH and deepest is not None:
            self.report(deepest, depth_message(depth))
            return self.errors  # walking a tree this deep could overflow Python's stack
        if not self.module.programs:
            self.report(
                self.module,
                "this file defines no program; write one as `program NAME(PARAMS) { ... }`",
            )
        declared: dict[str, ast.ModelDecl] = {}
        for decl in self.module.models:
            if decl.name in declared:
                first = declared[decl.name]
                self.report(
                    decl,
                    f"model {decl.name!r} is declared twice (first at {first.line}:{first.col})",
                )
            declared.setdefault(decl.name, decl)
        seen: dict[str, ast.ProgramDef] = {}
        for prog in self.module.programs:
            if prog.name in seen:
                self.report(prog, f"program {prog.name!r} is defined twice")
            if prog.name.startswith("__") and prog.name.endswith("__"):
                self.report(
                    prog,
                    f"program name {prog.name!r} is reserved: names that begin and end with "
                    "'__' are Python's special attributes; rename it",
                )
            seen.setdefault(prog.name, prog)
            self.unknown = set()
            self.block(prog.body, Names(own=prog.params), loop=False, sampled=Sampled())
        return sorted(self.errors, key=lambda e: (e.line, e.col))

    # statements: each adds the names it defines to ``defined`` (the current block's layer)
    def block(self, body, defined: Names, loop: bool, sampled: Sampled) -> None:
        for stmt in body:
            self.stmt(stmt, defined, loop, sampled)

    def duplicate(self, s: ast.Sample, loop: bool, sampled: Sampled) -> None:
        """Reports the sample ``s`` if its site can meet an earlier one in one execution."""
        name = s.target
        hint = f"rename the second sample, e.g. `{name}2 ~ {s.call.func}(...)`"
        if loop:
            if name in sampled.straight:
                first, _ = sampled.straight[name]
                self.report(
                    s,
                    f"site {name!r} is sampled in a loop here (sites {name}[0], {name}[1], ...) "
                    f"and before it, at {first.line}:{first.col}; {hint}",
                )
            sampled.looped.setdefault(name, (s, None))
            return
        if name in sampled.straight:
            first, if_line = sampled.straight[name]
            where = f"{first.line}:{first.col}" + ("" if if_line is None else " in an `if` branch")
            self.report(s, f"site {name!r} is sampled twice (first at {where}); {hint}")
        elif name in sampled.looped:
            first, _ = sampled.looped[name]
            self.report(
                s,
                f"site {name!r} is sampled in a loop at {first.line}:{first.col} (sites "
                f"{name}[0], {name}[1], ...) and again here, after it; {hint}",
            )
        sampled.straight.setdefault(name, (s, None))

    def stmt(self, s, defined: Names, loop: bool, sampled: Sampled) -> None:
        if isinstance(s, ast.Sample):
            items = self.site_call(s.call, defined)
            self.duplicate(s, loop, sampled)
            defined.define(s.target, kinds.of_sample(s.call, self.models, items))
        elif isinstance(s, ast.Assign):
            defined.define(s.target, self.expr(s.value, defined))
        elif isinstance(s, ast.Observe):
            self.expr(s.value, defined)
            self.site_call(s.call, defined)
        elif isinstance(s, ast.Condition | ast.Factor | ast.Return):
            self.expr(s.value, defined)
            if isinstance(s, ast.Factor) and isinstance(s.value, ast.Str | ast.ListExpr):
                self.report(s.value, "factor needs a number (a log-weight)")
        elif isinstance(s, ast.If):
            self.branches(s, defined, loop, sampled)
        elif isinstance(s, ast.For | ast.Repeat):
            self.loop(s, defined, sampled)
        else:  # pragma: no cover
            self.report(s, f"unsupported statement {type(s).__name__}")

    def branches(self, s: ast.If, defined: Names, loop: bool, sampled: Sampled) -> None:
        """An ``if``: the two branches may share names (only one runs); what either samples
        may meet what follows the if, unless that branch always returns.  A name either
        branch sets holds, after the ``if``, a value of either branch's kind."""
        self.expr(s.test, defined)
        outcomes = []
        for body in (s.body, s.orelse):
            seen, layer = sampled.copy(), defined.child()
            self.block(body, layer, loop, seen)
            outcomes.append((layer, seen, always_returns(body)))
        for _, seen, returns in outcomes:
            if not returns:
                sampled.merge(seen, s.line)
        (left, _, left_returns), (right, _, right_returns) = outcomes
        if left_returns != right_returns:
            after = right.own if left_returns else left.own
        else:
            after = left.own & right.own
        for name in sorted(left.own | right.own):
            if name not in after and name not in defined:
                continue
            if left_returns != right_returns:
                kind = (right if left_returns else left).kind(name)
            else:
                kind = kinds.join(left.kind(name), right.kind(name))
            defined.define(name, kind)

    def loop(self, s: ast.For | ast.Repeat, defined: Names, sampled: Sampled) -> None:
        """A ``for`` or ``repeat``: names the body sets may hold, in the body and after the
        loop, a value from any iteration (their kinds are unknown inside).  A ``for`` loop's
        own variable holds an item at the top of each iteration (text when it runs over
        text) and, after the loop, the last item or what the body set it to — or, when the
        loop ran no iteration, its value from before."""
        layer = defined.child()
        changed = sorted(n for n in assigned(s.body) if n in defined)
        for name in changed:
            layer.define(name, None)
        if isinstance(s, ast.For):
            over = self.expr(s.iterable, defined)
            if isinstance(s.iterable, ast.Num | ast.Bool):
                self.report(s.iterable, "for needs a list or a string to loop over")
            layer.define(s.var, over if over == kinds.ONE[kinds.TEXT] else None)
            if s.var in defined and s.var not in changed:
                changed.append(s.var)
        else:
            self.expr(s.count, defined)
            if isinstance(s.count, ast.Str | ast.ListExpr | ast.Bool) or (
                isinstance(s.count, ast.Num) and (s.count.value < 0 or s.count.value % 1)
            ):
                self.report(s.count, "repeat needs a whole number of times")
        self.block(s.body, layer, True, sampled)
        for name in changed:
            defined.define(name, kinds.join(defined.kind(name), layer.kind(name)))

    def site_call(self, call: ast.Call, defined: Names) -> list[kinds.Kinds]:
        """The right side of ``~``: a model or a distribution; for a categorical whose values
        are written out, their kinds."""
        if call.func in self.models:
            if len(call.args) != 1:
                self.report(
                    call,
                    f"model {call.func!r} takes one prompt, got "
                    f"{len(call.args)} positional arguments",
                )
            for key, _ in call.kwargs:
                if key not in LM_OPTIONS:
                    self.report(
                        call,
                        f"unknown option {key!r} for model {call.func!r}; "
                        f"options: {', '.join(sorted(LM_OPTIONS))}",
                    )
        elif call.func in DISTRIBUTIONS:
            self.arity(call, DISTRIBUTIONS[call.func], "distribution")
        else:
            known = sorted(self.models | set(DISTRIBUTIONS))
            self.report(
                call,
                f"{call.func!r} is not a model or distribution"
                f"{self.suggest(call.func, known)}; declare models with "
                '`model NAME = "..."` or bind them when loading',
            )
        items: list[kinds.Kinds] = []
        for i, arg in enumerate(call.args):
            if i == 0 and isinstance(arg, ast.ListExpr) and call.func == "categorical":
                items = [self.expr(x, defined) for x in arg.items]  # the values drawn
            else:
                self.expr(arg, defined)
        for key, value in call.kwargs:
            if key == "potential" and call.func in self.models:
                self.potential(value, defined)
            else:
                kind = self.expr(value, defined)
                if key == "constraint" and call.func in self.models:
                    self.constraint(value, kind)
        return items

    def potential(self, value: ast.Expr, defined: Names) -> None:
        """A model's ``potential=``: a tool named bare, a model call, or a value."""
        if isinstance(value, ast.Var) and value.name not in defined and value.name in self.tools:
            return
        if isinstance(value, ast.Call) and value.func in self.models:
            self.site_call(value, defined)
            return
        if isinstance(value, ast.Var) and value.name not in defined:
            self.report(
                value,
                f"potential={value.name} names no tool or variable; give a tool (a function of "
                "the partial text, passed with lc.load(..., tools={...})) or a model call, "
                'e.g. potential=lm2("...")',
            )
            return
        self.expr(value, defined)

    def constraint(self, value: ast.Expr, kind: kinds.Kinds) -> None:
        if kind is not None and kind != kinds.ONE[kinds.CONSTRAINT]:
            example = "regex(...)"
            if isinstance(value, ast.Str) and all(isinstance(p, str) for p in value.parts):
                example = f"regex({json.dumps(''.join(value.parts))})"  # type: ignore[arg-type]
            self.report(
                value,
                f"constraint= needs a constraint, got {kinds.words(kind)}: write {example}, "
                "json_schema(...), forbid(...), allow([...]) or max_word_length(n)",
            )

    def arity(self, call: ast.Call, bounds: tuple[int, int], what: str) -> None:
        low, high = bounds
        n = len(call.args)
        if not low <= n <= high:
            want = str(low) if low == high else f"{low} to {high}"
            self.report(call, f"{what} {call.func!r} takes {want} arguments, got {n}")

    def expr(self, e, defined: Names) -> kinds.Kinds:
        """Checks ``e``; the kinds of its value, where the source shows them."""
        if isinstance(e, ast.Var):
            if e.name not in defined:
                if e.name not in self.unknown:
                    self.unknown.add(e.name)
                    known = sorted(defined.all())
                    self.report(e, f"undefined variable {e.name!r}{self.suggest(e.name, known)}")
                return None
            return defined.kind(e.name)
        if isinstance(e, ast.Str):
            for part in e.parts:
                if isinstance(part, ast.Var):
                    self.expr(part, defined)
        elif isinstance(e, ast.ListExpr):
            for item in e.items:
                self.expr(item, defined)
        elif isinstance(e, ast.BinOp):
            left, right = self.expr(e.left, defined), self.expr(e.right, defined)
            if kinds.arithmetic_problem(e.op, left, right):
                self.report(
                    e,
                    f"cannot use {e.op!r} between text and a number; "
                    "convert with str(...) or int(...)",
                )
            return kinds.of_binop(e.op, left, right)
        elif isinstance(e, ast.Compare):
            self.compare(e, self.expr(e.left, defined), self.expr(e.right, defined))
        elif isinstance(e, ast.BoolOp):
            out: kinds.Kinds = frozenset()
            for v in e.values:
                out = kinds.join(out, self.expr(v, defined))
            return out
        elif isinstance(e, ast.Not | ast.Neg):
            self.expr(e.value, defined)
        elif isinstance(e, ast.Index):
            container = self.expr(e.value, defined)
            self.expr(e.index, defined)
            return kinds.of_index(container)
        elif isinstance(e, ast.Try):
            return kinds.join(self.expr(e.body, defined), self.expr(e.orelse, defined))
        elif isinstance(e, ast.Call):
            return self.call(e, defined)
        return kinds.of_literal(e)

    def compare(self, e: ast.Compare, left: kinds.Kinds, right: kinds.Kinds) -> None:
        """Reports a comparison between values of known different kinds."""
        problem = kinds.comparison_problem(e.op, left, right)
        if problem is None or left is None or right is None:
            return

        def side(x: ast.Expr, k: frozenset[str]) -> str:
            return f"{x.name} ({kinds.words(k)})" if isinstance(x, ast.Var) else kinds.words(k)

        hint = "convert one side with int(...), float(...) or str(...)"
        if kinds.NONE in left | right and e.op not in ("==", "!="):
            hint = "test for none first (`x != none and ...`) or give a default with try/else"
        self.report(
            e,
            f"`{e.op}` compares {side(e.left, left)} with {side(e.right, right)}, {problem}; "
            f"{hint}",
        )

    def call(self, call: ast.Call, defined: Names) -> kinds.Kinds:
        """A call inside an expression: a tool, a builtin or another program."""
        if call.func in self.programs:
            params = self.programs[call.func].params
            self.arity(call, (len(params), len(params)), "program")
        elif call.func == "chat":
            return self.chat(call, defined)
        elif call.func in BUILTINS:
            self.arity(call, BUILTINS[call.func], "function")
            self.literal_pattern(call)
        elif call.func in self.tools:
            pass
        elif call.func in self.models or call.func in DISTRIBUTIONS:
            self.report(
                call,
                f"{call.func!r} draws a random value: use it in a sample "
                f"statement, `x ~ {call.func}(...)`",
            )
        else:
            known = sorted(set(self.programs) | set(BUILTINS) | set(self.tools) | {"chat"})
            self.report(
                call,
                f"unknown function or tool {call.func!r}"
                f"{self.suggest(call.func, known)}; pass tools to "
                "lc.load(..., tools={...})",
            )
        if call.kwargs and call.func not in self.tools:
            self.report(call, f"{call.func!r} takes no keyword arguments")
        for arg in call.args:
            self.expr(arg, defined)
        for _, value in call.kwargs:
            self.expr(value, defined)
        return None if call.func in self.programs else kinds.of_call(call.func, self.tools)

    def chat(self, call: ast.Call, defined: Names) -> kinds.Kinds:
        """``chat(model, user, system=...)``: the first argument names a model."""
        usage = 'write chat(lm, "user message", system="system message")'
        if len(call.args) != 2:
            self.report(call, f"chat takes a model and a user message, got {len(call.args)} "
                        f"arguments; {usage}")  # fmt: skip
        elif not (isinstance(call.args[0], ast.Var) and call.args[0].name in self.models):
            self.report(call.args[0], f"chat's first argument must name a model; {usage}")
        for key, value in call.kwargs:
            if key != "system":
                self.report(call, f"chat takes only the keyword system=, not {key}=; {usage}")
            self.expr(value, defined)
        for arg in call.args[1:]:
            self.expr(arg, defined)
        return kinds.ONE[kinds.TEXT]

    def literal_pattern(self, call: ast.Call) -> None:
        """A pattern or schema written out in the source is checked now, not when it runs."""
        check = PATTERN_CHECKS.get(call.func)
        if check is None or not call.args:
            return
        first = call.args[0]
        if not (isinstance(first, ast.Str) and all(isinstance(p, str) for p in first.parts)):
            return
        try:
            check("".join(first.parts))  # type: ignore[arg-type]
        except (LMCascadeError, ValueError, TypeError) as err:
            self.report(first, str(err))

    @staticmethod
    def suggest(name: str, known: list[str]) -> str:
        close = difflib.get_close_matches(name, known, n=1)
        return f" (did you mean {close[0]!r}?)" if close else ""


PATTERN_CHECKS = {
    "match": lambda text: instruct.compiled(instruct.bounded_pattern("match", text)),
    "regex": instruct.regex_pattern,
    "json_schema": lambda text: instruct.CONSTRAINTS["json_schema"](text),
}

MAX_REPORTED = 50
"""The most problems one report lists (the rest are counted)."""


class CheckFailed(DSLCheckError):
    """Every problem :func:`check` found: located as the first one, listing each (one
    ``file:line:col: message`` with its line and caret after another); ``errors`` holds them
    as separate :class:`~lmcascade.errors.DSLCheckError` s.

    >>> from lmcascade.dsl.parser import parse
    >>> try:
    ...     check(parse("program f() { return [a, b] }", filename="f.lmc"), models=(), tools={})
    ... except CheckFailed as err:
    ...     print(str(err).splitlines()[-1], len(err.errors))
    (2 problems in f.lmc) 2
    """

    def __init__(self, errors: list[DSLCheckError], source: str | None = None) -> None:
        first = errors[0]
        super().__init__(
            first.reason, filename=first.filename, line=first.line, col=first.col, source=source
        )
        self.errors = tuple(errors)
        if len(errors) > 1:
            shown = "\n".join(str(e) for e in errors[:MAX_REPORTED])
            count = f"{len(errors)} problems"
            if len(errors) > MAX_REPORTED:
                count = f"{MAX_REPORTED} of {len(errors)} problems shown"
            self.args = (f"{shown}\n({count} in {first.filename})",)


def problems(module: ast.Module, *, models: Iterable[str], tools: dict) -> list[DSLCheckError]:
    """Every problem :func:`check` would report, in source order (empty when none).

    >>> from lmcascade.dsl.parser import parse
    >>> [e.reason for e in problems(parse("program f() { return 1 }"), models=(), tools={})]
    []
    """
    return Checker(module, models, tools).run()


def check(module: ast.Module, *, models: Iterable[str], tools: dict) -> None:
    """Raises a :class:`~lmcascade.errors.DSLCheckError` for every problem found in
    ``module``: the problem itself when there is one, else a :class:`CheckFailed` listing
    them all, each with its line, column and caret; either way ``errors`` holds them one by
    one.

    >>> from lmcascade.dsl.parser import parse
    >>> source = 'program f(q) {\\n  a = q + 1\\n  if b == 3 { return c }\\n  return a\\n}'
    >>> try:
    ...     check(parse(source, filename="f.lmc"), models=(), tools={})
    ... except CheckFailed as err:
    ...     print([(e.line, e.col, e.reason) for e in err.errors])
    [(3, 6, "undefined variable 'b'"), (3, 22, "undefined variable 'c'")]
    """
    found = problems(module, models=models, tools=tools)
    if len(found) == 1:
        found[0].errors = (found[0],)  # type: ignore[attr-defined]
        raise found[0]
    if found:
        raise CheckFailed(found, module.source)
