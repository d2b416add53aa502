"""Parsing ``.lmc`` sources into the syntax tree of :mod:`lmcascade.dsl.ast`.

The grammar is the data file ``grammar.lark`` (LALR); a lark ``Transformer`` maps each rule to
one AST node and keeps its line and column.  Every problem becomes a
:class:`~lmcascade.errors.DSLSyntaxError` showing ``file:line:col``, the line with a caret and
what was expected — no lark exception ever reaches the user.

Hostile input is bounded before and after lark sees it (the limits are module constants):
a source may have at most :data:`MAX_SOURCE_CHARS` characters and :data:`MAX_TOKENS` tokens
(parsing costs up to 60 µs a token), the syntax tree may nest at most :data:`MAX_DEPTH` levels
(so no later recursive walk can overflow Python's stack), a whole-number literal may have at
most :data:`MAX_NUMBER_DIGITS` digits and a number must be finite.  ``\\r\\n`` and lone ``\\r``
line endings read as ``\\n``, a leading byte-order mark is skipped, and a NUL character or a
lone surrogate is refused.

>>> module = parse('model lm = "smollm2-135m"\\nprogram hi() { t ~ lm("Hello {name}") return t }')
>>> module.models[0].ref, module.programs[0].name
('smollm2-135m', 'hi')
>>> parse('program f( { }', filename="bad.lmc")
Traceback (most recent call last):
...
lmcascade.errors.DSLSyntaxError: bad.lmc:1:12: unexpected "{"; expected ")" or a name
  program f( { }
             ^
"""

from __future__ import annotations

import keyword
import math
import re
from collections.abc import Iterator
from functools import lru_cache
from importlib import resources

from lark import Lark, Token, Transformer_NonRecursive, v_args
from lark.exceptions import (
    LarkError,
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
    VisitError,
)
from lark.lexer import PatternStr

from lmcascade.dsl import ast
from lmcascade.errors import DSLError, DSLSyntaxError

FRIENDLY = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a string",
    "RAW_STRING": "a string",
    "COMP_OP": "a comparison",
    "ADD_OP": '"+" or "-"',
    "MUL_OP": '"*", "/" or "%"',
    "$END": "the end of the file",
}
ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\", "{": "{", "}": "}"}

MAX_SOURCE_CHARS = 1_000_000
"""The longest source :func:`parse` accepts, in characters."""
MAX_TOKENS = 50_000
"""The most tokens (names, numbers, strings, operators) a source may have: about 3 s to parse."""
MAX_DEPTH = 200
"""How deeply the syntax tree may nest: brackets, calls, unary operators, ``if``/``for``/
``repeat`` blocks and each ``else if`` add a level, and so does every operator of a chain such
as ``a + b + c`` (it is read as ``(a + b) + c``)."""
MAX_NUMBER_DIGITS = 4_300
"""The most digits of a whole-number literal (Python's own limit for converting text)."""
PYTHON_KEYWORDS = frozenset(keyword.kwlist)
DSL_KEYWORDS = frozenset(
    "model program observe condition factor if else for in repeat return and or not true "
    "false none try".split()
)
"""Words the grammar reads as keywords: a variable may not be named so."""


