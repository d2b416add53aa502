"""The text DSL for instruct models (issue 10): ``chat``, ``constraint=`` and ``potential=``,
``try ... else ...`` with ``none``, ``match``, and a checker that reports every problem.

Each construct parses, checks and runs; programs written both in Python and in ``.lmc`` give
identical exact distributions under ``enumerate`` (to 1e-9); hostile arguments to the new
builtins are located DSL errors."""

from __future__ import annotations

import math
import re

import pytest

import lmcascade as lc
from lmcascade.constraints import allow, forbid, regex
from lmcascade.dsl import ast, parse
from lmcascade.dsl.check import CheckFailed, check
from lmcascade.dsl.limits import Limits
from lmcascade.dsl.tools import DEFAULT_TOOLS, calc
from lmcascade.errors import DSLCheckError, DSLRuntimeError, DSLSyntaxError
from lmcascade.models import ToyLM
from stats import assert_same_exact

DIGITS = ["1", "2", "+", "a", "<eos>"]


def _digit_scores(ctx: tuple[int, ...]) -> list[float]:
    """Context-dependent scores: digits after "+" are likelier, eos grows with length."""
    after_plus = bool(ctx) and ctx[-1] == 2
    return [0.3, 0.0 if after_plus else -0.4, -0.2, -0.6, -1.5 + 0.5 * len(ctx)]


TOY = ToyLM(DIGITS, _digit_scores, name="digits-toy")


class ChatToy(ToyLM):
    """A ToyLM with a chat format: the system message, then the user's, then ":"."""

    def chat(self, user: str, *, system: str | None = None) -> str:
        return (system or "") + user + "+"


CHAT_TOY = ChatToy(DIGITS, _digit_scores, name="chat-toy")


def need_two(text: str) -> int:
    """A host tool that fails on text without a "2"."""
    if "2" not in text:
        raise ValueError(f"no 2 in {text!r}")
    return text.count("2")


def twist(text: str) -> float:
    return 0.5 * text.count("2")


TOOLS = {"need_two": need_two, "twist": twist}
MODELS = {"lm": TOY, "chatty": CHAT_TOY}


def load(source: str, **kwargs):
    return lc.load(source=source, models=MODELS, tools=TOOLS, **kwargs)


def exact(bound, **options):
    return lc.infer(bound, method="enumerate", **options)


def outcomes(result) -> list:
    """The values of an exact result's distribution, as the program returned them."""
    return [getattr(key, "value", key) for key in result.distribution()]


# --- the same programs in Python and in .lmc --------------------------------------------------

LMC = r"""
program extract() {
  text ~ lm("1", max_tokens=3)
  n = match("[12]+", text)
  condition n != none
  return n
}

program grouped() {
  text ~ lm("1", max_tokens=3)
  return match("1(2|a)", text)
}

program guarded() {
  text ~ lm("1", max_tokens=3)
  twos = try need_two(text) else -1
  sum = try calc(text) else none
  return [twos, sum]
}

program parsed() {
  text ~ lm("2", max_tokens=2)
  n = try int(text) else 0
  factor n / 10
  return n
}

program constrained() {
  a ~ lm("1", max_tokens=3, constraint=regex("[12]+"))
  b ~ lm("{a}+", max_tokens=2, constraint=forbid("a", "+"))
  c ~ lm("2", max_tokens=2, constraint=allow(["1", "a"]))
  return [a, b, c]
}

program chatted() {
  plain ~ lm(chat(lm, "1", system="2"), max_tokens=2)
  formatted ~ chatty(chat(chatty, "1", system="2"), max_tokens=2)
  return [plain, formatted]
}
"""


def python_match(pattern: str, text: str):
    found = re.search(pattern, text)
    if found is None:
        return None
    return found.group(1) if found.re.groups else found.group(0)


@lc.program
def extract():
    text = yield lc.gen("text", TOY, "1", max_tokens=3)
    n = python_match("[12]+", text)
    yield lc.condition("c", n is not None)
    return n


@lc.program
def grouped():
    text = yield lc.gen("text", TOY, "1", max_tokens=3)
    return python_match("1(2|a)", text)


def _or(fn, default):
    def safe(*args):
        try:
            return fn(*args)
        except ValueError:
            return default

    return safe


@lc.program
def guarded():
    text = yield lc.gen("text", TOY, "1", max_tokens=3)
    twos = yield lc.call("twos", _or(need_two, -1), text)
    total = yield lc.call("sum", _or(calc, None), text)
    return [twos, total]


