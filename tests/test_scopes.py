"""Name scopes: ``lc.scope`` in Python programs, automatic scopes in the text DSL, and the
checker's duplicate-site errors."""

import gc
import math

import pytest
import torch
from pyro.distributions import Bernoulli, Categorical

import lmcascade as lc
from lmcascade.errors import DSLCheckError, ProgramError, SiteError
from lmcascade.models import ToyLM
from lmcascade.program import current_scope, send
from stats import assert_same_exact

COIN = Bernoulli(torch.tensor(0.5, dtype=torch.float64))
LM = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, -0.5, -1.0 + 0.5 * len(ctx)])


def coin(p: float) -> Bernoulli:
    return Bernoulli(torch.tensor(p, dtype=torch.float64))


def names(result) -> list[list[str]]:
    return [t.names for t in result.traces]


# --- lc.scope in Python ------------------------------------------------------------------------


def test_scopes_prefix_and_nest():
    assert lc.sample("x", COIN).name == "x"
    with lc.scope("a") as outer:
        assert outer == "a"
        assert lc.sample("x", COIN).name == "a/x"
        with lc.scope("b") as inner:
            assert inner == "a/b" == current_scope()
            assert lc.factor("f", 0.0).name == "a/b/f"
            assert lc.observe("o", COIN, 1.0).name == "a/b/o"
            assert lc.condition("c", True).name == "a/b/c"
            assert lc.call("t", len, "ab").name == "a/b/t"
            assert lc.gen("g", LM, "", max_tokens=1).name == "a/b/g"
        assert lc.sample("y", COIN).name == "a/y"
    assert lc.sample("x", COIN).name == "x"
    assert current_scope() == ""


@lc.program
def flip(p):
    x = yield lc.sample("x", coin(p))
    return int(x)


@lc.program
def scoped_loops():
    with lc.scope("first"):
        a = yield from flip(0.5)
    total = a
    for i in range(2):
        with lc.scope(f"round{i}"):
            total += yield from flip(0.5)
    for _ in range(2):
        with lc.scope("try[]"):
            total += yield from flip(0.5)
            with lc.scope("inner[]"):
                yield lc.factor("f", 0.0)
    with lc.scope("steps"):
        for _ in range(2):
            yield lc.factor("step[]", 0.0)
    return total


SCOPED_LOOP_NAMES = [
    "first/x",
    "round0/x",
    "round1/x",
    "try[0]/x",
    "try[0]/inner[0]/f",
    "try[1]/x",
    "try[1]/inner[0]/f",
    "steps/step[0]",
    "steps/step[1]",
]


def test_scopes_in_loops_and_auto_index():
    r = lc.infer(scoped_loops(), method="enumerate")
    assert len(r) == 2**5
    assert all(n == SCOPED_LOOP_NAMES for n in names(r))
    assert r.distribution()[5] == pytest.approx(1 / 32)


def test_scope_as_decorator_and_around_a_bound_program():
    @lc.scope("outer")
    @lc.program
    def above():
        return (yield from flip(0.5))

    @lc.program
    @lc.scope("below")
    def below():
        return (yield from flip(0.5))

    @lc.scope("again[]")
    def make_factor():
        return lc.factor("f", 0.0)

    @lc.program
    def main():
        a = yield from above()
        b = yield from below()
        c = yield from lc.scope("call")(flip(0.5))
        yield make_factor()
        yield make_factor()
        return a + b + c

    assert isinstance(above, lc.Program) and above.name == "above"
    assert repr(lc.scope("call")(flip(0.5))) == "flip(0.5)"
    trace = lc.infer(main(), method="forward", num_samples=1, seed=0).traces[0]
    assert trace.names == ["outer/x", "below/x", "call/x", "again[0]/f", "again[1]/f"]
    # a scoped program run on its own
    assert lc.infer(above(), method="forward", num_samples=1, seed=0).traces[0].names == ["outer/x"]


@pytest.mark.parametrize("bad", ["", "a/b", "[]", 3, None])
def test_scope_names_are_validated(bad):
    with pytest.raises(SiteError, match="scope name must be a non-empty string without '/'"):
        lc.scope(bad)


