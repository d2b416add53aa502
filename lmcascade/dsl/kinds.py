"""What kind of value each ``.lmc`` expression holds, as far as the source shows it.

The checker uses these kinds to refuse what can only be a mistake: a comparison between values
of known different kinds (``answer == 3`` where ``answer`` is model text is always false;
``answer < 3`` fails when it runs), and arithmetic between text and a number.  A kind is a
set of the possible kinds (``match`` gives text or none) or ``None`` when the source does not
show it (a parameter, a tool's result, a variable a loop reassigns); only known kinds are ever
reported, so a correct program is never refused.

>>> sorted(of_call("match", {}))
['none', 'text']
>>> comparison_problem("==", frozenset({TEXT}), frozenset({NUMBER}))
'which is always false'
"""

from __future__ import annotations

from lmcascade.dsl import ast
from lmcascade.dsl.tools import calc

TEXT, NUMBER, BOOL, LIST, NONE, CONSTRAINT = (
    "text",
    "number",
    "bool",
    "list",
    "none",
    "constraint",
)
Kinds = frozenset[str] | None

WORDS = {
    TEXT: "text",
    NUMBER: "a number",
    BOOL: "true/false",
    LIST: "a list",
    NONE: "none",
    CONSTRAINT: "a constraint",
}

ONE = {k: frozenset({k}) for k in WORDS}
BUILTIN_KINDS: dict[str, Kinds] = {
    **dict.fromkeys(["len", "int", "float", "round", "abs"], ONE[NUMBER]),
    **dict.fromkeys(["str", "lower", "upper", "strip", "join", "chat"], ONE[TEXT]),
    "split": ONE[LIST],
    "contains": ONE[BOOL],
    "match": frozenset({TEXT, NONE}),
    **dict.fromkeys(
        ["regex", "json_schema", "forbid", "allow", "max_word_length"], ONE[CONSTRAINT]
    ),
}
SAMPLE_KINDS: dict[str, Kinds] = {
    "bernoulli": ONE[BOOL],
    **dict.fromkeys(["normal", "uniform", "beta", "poisson", "geometric", "binomial"], ONE[NUMBER]),
}


def join(a: Kinds, b: Kinds) -> Kinds:
    """The kinds of a value that is one of two (unknown if either is).

    >>> sorted(join(ONE[TEXT], ONE[NONE])), join(ONE[TEXT], None)
    (['none', 'text'], None)
    """
    return None if a is None or b is None else a | b


def of_sample(call: ast.Call, models: set[str], items: list[Kinds]) -> Kinds:
    """The kinds a sample statement draws: text from a model, a number or true/false from a
    distribution, and from a categorical whose values are written out as a list, the kinds
    of its ``items``.

    >>> of_sample(ast.Call(1, 1, "bernoulli"), set(), []) == ONE[BOOL]
    True
    """
    if call.func in models:
        return ONE[TEXT]
    if call.func == "categorical" and call.args and isinstance(call.args[0], ast.ListExpr):
        kinds: Kinds = frozenset()
        for item in items:
            kinds = join(kinds, item)
        return kinds or None
    return SAMPLE_KINDS.get(call.func)


def of_literal(e: ast.Expr) -> Kinds:
    """The kind of a literal, a list, a comparison or a negation (None for other nodes).

    >>> of_literal(ast.NoneLit(1, 1)) == ONE[NONE]
    True
    """
    simple = {
        ast.Num: NUMBER,
        ast.Str: TEXT,
        ast.Bool: BOOL,
        ast.NoneLit: NONE,
        ast.ListExpr: LIST,
        ast.Compare: BOOL,
        ast.Not: BOOL,
        ast.Neg: NUMBER,
    }
    return ONE[simple[type(e)]] if type(e) in simple else None


def of_binop(op: str, left: Kinds, right: Kinds) -> Kinds:
    """``left op right``: a number from numbers; text or a list from ``+`` of two of them.

    >>> of_binop("+", ONE[TEXT], ONE[TEXT]) == ONE[TEXT], of_binop("-", ONE[TEXT], ONE[TEXT])
    (True, None)
    """
    if left == right and left in (ONE[NUMBER], ONE[TEXT], ONE[LIST]):
        return left if op == "+" or left == ONE[NUMBER] else None
    return None


def of_index(container: Kinds) -> Kinds:
    """An item of a text is text; of anything else, unknown.

    >>> of_index(ONE[TEXT]) == ONE[TEXT], of_index(ONE[LIST])
    (True, None)
    """
    return ONE[TEXT] if container == ONE[TEXT] else None


def of_call(func: str, tools: dict) -> Kinds:
    """What a builtin or a tool returns (``calc`` a number; other tools unknown)."""
    if func in tools:
        return ONE[NUMBER] if tools[func] is calc else None
    return BUILTIN_KINDS.get(func)


def _fits(op: str, a: str, b: str) -> bool:
    """Whether ``a op b`` can be true (for ``==``) or can run (the others)."""
    numeric = {NUMBER, BOOL}
    if op in ("==", "!="):
        return a == b or NONE in (a, b) or {a, b} <= numeric
    if op == "in":
        return b == LIST or (b == TEXT and a == TEXT)
    return (a == b and a in (TEXT, LIST)) or {a, b} <= numeric


def comparison_problem(op: str, left: Kinds, right: Kinds) -> str | None:
    """What is wrong with comparing values of these kinds (None if it can be right)."""
    if left is None or right is None or not left or not right:
        return None
    if any(_fits(op, a, b) for a in left for b in right):
        return None
    if op == "==":
        return "which is always false"
    if op == "!=":
        return "which is always true"
    return "which fails when it runs"


def arithmetic_problem(op: str, left: Kinds, right: Kinds) -> bool:
    """Whether ``left op right`` is text against a number under ``+ - /`` (``*`` repeats
    text, and ``%`` on text has its own message when it runs).

    >>> arithmetic_problem("+", ONE[TEXT], ONE[NUMBER]), arithmetic_problem("*", ONE[TEXT], ONE[NUMBER])
    (True, False)
    """
    if op not in "+-/" or left is None or right is None:
        return False
    number = frozenset({NUMBER, BOOL})
    return (left == ONE[TEXT] and right <= number) or (right == ONE[TEXT] and left <= number)


def words(kinds: frozenset[str]) -> str:
    """``kinds`` in the DSL's words: ``text``, ``text or none``.

    >>> words(frozenset({NONE, TEXT}))
    'text or none'
    """
    return " or ".join(WORDS[k] for k in sorted(kinds, key=list(WORDS).index))
