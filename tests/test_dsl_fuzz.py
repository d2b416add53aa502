"""A fuzz of well-formed ``.lmc`` programs run under small budgets.

Hypothesis writes programs — random expressions over whole numbers, floats, texts and lists,
nested loops with random counts, text and list repetition with random sizes, builtins, ``calc``,
recursion, factors, conditions, observations and samples from small distributions — that
parse and pass the checker, and runs each under forward sampling and exact enumeration.
Whatever a program does, only an :class:`~lmcascade.errors.LMCascadeError` may escape (an
interpreter error located at a line), never a duplicate site name, and every run stays within
its step budget and a bound on time.
"""

from __future__ import annotations

import time

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import lmcascade as lc
from lmcascade.dsl.check import check
from lmcascade.dsl.compiler import Interpreter
from lmcascade.dsl.limits import SIZE_PER_STEP, Limits
from lmcascade.dsl.parser import parse
from lmcascade.dsl.tools import DEFAULT_TOOLS
from lmcascade.errors import DSLCheckError, DSLError, DuplicateSiteError, LMCascadeError

LIMITS = Limits(steps=3_000, size=2_000, digits=60, depth=8, iterations=30)
VARIABLES = ["a", "b", "c", "s", "xs"]
PRELUDE = ["a = 3", "b = 2.5", "c = 0 - 7", 's = "ab"', 'xs = [1, "x", 2.5]']
RECURSIVE = """program r(k) {
  if k <= 0 { return 0 }
  return r(k - 1) + 1
}
"""
SIZES = [0, 1, 2, 3, 7, 100, 1999, 2001, 10**6, 3_000_000_000, 10**30]
FLOATS = [0.0, 0.5, 2.5, 1e-300, 1e308, 123.456]
BUILTINS = {
    "len": 1,
    "str": 1,
    "int": 1,
    "float": 1,
    "round": 1,
    "min": 1,
    "max": 2,
    "abs": 1,
    "lower": 1,
    "upper": 1,
    "strip": 1,
    "split": 2,
    "join": 2,
    "contains": 2,
}


@st.composite
def expressions(draw, depth: int) -> tuple[str, str]:
    """An expression's text and its kind: ``num`` or ``str`` for a bare literal (the checker
    rejects some mixes of literals), ``list`` for a list literal, ``any`` otherwise."""
    leaves = ["int", "float", "text", "var", "var"]
    nodes = ["binop", "compare", "logic", "neg", "index", "call", "calc", "list", "repeat", "r"]
    choice = draw(st.sampled_from(leaves + (nodes if depth > 0 else [])))
    sub = expressions(depth - 1)
    if choice == "int":
        return str(draw(st.sampled_from(SIZES[:6]))), "num"
    if choice == "float":
        return repr(draw(st.sampled_from(FLOATS))), "num"
    if choice == "text":
        parts = draw(
            st.lists(st.sampled_from(["a", "b", " ", "1", ",", "%d", "{a}", "{xs}"]), max_size=4)
        )
        return '"' + "".join(parts) + '"', "str"
    if choice == "var":
        return draw(st.sampled_from(VARIABLES)), "any"
    if choice == "list":
        items = draw(st.lists(sub, max_size=3))
        return "[" + ", ".join(text for text, _ in items) + "]", "list"
    if choice == "binop":
        (left, lk), (right, rk) = draw(sub), draw(sub)
        if {lk, rk} == {"num", "str"}:  # a literal type error the checker reports
            right = "a"
        return f"({left} {draw(st.sampled_from('+-*/%'))} {right})", "any"
    if choice == "compare":
        op = draw(st.sampled_from(["==", "!=", "<", "<=", ">", ">=", "in"]))
        return f"({draw(sub)[0]} {op} {draw(sub)[0]})", "any"
    if choice == "logic":
        form = draw(st.sampled_from(["({} and {})", "({} or {})", "(not {})"]))
        return form.format(draw(sub)[0], draw(sub)[0]), "any"
    if choice == "neg":
        return f"(-{draw(sub)[0]})", "any"
    if choice == "index":
        return f"{draw(st.sampled_from(VARIABLES))}[{draw(sub)[0]}]", "any"
    if choice == "call":
        name = draw(st.sampled_from(sorted(BUILTINS)))
        args = [draw(sub)[0] for _ in range(BUILTINS[name])]
        return f"{name}({', '.join(args)})", "any"
    if choice == "calc":
        return f"calc({draw(sub)[0]})", "any"
    if choice == "repeat":  # a text or a list repeated a random number of times
        seq = draw(st.sampled_from(["s", "xs", "[1, 2]"]))
        return f"({seq} * {draw(st.sampled_from(SIZES))})", "any"
    return f"r({draw(sub)[0]})", "any"