@lru_cache(maxsize=1)
def grammar() -> Lark:
    text = resources.files("lmcascade.dsl").joinpath("grammar.lark").read_text()
    return Lark(text, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def describe_terminal(name: str) -> str:
    if name in FRIENDLY:
        return FRIENDLY[name]
    try:
        pattern = grammar().get_terminal(name).pattern
    except KeyError:
        return name.lower()
    return f'"{pattern.value}"' if isinstance(pattern, PatternStr) else name.lower()


def expected_text(names) -> str:
    items = sorted({describe_terminal(n) for n in names})
    if len(items) > 1:
        return ", ".join(items[:-1]) + " or " + items[-1]
    return items[0] if items else "something else"


class _Kwarg(tuple):
    """A ``name=value`` argument on its way into a Call."""


class ToAst(Transformer_NonRecursive):
    """One method per grammar rule, each returning an AST node with its position (lark's
    non-recursive transformer: a deep tree is measured and refused afterwards, never a
    RecursionError here)."""

    def __init__(self, filename: str, source: str) -> None:
        super().__init__()
        self.filename, self.source = filename, source

    def error(self, message: str, line: int, col: int) -> DSLSyntaxError:
        return DSLSyntaxError(
            message, filename=self.filename, line=line, col=col, source=self.source
        )

    # top level
    @v_args(meta=True)
    def start(self, meta, items):
        models = tuple(i for i in items if isinstance(i, ast.ModelDecl))
        programs = tuple(i for i in items if isinstance(i, ast.ProgramDef))
        return ast.Module(1, 1, self.filename, models, programs, self.source)

    @v_args(meta=True)
    def model_decl(self, meta, items):
        name, ref = items
        text = self._unescape(ref)
        return ast.ModelDecl(meta.line, meta.column, str(name), text)

    @v_args(meta=True)
    def program(self, meta, items):
        name, params, body = items
        return ast.ProgramDef(meta.line, meta.column, str(name), tuple(params or ()), body)

    def params(self, items):
        names = [self._target(t) for t in items]
        for i, tok in enumerate(items):
            if names.index(names[i]) != i:
                raise self.error(f"parameter {names[i]!r} is listed twice", tok.line, tok.column)
            if names[i] in PYTHON_KEYWORDS:
                raise self.error(
                    f"parameter name {names[i]!r} is reserved: programs are called from "
                    "Python, where it is a keyword; rename it",
                    tok.line,
                    tok.column,
                )
        return tuple(names)

    def block(self, items):
        return tuple(items)

    # statements
    def _target(self, tok: Token) -> str:
        """A variable's name where it is set, refused when it is a keyword (it could never be
        read: ``none`` in an expression is the value none)."""
        if str(tok) in DSL_KEYWORDS:
            raise self.error(
                f"{str(tok)!r} is a keyword of the language, not a variable name; rename it",
                tok.line,
                tok.column,
            )
        return str(tok)

    @v_args(meta=True)
    def sample_stmt(self, meta, items):
        return ast.Sample(meta.line, meta.column, self._target(items[0]), items[1])

    @v_args(meta=True)
    def assign_stmt(self, meta, items):
        return ast.Assign(meta.line, meta.column, self._target(items[0]), items[1])

    @v_args(meta=True)
    def observe_stmt(self, meta, items):
        return ast.Observe(meta.line, meta.column, items[0], items[1])

    @v_args(meta=True)
    def condition_stmt(self, meta, items):
        return ast.Condition(meta.line, meta.column, items[0])

    @v_args(meta=True)
    def factor_stmt(self, meta, items):
        return ast.Factor(meta.line, meta.column, items[0])

    @v_args(meta=True)
    def if_stmt(self, meta, items):
        test, body, orelse = items
        if isinstance(orelse, ast.If):
            orelse = (orelse,)
        return ast.If(meta.line, meta.column, test, body, tuple(orelse or ()))

    @v_args(meta=True)
    def for_stmt(self, meta, items):
        return ast.For(meta.line, meta.column, self._target(items[0]), items[1], items[2])

    @v_args(meta=True)
    def repeat_stmt(self, meta, items):
        return ast.Repeat(meta.line, meta.column, items[0], items[1])

    @v_args(meta=True)
    def return_stmt(self, meta, items):
        return ast.Return(meta.line, meta.column, items[0])

    # calls
    @v_args(meta=True)
    def call(self, meta, items):
        name, args = items
        self._not_try(name)
        positional, keywords, seen = [], [], set()
        for arg in args or ():
            if isinstance(arg, _Kwarg):
                key, value, tok = arg
                if key in seen:
                    raise self.error(f"argument {key!r} is given twice", tok.line, tok.column)
                seen.add(key)
                keywords.append((key, value))
            else:
                if keywords:
                    raise self.error(
                        "a positional argument follows a keyword argument",
                        getattr(arg, "line", meta.line),
                        getattr(arg, "col", meta.column),
                    )
                positional.append(arg)
        return ast.Call(meta.line, meta.column, str(name), tuple(positional), tuple(keywords))

    def args(self, items):
        return [i for i in items if i is not None]

    def kwarg(self, items):
        return _Kwarg((str(items[0]), items[1], items[0]))

    # expressions
    @v_args(meta=True)
    def or_expr(self, meta, items):
        return ast.BoolOp(meta.line, meta.column, "or", tuple(items))

    @v_args(meta=True)
    def and_expr(self, meta, items):
        return ast.BoolOp(meta.line, meta.column, "and", tuple(items))

    @v_args(meta=True)
    def not_op(self, meta, items):
        return ast.Not(meta.line, meta.column, items[0])

    @v_args(meta=True)
    def comparison(self, meta, items):
        left, op, right = items
        return ast.Compare(meta.line, meta.column, str(op), left, right)

    @v_args(meta=True)
    def contains(self, meta, items):
        return ast.Compare(meta.line, meta.column, "in", items[0], items[1])

    @v_args(meta=True)
    def sum(self, meta, items):
        return self._fold(meta, items)

    @v_args(meta=True)
    def term(self, meta, items):
        return self._fold(meta, items)

    def _fold(self, meta, items):
        node = items[0]
        for op, right in zip(items[1::2], items[2::2], strict=True):
            node = ast.BinOp(meta.line, meta.column, str(op), node, right)
        return node

    @v_args(meta=True)
    def neg(self, meta, items):
        return ast.Neg(meta.line, meta.column, items[0])

    @v_args(meta=True)
    def index(self, meta, items):
        return ast.Index(meta.line, meta.column, items[0], items[1])

    def number(self, items):
        tok = items[0]
        text = str(tok)
        shown = text if len(text) <= 24 else f"{text[:10]}...{text[-10:]}"
        if re.fullmatch(r"\d+", text):
            digits = len(text.lstrip("0"))
            if digits > MAX_NUMBER_DIGITS:
                raise self.error(
                    f"the number {shown} has {digits:,} digits; the limit is {MAX_NUMBER_DIGITS:,}",
                    tok.line,
                    tok.column,
                )
            try:
                value: int | float = int(text.lstrip("0") or "0")
            except ValueError as err:  # the host lowered sys.set_int_max_str_digits
                message = f"the number {shown} cannot be read: {err}"
                raise self.error(message, tok.line, tok.column) from None
        else:
            value = float(text)
            if not math.isfinite(value):
                raise self.error(
                    f"the number {shown} is not a finite number (the largest is about 1.8e308)",
                    tok.line,
                    tok.column,
                )
        return ast.Num(tok.line, tok.column, value)

    def string(self, items):
        tok = items[0]
        return ast.Str(tok.line, tok.column, self._template(tok))

    def raw_string(self, items):
        """A `backtick` string: its text as written, without escapes or placeholders (for
        regular expressions and JSON); it may span lines."""
        tok = items[0]
        return ast.Str(tok.line, tok.column, (str(tok)[1:-1],))

    @v_args(meta=True)
    def true(self, meta, items):
        return ast.Bool(meta.line, meta.column, True)

    @v_args(meta=True)
    def false(self, meta, items):
        return ast.Bool(meta.line, meta.column, False)

    @v_args(meta=True)
    def none(self, meta, items):
        return ast.NoneLit(meta.line, meta.column)

    @v_args(meta=True)
    def try_expr(self, meta, items):
        return ast.Try(meta.line, meta.column, items[0], items[1])

    def var(self, items):
        tok = items[0]
        self._not_try(tok)
        return ast.Var(tok.line, tok.column, str(tok))

    def _not_try(self, tok: Token) -> None:
        """Refuses ``try`` read as a name (where lark did not expect the keyword)."""
        if str(tok) == "try":
            raise self.error(TRY_INSIDE, tok.line, tok.column)

    @v_args(meta=True)
    def list(self, meta, items):
        return ast.ListExpr(meta.line, meta.column, tuple(i for i in items if i is not None))

    # strings
    def _unescape(self, tok: Token, keep_braces: bool = False) -> str:
        body, out, i = str(tok)[1:-1], [], 0
        while i < len(body):
            ch = body[i]
            if ch == "\\":
                nxt = body[i + 1]
                if nxt not in ESCAPES:
                    raise self.error(
                        f'unknown escape \\{nxt} in a string (use \\n, \\t, \\", \\\\, \\{{ '
                        "or \\})",
                        tok.line,
                        tok.column + 1 + i,
                    )
                out.append("\\" + nxt if keep_braces and nxt in "{}" else ESCAPES[nxt])
                i += 2
            else:
                out.append(ch)
                i += 1
        return "".join(out)

    def _template(self, tok: Token) -> tuple[str | ast.Var, ...]:
        """Literal text and ``{name}`` placeholders (``\\{`` and ``\\}`` are literal braces)."""
        text = self._unescape(tok, keep_braces=True)
        parts: list[str | ast.Var] = []
        buf, i = [], 0
        while i < len(text):
            ch = text[i]
            if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
                buf.append(text[i + 1])
                i += 2
            elif ch == "{":
                end = text.find("}", i)
                name = text[i + 1 : end] if end > 0 else ""
                if end < 0 or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                    raise self.error(
                        "a placeholder must be {name} with a variable name (write \\{ for a "
                        "literal brace)",
                        tok.line,
                        tok.column + 1 + i,
                    )
                if buf:
                    parts.append("".join(buf))
                    buf = []
                parts.append(ast.Var(tok.line, tok.column + 1 + i, name))
                i = end + 1
            elif ch == "}":
                raise self.error(
                    "unmatched } in a string (write \\} for a literal brace)",
                    tok.line,
                    tok.column + 1 + i,
                )
            else:
                buf.append(ch)
                i += 1
        if buf or not parts:
            parts.append("".join(buf))
        return tuple(parts)


def parse(source: str, filename: str = "<string>") -> ast.Module:
    """Parses ``.lmc`` source text into an :class:`~lmcascade.dsl.ast.Module`.

    Every problem is a located :class:`~lmcascade.errors.DSLSyntaxError`, hostile input
    included (see the limits above): ``parse("program f() { return " + "-" * 5000 + "1 }")``
    says the expression is nested 5,002 levels deep where the limit is 200.
    """
    if not isinstance(source, str):
        raise DSLError(f"source must be text, got {type(source).__name__}", filename=filename)
    source = _clean(source, filename)
    tree = _lark_parse(source, filename)
    try:
        module = ToAst(filename, source).transform(tree)
    except VisitError as err:
        if isinstance(err.orig_exc, DSLError):
            raise err.orig_exc from None
        raise DSLSyntaxError(f"cannot parse: {err.orig_exc}", filename=filename) from None
    depth, node = nesting(module)
    if depth > MAX_DEPTH and node is not None:
        raise DSLSyntaxError(
            depth_message(depth), filename=filename, line=node.line, col=node.col, source=source
        )
    return module


def _position(source: str, offset: int) -> tuple[int, int]:
    """The 1-based line and column of a character offset."""
    line = source.count("\n", 0, offset) + 1
    return line, offset - (source.rfind("\n", 0, offset) + 1) + 1


def _clean(source: str, filename: str) -> str:
    """The source with its line endings made ``\\n`` and a leading byte-order mark dropped;
    refuses a source over the size limit, a NUL character and a lone surrogate."""
    if len(source) > MAX_SOURCE_CHARS:
        raise DSLSyntaxError(
            f"the source is {len(source):,} characters long; the limit is {MAX_SOURCE_CHARS:,}",
            filename=filename,
        )
    if source.startswith("\ufeff"):
        source = source[1:]
    if "\r" in source:
        source = source.replace("\r\n", "\n").replace("\r", "\n")
    bad = source.find("\0")
    message = "a NUL character (\\0) is not allowed in a .lmc source (is this a binary file?)"
    if bad < 0:
        try:
            source.encode("utf-8")
        except UnicodeEncodeError as err:
            bad = err.start
            message = (
                f"character U+{ord(source[bad]):04X} is not valid text (a lone surrogate); "
                "decode the file as UTF-8 without surrogateescape"
            )
    if bad >= 0:
        line, col = _position(source, bad)
        raise DSLSyntaxError(message, filename=filename, line=line, col=col, source=source)
    return source


TRY_INSIDE = (
    "`try ... else ...` must be a whole expression (after `=`, `return`, `if`, as an argument "
    "or a list item), not part of one: put it in parentheses, e.g. `1 + (try calc(t) else 0)`"
)
TRY_STATEMENT = (
    "`try ... else ...` is an expression, not a statement: write `x = try calc(t) else 0`; "
    "a sample (`x ~ lm(...)`) cannot be tried"
)


def _lark_parse(source: str, filename: str):
    """lark's parse tree, feeding at most :data:`MAX_TOKENS` tokens to the LALR parser.

    Where lark does not expect the keyword ``try`` (inside an expression, at the start of a
    statement) it reads it as a name; a parse that then fails is reported at that ``try``."""
    parser = grammar().parse_interactive(source)
    last = before = stray_try = None
    try:
        for count, last in enumerate(parser.iter_parse(), 1):
            if stray_try is None and last.type == "NAME" and last == "try":
                stray_try = last
            if count > MAX_TOKENS:
                raise DSLSyntaxError(
                    f"the source has more than {MAX_TOKENS:,} tokens (names, numbers, strings, "
                    "operators); that is the limit",
                    filename=filename,
                    line=last.line or 0,
                    col=last.column or 0,
                    source=source,
                )
            before = last
        return parser.feed_eof(last)
    except UnexpectedInput as err:
        if stray_try is not None:
            starts = before is stray_try and "TILDE" in getattr(err, "expected", ())
            raise DSLSyntaxError(
                TRY_STATEMENT if starts else TRY_INSIDE,
                filename=filename,
                line=stray_try.line,
                col=stray_try.column,
                source=source,
            ) from None
        raise _syntax_error(err, source, filename) from None
    except LarkError as err:  # pragma: no cover - any other lark failure is still ours to report
        raise DSLSyntaxError(f"cannot parse: {err}", filename=filename) from None


def _children(node: ast.Node) -> Iterator[ast.Node]:
    """The syntax nodes directly under ``node``, in source order."""
    for value in vars(node).values():
        if isinstance(value, ast.Node):
            yield value
        elif isinstance(value, tuple):
            for item in value:
                if isinstance(item, ast.Node):
                    yield item
                elif isinstance(item, tuple):  # a keyword argument: (name, value)
                    yield from (x for x in item if isinstance(x, ast.Node))


def nesting(module: ast.Module) -> tuple[int, ast.Node | None]:
    """How deeply ``module``'s syntax tree nests, and its first deepest node (measured with an
    explicit stack, so any depth is safe to measure).

    A program's statements are at level 1; each node under another adds one:

    >>> nesting(parse("program f() { return -x }"))
    (3, Var(line=1, col=23, name='x'))
    """
    best: tuple[int, ast.Node | None] = (0, None)
    stack: list[tuple[ast.Node, int]] = []
    for program in reversed(module.programs):
        stack.extend((s, 1) for s in reversed(program.body))
    while stack:
        node, depth = stack.pop()
        if depth > best[0]:
            best = (depth, node)
        stack.extend((child, depth + 1) for child in reversed(list(_children(node))))
    return best


def depth_message(depth: int) -> str:
    """The error for a syntax tree nested ``depth`` levels deep."""
    return (
        f"nested {depth:,} levels deep here; the limit is {MAX_DEPTH} (brackets, calls, "
        "blocks and each operator of a chain such as a + b + c add a level): split it into "
        "smaller parts with intermediate variables"
    )


def _syntax_error(err: UnexpectedInput, source: str, filename: str) -> DSLSyntaxError:
    line, col = getattr(err, "line", 0) or 0, getattr(err, "column", 0) or 0
    if isinstance(err, UnexpectedCharacters):
        char = source[err.pos_in_stream] if err.pos_in_stream < len(source) else ""
        hints = {"'": " (strings use double quotes)", "`": " (a `raw string` needs its closing `)"}
        hint = hints.get(char, "")
        message = f"unexpected character {char!r}{hint}; expected {expected_text(err.allowed)}"
    elif isinstance(err, UnexpectedToken):
        tok = err.token
        if tok.type == "$END":
            message = f"unexpected end of file; expected {expected_text(err.expected)}"
            lines = source.splitlines() or [""]
            line, col = len(lines), len(lines[-1]) + 1
        else:
            message = f'unexpected "{tok}"; expected {expected_text(err.expected)}'
    elif isinstance(err, UnexpectedEOF):
        lines = source.splitlines() or [""]
        line, col = len(lines), len(lines[-1]) + 1
        message = f"unexpected end of file; expected {expected_text(err.expected)}"
    else:  # pragma: no cover
        message = str(err)
    return DSLSyntaxError(message, filename=filename, line=line, col=col, source=source)