@lc.program
def parsed():
    text = yield lc.gen("text", TOY, "2", max_tokens=2)
    n = _or(int, 0)(text)
    yield lc.factor("f", n / 10)
    return n


@lc.program
def constrained():
    a = yield lc.gen("a", TOY, "1", max_tokens=3, constraint=regex("[12]+"))
    b = yield lc.gen("b", TOY, a + "+", max_tokens=2, constraint=forbid("a", "+"))
    c = yield lc.gen("c", TOY, "2", max_tokens=2, constraint=allow(["1", "a"]))
    return [a, b, c]


@lc.program
def chatted():
    plain = yield lc.gen("plain", TOY, "1", max_tokens=2)  # no chat format: unchanged
    formatted = yield lc.gen("formatted", CHAT_TOY, "21+", max_tokens=2)
    return [plain, formatted]


@pytest.fixture(scope="module")
def compiled():
    return load(LMC)


@pytest.mark.parametrize(
    "python", [extract, grouped, guarded, parsed, constrained, chatted], ids=lambda p: p.__name__
)
def test_lmc_and_python_give_identical_exact_distributions(compiled, python):
    name = python.__name__
    lmc_result = exact(getattr(compiled, name)())
    assert_same_exact(lmc_result, exact(python()))
    assert len(lmc_result.distribution()) > 1  # a program with one outcome would prove little


def test_the_equivalent_programs_exercise_both_branches(compiled):
    """try's value and its else branch both occur; match finds and misses."""
    guarded_values = outcomes(exact(compiled.guarded()))
    assert any(twos == -1 for twos, _ in guarded_values)
    assert any(twos > 0 for twos, _ in guarded_values)
    assert any(total is None for _, total in guarded_values)
    assert any(isinstance(total, int) for _, total in guarded_values)
    assert {None, "2", "a"} <= set(outcomes(exact(compiled.grouped())))


# --- try ... else ... and failing tools -------------------------------------------------------

FAILING = """
program risky() {
  text ~ lm("1", max_tokens=2)
  n = need_two(text)
  return n
}
"""


def test_a_failing_tool_outside_try_zeroes_its_trace_and_the_run_goes_on():
    result = exact(load(FAILING).risky())
    assert set(result.distribution()) == {1, 2}  # the texts with a "2"; the others weigh zero
    assert result.stats["tool_errors"] > 0
    sampled = lc.infer(load(FAILING).risky(), method="forward", num_samples=20, seed=0)
    failed = [t for t in sampled.traces if t.log_weight == -math.inf]
    assert 0 < len(failed) < 20 and sampled.stats["tool_errors"] == len(failed)
    site = failed[0]["need_two@4:7[0]"]
    assert isinstance(site.error, ValueError) and "no 2" in str(site.error)


def test_a_failing_tool_under_raise_is_a_located_error():
    with pytest.raises(DSLRuntimeError, match="tool 'need_two' failed: no 2") as info:
        exact(load(FAILING).risky(), on_tool_error="raise")
    assert (info.value.line, info.value.col) == (4, 7)


def test_try_catches_a_tool_under_raise_too():
    source = 'program f() { t ~ lm("1", max_tokens=2) return try need_two(t) else 0 }'
    result = exact(load(source).f(), on_tool_error="raise")
    assert 0 in result.distribution() and result.stats["tool_errors"] == 0


def test_try_catches_failures_inside_called_programs_and_nests():
    source = """
    program inner(t) { n = need_two(t) return n * 10 }
    program outer() {
      t ~ lm("1", max_tokens=2)
      a = try inner(t) else -1
      b = try (try int(t) else calc("1/0")) else none
      return [a, b]
    }
    """
    dist = outcomes(exact(load(source).outer()))
    assert any(a == -1 for a, _ in dist) and any(a == 10 for a, _ in dist)
    assert any(b is None for _, b in dist) and any(b == 12 for _, b in dist)


def test_try_does_not_catch_a_spent_budget():
    source = "program f() { x = try loop(0) else 1 return x }\n"
    source += "program loop(n) { repeat 1000 { n = n + 1 } return n }"
    with pytest.raises(DSLRuntimeError, match="--max-steps"):
        exact(load(source, limits=Limits(steps=500)).f())


