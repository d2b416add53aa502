"""Regressions from a review of the text DSL's instruct constructs: the kind checker and
``for`` loops, the time ``match`` may take in one run, a failing ``potential=`` tool, regex
literals checked before the run, a misplaced ``try``, unclear model-option errors, and
``calc``'s digit limit under ``try``."""

from __future__ import annotations

import math
import re
import time

import pytest

import lmcascade as lc
from lmcascade.dsl.compiler import BudgetError
from lmcascade.dsl.instruct import unanchored
from lmcascade.dsl.limits import Limits
from lmcascade.errors import DSLCheckError, DSLRuntimeError, DSLSyntaxError, OptionError
from lmcascade.models import ToyLM

TOY = ToyLM(["1", "2", "a", " ", "<eos>"], lambda ctx: [0.0, 0.0, 0.0, -0.5, -1.0])


def load(source: str, **kwargs):
    kwargs.setdefault("models", {"lm": TOY})
    return lc.load(source=source, **kwargs)


def forward(bound, **options):
    return lc.infer(bound, method="forward", num_samples=1, seed=0, **options)


# --- 1. a for loop's own variable after the loop --------------------------------------------


@pytest.mark.parametrize(
    ("body", "value"),
    [
        ('c = "z" for c in [1, 2] { x = 0 } return c == 2', True),
        ('c = 1 for c in "ab" { x = 0 } return c == "b"', True),
        ('c = 1 for c in "" { x = 0 } return c == 1', True),  # no iteration: the old value
        ('c = 1 for c in "ab" { if c == "a" { x = 0 } } return c', "b"),  # text inside
        ('c = "z" for d in [1] { for c in [1, 2] { x = 0 } if c == 2 { } } return c', 2),
    ],
)
def test_a_for_variable_after_its_loop_holds_its_last_item(body, value):
    assert forward(load(f"program f() {{ {body} }}").f()).values == [value]


def test_a_for_variable_over_text_is_still_text_inside_its_loop():
    with pytest.raises(DSLCheckError, match=r"`==` compares c \(text\) with a number"):
        load('program f() { c = 1 for c in "ab" { if c == 1 { } } return c }')


# --- 2. the time match may take in one run ----------------------------------------------------

SLOW_LOOP = "program f(t, n) { c = 0 repeat n { m = try match(`(x+x+)+y`, t) else none c = c + 1 } return c }"


def test_the_match_searches_of_one_run_share_a_time_budget():
    program = load(SLOW_LOOP, limits=Limits(match_seconds=0.3))
    start = time.perf_counter()
    with pytest.raises(DSLRuntimeError, match=r"took 0\.3 s in all") as info:
        forward(program.f("x" * 5000, 20))  # each search alone would take its full second
    assert time.perf_counter() - start < 3
    assert (info.value.line, info.value.col) == (1, 44)  # the match, inside try
    assert "Limits(match_seconds=...)" in str(info.value)
    assert Limits().match_seconds == 5


def test_fast_searches_stay_within_the_match_budget():
    program = load(SLOW_LOOP, limits=Limits(match_seconds=0.5))
    assert forward(program.f("xy", 1000)).values == [1000]


@pytest.mark.parametrize("seconds", [0, -1, math.inf, math.nan, True, "5"])
def test_a_bad_match_budget_is_refused(seconds):
    with pytest.raises(OptionError, match="match_seconds"):
        Limits(match_seconds=seconds)


# --- 3. a potential= tool that fails ------------------------------------------------------------

POTENTIAL = 'program f() {\n  x ~ lm("1", max_tokens=2, potential=bad)\n  return x\n}'


@pytest.mark.parametrize(
    ("tool", "fragment"),
    [
        (lambda text: 1 / 0, "potential tool 'bad' failed on the text '': division by zero"),
        (lambda text: 1 / 0 if "2" in text else 0.0, "failed on the text '2'"),
        (lambda text: math.nan, "potential tool 'bad' returned nan for the text ''"),
        (lambda text: "high", "returned 'high'"),
    ],
)
@pytest.mark.parametrize("method", ["enumerate", "smc"])
def test_a_failing_potential_is_a_located_error_naming_the_tool(tool, fragment, method):
    program = load(POTENTIAL, tools={"bad": tool})
    options = {"particles": 4, "seed": 0} if method == "smc" else {}
    with pytest.raises(DSLRuntimeError) as info:
        lc.infer(program.f(), method=method, **options)
    err = info.value
    assert (err.line, err.col) == (2, 39), str(err)
    assert fragment in str(err) and str(err).startswith("<string>:2:39: "), str(err)
    assert "potential=bad" in str(err)  # the line, with a caret under the tool's name


# --- 4. regex(...) patterns: checked before the run, anchors dropped ----------------------------


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        ("`(`", "regex's pattern '(' is not a valid regular expression: missing )"),
        ("`[1-`", "regex's pattern '[1-' is not a valid regular expression"),
        ("`^$`", "allows only the empty text"),
    ],
)
def test_a_bad_regex_literal_is_refused_before_the_run(pattern, fragment):
    source = f'program f() {{\n  x ~ lm("1", constraint=regex({pattern}))\n  return x\n}}'
    with pytest.raises(DSLCheckError, match=re.escape(fragment)) as info:
        load(source)
    assert (info.value.line, info.value.col) == (2, 32)


def test_a_bad_regex_given_at_run_time_is_a_located_error():
    program = load(
        'program f(p) {\n  x ~ lm("1", max_tokens=2, constraint=regex(p))\n  return x\n}'
    )
    with pytest.raises(
        DSLRuntimeError, match=re.escape("regex's pattern '(' is not a valid")
    ) as info:
        lc.infer(program.f("("), method="enumerate")
    assert info.value.line == 2


