"""Hostile and careless ``.lmc`` programs: each stops with a located ``DSLRuntimeError``
(file, line, column, a message naming the limit or the problem), never a Python traceback, a
hang, an unbounded allocation or a silently wrong number.  Also the exact scoring of
``observe`` on a categorical with values, the per-trace budget, and unique site names."""

from __future__ import annotations

import math
import time

import pytest

import lmcascade as lc
from lmcascade.dsl.check import check
from lmcascade.dsl.compiler import Interpreter
from lmcascade.dsl.limits import Limits
from lmcascade.dsl.parser import parse
from lmcascade.dsl.tools import DEFAULT_TOOLS, calc
from lmcascade.errors import DSLRuntimeError


def compile_lmc(source: str, *, limits: Limits | None = None, tools: dict | None = None):
    """The programs of ``source``, parsed, checked and compiled under ``limits``."""
    module = parse(source, filename="hostile.lmc")
    tools = {**DEFAULT_TOOLS, **(tools or {})}
    check(module, models=set(), tools=tools)
    kwargs = {} if limits is None else {"limits": limits}
    return Interpreter(module, {}, tools, **kwargs).build()


def run(source: str, *args, limits: Limits | None = None, tools=None, method="forward"):
    """Runs ``p(*args)``; a tool that fails stops the run here (``on_tool_error="raise"``),
    with a located error, as every other failure does (tests/test_dsl_instruct.py checks the
    default, where such a trace gets weight zero and the run goes on)."""
    programs = compile_lmc(source, limits=limits, tools=tools)
    options = {"num_samples": 2, "seed": 0} if method == "forward" else {}
    return lc.infer(programs["p"](*args), method=method, on_tool_error="raise", **options)


def body(*lines: str) -> str:
    """A program ``p(n)`` whose body is ``lines``: the first body line is line 2."""
    return "program p(n) {\n" + "\n".join(f"  {x}" for x in lines) + "\n}\n"