def test_a_failed_tool_in_try_replays_the_same_way_under_smc():
    """The failure is the call site's recorded value: particles cloned by resampling replay
    it and take the else branch again (no replay divergence)."""
    source = """
    program f() {
      a ~ lm("1", max_tokens=2)
      n = try need_two(a) else 0
      b ~ lm("{a}+", max_tokens=2)
      factor n
      return [n, b]
    }
    """
    result = lc.infer(load(source).f(), method="smc", particles=16, seed=0, ess_threshold=1.0)
    assert any(n == 0 for n, _ in result.values)
    assert result.stats["resamples"] > 0


# --- match ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        (r"(\d+) apples", "I have 12 apples", "12"),
        (r"\d+", "a 7 b 8", "7"),
        (r"(x)|y", "y", None),  # the group took no part
        (r"z", "abc", None),
        (r"(?i)YES", "yes!", "yes"),
    ],
)
def test_match_returns_group_one_the_whole_match_or_none(pattern, text, expected):
    source = "program f(p, t) { return match(p, t) }"
    assert exact(lc.load(source=source).f(pattern, text)).values == [expected]


# --- hostile arguments ------------------------------------------------------------------------

RUNTIME_HOSTILE = [
    ("empty pattern", ('x = match(p, "a")', ""), "pattern is empty"),
    ("huge pattern", ('x = match(p, "a")', "a" * 5000), "the limit is 1,000"),
    ("nested counts", ('x = match(p, "a")', "(a{101}){100}"), "expands to about 10,100 items"),
    ("bad pattern", ('x = match(p, "a")', "(unclosed"), "not a valid regular expression"),
    ("text not text", ("x = match(p, 3)", "a"), "match's text to search must be text"),
    ("pattern not text", ("x = match(3, p)", "a"), "match's pattern must be text"),
    ("catastrophic", ("x = match(p, q)", r"(x+x+)+y"), "match gave up after 1 s"),
    ("empty regex", ('x ~ lm("1", constraint=regex(p))', ""), "regex's pattern is empty"),
    (
        "bad regex",
        ('x ~ lm("1", constraint=regex(p))', "(["),
        "regex's pattern '([' is not a valid regular expression",
    ),
    ("schema not JSON", ('x ~ lm("1", constraint=json_schema(p))', "{"), "not JSON text"),
    ("schema too deep", ('x ~ lm("1", constraint=json_schema(p))', "[" * 30 + "]" * 30), "nests"),
    ("chat not text", ("x = chat(lm, 3)", ""), "chat's user message must be text"),
    ("chat system list", ("x = chat(lm, p, system=[p])", "a"), "system message must be text"),
    ("forbid empty", ('x ~ lm("1", constraint=forbid(p))', ""), "must not be empty"),
    ("allow text", ('x ~ lm("1", constraint=allow(p))', "a"), "allow needs a non-empty list"),
    ("word length", ('x ~ lm("1", constraint=max_word_length(len(p)))', ""), ">= 1"),
    ("constraint value", ('x ~ lm("1", constraint=p)', "a"), "constraint"),
    ("potential value", ('x ~ lm("1", potential=p)', "a"), "potential"),
]


@pytest.mark.parametrize(
    ("line", "argument", "fragment"),
    [(c[1][0], c[1][1], c[2]) for c in RUNTIME_HOSTILE],
    ids=[c[0] for c in RUNTIME_HOSTILE],
)
def test_hostile_arguments_to_the_new_builtins_are_located_errors(line, argument, fragment):
    source = f"program f(p, q) {{\n  {line}\n  return 1\n}}"
    program = load(source).f(argument, "x" * 5000)
    with pytest.raises(DSLRuntimeError) as info:
        lc.infer(program, method="forward", num_samples=1, seed=0)
    err = info.value
    assert err.line == 2 and err.col >= 3, str(err)
    assert fragment in str(err), str(err)


def test_a_catastrophic_match_is_not_caught_by_try():
    source = "program f(p, t) { return try match(p, t) else none }"
    with pytest.raises(DSLRuntimeError, match="gave up"):
        exact(lc.load(source=source).f(r"(x+x+)+y", "x" * 5000))


def test_a_huge_text_costs_steps_in_proportion():
    source = 'program f(t) { return match("(b+)", t) }'
    text = "a" * 50_000 + "b" * 60_000
    with pytest.raises(DSLRuntimeError, match="more than 1,000 steps") as info:
        exact(lc.load(source=source, limits=Limits(steps=1000)).f(text))
    assert (info.value.line, info.value.col) == (1, 23)
    assert exact(lc.load(source=source).f(text)).values == ["b" * 60_000]


