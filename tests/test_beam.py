"""Beam search and stochastic beam search (method="beam").

Deterministic checks are exact: a beam at least as wide as the support returns enumeration's
traces in order of joint log-weight; width 1 is greedy decoding; on a tiny random-weight
Hugging Face model the finished beams, their order and their scores equal
``model.generate(num_beams=W)``.

Statistical checks of stochastic beam (Gumbel-top-k) use i.i.d. runs with different seeds:

- ``test_stochastic_k1_is_ancestral``: chi-square (tests/stats.py) of the one sample of 2000
  runs against the exact prior; false-alarm rate <= 1e-3; detects (power 0.9) a sampling
  distribution whose total-variation distance from the prior on the merged cells exceeds the
  bound asserted in the test (0.075).
- ``test_stochastic_k2_ordered_pairs``: chi-square of the ordered pair (first, second by
  perturbed value) of 3000 runs against p(y1) p(y2) / (1 - p(y1)); false-alarm rate <= 1e-3;
  detects TV >= 0.075 on the merged cells (asserted).
- ``test_stochastic_all_zero_is_an_estimate_of_zero``: the mean of 1000 estimates of Z (k = 2;
  about 38% of the runs keep only leaves of weight zero, and estimate 0) must lie within 3
  standard errors of the exact Z (false-alarm rate about 2.7e-3); it detects a relative bias
  of 30% with probability about 0.9 (asserted), and dropping the all-zero runs (what raising
  made callers do) biases it by about +60%.
- ``test_stochastic_expectation_unbiased``: the mean of 1500 Horvitz-Thompson estimates
  (k = 8 of 14 leaves) of E_prior[w f] and of Z must lie within 3 standard errors of the exact value (CLT: false-alarm
  rate about 2.7e-3 each); ``evidence_check`` asserts that a relative bias of 3% (f) and 3%
  (Z) would be detected with probability about 0.9.

Each was run once against deliberately wrong samplers.  Perturbations not conditioned on the
parent's: the pairs test fails (chi2 388 > 61); k = 1 cannot see it (the arg-max of the
children is the same either way) nor, at k = 8 of 14, the expectation test.  Log-probabilities
doubled in the perturbation: k = 1 fails (chi2 644 > 36), pairs fail (chi2 1149 > 61).  The
threshold kappa one place too high (the k-th largest leaf value): the expectation test fails
(mean 13% high, 15 standard errors).  Two generators seeded alike for the perturbations (a
real bug, since fixed): k = 1 failed (chi2 1349 > 36).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch
from pyro.distributions import Bernoulli, Categorical, Normal

import lmcascade as lc
from lmcascade.constraints import forbid
from lmcascade.engine import Engine, Particle
from lmcascade.errors import AllWeightsZeroError, NotEnumerableError, OptionError
from lmcascade.inference import beam as beam_module
from lmcascade.inference.base import PARTICLE_BYTES
from lmcascade.inference.beam import BeamEngine, BeamPolicy, BeamSchedule
from lmcascade.models import ToyLM
from lmcascade.samplers import Greedy, TopK
from programs import LM as TOY
from programs import categorical_prompt, chained_soft, hard_condition
from stats import assert_matches, evidence_check


@pytest.fixture(autouse=True)
def one_thread():
    """These tests make thousands of tiny tensor operations, which a thread pool on a busy
    machine slows a hundredfold; one thread, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- deterministic beam ----------------------------------------------------------------------


def ranked_enumeration(bound):
    """Enumeration's traces of non-zero weight, by joint log-weight, best first."""
    exact = lc.infer(bound, method="enumerate", seed=0)
    pairs = [(lw, t) for lw, t in zip(exact.log_weights, exact.traces, strict=True)]
    return sorted([pt for pt in pairs if pt[0] > -math.inf], key=lambda pt: -pt[0])


@lc.program
def two_sites_with_choice():
    """Two LM sites with a Bernoulli and a Categorical between them (across-site beams)."""
    x = yield lc.gen("x", TOY, "q", max_tokens=2)
    loud = yield lc.sample("loud", Bernoulli(torch.tensor(0.35, dtype=torch.float64)))
    style = yield lc.sample("style", Categorical(torch.tensor([0.5, 0.3, 0.2])))
    y = yield lc.gen("y", TOY, "q" + x + ":" + "abc"[style] * (1 + int(loud)), max_tokens=2)
    return f"{x}|{int(loud)}{style}|{y}"