# (id, source, argument n, (line, col), a fragment of the message)
HOSTILE = [
    # budgets: one per trace, each a located error naming how to raise it
    (
        "string_repeat_3GB",
        body('s = "a" * n', "return 1"),
        3_000_000_000,
        (2, 7),
        "Limits(size=...)",
    ),
    (
        "percent_format_1GB",
        body('s = "%0999999999d" % n', "return s"),
        1,
        (2, 7),
        "remainder of two numbers",
    ),
    ("list_repeat", body("xs = [1, 2] * n", "return 1"), 10**9, (2, 8), "--max-size"),
    (
        "concat_doubling",
        body('s = "ab"', "repeat 100 { s = s + s }", "return 1"),
        0,
        (3, 20),
        "--max-size",
    ),
    (
        "nested_list_doubling_then_str",
        body("x = [1]", "repeat 30 { x = [x, x] }", "s = str(x)", "return 1"),
        0,
        (3, 19),
        "--max-size",
    ),
    (
        "integer_squaring",
        body("x = 7", "repeat 40 { x = x * x }", "return 1"),
        0,
        (3, 19),
        "Limits(digits=...)",
    ),
    (
        "round_huge_negative_digits",
        body("y = round(n, -1000000000)", "return y"),
        5,
        (2, 7),
        "Limits(digits=...)",
    ),
    ("infinite_recursion", "program p(n) {\n  return p(n)\n}\n", 0, (2, 10), "--max-depth"),
    (
        "nested_repeat_steps",
        body("x = 0", "repeat 1000 { repeat 1000 { repeat 1000 { x = x + 1 } } }", "return x"),
        0,
        (3, 49),
        "--max-steps",
    ),
    (
        "binomial_fractional_n",
        body("k ~ binomial(3.5, 0.5)", "return k"),
        0,
        (2, 7),
        "whole number",
    ),
    # located errors instead of tracebacks
    (
        "int_of_infinity",
        body("y = 1e308 * 10", "x = int(y)", "return x"),
        0,
        (3, 7),
        "too large or infinite",
    ),
    (
        "round_of_infinity",
        body("y = 1e308 * 10", "x = round(y)", "return x"),
        0,
        (3, 7),
        "too large or infinite",
    ),
    (
        "float_of_huge_int",
        body("y = 10", "repeat 400 { y = y * 10 }", "z = float(y)", "return z"),
        0,
        (4, 7),
        "too large",
    ),
    (
        "negate_text",
        body('y = "a"', "x = -y", "return x"),
        0,
        (3, 7),
        "only numbers can be negated",
    ),
    (
        "for_over_a_number",
        body("for c in n { x = c }", "return 1"),
        5,
        (2, 3),
        "not over a whole number",
    ),
    (
        "categorical_lengths_differ",
        body('x ~ categorical(["a"], [0.01, 0.99])', "return x"),
        0,
        (2, 7),
        "1 values but 2 probabilities",
    ),
    (
        "categorical_2d_probs",
        body('x ~ categorical(["a", "b"], [[0.5, 0.5], [0.5, 0.5]])', "return x"),
        0,
        (2, 7),
        "probability 0 must be a number",
    ),
    (
        "normal_with_a_list",
        body("x ~ normal([0, 1], 1)", "return x"),
        0,
        (2, 7),
        "normal's mu must be a finite number",
    ),
    ("huge_int_in_template", body('return "{n}"'), 10**5000, (2, 10), "4,300 digits"),
    ("calc_divide_by_zero", body('x = calc("1/0")', "return x"), 0, (2, 7), "divide by zero"),
    (
        "calc_4000_digit_product",
        body('d = "9"', "d = d * 4000", 'x = calc(d + " * " + d)', "return x"),
        0,
        (4, 7),
        "Limits(digits=...)",
    ),
    ("factor_inf", body("factor 1e308 * 10", "return 1"), 0, (2, 3), "-inf for weight zero"),
    (
        "factor_nan",
        body("y = 1e308 * 10", "factor y - y", "return 1"),
        0,
        (3, 3),
        "it must be a finite number",
    ),
    (
        "observe_text_under_normal",
        body('observe "a" ~ normal(0, 1)', "return 1"),
        0,
        (2, 3),
        "needs a number",
    ),
]


@pytest.mark.parametrize(
    ("source", "n", "where", "fragment"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE]
)
def test_hostile_programs_stop_with_a_located_error(source, n, where, fragment):
    start = time.perf_counter()
    with pytest.raises(DSLRuntimeError) as info:
        run(source, n)
    elapsed = time.perf_counter() - start
    err = info.value
    assert (err.filename, err.line, err.col) == ("hostile.lmc", *where), str(err)
    assert fragment in str(err), str(err)
    assert elapsed < 20, f"took {elapsed:.1f}s"


def test_a_limit_is_raised_with_limits():
    """Each limit names how to raise it, and raising it lets the program run."""
    source = body("x = 0", "repeat n { x = x + 1 }", "return x")
    with pytest.raises(DSLRuntimeError, match=r"Limits\(iterations=\.\.\.\)"):
        run(source, 2000)
    assert run(source, 2000, limits=Limits(iterations=2000)).values == [2000, 2000]
    with pytest.raises(DSLRuntimeError, match="--max-steps"):
        run(source, 900, limits=Limits(steps=1000))


def test_the_budget_is_per_trace():
    """Every trace starts with a fresh budget: four traces of 60% of the steps each run."""
    source = body("x = 0", "repeat n { x = x + 1 }", "return x")
    programs = compile_lmc(source, limits=Limits(steps=10_000, iterations=10_000))
    result = lc.infer(programs["p"](1500), method="forward", num_samples=4, seed=0)
    assert result.values == [1500] * 4
    with pytest.raises(DSLRuntimeError, match="more than 10,000 steps"):
        lc.infer(programs["p"](3000), method="forward", num_samples=1, seed=0)