# --- chat, constraints and potentials ---------------------------------------------------------


def test_chat_applies_the_models_format_and_leaves_a_plain_model_unchanged():
    source = 'program f() { return [chat(chatty, "1", system="2"), chat(lm, "1", system="2")] }'
    assert exact(load(source).f()).values == [["21+", "1"]]


def test_a_constrained_site_generates_only_what_the_constraint_allows(compiled):
    for a, b, c in outcomes(exact(compiled.constrained())):
        assert re.fullmatch("[12]+", a)
        assert "a" not in b and "+" not in b
        assert set(c) <= {"1", "a"}


def test_constraint_objects_are_shared_between_traces():
    source = 'program f() { x ~ lm("1", max_tokens=2, constraint=regex("[12]+")) return x }'
    result = exact(load(source).f())
    constraints = {id(t["x"].dist.constraint) for t in result.traces}
    assert len(constraints) == 1


def test_potentials_a_tool_and_a_model():
    source = """
    program f() {
      x ~ lm("1", max_tokens=3, potential=twist)
      y ~ lm("2", max_tokens=2, potential=lm("1+"))
      return x + y
    }
    """
    trace = lc.infer(load(source).f(), method="forward", num_samples=1, seed=0).traces[0]
    assert trace["x"].dist.potential.__wrapped__ is twist  # located if it fails
    assert "potential='twist'" in repr(trace["x"].dist)
    assert trace["y"].dist.potential.is_lm and trace["y"].dist.potential.prompt == "1+"

    @lc.program
    def python():
        x = yield lc.gen("x", TOY, "1", max_tokens=3, potential=twist)
        y = yield lc.gen("y", TOY, "2", max_tokens=2, potential=lc.LM(TOY, "1+"))
        return x + y

    a = lc.infer(load(source).f(), method="smc", particles=12, seed=3)
    b = lc.infer(python(), method="smc", particles=12, seed=3)
    assert a.values == b.values
    assert a.log_weights.tolist() == pytest.approx(b.log_weights.tolist(), abs=1e-9)


# --- check: every problem, and comparisons of known different kinds ---------------------------

THREE_MISTAKES = """model lm = "smollm2-135m"
program f(q) {
  answer ~ lm("1", max_tokens=2)
  if answer == 3 { return 1 }
  total = undefined_name + 1
  x ~ lm("1", constraint="[0-9]+")
  return answer
}
"""


def test_check_reports_three_mistakes_with_their_positions():
    module = parse(THREE_MISTAKES, filename="three.lmc")
    with pytest.raises(CheckFailed) as info:
        check(module, models=(), tools=DEFAULT_TOOLS)
    err = info.value
    where = [(e.line, e.col) for e in err.errors]
    assert where == [(4, 6), (5, 11), (6, 26)], str(err)
    assert "`==` compares answer (text) with a number, which is always false" in str(err)
    assert "undefined variable 'undefined_name'" in str(err)
    assert 'constraint= needs a constraint, got text: write regex("[0-9]+")' in str(err)
    assert str(err).startswith("three.lmc:4:6: ") and str(err).count("three.lmc:") == 3
    assert (err.line, err.col) == (4, 6) and isinstance(err, DSLCheckError)


def test_the_check_command_prints_every_problem(tmp_path, capsys):
    from lmcascade.cli import main

    path = tmp_path / "three.lmc"
    path.write_text(THREE_MISTAKES)
    assert main(["check", str(path)]) == 1
    printed = capsys.readouterr().err
    for line, col in [(4, 6), (5, 11), (6, 26)]:
        assert f"{path}:{line}:{col}: " in printed


KIND_ERRORS = [
    ('a ~ lm("1") if a == 3 { }', "compares a (text) with a number, which is always false"),
    ('a ~ lm("1") if 3 != a { }', "which is always true"),
    ('a ~ lm("1") if a < 2 { }', "which fails when it runs"),
    ('m = match("1", "1") if m > 0 { }', "m (text or none) with a number"),
    ("n = len([1]) if n in 5 { }", "fails when it runs"),
    ('c ~ categorical(["x", "y"], [1, 1]) if c == 1 { }', "c (text)"),
    ('b ~ bernoulli(0.5) if b == "yes" { }', "b (true/false) with text"),
    ('a ~ lm("1") x = a - 1', "cannot use '-' between text and a number"),
    ('x = 1 if true { x = "a" } else { x = "b" } if x == 1 { }', "x (text)"),
]