@pytest.mark.parametrize(
    "prog", [hard_condition, chained_soft, categorical_prompt, two_sites_with_choice]
)
def test_wide_beam_is_exact_top_k(prog):
    exact = ranked_enumeration(prog())
    r = lc.infer(prog(), method="beam", beam_width=len(exact), seed=0)
    assert len(r) == len(exact)
    for (lw, _), score in zip(exact, r.log_weights, strict=True):
        assert abs(score - lw) < 1e-9

    def by_score(pairs):  # equal scores (ties) may come in either order
        return Counter((round(float(lw), 9), v) for lw, v in pairs)

    got = zip(r.log_weights, r.values, strict=True)
    assert by_score((lw, t.value) for lw, t in exact) == by_score(got)
    assert r.weights[0] == max(r.weights)


def test_narrow_beam_across_sites_keeps_true_scores():
    """W=3 over two LM sites and two scalar choices: three distinct traces, best first, each
    scored with its exact joint log-weight (enumeration's), all from one batched call per
    decoding step."""
    exact = {t.value: lw for lw, t in ranked_enumeration(two_sites_with_choice())}
    r = lc.infer(two_sites_with_choice(), method="beam", beam_width=3, seed=0)
    assert len(set(r.values)) == 3
    assert list(r.log_weights) == sorted(r.log_weights, reverse=True)
    for value, score in zip(r.values, r.log_weights, strict=True):
        assert abs(exact[value] - score) < 1e-9
    assert r.stats["model_calls"] <= 4  # two sites of at most 2 tokens


@lc.program
def plain(prompt: str, n: int):
    return (yield lc.gen("x", TOY, prompt, max_tokens=n))


@pytest.mark.parametrize("lp", [0.0, 1.0])
def test_width_one_is_greedy(lp):
    for prompt in ["q", "qa", "qc:"]:
        (p,) = Engine(sampler=Greedy(), seed=0).run([Particle(plain(prompt, 4))])
        r = lc.infer(plain(prompt, 4), method="beam", beam_width=1, length_penalty=lp)
        assert r.values == [p.trace.value]
        assert r.traces[0].sites[0].token_ids == p.trace.sites[0].token_ids


@lc.program
def reversed_by_factor():
    """The model prefers "a"; a factor (and a condition) reverse that."""
    x = yield lc.gen("x", LEANING, "", max_tokens=2)
    yield lc.factor("dislike_a", -5.0 if "a" in x else 0.0)
    yield lc.condition("not_empty", x != "")
    return x


LEANING = ToyLM(["a", "b", "<eos>"], lambda ctx: [2.0, 0.0, -1.0] if not ctx else [-3, -3, 0])


def test_factors_and_conditions_rank_the_beams():
    r = lc.infer(reversed_by_factor(), method="beam", beam_width=2, seed=0)
    assert r.values[0] == "b"  # the LM alone would rank "a" (and "") first
    assert "" not in r.values
    (greedy,) = Engine(sampler=Greedy(), seed=0).run([Particle(reversed_by_factor())])
    assert greedy.trace.value == "a"


def test_length_penalty_and_max_tokens():
    r0 = lc.infer(plain("q", 4), method="beam", beam_width=4, seed=0)
    joint = r0.stats["joint_log_weights"]
    assert list(r0.log_weights) == joint
    r1 = lc.infer(plain("q", 4), method="beam", beam_width=4, length_penalty=1.0, seed=0)
    for trace, score, lw in zip(
        r1.traces, r1.log_weights, r1.stats["joint_log_weights"], strict=True
    ):
        assert abs(score - lw / len(trace.sites[0].token_ids)) < 1e-12
    capped = lc.infer(plain("q", 4), method="beam", beam_width=4, max_tokens=1, seed=0)
    assert all(len(t.sites[0].token_ids) == 1 for t in capped.traces)
    assert {t.sites[0].finish_reason for t in capped.traces} <= {"eos", "max_tokens"}


# --- on the tiny Hugging Face model: the same beams as generate(num_beams=W) ------------------


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("transformers")
    from tiny_hf import tiny_lm

    return tiny_lm(seed=0)