def test_scope_misuse_errors():
    with pytest.raises(ProgramError, match="applies to a program, a function"):
        lc.scope("a")(42)
    s = lc.scope("a")
    with pytest.raises(ProgramError, match="scope 'a' ended inside scope"):
        s.__exit__(None, None, None)
    with pytest.raises(SiteError, match="scope name"):

        @lc.program
        def bad():
            with lc.scope("x/y"):
                yield lc.factor("f", 0.0)

        lc.infer(bad(), method="forward", num_samples=1, seed=0)
    assert current_scope() == ""


# --- interleaved particles ---------------------------------------------------------------------


@lc.program
def branching():
    """Each particle takes its own scopes, held open across LM generation steps."""
    k = yield lc.sample("k", Categorical(torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)))
    k = int(k)
    with lc.scope(f"path{k}"):
        text = yield lc.gen("text", LM, "", max_tokens=2)
        for _ in range(k):
            with lc.scope("try[]"):
                more = yield lc.gen("more", LM, text, max_tokens=2)
                yield lc.factor("len", -0.1 * len(more))
    tail = yield lc.gen("tail", LM, text, max_tokens=2)
    return f"{k}:{text}|{tail}"


def expected_names(k: int) -> list[str]:
    out = ["k", f"path{k}/text"]
    for i in range(k):
        out += [f"path{k}/try[{i}]/more", f"path{k}/try[{i}]/len"]
    return out + ["tail"]


@pytest.mark.parametrize(
    ("method", "opts"),
    [
        ("smc", {"particles": 32, "ess_threshold": 1.0}),
        ("importance", {"num_samples": 32}),
        ("forward", {"num_samples": 32}),
    ],
)
def test_interleaved_particles_keep_their_own_scopes(method, opts):
    r = lc.infer(branching(), method=method, seed=0, **opts)
    assert len(r) == 32
    ks = set()
    for trace in r.traces:
        k = int(trace.value.split(":")[0])
        ks.add(k)
        assert trace.names == expected_names(k)
    assert len(ks) > 1  # the particles really took different scopes
    assert current_scope() == ""
    if method == "smc":
        assert r.stats["resamples"] > 0  # clones replayed into fresh generators


def test_enumerate_agrees_with_scoped_replay():
    r = lc.infer(branching(), method="enumerate")
    assert {tuple(t.names) for t in r.traces} == {tuple(expected_names(k)) for k in range(3)}


# --- no leaks ----------------------------------------------------------------------------------


def test_a_generator_failing_inside_a_scope_does_not_leak():
    @lc.program
    def fails():
        with lc.scope("doomed"):
            yield lc.factor("f", 0.0)
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        lc.infer(fails(), method="forward", num_samples=3, seed=0)
    assert current_scope() == ""
    assert lc.sample("x", COIN).name == "x"
    # and the failure restores the caller's scope, whatever it was
    gen = iter(fails())
    with lc.scope("caller"):
        _, scope = send(gen, None, ())
        assert scope == ("doomed",)
        with pytest.raises(ValueError):
            send(gen, None, scope)
        assert current_scope() == "caller"


def test_closing_or_collecting_a_generator_inside_a_scope_does_not_leak():
    @lc.program
    def held():
        with lc.scope("a"), lc.scope("b"):
            yield lc.factor("f", 0.0)
            yield lc.factor("g", 0.0)

    victim = iter(held())
    eff, victim_scope = send(victim, None, ())
    assert eff.name == "a/b/f" and victim_scope == ("a", "b")

    @lc.program
    def closer():
        with lc.scope("mine"), lc.scope("b"):  # same innermost name as the victim's
            victim.close()  # the victim's scopes exit while this program runs
            yield lc.factor("h", 0.0)

    eff, scope = send(iter(closer()), None, ())
    assert eff.name == "mine/b/h" and scope == ("mine", "b")
    assert current_scope() == ""

    # a suspended generator that is garbage-collected while the caller is in a scope
    other = iter(held())
    send(other, None, ())
    with lc.scope("b"):
        del other
        gc.collect()
        assert current_scope() == "b"
    assert current_scope() == ""