def test_steps_count_statements_and_expressions():
    interp = Interpreter(parse(body("x = 0", "repeat n { x = x + 1 }", "return x")), {}, {})
    lc.infer(interp.build()["p"](10), method="forward", num_samples=1, seed=0)
    # 1 + 1 (x = 0), 1 + 1 (repeat n), 10 * (1 + 3) (x = x + 1), 1 + 1 (return x)
    assert interp.peak_steps == 46


def test_limit_messages_name_the_cli_options():
    cases = [
        (body("return p(n)"), Limits(depth=5), "--max-depth"),
        (body('s = "ab" * n', "return 1"), Limits(size=10), "--max-size"),
        (body("repeat 100 { x = 1 }", "return 1"), Limits(steps=50), "--max-steps"),
    ]
    for source, limits, option in cases:
        with pytest.raises(DSLRuntimeError, match=f"`lmcascade run {option} N`"):
            run(source, 6, limits=limits)


def test_deep_recursion_past_pythons_stack_is_a_located_error():
    """With the depth limit raised past what Python's stack holds, the program still fails
    with a located error, not a RecursionError."""
    source = body("if n == 0 { return 0 }", "return p(n - 1) + 1")
    with pytest.raises(DSLRuntimeError, match="nest too deeply") as info:
        run(source, 5000, limits=Limits(depth=100_000, steps=10**7))
    assert info.value.line > 0


def test_a_failing_host_tool_is_a_located_error():
    source = body("x = boom(n)", "return x")
    with pytest.raises(DSLRuntimeError, match="tool 'boom' failed: division by zero") as info:
        run(source, 0, tools={"boom": lambda n: 1 / n})
    assert (info.value.line, info.value.col) == (2, 7)


def test_limits_must_be_positive_whole_numbers():
    with pytest.raises(lc.errors.OptionError, match=r"Limits.steps \(--max-steps\)"):
        Limits(steps=0)
    with pytest.raises(lc.errors.OptionError, match="Limits.size"):
        Limits(size=1.5)


# --- calc -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "fragment"),
    [
        ("1/0", "divide by zero"),
        ("5 % 0", "divide by zero"),
        ("9" * 4000 + " * " + "9" * 4000, "over the limit of 1,000 digits"),
        ("9" * 900 + " * " + "9" * 900, "the product would have about 1,80"),
        ("1e308 * 10", "not a finite number"),
        ("(" * 300 + "1" + ")" * 300, "calc cannot read"),
        ("-" * 5000 + "1", "calc cannot read"),
        ("1 + " * 5000 + "1", "at most 10,000 characters"),
        ("2 ** 10", "not Pow"),
        ("x", "not Name"),
        ("'a'", "handles numbers"),
    ],
    ids=[
        "div_zero",
        "mod_zero",
        "4000_digits",
        "900_digit_product",
        "overflow",
        "parens",
        "minus_chain",
        "too_long",
        "power",
        "name",
        "text_literal",
    ],  # fmt: skip
)
def test_calc_failures_are_clear_value_errors(expression, fragment):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace("*", r"\*")):
        calc(expression)
    assert time.perf_counter() - start < 1


def test_calc_takes_the_programs_digit_limit():
    assert calc("99 * 99", limits=Limits(digits=4)) == 9801
    with pytest.raises(ValueError, match="digits"):
        calc("999 * 999", limits=Limits(digits=4))
    assert (
        run(body('x = calc("123 * 1000")', "return x"), 0, limits=Limits(digits=6)).values[0]
        == 123000
    )
    with pytest.raises(DSLRuntimeError, match="tool 'calc' failed"):
        run(body('x = calc("1234 * 1000")', "return x"), 0, limits=Limits(digits=6))


