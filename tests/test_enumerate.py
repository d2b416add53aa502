"""Exact enumeration against probabilities computed by hand."""

import math

import pytest
import torch
from pyro.distributions import Bernoulli, Categorical

import lmcascade as lc
from lmcascade.errors import AllWeightsZeroError, NotEnumerableError, TooManyTracesError
from lmcascade.models import ToyLM

# A context-free model: P(a) = .5, P(b) = .3, P(eos) = .2 at every step.
FIXED = ToyLM(["a", "b", "<eos>"], lambda ctx: [math.log(0.5), math.log(0.3), math.log(0.2)])


def gen_program(**params):
    @lc.program
    def prog():
        text = yield lc.gen("t", FIXED, "", **params)
        return text

    return prog()


def exact(prog):
    return lc.infer(prog, method="enumerate").distribution()


def assert_dist(got, want):
    assert set(got) == set(want), (got, want)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k


def test_unconstrained_two_tokens():
    # Hand-computed: eos first .2; one token then eos; two tokens hit max_tokens.
    want = {"": 0.2, "a": 0.5 * 0.2, "b": 0.3 * 0.2, "aa": 0.25, "ab": 0.15, "ba": 0.15, "bb": 0.09}
    assert_dist(exact(gen_program(max_tokens=2)), want)


def test_hard_condition_posterior_and_evidence():
    @lc.program
    def prog():
        text = yield lc.gen("t", FIXED, "", max_tokens=2)
        yield lc.condition("has_a", "a" in text)
        return text

    r = lc.infer(prog(), method="enumerate")
    z = 0.1 + 0.25 + 0.15 + 0.15
    assert r.log_evidence == pytest.approx(math.log(z))
    assert_dist(r.distribution(), {"a": 0.1 / z, "aa": 0.25 / z, "ab": 0.15 / z, "ba": 0.15 / z})


def test_stop_string_cuts_text():
    # With stop "b": "ab" -> "a", "ba"/"bb"/"b" -> "".
    want = {"": 0.2 + 0.3, "a": 0.1 + 0.15, "aa": 0.25}
    assert_dist(exact(gen_program(max_tokens=2, stop="b")), want)


def test_top_k_top_p_temperature():
    assert_dist(exact(gen_program(max_tokens=2, top_k=1)), {"aa": 1.0})
    assert_dist(exact(gen_program(max_tokens=2, temperature=0)), {"aa": 1.0})
    # top_p=0.6 keeps a (.5) and b (.3): renormalised .625 / .375, eos never drawn.
    a, b = 0.625, 0.375
    want = {"aa": a * a, "ab": a * b, "ba": b * a, "bb": b * b}
    assert_dist(exact(gen_program(max_tokens=2, top_p=0.6)), want)
    # temperature 2 flattens: p ~ sqrt(p).
    s = math.sqrt(0.5) + math.sqrt(0.3) + math.sqrt(0.2)
    pa, pb, pe = math.sqrt(0.5) / s, math.sqrt(0.3) / s, math.sqrt(0.2) / s
    got = exact(gen_program(max_tokens=1, temperature=2.0))
    assert_dist(got, {"": pe, "a": pa, "b": pb})


def test_min_tokens_masks_eos_early():
    a, b = 0.5 / 0.8, 0.3 / 0.8  # eos masked at the first token, the rest renormalised
    want = {"a": a * 0.2, "b": b * 0.2, "aa": a * 0.5, "ab": a * 0.3, "ba": b * 0.5, "bb": b * 0.3}
    assert_dist(exact(gen_program(max_tokens=2, min_tokens=1)), want)
    assert lc.LM(FIXED, "", max_tokens=2, min_tokens=1).log_prob("") == -math.inf


def test_lm_log_prob_matches_enumeration():
    for params in (
        {"max_tokens": 3, "min_tokens": 2},
        {"max_tokens": 2},
        {"max_tokens": 3, "stop": "b"},
        {"max_tokens": 2, "top_p": 0.6},
    ):
        dist = lc.LM(FIXED, "", **params)
        for text, p in exact(gen_program(**params)).items():
            assert math.exp(dist.log_prob(text)) == pytest.approx(p, abs=1e-12), (params, text)


def test_categorical_and_bernoulli_sites():
    @lc.program
    def prog():
        c = yield lc.sample("c", Categorical(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)))
        coin = yield lc.sample("coin", Bernoulli(torch.tensor(0.25, dtype=torch.float64)))
        yield lc.condition("not_both", not (c == 2 and coin == 1))
        return (c, int(coin))

    r = lc.infer(prog(), method="enumerate")
    z = 1 - 0.5 * 0.25
    want = {
        (c, k): pc * (0.25 if k else 0.75) / z
        for c, pc in enumerate([0.2, 0.3, 0.5])
        for k in (0, 1)
        if not (c == 2 and k == 1)
    }
    assert_dist(r.distribution(), want)
    assert r.log_evidence == pytest.approx(math.log(z))


def test_factor_and_observe_weights():
    @lc.program
    def prog():
        c = yield lc.sample("c", Bernoulli(torch.tensor(0.5, dtype=torch.float64)))
        yield lc.factor("bonus", 1.0 if c else 0.0)
        yield lc.observe("o", Bernoulli(torch.tensor(0.8 if c else 0.4, dtype=torch.float64)), 1)
        return int(c)

    r = lc.infer(prog(), method="enumerate")
    w1, w0 = 0.5 * math.e * 0.8, 0.5 * 0.4
    assert_dist(r.distribution(), {1: w1 / (w1 + w0), 0: w0 / (w1 + w0)})
    assert r.log_evidence == pytest.approx(math.log(w1 + w0))


def test_observe_lm_site():
    @lc.program
    def prog():
        c = yield lc.sample("c", Bernoulli(torch.tensor(0.5, dtype=torch.float64)))
        yield lc.observe("said", lc.LM(FIXED, "", max_tokens=2, top_k=1 if c else None), "aa")
        return int(c)

    r = lc.infer(prog(), method="enumerate")
    # "aa" has probability 1 under greedy decoding and .25 otherwise.
    assert_dist(r.distribution(), {1: 1 / 1.25, 0: 0.25 / 1.25})


def test_max_traces_exceeded_names_budget():
    with pytest.raises(TooManyTracesError, match="max_traces=10"):
        lc.infer(gen_program(max_tokens=5), method="enumerate", max_traces=10)


def test_never_satisfied_condition():
    @lc.program
    def prog():
        text = yield lc.gen("t", FIXED, "", max_tokens=2)
        yield lc.condition("has_c", "c" in text)
        return text

    with pytest.raises(AllWeightsZeroError, match="has_c"):
        lc.infer(prog(), method="enumerate")


def test_continuous_site_is_not_enumerable():
    from pyro.distributions import Normal

    @lc.program
    def prog():
        x = yield lc.sample("x", Normal(0.0, 1.0))
        return x

    with pytest.raises(NotEnumerableError, match="'x'"):
        lc.infer(prog(), method="enumerate")