def hf_beams(lm, prompt: str, width: int, n: int, lp: float):
    """Hugging Face's beams: generated ids (through the first eos) and scores."""
    ids = lm.encode_prompt(prompt)
    with torch.inference_mode():
        out = lm.hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            num_beams=width,
            num_return_sequences=width,
            do_sample=False,
            max_new_tokens=n,
            length_penalty=lp,
            early_stopping=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=lm.eos_id,
        )
    seqs = []
    for row in out.sequences.tolist():
        gen = row[len(ids) :]
        seqs.append(tuple(gen[: gen.index(lm.eos_id) + 1] if lm.eos_id in gen else gen))
    if width == 1:  # generate() runs greedy search: score the path from its logits
        steps = zip(out.scores, seqs[0], strict=True)
        lps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in steps]
        return seqs, [sum(lps) / len(lps) ** lp]
    return seqs, out.sequences_scores.tolist()


@pytest.mark.parametrize("width", [1, 2, 4])
def test_matches_hugging_face_beam_search(tiny, width):
    @lc.program
    def one(prompt: str, n: int):
        return (yield lc.gen("x", tiny, prompt, max_tokens=n))

    for lp in [1.0, 0.0, 2.0, -0.5]:
        for prompt, n in [("Q:", 6), ("dd", 10)]:
            want, scores = hf_beams(tiny, prompt, width, n, lp)
            r = lc.infer(one(prompt, n), method="beam", beam_width=width, length_penalty=lp)
            assert [t.sites[0].token_ids for t in r.traces] == want, (prompt, width, lp)
            assert max(abs(a - b) for a, b in zip(scores, r.log_weights, strict=True)) < 1e-4
            assert r.stats["model_calls"] <= n  # one batched call per decoding step


# --- stochastic beam (Gumbel-top-k) -----------------------------------------------------------

SMALL = ToyLM(
    ["a", "b", "<eos>"],
    lambda ctx: [0.4, 0.0, -0.3] if len(ctx) % 2 else [0.0, 0.9, 0.2],
    name="small",
)


@lc.program
def small_prior(n: int = 2):
    """An LM site then a Bernoulli: 7 x 2 = 14 leaves (n=2) or 3 x 2 = 6 (n=1), no weights."""
    x = yield lc.gen("x", SMALL, "", max_tokens=n)
    c = yield lc.sample("c", Bernoulli(torch.tensor(0.3, dtype=torch.float64)))
    return f"{x}/{int(c)}"


def prior_of(bound) -> dict:
    return lc.infer(bound, method="enumerate", seed=0).distribution()


def stochastic(bound, k: int, seed: int):
    return lc.infer(bound, method="beam", beam_width=k, stochastic=True, seed=seed, progress=False)


def test_stochastic_k1_is_ancestral():
    prior = prior_of(small_prior())
    draws = [stochastic(small_prior(), 1, seed).values[0] for seed in range(2000)]
    result = assert_matches(draws, prior)
    assert result.detectable_tv <= 0.075, str(result)


def test_stochastic_k2_ordered_pairs():
    prior = prior_of(small_prior(1))
    pairs = {
        (a, b): pa * pb / (1 - pa) for a, pa in prior.items() for b, pb in prior.items() if a != b
    }
    draws = []
    for seed in range(3000):
        r = stochastic(small_prior(1), 2, seed)
        assert len(r.values) == 2 and r.values[0] != r.values[1]
        draws.append(tuple(r.values))
    result = assert_matches(draws, pairs)
    assert result.detectable_tv <= 0.075, str(result)


def test_stochastic_never_repeats_and_wide_is_exact():
    prior = prior_of(small_prior())
    for seed in range(50):
        r = stochastic(small_prior(), 5, seed)
        assert len(set(r.values)) == len(r.values) == 5
    whole = stochastic(small_prior(), len(prior), 0)  # k >= support: every leaf, q = 1
    assert whole.stats["threshold"] == -math.inf and sorted(whole.values) == sorted(prior)
    assert abs(whole.expectation(lambda v: v.endswith("1")) - 0.3) < 1e-12


TRAP = ToyLM(
    ["a", "b", "c", "<eos>"],
    lambda ctx: [0.0, 1.2, 0.3, -0.4] if not ctx or ctx[-1] == 0 else [0.5, -1.0, 0.0, 0.2],
    name="trap",
)


@lc.program
def weighted_small():
    """A constrained LM site (its p/q is an importance weight: the process draws from the
    masked q), a Bernoulli, a factor and a condition: 13 leaves of non-zero weight."""
    x = yield lc.gen("x", TRAP, "", max_tokens=2, constraint=forbid("b"))
    c = yield lc.sample("c", Bernoulli(torch.tensor(0.4, dtype=torch.float64)))
    yield lc.factor("likes_a", 0.7 * x.count("a") - 0.5 * int(c))
    yield lc.condition("not_cc1", not (x == "cc" and c))
    return f"{x}/{int(c)}"


