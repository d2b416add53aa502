"""The embedded DSL, traces and replay."""

import random

import pytest
import torch
from pyro.distributions import Bernoulli, Categorical

import lmcascade as lc
from lmcascade.engine import Engine, Particle
from lmcascade.errors import (
    BadYieldError,
    DuplicateSiteError,
    ProgramError,
    ReplayDivergenceError,
    SiteError,
)
from programs import LM


@lc.program
def helper(prefix):
    word = yield lc.gen("word", LM, prefix, max_tokens=2)
    return prefix + word


@lc.program
def outer():
    first = yield from helper("q")
    n = yield lc.call("length", len, first)
    for _ in range(2):
        yield lc.sample("flip[]", Bernoulli(0.5))
    return (first, n)


def test_yield_from_subprogram_and_auto_index():
    r = lc.infer(outer(), method="forward", num_samples=5, seed=0)
    trace = r.traces[0]
    assert trace.names == ["word", "length", "flip[0]", "flip[1]"]
    first, n = trace.value
    assert first == "q" + trace["word"].value and n == len(first)
    assert trace["word"].token_ids is not None


def test_bound_program_does_not_run_until_inferred():
    calls = []

    @lc.program
    def prog():
        calls.append(1)
        yield lc.factor("f", 0.0)

    bound = prog()
    assert calls == [] and repr(bound) == "prog()"
    lc.infer(bound, method="forward", num_samples=3, seed=0)
    assert len(calls) == 3


def test_not_a_generator_function():
    with pytest.raises(ProgramError, match="generator function"):

        @lc.program
        def plain():
            return 1


def test_bad_arguments():
    with pytest.raises(ProgramError, match="helper"):
        helper(1, 2)


def test_non_effect_yield_names_previous_site():
    @lc.program
    def bad():
        yield lc.sample("x", Bernoulli(0.5))
        yield 42

    with pytest.raises(BadYieldError, match="after site 'x'"):
        lc.infer(bad(), method="forward", num_samples=1, seed=0)


def test_yielding_a_bound_program_suggests_yield_from():
    @lc.program
    def bad():
        yield helper("q")

    with pytest.raises(BadYieldError, match="yield from"):
        lc.infer(bad(), method="forward", num_samples=1, seed=0)


def test_duplicate_site_names():
    @lc.program
    def dup():
        for _ in range(2):
            yield lc.sample("x", Bernoulli(0.5))

    with pytest.raises(DuplicateSiteError, match="'x'.*x\\[\\]"):
        lc.infer(dup(), method="forward", num_samples=1, seed=0)


def test_bad_site_arguments():
    with pytest.raises(SiteError, match="site 'g'.*max_tokens"):
        lc.gen("g", LM, "q", max_tokens=0)
    with pytest.raises(SiteError, match="site 'g'.*takes max_tokens"):
        lc.gen("g", LM, "q", max_new_tokens=3)
    with pytest.raises(SiteError, match="site 's'"):
        lc.sample("s", "not a distribution")
    with pytest.raises(SiteError):
        lc.sample("", Bernoulli(0.5))


def test_untokenisable_prompt_names_site():
    @lc.program
    def prog():
        yield lc.gen("answer", LM, "hello", max_tokens=2)

    with pytest.raises(lc.errors.TokenizationError, match="site 'answer'.*'hello'"):
        lc.infer(prog(), method="forward", num_samples=2, seed=0)


def test_runaway_program_stops():
    @lc.program
    def forever():
        i = 0
        while True:
            yield lc.factor(f"f{i}", 0.0)
            i += 1

    engine = Engine(max_sites=50)
    with pytest.raises(ProgramError, match="50 sites"):
        engine.run([Particle(forever())])


def test_bad_factor_value():
    @lc.program
    def prog():
        yield lc.factor("score", "high")

    with pytest.raises(SiteError, match="site 'score'"):
        lc.infer(prog(), method="forward", num_samples=1, seed=0)


# --- replay -----------------------------------------------------------------------------


@lc.program
def story(tool_log):
    topic = yield lc.sample("topic", Categorical(torch.tensor([0.5, 0.5])))
    first = yield lc.gen("first", LM, ["a", "b"][topic] + ":", max_tokens=3)
    upper = yield lc.call("shout", lambda s: (tool_log.append(s), s.upper())[1], first)
    second = yield lc.gen("second", LM, "q" + first, max_tokens=3, temperature=0)
    return (topic, upper, second)


def test_full_replay_reproduces_value_without_rerunning_tools():
    log = []
    engine = Engine(seed=3)
    original = Particle(story(log))
    engine.run([original])
    assert len(log) == 1
    clone = original.clone()
    clone.trace.done = False
    engine.run([clone])
    assert clone.trace.value == original.trace.value
    assert len(log) == 1  # the tool result was memoised
    assert engine.stats["model_calls"] > 0


def test_resumed_clone_continues_like_the_original():
    log = []
    engine = Engine(seed=5)
    original = Particle(story(log))
    engine.run([original])
    # Resume from the first three sites; the greedy second site must be regenerated identically.
    resumed = Particle(original.program, original.trace.prefix(3))
    calls_before = engine.stats["model_calls"]
    engine.run([resumed])
    assert engine.stats["model_calls"] > calls_before  # 'second' was generated live
    assert [s.value for s in resumed.trace] == [s.value for s in original.trace]
    assert resumed.trace.value == original.trace.value
    assert resumed.trace.log_weight == original.trace.log_weight


def test_replay_divergence_is_reported():
    @lc.program
    def flaky():
        yield lc.sample("x", Bernoulli(0.5))
        if random.random() < 0.5:
            yield lc.sample("y", Bernoulli(0.5))
        else:
            yield lc.sample("z", Bernoulli(0.5))

    engine = Engine(seed=0)
    p = Particle(flaky())
    engine.run([p])
    random.seed(0)
    with pytest.raises(ReplayDivergenceError, match="diverged on replay at site #1"):
        for _ in range(20):  # some replay hits the other branch
            q = p.clone()
            q.trace.done = False
            engine.run([q])


def test_trace_copy_shares_sites():
    engine = Engine(seed=1)
    p = Particle(story([]))
    engine.run([p])
    copy = p.trace.copy()
    assert copy.sites is not p.trace.sites
    assert all(a is b for a, b in zip(copy.sites, p.trace.sites, strict=True))
    assert copy["first"].value == p.trace["first"].value
    assert "first" in copy and len(copy) == 4
    with pytest.raises(KeyError, match="no site 'nope'"):
        copy["nope"]
