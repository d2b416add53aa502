"""The text DSL's syntax tree: one small frozen record per construct, each with its position.

>>> from lmcascade.dsl.parser import parse
>>> module = parse('program f(x) { y = x + 1  return y }')
>>> module.programs[0].body[0]
Assign(line=1, col=16, target='y', value=BinOp(line=1, col=20, op='+', left=Var(line=1, col=20, name='x'), right=Num(line=1, col=24, value=1)))
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Node:
    """Base: every node knows where it starts in the source."""

    line: int
    col: int


# --- expressions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Num(Node):
    value: int | float


@dataclass(frozen=True)
class Str(Node):
    """A string; ``parts`` alternate literal text and :class:`Var` placeholders (``{name}``)."""

    parts: tuple[str | Var, ...]


@dataclass(frozen=True)
class Bool(Node):
    value: bool


@dataclass(frozen=True)
class NoneLit(Node):
    """``none``: no value (what ``match`` gives when nothing matches)."""


@dataclass(frozen=True)
class Var(Node):
    name: str


@dataclass(frozen=True)
class ListExpr(Node):
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class BinOp(Node):
    """Arithmetic: ``+ - * / %``."""

    op: str
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Compare(Node):
    """``== != < <= > >=`` and ``in``."""

    op: str
    left: Expr
    right: Expr


@dataclass(frozen=True)
class BoolOp(Node):
    """``and`` / ``or`` over two or more operands."""

    op: str
    values: tuple[Expr, ...]


@dataclass(frozen=True)
class Not(Node):
    value: Expr


@dataclass(frozen=True)
class Neg(Node):
    value: Expr


@dataclass(frozen=True)
class Index(Node):
    value: Expr
    index: Expr


@dataclass(frozen=True)
class Call(Node):
    """``name(args, key=value)``: a model, a distribution, a tool or another program."""

    func: str
    args: tuple[Expr, ...] = ()
    kwargs: tuple[tuple[str, Expr], ...] = ()


@dataclass(frozen=True)
class Try(Node):
    """``try body else orelse``: ``orelse`` when evaluating ``body`` fails (a tool that
    raised, an operation that failed); never when the run went over a budget."""

    body: Expr
    orelse: Expr


Expr = (
    Num | Str | Bool | NoneLit | Var | ListExpr | BinOp | Compare | BoolOp | Not | Neg | Index
    | Call | Try
)  # fmt: skip


# --- statements --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample(Node):
    """``target ~ call``."""

    target: str
    call: Call


@dataclass(frozen=True)
class Assign(Node):
    target: str
    value: Expr


@dataclass(frozen=True)
class Observe(Node):
    """``observe value ~ call``."""

    value: Expr
    call: Call


@dataclass(frozen=True)
class Condition(Node):
    value: Expr


@dataclass(frozen=True)
class Factor(Node):
    value: Expr


@dataclass(frozen=True)
class If(Node):
    test: Expr
    body: tuple[Stmt, ...]
    orelse: tuple[Stmt, ...] = ()


@dataclass(frozen=True)
class For(Node):
    var: str
    iterable: Expr
    body: tuple[Stmt, ...]


@dataclass(frozen=True)
class Repeat(Node):
    count: Expr
    body: tuple[Stmt, ...]


@dataclass(frozen=True)
class Return(Node):
    value: Expr


Stmt = Sample | Assign | Observe | Condition | Factor | If | For | Repeat | Return


# --- top level ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDecl(Node):
    """``model name = "registry-name-or-path"``."""

    name: str
    ref: str


@dataclass(frozen=True)
class ProgramDef(Node):
    name: str
    params: tuple[str, ...]
    body: tuple[Stmt, ...]


@dataclass(frozen=True)
class Module(Node):
    """A whole ``.lmc`` file."""

    filename: str
    models: tuple[ModelDecl, ...] = ()
    programs: tuple[ProgramDef, ...] = ()
    source: str = field(default="", repr=False, compare=False)
