"""What a new user hits first (issue: first contact): structured values read back as returned,
errors that show what happened, method and option names that survive a switch."""

import json

import pytest

import lmcascade as lc
from lmcascade.errors import (
    AllWeightsZeroError,
    NothingAcceptedError,
    OptionError,
    ProgramError,
    UnknownMethodError,
)
from programs import LM, hard_condition


@lc.program
def pair():
    x = yield lc.gen("x", LM, "", max_tokens=1)
    return [x, 2]


def test_structured_values_come_back_as_returned():
    r = lc.infer(pair(), method="enumerate")
    best = r.best()
    assert isinstance(best, list) and best[1] == 2
    assert all(isinstance(key.value, list) for key in r.distribution())
    data = json.loads(r.to_json())
    assert all(isinstance(d["value"], list) for d in data["distribution"])  # written once
    assert all(isinstance(t["value"], list) for t in data["traces"])


@lc.program
def never():
    x = yield lc.gen("x", LM, "", max_tokens=2)
    yield lc.condition("never", False)
    return x


def test_a_zero_weight_error_shows_what_the_traces_held():
    with pytest.raises(AllWeightsZeroError, match=r"The first traces held: \{x=") as caught:
        lc.infer(never(), method="forward", num_samples=5, seed=0)
    assert len(caught.value.traces) == 5
    assert all("x" in t for t in caught.value.traces)


def test_rejection_that_accepts_nothing_keeps_the_traces():
    with pytest.raises(NothingAcceptedError) as caught:
        lc.infer(never(), method="rejection", num_samples=2, max_attempts=6, seed=0)
    assert caught.value.traces and "x" in caught.value.traces[0]


@lc.program
def forgot_yield():
    yield lc.factor("start", 0.0)
    text = lc.gen("text", LM, "", max_tokens=2)  # no yield: an effect, not a text
    return text + "!"


def test_a_missing_yield_gets_a_hint():
    with pytest.raises(ProgramError, match="did you forget `yield`"):
        lc.infer(forgot_yield(), method="forward", num_samples=2, seed=0)


def test_method_names_ignore_case_and_suggest():
    r = lc.infer(hard_condition(), method="Enumerate")
    assert r.method == "enumerate"
    with pytest.raises(UnknownMethodError, match="did you mean 'forward'"):
        lc.infer(hard_condition(), method="forwrd")


def test_num_samples_works_for_smc_too():
    r = lc.infer(hard_condition(), method="smc", num_samples=9, seed=0, progress=False)
    assert len(r) == 9 and r.options["particles"] == 9
    with pytest.raises(OptionError, match="name the same option"):
        lc.infer(hard_condition(), method="smc", num_samples=9, particles=8)
    same = lc.infer(hard_condition(), method="smc", particles=9, seed=0, progress=False)
    assert same.values == r.values


def test_smc_reports_the_ess_before_its_final_resample():
    r = lc.infer(
        hard_condition(), method="smc", particles=12, ess_threshold=1.0, seed=0, progress=False
    )
    last = r.genealogy[-1]
    assert r.ess == r.stats["ess"][-1] < 12  # not 12 for 12 copies
    assert r.stats["distinct_traces"] == len(set(last)) < 12
    assert len(set(r.log_weights.tolist())) == 1  # equal weights after it


def test_summary_stats_fit_on_a_line():
    r = lc.infer(hard_condition(), method="smc", particles=12, seed=0, progress=False)
    stats_line = r.summary().splitlines()[-1]
    assert "ess=[" in stats_line and "values, last" in stats_line and len(stats_line) < 400


def test_enumerating_a_full_vocabulary_fails_before_the_next_forward_pass():
    from tiny_hf import tiny_lm

    lm = tiny_lm()  # 8 tokens, every one with some probability

    @lc.program
    def long(n):
        return (yield lc.gen("answer", lm, "ab", max_tokens=n))

    calls = []
    forward = lm.hf.forward
    lm.hf.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    with pytest.raises(lc.errors.TooManyTracesError, match=r"site 'answer'.*up to 8\^4"):
        lc.infer(long(6), method="enumerate", max_traces=1000)
    # the third level holds about 400 contexts; the fourth (3,000) would pass max_traces, so the
    # run stops after three passes instead of computing a level it cannot keep
    assert len(calls) == 3
    assert len(lc.infer(long(3), method="enumerate", max_traces=1000)) > 0  # 8^3 fits


def test_all_weights_zero_from_a_tool_says_so():
    """When every trace died in a failing tool, the error says which tool and what it raised,
    not that a condition was never satisfied."""
    from pyro.distributions import Bernoulli

    @lc.program
    def parse():
        x = yield lc.sample("x", Bernoulli(0.5))
        n = yield lc.call("to_int", int, "" if x else "x")
        return n

    with pytest.raises(lc.errors.AllWeightsZeroError) as caught:
        lc.infer(parse(), method="forward", num_samples=4, seed=0)
    message = str(caught.value)
    assert "tool call 'to_int' failed in 4 of them" in message
    assert "ValueError: invalid literal for int()" in message
    assert "condition is never satisfied" not in message