# --- observe on a categorical scores the value (item 1) ------------------------------------


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("observe 0 ~ categorical([5, 0], [0.9, 0.1])", math.log(0.1)),
        ("observe 5 ~ categorical([5, 0], [0.9, 0.1])", math.log(0.9)),
        ('observe "long" ~ categorical(["short", "long"], [0.3, 0.7])', math.log(0.7)),
        ('observe "a" ~ categorical(["a", "b", "a"], [0.2, 0.5, 0.3])', math.log(0.5)),
        ('observe "a" ~ categorical(["a", "b", "a"], [2, 5, 3])', math.log(0.5)),
        ("observe [1, 2] ~ categorical([[1, 2], [3]], [0.25, 0.75])", math.log(0.25)),
    ],
    ids=["zero_of_two", "five_of_two", "text", "duplicates", "unnormalised", "list_value"],
)
def test_observe_on_a_categorical_scores_the_value(statement, expected):
    source = f"program p() {{\n  {statement}\n  return 1\n}}\n"
    result = lc.infer(compile_lmc(source)["p"](), method="enumerate")
    assert result.log_evidence == expected  # exact: the probabilities of equal values summed


def test_observing_a_value_not_among_the_values_has_weight_zero():
    source = """program p() {
  x ~ bernoulli(0.5)
  if x { observe "z" ~ categorical(["a", "b"], [0.2, 0.8]) }
  return x
}
"""
    result = lc.infer(compile_lmc(source)["p"](), method="enumerate")
    assert result.log_evidence == math.log(0.5)
    assert result.distribution() == {False: 1.0}


def test_observing_a_value_outside_a_distributions_support_has_weight_zero():
    source = """program p() {
  x ~ bernoulli(0.25)
  if x { observe 3 ~ bernoulli(0.5) } else { observe 2.5 ~ poisson(1) }
  return x
}
"""
    with pytest.raises(lc.errors.AllWeightsZeroError, match="observe@3"):
        lc.infer(compile_lmc(source)["p"](), method="enumerate")
    source = source.replace("observe 2.5 ~ poisson(1)", "observe 2 ~ poisson(1)")
    result = lc.infer(compile_lmc(source)["p"](), method="enumerate")
    assert result.log_evidence == pytest.approx(math.log(0.75 * math.exp(-1) / 2), abs=1e-15)


def test_sampling_a_categorical_gives_its_values_with_their_probabilities():
    source = """program p() {
  x ~ categorical(["a", "b", "a", "c"], [0.2, 0.5, 0.3, 0])
  observe x ~ categorical(["a", "b"], [0.25, 0.75])
  return x
}
"""
    result = lc.infer(compile_lmc(source)["p"](), method="enumerate")
    # prior a: 0.5, b: 0.5, c: 0 (never enumerated as possible); likelihood a: 0.25, b: 0.75
    assert result.log_evidence == pytest.approx(math.log(0.5 * 0.25 + 0.5 * 0.75), abs=1e-15)
    assert result.distribution() == pytest.approx({"a": 0.25, "b": 0.75}, abs=1e-12)


# --- site names are unique by construction (item 4 of the issue) ---------------------------

NAMES_SOURCE = """program h() { condition true factor 0 return 1 }
program p() {
  condition true condition true factor 0 factor 0 observe 1 ~ bernoulli(0.5) observe 1 ~ bernoulli(0.5)
  repeat 2 { condition true condition true }
  if true { factor 0 } else { factor 0 } factor 0
  a = h() b = h() c = calc("1") + calc("2")
  return 1
}
"""


def test_statements_on_one_line_get_distinct_site_names():
    result = lc.infer(compile_lmc(NAMES_SOURCE)["p"](), method="enumerate")
    assert result.traces[0].names == [
        "condition@3", "condition@3:18", "factor@3", "factor@3:42", "observe@3", "observe@3:78",
        "condition@4[0]", "condition@4:29[0]", "condition@4[1]", "condition@4:29[1]",
        "factor@5", "factor@5:42",
        "h@6/condition@1", "h@6/factor@1", "h@6:15/condition@1", "h@6:15/factor@1",
        "calc@6:23[0]", "calc@6:35[0]",
    ]  # fmt: skip