def test_closed_particles_mid_scope_do_not_leak():
    @lc.program
    def dies():
        with lc.scope("s"):
            x = yield lc.sample("x", coin(0.5))
            yield lc.condition("heads", x == 1)
            yield lc.factor("after", 0.0)
        return int(x)

    r = lc.infer(dies(), method="forward", num_samples=20, seed=0)
    for trace, w in zip(r.traces, r.weights, strict=True):
        assert trace.names == (["s/x", "s/heads", "s/after"] if w > 0 else ["s/x", "s/heads"])
    assert current_scope() == ""


# --- the text DSL ------------------------------------------------------------------------------

LMC = """
program helper(prompt, p) {
  x ~ lm(prompt, max_tokens=1)
  b ~ bernoulli(p)
  observe b ~ bernoulli(0.8)
  return x
}

program twice() {
  first = helper("", 0.3)
  second = helper(first, 0.6)
  condition len(first + second) > 1
  return first + "|" + second
}

program looped(n) {
  out = ""
  repeat n { out = out + helper(out, 0.5) }
  for p in [0.2] { out = out + helper("", p) }
  return out
}
"""


@lc.program
def helper(prompt, p):
    x = yield lc.gen("x", LM, prompt, max_tokens=1)
    b = yield lc.sample("b", coin(p))
    yield lc.observe("observe@5", coin(0.8), b)
    return x


@lc.program
def twice():
    with lc.scope("helper@10"):
        first = yield from helper("", 0.3)
    with lc.scope("helper@11"):
        second = yield from helper(first, 0.6)
    yield lc.condition("condition@12", len(first + second) > 1)
    return first + "|" + second


@lc.program
def looped(n):
    out = ""
    for _ in range(n):
        with lc.scope("helper@18[]"):
            out += yield from helper(out, 0.5)
    for p in [0.2]:
        with lc.scope("helper@19[]"):
            out += yield from helper("", p)
    return out


@pytest.fixture(scope="module")
def compiled():
    return lc.load(LMC, models={"lm": LM})


@pytest.mark.parametrize(
    ("name", "python", "args"), [("twice", twice, ()), ("looped", looped, (2,))]
)
def test_lmc_sub_program_calls_match_python_scopes(compiled, name, python, args):
    a = lc.infer(getattr(compiled, name)(*args), method="enumerate")
    b = lc.infer(python(*args), method="enumerate")
    assert_same_exact(a, b)
    assert {tuple(t.names) for t in a.traces} == {tuple(t.names) for t in b.traces}


def test_lmc_sub_program_site_names(compiled):
    trace = lc.infer(compiled.looped(2), method="forward", num_samples=1, seed=0).traces[0]
    assert trace.names == [
        f"{scope}/{site}"
        for scope in ("helper@18[0]", "helper@18[1]", "helper@19[0]")
        for site in ("x", "b", "observe@5")
    ]


@pytest.mark.parametrize(
    ("method", "opts"),
    [
        ("enumerate", {}),
        ("forward", {"num_samples": 30}),
        ("importance", {"num_samples": 30}),
        ("rejection", {"num_samples": 5, "max_log_weight": 0.0}),
        ("smc", {"particles": 16, "ess_threshold": 1.0}),
    ],
)
def test_lmc_sub_programs_run_under_every_method(compiled, method, opts):
    for bound in (compiled.twice(), compiled.looped(2)):
        r = lc.infer(bound, method=method, seed=0, **opts)
        live = [t for t, w in zip(r.traces, r.weights, strict=True) if w > 0]
        assert live
        for trace in live:
            assert all("/" in n for n in trace.names if not n.startswith("condition@"))
            assert len(set(trace.names)) == len(trace.names)