@pytest.mark.parametrize("param", [False, True])
def test_a_regex_constraint_may_be_written_with_anchors(param):
    pattern = "^[12]+$"
    literal = "p" if param else f"`{pattern}`"
    source = f'program f(p) {{ x ~ lm("1", max_tokens=2, constraint=regex({literal})) return x }}'
    program = load(source)
    plain = load('program f(p) { x ~ lm("1", max_tokens=2, constraint=regex(`[12]+`)) return x }')
    got = lc.infer(program.f(pattern), method="enumerate").distribution()
    assert got == pytest.approx(lc.infer(plain.f(""), method="enumerate").distribution())
    assert set(got) == {"1", "2", "11", "12", "21", "22"}


def test_an_escaped_dollar_is_not_an_anchor():
    assert unanchored(r"cost \$") == r"cost \$"
    assert unanchored(r"a\\$") == "a\\\\"
    assert unanchored("^a|b$") == "a|b"


# --- 5. try where an expression goes on ---------------------------------------------------------

TRY_INSIDE = [
    'x = 1 + try calc("1") else 0',
    "x = 1 + try",
    'return not try calc("1") else 0',
    'x = [1, 2 * try calc("1") else 0]',
    'x = 1 + try(calc("1"))',
    'x = 1 + try (calc("1")) else 0',
]


@pytest.mark.parametrize("body", TRY_INSIDE)
def test_try_inside_an_expression_says_to_use_parentheses(body):
    source = f"program f() {{\n  {body}\n  return 1\n}}"
    with pytest.raises(DSLSyntaxError, match="put it in parentheses") as info:
        load(source)
    assert (info.value.line, info.value.col) == (2, 3 + body.index("try"))
    assert "undefined variable" not in str(info.value)


@pytest.mark.parametrize("body", ['try x ~ lm("1") else none', 'try calc("1") else 0'])
def test_try_as_a_statement_says_it_is_an_expression(body):
    with pytest.raises(DSLSyntaxError, match="is an expression, not a statement") as info:
        load(f"program f() {{ {body} return 1 }}")
    assert info.value.col == 15


def test_try_in_parentheses_is_part_of_an_expression():
    program = load(
        'program f() { x = 1 + (try calc("1") else 0) return not (try calc("a") else 0) }'
    )
    assert forward(program.f()).values == [True]
    assert forward(load('program f() { return 1 + (try calc("2") else 0) }').f()).values == [3]


# --- 6. a model's options, in the DSL's words ---------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("stop", 3, "lm's stop= must be a text or a list of texts"),
        ("stop", [1], "lm's stop= must be a text or a list of texts"),
        ("constraint", "[0-9]", "lm's constraint= must be a constraint: regex(...), json_schema"),
        ("max_tokens", "2", "lm's max_tokens= must be a whole number >= 1"),
        ("top_p", 2, "lm's top_p= must be a number in (0, 1]"),
        ("potential", "x", "lm's potential= must be a tool named bare"),
    ],
)
def test_a_bad_model_option_is_a_located_error_in_the_dsls_words(option, value, fragment):
    extra = "" if option == "max_tokens" else "max_tokens=2, "
    program = load(f'program f(q) {{\n  x ~ lm("1", {extra}{option}=q)\n  return x\n}}')
    with pytest.raises(DSLRuntimeError, match=re.escape(fragment)) as info:
        lc.infer(program.f(value), method="enumerate")
    err = info.value
    assert (err.line, err.col) == (2, 15 + len(extra) + len(option) + 1), str(err)
    assert "lc.constraints" not in str(err) and "not iterable" not in str(err)


def test_a_literal_option_of_the_wrong_kind_is_located_at_its_value():
    program = load('program f() { x ~ lm("1", max_tokens=2, stop=3) return x }')
    with pytest.raises(DSLRuntimeError, match="lm's stop= must be") as info:
        lc.infer(program.f(), method="enumerate")
    assert info.value.col == 46


def test_good_options_given_at_run_time_still_work():
    program = load('program f(s, c) { x ~ lm("1", max_tokens=2, stop=s, constraint=c) return x }')
    result = lc.infer(program.f(["2", "a"], None), method="enumerate").distribution()
    assert result and all("2" not in t[:-1] for t in result)


# --- 7. calc past the digit limit is a budget, not a tool failure -------------------------------

HUGE = "9" * 600 + "*" + "9" * 600


@pytest.mark.parametrize(
    "body",
    [f'return try calc("{HUGE}") else "caught"', f'return calc("{HUGE}")', "return calc(q)"],
)
def test_calc_past_the_digit_limit_stops_the_run_even_in_try(body):
    program = lc.load(source=f"program f(q) {{ {body} }}")
    with pytest.raises(
        BudgetError, match=r"tool 'calc' failed: the product .*Limits\(digits="
    ) as info:
        forward(program.f(HUGE))
    assert info.value.line == 1


def test_calcs_other_failures_are_still_caught_by_try():
    program = lc.load(source='program f(q) { return try calc(q) else "caught" }')
    for text in ["1/0", "x", "1" * 10_001]:  # the character limit is calc's own, not a budget
        assert forward(program.f(text)).values == ["caught"]
    assert forward(
        lc.load(source=f'program f() {{ return calc("{HUGE}") }}', limits=Limits(digits=2000)).f()
    ).values == [int("9" * 600) ** 2]