@pytest.mark.parametrize(("body", "fragment"), KIND_ERRORS)
def test_comparisons_of_known_different_kinds_are_errors(body, fragment):
    with pytest.raises(DSLCheckError, match=re.escape(fragment)):
        load(f"program f() {{ {body} return 1 }}")


KIND_OK = [
    'a ~ lm("1") if a == "3" or int(a) == 3 { }',
    'm = match("1", "1") if m == none or m == "1" { }',
    "b ~ bernoulli(0.5) if b == 1 { }",  # true/false is a number too
    'x = 0 repeat 2 { x = str(x) + "a" } if x == 1 { }',  # a loop may change a kind
    'x = 0 for c in "ab" { if c == "a" { x = "t" } } if x == 0 { }',
    'x = 1 if true { x = "a" } if x == 1 { }',  # one branch keeps the number
    'x = try calc("1") else "none" if x == 1 { }',
    'p = "-" * 3 if p == "---" { }',  # text repeated
    "if q == 3 { }",  # a parameter's kind is unknown
]


@pytest.mark.parametrize("body", KIND_OK)
def test_comparisons_that_can_be_right_are_accepted(body):
    load(f"program f(q) {{ {body} return 1 }}")


CHECK_NEW = [
    ('x = chat("lm", "hi")', "chat's first argument must name a model"),
    ('x = chat(lm, "hi", role="x")', "chat takes only the keyword system="),
    ("x = chat(lm)", "chat takes a model and a user message"),
    ('x = match("(", "a")', "not a valid regular expression"),
    ('x = match(`(a{101}){100}`, "a")', "expands to about 10,100 items"),
    ('x ~ lm("1", constraint=regex(""))', "regex's pattern is empty"),
    ('x ~ lm("1", constraint=json_schema(`{"type": "nothing"`))', "not JSON text"),
    ('x ~ lm("1", constraint=json_schema(`{"type": "nothing"}`))', "cannot turn this JSON"),
    ('x ~ lm("1", potential=nothing)', "potential=nothing names no tool or variable"),
    ('x = match("a")', "takes 2 arguments"),
    ('x = regex("a", "b")', "takes 1 arguments"),
]


@pytest.mark.parametrize(("line", "fragment"), CHECK_NEW)
def test_the_checker_refuses_misuse_of_the_new_builtins(line, fragment):
    with pytest.raises(DSLCheckError, match=re.escape(fragment)) as info:
        load(f"program f() {{\n  {line}\n  return 1\n}}")
    assert info.value.line == 2


def test_check_caps_a_long_report():
    body = " ".join(f"x{i} = y{i}" for i in range(80))
    with pytest.raises(CheckFailed) as info:
        load(f"program f() {{ {body} return 1 }}")
    assert len(info.value.errors) == 80
    assert "(50 of 80 problems shown in <string>)" in str(info.value)


# --- syntax -----------------------------------------------------------------------------------


def test_try_and_none_parse_as_expressions():
    module = parse("program f(x) { y = try calc(x) + 1 else none return y }")
    value = module.programs[0].body[0].value
    assert isinstance(value, ast.Try) and isinstance(value.orelse, ast.NoneLit)
    assert isinstance(value.body, ast.BinOp)  # try binds loosest


@pytest.mark.parametrize("name", ["try", "none"])
def test_try_and_none_are_keywords(name):
    with pytest.raises(DSLSyntaxError):
        parse(f"program f() {{ {name} = 1 return 1 }}")
    parse(f"program f() {{ {name}x = 1 return {name}x }}")  # a longer name is a name


def test_the_graph_of_a_program_using_the_new_constructs():
    from lmcascade.graph import from_program

    module = parse(
        'program f(q) { p = chat(lm, q, system="s") a ~ lm(p, constraint=regex("[0-9]+"), '
        'potential=lm("x")) n = try calc(a) else none m = match("(1)", a) return [n, m] }'
    )
    g = from_program(module.programs[0], {"lm"})
    edges = {(u.split("@")[0], v.split("@")[0]) for u, v in g.edges}
    expected = {("input:q", "p"), ("p", "a"), ("a", "n"), ("a", "m"), ("n", "return")}
    assert expected <= edges, edges