@st.composite
def statements(draw, depth: int, names: list[str]) -> list[str]:
    """One statement (with its lines); ``names`` counts fresh names for sample sites and loop
    variables, so that no site is sampled twice."""
    expr = expressions(2)
    simple = ["assign", "assign", "condition", "factor", "observe", "sample", "heavy"]
    nested = ["if", "repeat", "for"] if depth > 0 else []
    choice = draw(st.sampled_from(simple + nested))
    if choice == "assign":
        return [f"{draw(st.sampled_from(VARIABLES))} = {draw(expr)[0]}"]
    if choice == "heavy":  # well-typed loops that grow numbers, texts and lists
        counts = draw(st.lists(st.sampled_from(["3", "10", "30"]), min_size=1, max_size=3))
        grow = draw(
            st.sampled_from(
                ["c = c + 1", "c = c + c", "c = c * a", "s = s + s", "xs = [xs, xs]", "b = b * b"]
            )
        )
        return [*(f"repeat {n} {{" for n in counts), grow, *("}" for _ in counts)]
    if choice == "condition":
        return [f"condition {draw(expr)[0]}"]
    if choice == "factor":
        text, kind = draw(expr)
        return [f"factor {text if kind not in ('str', 'list') else 'b'}"]
    if choice in ("observe", "sample"):
        dist = draw(
            st.sampled_from(
                [
                    "bernoulli(0.3)",
                    'categorical(["x", 1, "x"], [0.2, 0.5, 0.3])',
                    "normal(0, 1)",
                    "poisson(2)",
                    f"bernoulli({draw(expr)[0]})",
                    f"categorical({draw(expr)[0]}, [0.5, 0.5])",
                    f"normal({draw(expr)[0]}, {draw(expr)[0]})",
                ]
            )
        )
        if choice == "observe":
            return [f"observe {draw(expr)[0]} ~ {dist}"]
        names.append(f"v{len(names)}")
        return [f"{names[-1]} ~ {dist}", f"{draw(st.sampled_from(VARIABLES))} = {names[-1]}"]
    body = draw(st.lists(statements(depth - 1, names), min_size=1, max_size=3))
    inner = [line for stmt in body for line in stmt]
    if choice == "if":
        orelse = [
            line
            for stmt in draw(st.lists(statements(depth - 1, names), max_size=2))
            for line in stmt
        ]
        tail = ["} else {", *orelse] if orelse else []
        return [f"if {draw(expr)[0]} {{", *inner, *tail, "}"]
    if choice == "repeat":
        count = draw(
            st.sampled_from(["0", "2", "10", "30", "31", "a", "(a * 9)", "len(s)", "1999"])
        )
        return [f"repeat {count} {{", *inner, "}"]
    names.append(f"v{len(names)}")
    iterable = draw(st.sampled_from(["xs", "s", "split(s)", "[1, 2, 3]", "(xs * a)", "a"]))
    return [f"for {names[-1]} in {iterable} {{", f"b = {names[-1]}", *inner, "}"]


@st.composite
def programs(draw) -> str:
    names: list[str] = []
    heavy = draw(statements(0, names).filter(lambda lines: lines[0].startswith("repeat")))
    body = [
        line
        for stmt in draw(st.lists(statements(2, names), min_size=1, max_size=5))
        for line in stmt
    ]
    if draw(st.booleans()):  # a loop that runs long or grows a value, where it runs at all
        body.insert(draw(st.integers(0, len(body))), "\n".join(heavy))
    lines = [*PRELUDE, *body, f"return {draw(expressions(1))[0]}"]
    return RECURSIVE + "program p() {\n" + "\n".join(f"  {line}" for line in lines) + "\n}\n"


def run_once(interp: Interpreter, method: str) -> None:
    """Runs ``p`` once under ``method``; only located DSL errors and other lmcascade errors
    may escape, and never a duplicate site."""
    options = {"num_samples": 2, "seed": 0} if method == "forward" else {"max_traces": 16}
    start = time.perf_counter()
    try:
        lc.infer(interp.programs["p"](), method=method, **options)
    except LMCascadeError as err:
        assert not isinstance(err, DuplicateSiteError), str(err)
        if isinstance(err, DSLError):
            assert err.line > 0, str(err)
    elapsed = time.perf_counter() - start
    assert elapsed < 5, f"{method} took {elapsed:.1f}s"
    # a run stops as soon as it spends more than its budget; one charge may overshoot it
    assert interp.peak_steps <= LIMITS.steps + LIMITS.size // SIZE_PER_STEP * 4 + 8


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(programs())
def test_generated_programs_fail_only_with_located_errors_and_within_budget(source):
    module = parse(source, filename="fuzz.lmc")  # the generator writes only valid syntax
    try:
        check(module, models=set(), tools=DEFAULT_TOOLS)
    except DSLCheckError:  # pragma: no cover - the generator avoids what the checker rejects
        assume(False)
    interp = Interpreter(module, {}, DEFAULT_TOOLS, limits=LIMITS)
    interp.build()
    run_once(interp, "forward")
    run_once(interp, "enumerate")