def test_stochastic_expectation_unbiased():
    """HT estimates of E_prior[w f] (and exp(log_evidence), of Z) are unbiased."""
    exact = lc.infer(weighted_small(), method="enumerate", seed=0)

    def f(v) -> float:
        return 1.0 + v.count("a") + 2 * v.count("c")

    pairs = zip(exact.log_weights, exact.traces, strict=True)
    want_f = math.fsum(math.exp(lw) * f(t.value) for lw, t in pairs if lw > -math.inf)
    want_z = math.exp(exact.log_evidence)
    est_f, est_z = [], []
    for seed in range(1500):
        r = stochastic(weighted_small(), 8, seed)
        est_f.append(r.expectation(f))
        est_z.append(math.exp(r.log_evidence))
    evidence_check(est_f, want_f, max_detectable=0.03)
    evidence_check(est_z, want_z, max_detectable=0.03)


def test_expectation_of_an_ordinary_result_is_self_normalised():
    exact = lc.infer(chained_soft(), method="enumerate", seed=0)
    want = sum(w * len(v) for v, w in exact.distribution().items())
    assert abs(exact.expectation(len) - want) < 1e-12


# --- hostile input ----------------------------------------------------------------------------


@pytest.mark.parametrize("width", [0, -1, 1.5, True, "4", None, 10**15])
def test_bad_beam_width(width):
    with pytest.raises(OptionError, match="beam_width"):
        lc.infer(plain("q", 2), method="beam", beam_width=width)


@pytest.mark.parametrize("lp", [math.nan, math.inf, "1", None, True, 1000, -700, 100.5, -1e300])
def test_bad_length_penalty(lp):
    with pytest.raises(OptionError, match="length_penalty must be a number from -100 to 100"):
        lc.infer(plain("q", 2), method="beam", length_penalty=lp)


@pytest.mark.parametrize("lp", [100, -100, 99.5])
def test_extreme_length_penalty_gives_finite_scores(lp, monkeypatch):
    """At the ends of the range the search runs, and a score beyond a float's range (a very
    long trace) is the largest float of its sign, never an OverflowError or a NaN."""
    r = lc.infer(plain("q", 4), method="beam", beam_width=3, length_penalty=lp, seed=0)
    assert len(r) == 3 and all(math.isfinite(s) for s in r.log_weights)
    assert list(r.log_weights) == sorted(r.log_weights, reverse=True)
    schedule = BeamSchedule(2, float(lp))
    p = Particle(plain("q", 4))
    p.trace = r.traces[0].copy()
    for length in [1, 2, 10**6, 10**300]:
        monkeypatch.setattr(beam_module, "generated_tokens", lambda _, n=length: n)
        score = schedule.final_score(p)
        assert math.isfinite(score) and score <= 0, (length, score)


def test_other_bad_options():
    with pytest.raises(OptionError, match="max_tokens"):
        lc.infer(plain("q", 2), method="beam", max_tokens=0)
    with pytest.raises(OptionError, match="stochastic"):
        lc.infer(plain("q", 2), method="beam", stochastic="yes")
    with pytest.raises(OptionError, match="length_penalty"):
        lc.infer(plain("q", 2), method="beam", stochastic=True, length_penalty=1.0)
    with pytest.raises(OptionError, match="beam_wdith"):
        lc.infer(plain("q", 2), method="beam", beam_wdith=2)


@lc.program
def continuous():
    x = yield lc.gen("x", TOY, "q", max_tokens=1)
    z = yield lc.sample("noise", Normal(0.0, 1.0))
    return x, float(z)


@pytest.mark.parametrize("stoch", [False, True])
def test_continuous_site_is_named(stoch):
    with pytest.raises(NotEnumerableError, match="'noise'.*smc"):
        lc.infer(continuous(), method="beam", stochastic=stoch, seed=0)


@lc.program
def impossible():
    x = yield lc.gen("x", TOY, "q", max_tokens=2)
    yield lc.condition("never", len(x) > 5)
    return x


def test_every_beam_dies():
    """Deterministic beam raises, and says the narrow search may have pruned what a wider
    one (or enumeration) would find — not that the condition can never be met."""
    with pytest.raises(AllWeightsZeroError, match="beam_width=3") as err:
        lc.infer(impossible(), method="beam", beam_width=3, seed=0)
    text = str(err.value)
    assert "'never'" in text and "pruned" in text and "never satisfied" not in text
    assert err.value.traces and all(t.log_weight == -math.inf for t in err.value.traces)


