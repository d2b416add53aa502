"""The text DSL's parser: every construct, positioned errors, and a fuzz test."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcascade.dsl import ast
from lmcascade.dsl.parser import parse
from lmcascade.errors import DSLError, DSLSyntaxError

TOUR = Path(__file__).resolve().parents[1] / "examples" / "lmc" / "grammar_tour.lmc"


def test_every_construct_parses_to_its_node():
    module = parse(TOUR.read_text(), filename="grammar_tour.lmc")
    assert [m.name for m in module.models] == ["lm"] and module.models[0].ref == "smollm2-135m"
    prog = module.programs[0]
    assert prog.name == "solve" and prog.params == ("question", "n")
    kinds = [type(s).__name__ for s in prog.body]
    assert kinds == ["Sample", "Sample", "Assign", "If", "For", "Repeat", "Observe", "Return"]
    thought = prog.body[0]
    assert (thought.line, thought.col) == (5, 3)
    assert thought.call.func == "lm"
    chat = thought.call.args[0]
    assert chat.func == "chat" and chat.args[0].name == "lm"
    assert dict(chat.kwargs)["system"].parts == ("Think briefly.",)
    prompt = chat.args[1]
    assert isinstance(prompt, ast.Str) and prompt.parts[0] == "Q: "
    assert isinstance(prompt.parts[1], ast.Var) and prompt.parts[1].name == "question"
    assert dict(thought.call.kwargs)["stop"].parts == ("\n",)
    assert dict(thought.call.kwargs)["max_tokens"].value == 32
    assert dict(thought.call.kwargs)["constraint"].func == "forbid"
    ok = prog.body[2].value
    assert isinstance(ok, ast.BoolOp) and ok.op == "and"
    tried = ok.values[0].left
    assert isinstance(tried, ast.Try) and isinstance(tried.orelse, ast.NoneLit)
    assert isinstance(ok.values[1], ast.Not) and ok.values[1].value.op == "in"
    branch = prog.body[3]
    assert isinstance(branch.orelse[0], ast.If)  # else if
    assert isinstance(branch.orelse[0].orelse[0], ast.Assign)
    arith = branch.orelse[0].orelse[0].value
    assert arith.op == "%" and arith.left.op == "*" and isinstance(arith.left.left, ast.Neg)
    found = prog.body[5].body[0].value
    assert found.func == "match" and found.args[0].parts == ("(\\d+)",)  # a raw string
    assert isinstance(found.args[1], ast.Index)
    assert isinstance(prog.body[7].value, ast.ListExpr)


def test_templates_and_escapes():
    prog = parse(r'program p(a) { x = "lit \{braces\} {a}\t\"q\"" return x }').programs[0]
    parts = prog.body[0].value.parts
    assert parts[0] == "lit {braces} " and parts[1].name == "a" and parts[2] == '\t"q"'


def test_several_programs_and_semicolons():
    module = parse("program a() { x = 1; return x } program b(y) { return a() }")
    assert [p.name for p in module.programs] == ["a", "b"]
    assert module.programs[1].body[0].value == ast.Call(1, 55, "a")


MALFORMED = [
    ("program f( { }", 1, 12, 'unexpected "{"'),
    ("program f() { x = }", 1, 19, "unexpected"),
    ("program f() { x ~ }", 1, 19, "expected a name"),
    ("program f() {\n  x = 'single'\n}", 2, 7, "double quotes"),
    ("program f() { return }", 1, 22, "unexpected"),
    ("program f() {", 1, 14, "unexpected end of file"),
    ("program f() { x = 1 + }", 1, 23, "unexpected"),
    ("program f() { if x { } else }", 1, 29, 'unexpected "}"'),
    ("model lm = smollm2", 1, 12, "a string"),
    ("program f(a, a) { return a }", 1, 14, "listed twice"),
    ('program f() { x ~ lm(stop="a", stop="b") }', 1, 32, "given twice"),
    ('program f() { x ~ lm(max_tokens=3, "p") }', 1, 36, "positional argument follows"),
    ('program f() { x = "a {1b} c" }', 1, 22, "placeholder"),
    ('program f() { x = "a } c" }', 1, 22, "unmatched }"),
    ('program f() { x = "bad \\q" }', 1, 24, "unknown escape"),
    ("program f() { for in [1] { } }", 1, 22, 'expected "in"'),
    ("program f() { x = [1, 2 }", 1, 25, 'unexpected "}"'),
    ("program f() { x = a[ }", 1, 22, "unexpected"),
    ("program f() { observe x }", 1, 25, '"~"'),
    ("program f() { 3 = x }", 1, 15, "unexpected"),
    ("program () { }", 1, 9, "a name"),
    ("program f() { x = 1 } }", 1, 23, "unexpected"),
    ("program f() { x = @ }", 1, 19, "unexpected character '@'"),
]


@pytest.mark.parametrize(("source", "line", "col", "fragment"), MALFORMED)
def test_syntax_errors_point_at_the_problem(source, line, col, fragment):
    with pytest.raises(DSLSyntaxError) as info:
        parse(source, filename="bad.lmc")
    err = info.value
    assert (err.line, err.col) == (line, col), str(err)
    assert fragment in str(err)
    assert str(err).startswith(f"bad.lmc:{line}:{col}:")
    assert "^" in str(err)  # the caret under the column


def test_non_text_source():
    with pytest.raises(DSLError):
        parse(b"program f() {}")  # type: ignore[arg-type]


def _mutations(base: str):
    return st.tuples(st.integers(0, len(base)), st.integers(0, 6), st.text(max_size=6)).map(
        lambda t: base[: t[0]] + t[2] + base[t[0] + t[1] :]
    )


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), _mutations(TOUR.read_text())))
def test_fuzz_only_dsl_errors_escape(source):
    try:
        parse(source)
    except DSLError:
        pass
