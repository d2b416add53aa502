"""Tools every ``.lmc`` file may call (the host can add more with ``lc.load(tools=...)``).

``calc`` evaluates arithmetic text without running code, under the same bounds as the
interpreter: whole numbers of at most ``Limits.digits`` digits (a product is refused before it
is computed), an expression of at most ``MAX_CALC_CHARS`` characters, no powers, and a finite
result.  Every failure is a ``ValueError`` whose message says what went wrong; in a ``.lmc``
program it gives the trace weight zero like any failing tool (``try calc(x) else none``
handles it; under ``on_tool_error="raise"`` it is a located ``DSLRuntimeError``) — except a
whole number past the digit limit (an :class:`~lmcascade.dsl.limits.OverLimit`): that is the
run's digit budget, which stops the run and which ``try`` does not catch, as when the program
itself builds such a number.

>>> calc("2 * (3 + 4)")
14
>>> calc("2 ** 100")
Traceback (most recent call last):
...
ValueError: calc handles + - * / % and parentheses over numbers, not Pow
>>> calc("1/0")
Traceback (most recent call last):
...
ValueError: calc cannot divide by zero in '1/0'
"""

from __future__ import annotations

import ast
import math
import operator

from lmcascade.dsl.limits import Budget, Limits, Refusal

MAX_CALC_CHARS = 10_000

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def calc(expression: str | int | float, *, limits: Limits | None = None) -> int | float:
    """Evaluates arithmetic over numbers (``+ - * / %``, parentheses) without running code.

    ``limits`` bounds the digits of whole numbers (the interpreter passes the program's own;
    the default is ``Limits()``).
    """
    budget = Budget(limits or Limits())
    if isinstance(expression, bool) or not isinstance(expression, str | int | float):
        raise ValueError(f"calc takes text or a number, got {type(expression).__name__}")
    if not isinstance(expression, str):
        return _result(expression, budget, repr(expression))
    text = expression.strip()
    if len(text) > MAX_CALC_CHARS:
        raise Refusal(
            f"calc reads expressions of at most {MAX_CALC_CHARS:,} characters, got {len(text):,}"
        )
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        why = "" if isinstance(err, SyntaxError) else f" ({type(err).__name__}: {err})"
        raise ValueError(f"calc cannot read {_short(text)}{why}") from None
    try:
        return _result(_evaluate(tree.body, budget), budget, text)
    except ZeroDivisionError:
        raise ValueError(f"calc cannot divide by zero in {_short(text)}") from None
    except OverflowError as err:
        raise ValueError(f"calc overflowed in {_short(text)}: {err}") from None


def _evaluate(root: ast.expr, budget: Budget) -> int | float:
    """The value of a parsed expression, computed without recursion (an explicit stack, so a
    deeply nested expression cannot exhaust Python's stack)."""
    values: list[int | float] = []
    stack: list[tuple[ast.AST, bool]] = [(root, False)]
    while stack:
        node, ready = stack.pop()
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"calc handles numbers, not {value!r}")
            values.append(_checked(value, budget))
        elif isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            if not ready:
                stack += [(node, True), (node.right, False), (node.left, False)]
                continue
            right, left = values.pop(), values.pop()
            if isinstance(node.op, ast.Mult) and isinstance(left, int) and isinstance(right, int):
                budget.check_product(left, right)
            values.append(_checked(_OPS[type(node.op)](left, right), budget))
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            if not ready:
                stack += [(node, True), (node.operand, False)]
                continue
            values.append(_OPS[type(node.op)](values.pop()))
        else:
            kind = type(getattr(node, "op", node)).__name__
            raise ValueError(f"calc handles + - * / % and parentheses over numbers, not {kind}")
    return values[0]


def _checked(value: int | float, budget: Budget) -> int | float:
    """``value``, refused when a whole number has too many digits."""
    return budget.check_int(value) if isinstance(value, int) else value


def _result(value: int | float, budget: Budget, text: str) -> int | float:
    """The final value: a whole number within the digit limit or a finite float."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"calc's result for {_short(text)} is {value}, not a finite number")
    return _checked(value, budget)


def _short(text: str) -> str:
    """``text`` quoted, cut to a readable length for messages."""
    return repr(text) if len(text) <= 60 else repr(text[:57] + "...")


DEFAULT_TOOLS = {"calc": calc}
