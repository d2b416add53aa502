"""Text-DSL programs: static checks, and exact equivalence with Python programs."""

import pytest
import torch
from pyro.distributions import Bernoulli, Categorical

import lmcascade as lc
from lmcascade.errors import DSLCheckError, DSLRuntimeError
from programs import LM
from stats import assert_same_exact

MODELS = {"lm": LM}
TOOLS = {"shout": lambda s: s.upper(), "count_a": lambda s: s.count("a")}

LMC = """
# five programs, each also written in Python below
program single() {
  text ~ lm("q", max_tokens=3)
  condition "a" in text
  return text
}

program chained() {
  x ~ lm("q", max_tokens=2)
  y ~ lm("q{x}:", max_tokens=2)
  factor count_a(y) - len(x) * 0.5
  return x + "|" + y
}

program topic() {
  t ~ categorical(["a", "b"], [0.3, 0.7])
  text ~ lm("{t}:", max_tokens=2)
  condition len(text) > 0
  return t + "/" + shout(text)
}

program noisy() {
  text ~ lm("q", max_tokens=2)
  if "c" in text { observe true ~ bernoulli(0.9) } else { observe true ~ bernoulli(0.2) }
  return text
}

program looped(n) {
  total = 0
  repeat n { coin ~ bernoulli(0.5)  if coin { total = total + 1 } }
  for w in ["a", "b"] { factor 0.1 * total }
  return total
}
"""


@lc.program
def single():
    text = yield lc.gen("text", LM, "q", max_tokens=3)
    yield lc.condition("c", "a" in text)
    return text


@lc.program
def chained():
    x = yield lc.gen("x", LM, "q", max_tokens=2)
    y = yield lc.gen("y", LM, f"q{x}:", max_tokens=2)
    yield lc.factor("f", y.count("a") - len(x) * 0.5)
    return x + "|" + y


@lc.program
def topic():
    t = yield lc.sample("t", Categorical(torch.tensor([0.3, 0.7], dtype=torch.float64)))
    t = ["a", "b"][t]
    text = yield lc.gen("text", LM, f"{t}:", max_tokens=2)
    yield lc.condition("c", len(text) > 0)
    return t + "/" + text.upper()


@lc.program
def noisy():
    text = yield lc.gen("text", LM, "q", max_tokens=2)
    p = 0.9 if "c" in text else 0.2
    yield lc.observe("o", Bernoulli(torch.tensor(p, dtype=torch.float64)), 1.0)
    return text


@lc.program
def looped(n):
    total = 0
    for _ in range(n):
        coin = yield lc.sample("coin[]", Bernoulli(torch.tensor(0.5, dtype=torch.float64)))
        total += int(coin)
    for _ in ["a", "b"]:
        yield lc.factor("f[]", 0.1 * total)
    return total


@pytest.fixture(scope="module")
def compiled():
    return lc.load(LMC, models=MODELS, tools=TOOLS)


@pytest.mark.parametrize(
    ("name", "python", "args"),
    [
        ("single", single, ()),
        ("chained", chained, ()),
        ("topic", topic, ()),
        ("noisy", noisy, ()),
        ("looped", looped, (3,)),
    ],
)
def test_lmc_and_python_have_identical_exact_posteriors(compiled, name, python, args):
    a = lc.infer(getattr(compiled, name)(*args), method="enumerate")
    b = lc.infer(python(*args), method="enumerate")
    assert_same_exact(a, b)


def test_lmc_programs_run_with_every_method(compiled):
    for method, opts in [
        ("forward", {"num_samples": 50}),
        ("importance", {"num_samples": 50}),
        ("rejection", {"num_samples": 20}),
        ("smc", {"particles": 20}),
    ]:
        r = lc.infer(compiled.single(), method=method, seed=0, **opts)
        assert all("a" in v for v, w in zip(r.values, r.weights, strict=True) if w > 0)
    trace = lc.infer(compiled.looped(2), method="forward", num_samples=1, seed=0).traces[0]
    assert trace.names[:2] == ["coin[0]", "coin[1]"]


CHECK_ERRORS = [
    ("program f() { return y }", 1, 22, "undefined variable 'y'"),
    ('program f() { x ~ llm("q") return x }', 1, 19, "did you mean 'lm'"),
    ('program f() { x ~ lm("q", 3) return x }', 1, 19, "takes one prompt"),
    ('program f() { x ~ lm("q", temp=1) return x }', 1, 19, "unknown option 'temp'"),
    ("program f() { x ~ bernoulli(0.1, 0.2) return x }", 1, 19, "takes 1 arguments"),
    ("program f() { x = sqrt(2) return x }", 1, 19, "unknown function or tool 'sqrt'"),
    ('program f() { x = lm("q") return x }', 1, 19, "use it in a sample statement"),
    ('program f() { x ~ shout("q") return x }', 1, 19, "not a model or distribution"),
    ('program f() { x ~ lm("q") x ~ lm("r") return x }', 1, 27, "sampled twice"),
    ("program f() { if true { y = 1 } return y }", 1, 40, "undefined variable 'y'"),
    ('program f() { x = "a" + 1 return x }', 1, 19, "between text and a number"),
    ('program f() { repeat "3" { } return 1 }', 1, 22, "whole number"),
    ("program f() { for x in 5 { } return 1 }", 1, 24, "list or a string"),
    ('program f() { factor "high" return 1 }', 1, 22, "needs a number"),
    ("program g(a) { return a } program f() { return g(1, 2) }", 1, 48, "takes 1 arguments"),
    ("program f() { return 1 } program f() { return 2 }", 1, 26, "defined twice"),
    ('program f() { x = "{nope}" return x }', 1, 20, "undefined variable 'nope'"),
]


@pytest.mark.parametrize(("source", "line", "col", "fragment"), CHECK_ERRORS)
def test_check_errors_point_at_the_problem(source, line, col, fragment):
    with pytest.raises(DSLCheckError) as info:
        lc.load(source, models=MODELS, tools=TOOLS)
    assert (info.value.line, info.value.col) == (line, col), str(info.value)
    assert fragment in str(info.value)


def test_runaway_loops_stop_with_a_clear_error():
    progs = lc.load("program f(n) { repeat n { x = 1 } return n }", models=MODELS)
    with pytest.raises(DSLRuntimeError, match="repeat needs a whole number from 0 to 1000"):
        lc.infer(progs.f(10**6), method="forward", num_samples=1, seed=0)


def test_only_given_tools_are_callable():
    with pytest.raises(DSLCheckError, match="unknown function or tool 'open'"):
        lc.load('program f() { return open("/etc/passwd") }', models=MODELS)