def test_every_site_name_of_a_module_is_distinct():
    from lmcascade.dsl.compiler import site_names

    module = parse(
        NAMES_SOURCE + "program q() { condition true factor 0 condition true return h() }"
    )
    names = site_names(module)
    assert len(names) == len(set(names.values())) == 19


# --- probabilities at and near 0 and 1 are exact (torch would clamp them to eps) -------------


@pytest.mark.parametrize(
    "statement, expected",
    [
        ("observe true ~ bernoulli(1e-20)", math.log(1e-20)),
        ("observe false ~ bernoulli(1e-20)", 0.0),
        ("observe true ~ bernoulli(0)", -math.inf),
        ("observe false ~ bernoulli(1)", -math.inf),
        ("observe 1 ~ geometric(1)", -math.inf),
        ("observe 0 ~ geometric(1)", 0.0),
        ("observe 3 ~ geometric(1e-20)", math.log(1e-20) + 3 * math.log1p(-1e-20)),
        ("observe 1 ~ binomial(10, 0)", -math.inf),
        ("observe 10 ~ binomial(10, 1)", 0.0),
        ("observe 1 ~ binomial(2, 1e-20)", math.log(2e-20) + math.log1p(-1e-20)),
        ("observe 2 ~ binomial(3, 0.5)", math.log(3 / 8)),
        ("observe 1 ~ categorical([0, 1], [1, 1e-20])", math.log(1e-20)),
    ],
)
def test_extreme_probabilities_are_exact(statement, expected):
    source = body(statement, "return 1")
    if expected == -math.inf:
        with pytest.raises(lc.errors.AllWeightsZeroError):
            run(source, 0, method="enumerate")
    else:
        assert run(source, 0, method="enumerate").log_evidence == pytest.approx(expected, rel=1e-12)


def test_a_coin_of_probability_zero_never_lands():
    with pytest.raises(lc.errors.AllWeightsZeroError, match="condition"):
        run(body("x ~ bernoulli(0)", "condition x", "return x"), 0, method="enumerate")
    r = run(body("x ~ bernoulli(0)", "return x"), 0)
    assert set(r.values) == {False}


def test_beta_shapes_torch_cannot_sample_are_refused():
    with pytest.raises(DSLRuntimeError, match="beta's a must be a number >= 0.01"):
        run(body("x ~ beta(0.00001, 0.00001)", "return x"), 0)


# --- what a run builds is paid for in steps ---------------------------------------------------


def test_placeholders_cost_steps():
    many = "{e}" * 20_000
    source = body('e = ""', "repeat 1000 {", f'  t = "{many}"', "}", "return 1")
    start = time.monotonic()
    with pytest.raises(DSLRuntimeError, match="steps"):
        run(source, 0, limits=Limits(steps=100_000))
    assert time.monotonic() - start < 10


def test_repeated_lists_cost_their_size():
    lines = [f"a{i} = [[]] * 999999" for i in range(50)]
    with pytest.raises(DSLRuntimeError, match="steps") as caught:
        run(body(*lines, "return 1"), 0)
    # a line builds about a million items (31,250 steps at 32 units per step), so the 32nd
    # (a31, on line 33) passes a million steps; before, every line cost a few steps
    assert caught.value.line == 33


@pytest.mark.parametrize(
    "site, fragment",
    [
        ("normal(0, 1e-300)", "sigma must be a number from 1e-150"),
        ("normal(0, 1e200)", "sigma must be a number from 1e-150"),
        ("uniform(-1e308, 1e308)", "width"),
    ],
)
def test_parameters_whose_densities_a_float_cannot_hold(site, fragment):
    with pytest.raises(DSLRuntimeError, match=fragment):
        run(body(f"observe 0 ~ {site}", "return 1"), 0, method="enumerate")
    assert math.isfinite(run(body("observe 0 ~ normal(0, 1e-100)", "return 1"), 0).log_evidence)