def test_stochastic_every_leaf_dead_is_a_result():
    r = lc.infer(impossible(), method="beam", beam_width=3, stochastic=True, seed=0)
    assert len(r) == 3 and r.values == [lc.REJECTED] * 3 and r.num_rejected == 3
    assert r.log_evidence == -math.inf and r.expectation(lambda v: 1.0) == 0.0
    assert r.stats["zero_weight_traces"] == 3 and r.distribution() == {} and r.best() is None
    data = json.loads(r.to_json(), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    assert data["log_evidence"] == "-inf" and all(t["rejected"] for t in data["traces"])


FLAT = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, -1.0], name="flat")


@lc.program
def two_as():
    x = yield lc.gen("x", FLAT, "", max_tokens=3)
    yield lc.condition("two_a", x.count("a") >= 2)
    return x


def test_stochastic_all_zero_is_an_estimate_of_zero():
    """With k = 2 about 38% of the runs keep only failed leaves: each is a result estimating
    0 (never an error), and the estimates, zeros included, are unbiased for Z."""
    z = math.exp(lc.infer(two_as(), method="enumerate").log_evidence)
    estimates, all_dead = [], 0
    for seed in range(1000):
        r = stochastic(two_as(), 2, seed)
        assert len(r) == 2 and r.stats["zero_weight_traces"] == r.num_rejected
        if r.num_rejected == 2:
            all_dead += 1
            assert r.log_evidence == -math.inf and r.expectation(len) == 0.0
            assert r.values == [lc.REJECTED, lc.REJECTED]
        estimates.append(math.exp(r.log_evidence))
    assert 250 < all_dead < 500
    evidence_check(estimates, z, max_detectable=0.3)


def test_stochastic_dead_leaves_hold_their_place():
    """A leaf whose condition failed is one of the k samples: it stays in the result with
    weight zero (REJECTED), and the estimates count it as a zero."""
    for seed in range(20):
        r = stochastic(hard_condition(), 3, seed)
        assert len(r) == 3 and r.stats["num_traces"] == 3
        dead = [lw == -math.inf for lw in r.log_weights]
        assert r.stats["zero_weight_traces"] == sum(dead) == r.num_rejected
        for v, d in zip(r.values, dead, strict=True):
            assert (v is lc.REJECTED) if d else ("a" in v)
        assert len(r.stats["inclusion_log_probs"]) == len(r.stats["perturbed"]) == 3


# --- the children of a step: the 2W best (beam, token) pairs overall ---------------------------


def noisy(vocab: int, seed: int):
    """Next-token scores that depend on the whole context, without ties."""

    def scores(ctx):
        g = random.Random(hash((seed, *ctx)))
        return [g.gauss(0.0, 2.0) for _ in range(vocab)]

    return scores