def test_lmc_repeated_call_sites_on_one_line_and_recursion():
    progs = lc.load(
        """
program h(p) { c ~ bernoulli(p) return c }
program two() { return [h(0.2), h(0.7)] }
program conds(x) { condition x > 0 condition x < 5 return x }
program countdown(n) {
  if n > 0 { c ~ bernoulli(0.5) return countdown(n - 1) }
  return n
}
""",
        models={},
    )
    trace = lc.infer(progs.two(), method="forward", num_samples=1, seed=0).traces[0]
    assert trace.names == ["h@3/c", "h@3:33/c"]
    r = lc.infer(progs.conds(3), method="enumerate")
    assert r.traces[0].names == ["condition@4", "condition@4:36"]
    r = lc.infer(progs.countdown(2), method="enumerate")
    assert {tuple(t.names) for t in r.traces} == {("c", "countdown@6/c")}


# --- lmcascade check: duplicate sites ----------------------------------------------------------

DUPLICATES = [
    (
        "program f(c) {\n  if c { a ~ bernoulli(0.5) }\n  a ~ bernoulli(0.2)\n  return a\n}",
        3,
        3,
        "site 'a' is sampled twice (first at 2:10 in an `if` branch)",
    ),
    (
        'program f() {\n  x ~ lm("q")\n  y = 1\n  x ~ lm("r")\n  return x\n}',
        4,
        3,
        "site 'x' is sampled twice (first at 2:3)",
    ),
    (
        "program f() {\n  a ~ bernoulli(0.5)\n  repeat 2 { a ~ bernoulli(0.2) }\n  return a\n}",
        3,
        14,
        "sampled in a loop here (sites a[0], a[1], ...) and before it, at 2:3",
    ),
    (
        "program f() {\n  for i in [1] {\n    a ~ bernoulli(0.2)\n  }\n  a ~ bernoulli(0.5)\n"
        "  return a\n}",
        5,
        3,
        "sampled in a loop at 3:5",
    ),
    (
        "program f(c, d) {\n  if c { if d { a ~ bernoulli(0.5) } } else { b = 1 }\n"
        "  a ~ bernoulli(0.2)\n  return a\n}",
        3,
        3,
        "first at 2:17 in an `if` branch",
    ),
]


@pytest.mark.parametrize(("source", "line", "col", "fragment"), DUPLICATES)
def test_check_reports_duplicate_sites_with_lmc_hints(source, line, col, fragment):
    with pytest.raises(DSLCheckError) as info:
        lc.load(source, models={"lm": LM})
    err = info.value
    assert (err.line, err.col) == (line, col), str(err)
    assert fragment in str(err)
    assert "rename the second sample, e.g. `" in str(err)
    assert "~ " in err.reason.split("e.g.")[1] and "lc." not in str(err)


@pytest.mark.parametrize(
    "source",
    [
        # the two branches of one if: only one runs
        "program f(c) {\n  if c { a ~ bernoulli(0.5) } else { a ~ bernoulli(0.1) }\n  return a\n}",
        # else-if chains
        "program f(c) { if c == 1 { a ~ bernoulli(0.5) } else if c == 2 { a ~ bernoulli(0.1) }"
        " else { a ~ bernoulli(0.9) } return 1 }",
        # a branch that returns never meets what follows the if
        "program f(c) {\n  if c { a ~ bernoulli(0.5) return a }\n  a ~ bernoulli(0.1)\n"
        "  return a\n}",
        # loops index their sites; two loops share the index
        "program f() { repeat 2 { a ~ bernoulli(0.5) } for i in [1, 2] { a ~ bernoulli(0.1) }"
        " return 1 }",
        # separate programs, and a sub-program called twice
        "program g() { a ~ bernoulli(0.5) return a }"
        " program f() { a ~ bernoulli(0.5) b = g() c = g() return [a, b, c] }",
    ],
)
def test_check_accepts_sites_that_cannot_meet(source):
    progs = lc.load(source, models={})
    name = source.split("program ")[-1].split("(")[0]
    bound = getattr(progs, name)(1) if "(c)" in source else getattr(progs, name)()
    r = lc.infer(bound, method="enumerate")
    assert math.isfinite(r.log_evidence)


def test_if_branch_that_returns_defines_nothing_after_it():
    progs = lc.load("program f(c) { if c { return 0 } else { y = 1 } return y }", models={})
    assert lc.infer(progs.f(False), method="enumerate").distribution() == {1: 1.0}
