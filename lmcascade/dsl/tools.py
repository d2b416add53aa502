"""Tools every ``.lmc`` file may call (the host can add more with ``lc.load(tools=...)``).

>>> calc("2 * (3 + 4)")
14
>>> calc("2 ** 100")
Traceback (most recent call last):
...
ValueError: calc handles + - * / % and parentheses over numbers, not Pow
"""

from __future__ import annotations

import ast
import operator

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def calc(expression) -> int | float:
    """Evaluates arithmetic over numbers (``+ - * / %``, parentheses) without running code."""
    if isinstance(expression, int | float):
        return expression

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.operand))
        kind = type(getattr(node, "op", node)).__name__
        raise ValueError(f"calc handles + - * / % and parentheses over numbers, not {kind}")

    try:
        tree = ast.parse(str(expression).strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"calc cannot read {expression!r}") from err
    return walk(tree)


DEFAULT_TOOLS = {"calc": calc}
