"""Result API, method options and errors, seeds, and the engine's batching contract."""

import json
import math

import pytest
import torch
from pyro.distributions import Bernoulli, Normal

import lmcascade as lc
from lmcascade.errors import (
    AllWeightsZeroError,
    InferenceError,
    NothingAcceptedError,
    OptionError,
    ProgramError,
    UnknownMethodError,
)
from lmcascade.models import ToyLM
from programs import LM, PROGRAMS


@lc.program
def never():
    text = yield lc.gen("text", LM, "q", max_tokens=2)
    yield lc.condition("impossible", "q" in text)
    return text


def test_same_seed_same_result():
    prog = PROGRAMS["chained_soft"]()
    for method in ("forward", "importance", "rejection"):
        opts = {"max_log_weight": 0.5} if method == "rejection" else {}
        a = lc.infer(prog, method=method, num_samples=50, seed=7, **opts)
        b = lc.infer(prog, method=method, num_samples=50, seed=7, **opts)
        c = lc.infer(prog, method=method, num_samples=50, seed=8, **opts)
        assert a.values == b.values and list(a.log_weights) == list(b.log_weights)
        assert a.values != c.values


def test_seedless_run_records_its_seed():
    prog = PROGRAMS["hard_condition"]()
    r = lc.infer(prog, method="forward", num_samples=20)
    again = lc.infer(prog, method="forward", num_samples=20, seed=r.stats["seed"])
    assert r.values == again.values


def test_result_fields_and_helpers():
    r = lc.infer(PROGRAMS["observe_bernoulli"](), method="importance", num_samples=200, seed=0)
    assert r.weights.dtype.name == "float64" and math.isclose(r.weights.sum(), 1.0)
    assert len(r.values) == len(r.traces) == len(r.log_weights) == 200
    dist = r.distribution()
    probs = list(dist.values())
    assert probs == sorted(probs, reverse=True) and math.isclose(sum(probs), 1.0)
    assert r.best() == next(iter(dist))
    assert 1 <= r.ess <= 200
    s1, s2 = r.sample(30, seed=1), r.sample(30, seed=1)
    assert s1 == s2 and set(s1) <= set(dist)
    for key in ("model_calls", "tokens_generated", "wall_time_s", "seed"):
        assert key in r.stats
    table = r.summary()
    assert "importance" in table and repr(r.best()) in table and "ESS" in table
    data = json.loads(r.to_json())
    assert data["method"] == "importance" and len(data["traces"]) == 200
    assert data["traces"][0]["sites"][0]["name"] == "text"


def test_distribution_merges_unhashable_values():
    @lc.program
    def listy():
        x = yield lc.sample("x", Bernoulli(0.5))
        return [int(x), "fixed"]

    r = lc.infer(listy(), method="enumerate")
    assert len(r.distribution()) == 2


def test_rejection_errors():
    with pytest.raises(NothingAcceptedError, match="'impossible'"):
        lc.infer(never(), method="rejection", num_samples=5, max_attempts=200, seed=0)
    with pytest.raises(InferenceError, match="max_log_weight"):
        lc.infer(PROGRAMS["chained_soft"](), method="rejection", num_samples=5, seed=0)
    with pytest.raises(OptionError, match="max_log_weight"):
        lc.infer(
            PROGRAMS["chained_soft"](),
            method="rejection",
            num_samples=50,
            seed=0,
            max_log_weight=-5.0,
        )


def test_rejection_partial_result_keeps_what_was_accepted():
    r = lc.infer(
        PROGRAMS["hard_condition"](), method="rejection", num_samples=1000, max_attempts=100, seed=0
    )
    assert 0 < len(r.values) < 1000
    assert r.stats["shortfall"] == 1000 - len(r.values)
    assert r.stats["attempts"] == 100


def test_forward_and_importance_all_zero():
    for method in ("forward", "importance"):
        with pytest.raises(AllWeightsZeroError, match="'impossible'"):
            lc.infer(never(), method=method, num_samples=20, seed=0)


def test_option_and_method_errors():
    prog = PROGRAMS["hard_condition"]()
    with pytest.raises(UnknownMethodError, match="available: .*enumerate"):
        lc.infer(prog, method="magic")
    with pytest.raises(OptionError, match="no option 'particles'.*num_samples"):
        lc.infer(prog, method="forward", particles=3)
    with pytest.raises(OptionError, match="num_samples"):
        lc.infer(prog, method="forward", num_samples=0)
    with pytest.raises(OptionError, match="proposal"):
        lc.infer(prog, method="importance", proposal="nope")
    with pytest.raises(ProgramError, match="Call the program"):
        lc.infer(PROGRAMS["hard_condition"], method="forward")


def test_proposal_must_only_sample_target_sites():
    @lc.program
    def extra_site():
        yield lc.sample("unrelated", Bernoulli(0.5))

    @lc.program
    def weighted():
        yield lc.factor("w", 1.0)

    prog = PROGRAMS["hard_condition"]()
    with pytest.raises(OptionError, match="'unrelated'"):
        lc.infer(prog, method="importance", proposal=extra_site(), num_samples=5, seed=0)
    with pytest.raises(OptionError, match="factor site 'w'"):
        lc.infer(prog, method="importance", proposal=weighted(), num_samples=5, seed=0)


def test_continuous_choices_work_with_sampling_methods():
    @lc.program
    def gauss():
        x = yield lc.sample("x", Normal(0.0, 1.0))
        yield lc.observe("y", Normal(x, 1.0), 1.0)
        return x

    r = lc.infer(gauss(), method="importance", num_samples=4000, seed=0)
    mean = float(sum(w * v for w, v in zip(r.weights, r.values, strict=True)))
    assert abs(mean - 0.5) < 0.1  # posterior mean of a conjugate normal: 0.5
    assert abs(r.log_evidence - Normal(0.0, math.sqrt(2.0)).log_prob(torch.tensor(1.0))) < 0.05


def test_one_batched_call_per_decoding_step():
    """1,000 traces of two 20-token sites cost about 40 batched model calls, not 40,000."""
    calls = []

    def scores(ctx):
        return [0.0, 0.0, 0.0, -math.inf, -math.inf, -math.inf if len(ctx) < 45 else 0.0]

    lm = ToyLM(["a", "b", "c", "q", ":", "<eos>"], scores)
    original = lm.next_logprobs

    def counting(contexts):
        calls.append(len(contexts))
        return original(contexts)

    lm.next_logprobs = counting

    @lc.program
    def two_sites():
        x = yield lc.gen("x", lm, "q", max_tokens=20)
        y = yield lc.gen("y", lm, "q" + x, max_tokens=20)
        return y

    r = lc.infer(two_sites(), method="forward", num_samples=1000, seed=0)
    assert len(calls) == 40 and all(n == 1000 for n in calls)
    assert r.stats["model_calls"] == 40 and r.stats["tokens_generated"] == 40_000