class Counting(ToyLM):
    """A ToyLM that counts its forks and the rows of each call."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.forks, self.rows = 0, []

    def fork(self, context):
        self.forks += 1
        return super().fork(context)

    def next_logprobs(self, contexts):
        self.rows.append(len(contexts))
        return super().next_logprobs(contexts)


WORDS = [f"w{i}" for i in range(11)] + ["<eos>"]
NOISY_A = ToyLM(WORDS, noisy(12, 1), name="noisy_a")
NOISY_B = ToyLM(WORDS, noisy(12, 2), name="noisy_b")


@lc.program
def two_models():
    """Beams at two models in the same step (a Bernoulli picks the model)."""
    c = yield lc.sample("which", Bernoulli(torch.tensor(0.4, dtype=torch.float64)))
    x = yield lc.gen("x", NOISY_B if c else NOISY_A, "", max_tokens=3)
    return f"{int(c)}:{x}"


@lc.program
def two_noisy_sites():
    x = yield lc.gen("x", NOISY_A, "", max_tokens=2)
    y = yield lc.gen("y", NOISY_A, x + "w0", max_tokens=2)
    return x + "|" + y


@lc.program
def one_noisy_site():
    return (yield lc.gen("x", NOISY_B, "", max_tokens=4))


def full_expansion(bound, width: int, lp: float):
    """The reference: every child of every beam becomes a candidate and only the schedule
    cuts (the search before the sampler kept the 2W best per call)."""
    engine = BeamEngine(BeamPolicy(), TopK(10**9), seed=0)
    schedule = BeamSchedule(width, lp)
    schedule.absorb(engine.run([Particle(bound)], schedule))
    return [(p.trace.value, s) for s, p in schedule.hypotheses]


@pytest.mark.parametrize("prog", [one_noisy_site, two_models, two_noisy_sites])
@pytest.mark.parametrize("width", [1, 3, 5])
def test_cutting_in_the_sampler_loses_no_candidate(prog, width):
    """Keeping the 2W best (beam, token) pairs of each model call before forking gives the
    same beams, order and scores as letting every child of every beam compete."""
    for lp in [0.0, 1.0]:
        want = full_expansion(prog(), width, lp)
        r = lc.infer(prog(), method="beam", beam_width=width, length_penalty=lp, seed=0)
        assert [(t.value, s) for t, s in zip(r.traces, r.log_weights, strict=True)] == want


@pytest.mark.parametrize("stoch", [False, True])
def test_a_step_creates_at_most_2w_children(stoch):
    """W beams of a 40-token model: each call has at most W rows and creates at most 2W
    children in all (stochastic: W), not 2W per beam."""
    w = 4
    lm = Counting([f"t{i}" for i in range(39)] + ["<eos>"], noisy(40, 3), name="counting")

    @lc.program
    def long_site():
        return (yield lc.gen("x", lm, "", max_tokens=6))

    r = lc.infer(long_site(), method="beam", beam_width=w, stochastic=stoch, seed=0)
    children = w if stoch else 2 * w
    calls = r.stats["model_calls"]
    assert calls == len(lm.rows) == 6 and max(lm.rows) <= w
    assert r.stats["tokens_generated"] <= children * calls
    assert lm.forks <= (children - 1) * calls  # the first child of a run takes the run itself
    assert r.stats["zero_weight_traces"] == 0  # runs cut by rank are not counted as dead


def test_memory_check_counts_the_particles_held(monkeypatch):
    """The option check counts what a step holds (2W candidates and W finished traces)."""
    w = 1000
    from lmcascade.inference import base

    monkeypatch.setattr(base, "available_memory", lambda device="cpu": 2 * w * PARTICLE_BYTES)
    with pytest.raises(OptionError, match="beam_width=1,000 holds up to 3,000 particles"):
        lc.infer(plain("q", 2), method="beam", beam_width=w)
    r = lc.infer(plain("q", 2), method="beam", beam_width=w, stochastic=True, seed=0)
    assert len(r) >= 1  # 2W particles fit


# --- potentials only steer SMC ------------------------------------------------------------------


def likes_b(text: str) -> float:
    return 4.0 * text.count("b")


@lc.program
def steered(potential):
    return (yield lc.gen("x", LEANING, "", max_tokens=3, potential=potential))


@pytest.mark.parametrize("width", [1, 2, 4])
def test_potentials_do_not_steer_beam(width):
    """A site's potential leaves beam's ranking alone: the same beams and scores as without
    it, and W = 1 is greedy decoding."""
    plain_r = lc.infer(steered(None), method="beam", beam_width=width, seed=0)
    r = lc.infer(steered(likes_b), method="beam", beam_width=width, seed=0)
    assert r.values == plain_r.values and list(r.log_weights) == list(plain_r.log_weights)
    if width == 1:
        (greedy,) = Engine(sampler=Greedy(), seed=0).run([Particle(steered(likes_b))])
        assert r.values == [greedy.trace.value] and "b" not in greedy.trace.value
    s0 = stochastic(steered(None), width, 7)
    s1 = stochastic(steered(likes_b), width, 7)
    assert s0.values == s1.values and list(s0.log_weights) == list(s1.log_weights)


# --- the result as JSON ---------------------------------------------------------------------------


def test_json_records_the_estimator_and_the_result_weights():
    s = stochastic(weighted_small(), 4, 3)
    data = json.loads(s.to_json())
    assert data["estimator"] == "horvitz-thompson"
    got = [float(t["result_log_weight"]) for t in data["traces"]]
    assert got == list(s.log_weights)
    own = [float(t["log_weight"]) for t in data["traces"]]
    assert own == [t.log_weight for t in s.traces] and own != got  # the trace's own weight
    d = lc.infer(plain("q", 3), method="beam", beam_width=2, length_penalty=1.0, seed=0)
    data = d.to_dict()
    assert "estimator" not in data  # the default is left out
    assert [t["result_log_weight"] for t in data["traces"]] == list(d.log_weights)
