"""Arithmetic sampling (forward, codes="arithmetic") and priority sampling, against enumeration.

Statistical tests follow tests/stats.py: each states its false-alarm rate and the smallest
error it detects with probability 0.9.  Draws are made i.i.d. before testing: arithmetic
samples of one run share a code, so a test pools *the j-th sample of many runs* (different
seeds, hence independent shared uniforms), never several samples of one run.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch
from pyro.distributions import Categorical, Normal

import lmcascade as lc
from lmcascade.engine import Engine, Particle
from lmcascade.errors import AllWeightsZeroError, NotEnumerableError, OptionError
from lmcascade.models import ToyLM
from lmcascade.samplers import Greedy
from lmcascade.samplers.arithmetic import Arithmetic, codes, decode
from programs import LM, categorical_prompt, hard_condition, trap_chain
from stats import ALPHA, assert_matches


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests step tiny batches thousands of times: torch's intra-op threads only add
    contention there (ten times slower on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- programs ------------------------------------------------------------------------------


@lc.program
def chained_prior(temperature: float = 1.0):
    """Two LM sites, the second prompted by the first (no weights: its values follow the prior)."""
    x = yield lc.gen("x", LM, "q", max_tokens=2, temperature=temperature)
    y = yield lc.gen("y", LM, "q" + x + ":", max_tokens=2, temperature=temperature)
    return x + "|" + y


PEAKED = ToyLM(
    ["a", "b", "c", "<eos>"], lambda ctx: [3.0, 1.0, 0.0, 1.0 if ctx else -9.0], name="peaked"
)


@lc.program
def peaked():
    """A peaked model: "aaaaaa" has probability 0.21, so independent samples repeat a lot."""
    return (yield lc.gen("w", PEAKED, "", max_tokens=6))


def run(program, seed, n=8, codes="arithmetic", **options):
    return lc.infer(
        program, method="forward", codes=codes, num_samples=n, seed=seed, progress=False, **options
    )


def exact(program) -> dict:
    return lc.infer(program, method="enumerate", progress=False).distribution()


def duplicates(result) -> int:
    return len(result.traces) - len({t.value for t in result.traces})


# --- arithmetic sampling: exactness --------------------------------------------------------

RUNS = 2000  # seeds pooled by the marginal tests


@pytest.fixture(scope="module")
def chained_runs():
    return [[t.value for t in run(chained_prior(), seed).traces] for seed in range(RUNS)]


@pytest.mark.parametrize("j", [0, 5])
def test_arithmetic_each_sample_is_marginally_exact(chained_runs, j):
    """Sample j of 8 (one code of the shared offset), pooled over 2000 seeds: i.i.d. draws that
    must follow the exact prior of a two-site program (chi-square, stats.assert_matches).
    False-alarm rate <= 1e-3 per j (stats.ALPHA); power 0.9 against any sampling error of TV
    >= 0.095 on the merged cells (asserted <= 0.1).  Deliberately wrong samplers fail it:
    codes never rescaled (the same code reused for every token) and codes without the shared
    uniform (u = 0, 300 seeds) and a biased one (u uniform on [0, 0.9)) are rejected: chi2 =
    22,145, 360 and 294 against critical values 118, 38 and 118."""
    result = assert_matches([values[j] for values in chained_runs], exact(chained_prior()))
    assert result.detectable_tv <= 0.1, str(result)


def populations(program, groups: int, n: int, seed: int = 0, stats: dict | None = None) -> list:
    """``groups`` arithmetic populations of ``n`` (each with its own shared uniform) run in one
    engine, so every decoding step is one batched model call for all of them; their traces
    (and the engine's counters in ``stats``)."""
    rng = np.random.default_rng(seed)
    particles = []
    for _ in range(groups):
        for code in codes(n, float(rng.random())):
            p = Particle(program)
            p.tag = code
            particles.append(p)
    engine = Engine(sampler=Arithmetic(), seed=seed)
    done = engine.run(particles)
    if stats is not None:
        stats.update(engine.stats)
    return [[p.trace for p in done[g * n : (g + 1) * n]] for g in range(groups)]


def test_arithmetic_weights_exact_under_a_constraint():
    """Under a hard constraint the tokens are drawn from the masked q and weighted p/q (the
    allowed mass, at most 1).  Sample j = 2 of 3 from 5000 populations (independent shared
    uniforms), kept with probability exp(log_weight): exact i.i.d. posterior draws (about 2000)
    when samples and weights are right.  Chi-square: false-alarm rate <= 1e-3; detects TV >=
    0.084 with probability 0.9 (asserted <= 0.09).  Ignoring the weights (keeping all 5000
    samples) fails it: chi2 = 13,600 against a critical value of 75."""
    rng = np.random.default_rng(1)
    draws = []
    for traces in populations(trap_chain(), 5000, 3):
        if rng.random() < math.exp(traces[2].log_weight):
            draws.append(traces[2].value)
    result = assert_matches(draws, exact(trap_chain()))
    assert result.detectable_tv <= 0.09, str(result)


def test_arithmetic_population_estimates_the_posterior():
    """The whole population's weighted estimate, on a program with a hard condition.  Per run
    (N = 32) the unnormalised mass m(x) = mean_i w_i 1{x_i = x} has expectation Z pi(x) exactly
    (each sample is marginally exact), so over 300 seeds the mean of m(x) is within z standard
    errors of Z pi(x) for the K cells (values of posterior probability >= 0.03, the rest
    pooled) and for Z itself; z = 3.9 is the normal quantile at 1e-3 / (2 (K + 1)), so the
    false-alarm rate is <= 1e-3 in all (Bonferroni; means of 300 bounded i.i.d. terms).
    Power 0.9 against an error of (z + 1.28) SE in any cell: 0.012 at most here (asserted
    <= 0.02), an error of 0.036 in a posterior probability (Z = 0.556).  The shared code pays:
    the evidence's standard error is 0.0007 against 0.0049 with independent sampling.  Codes
    never rescaled, or squared (c -> c^2), fail it; a biased offset (u uniform on [0, 0.9))
    does not, since the population's codes still cover [0, 1) evenly — the per-sample test
    above catches that one."""
    post = exact(hard_condition())
    z_exact = math.exp(lc.infer(hard_condition(), method="enumerate").log_evidence)
    cells = [[x] for x, p in post.items() if p >= 0.03]
    cells.append([x for x, p in post.items() if p < 0.03])
    masses = []
    for seed in range(300):
        r = run(hard_condition(), seed, n=32)
        w = np.exp(r.log_weights) / len(r.traces)
        m = [sum(wi for t, wi in zip(r.traces, w, strict=True) if t.value in c) for c in cells]
        masses.append([*m, float(w.sum())])
    masses = np.asarray(masses)
    truth = [z_exact * sum(post[x] for x in c) for c in cells] + [z_exact]
    z = NormalDist().inv_cdf(1 - ALPHA / (2 * len(truth)))
    se = masses.std(axis=0, ddof=1) / math.sqrt(len(masses))
    assert np.all(np.abs(masses.mean(axis=0) - truth) <= z * se), (masses.mean(0), truth, se)
    assert float(np.max((z + 1.28) * se)) <= 0.02, se


def test_decode_keeps_codes_uniform_over_long_generations():
    """80 steps of decode on 20,000 independent uniform codes (q = 1/2, 1/4, 1/4 at every step):
    the pair of tokens at steps 78-79 must be i.i.d. with probabilities q x q, which needs the
    fresh low bits — a float64 code rescaled by these dyadic probabilities without them is
    spent after about 36 tokens and then always picks the first token (chi2 = 60,000).
    Chi-square with 9 cells: false-alarm rate <= 1e-3; detects TV >= 0.021 (asserted <= 0.03)."""
    g = torch.Generator().manual_seed(0)
    q = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    rows = torch.log(q).expand(20_000, 3)
    code = torch.rand(20_000, generator=g, dtype=torch.float64)
    history = []
    for _ in range(80):
        tokens, code = decode(rows, code, torch.rand(20_000, generator=g, dtype=torch.float64))
        assert bool(((code >= 0) & (code < 1)).all())
        history.append(tokens)
    pairs = list(zip(history[78].tolist(), history[79].tolist(), strict=True))
    probs = {(a, b): float(q[a] * q[b]) for a in range(3) for b in range(3)}
    result = assert_matches(pairs, probs)
    assert result.detectable_tv <= 0.03, str(result)


# --- arithmetic sampling: diversity, seeds, batches ----------------------------------------


def test_arithmetic_repeats_less_than_independent_sampling():
    """On a peaked model (the most probable text has probability 0.21): at seed 0 and N = 32
    arithmetic sampling gives 9 duplicates where independent sampling gives 14; over 40 seeds
    the means are 9.4 and 13.45 (standard deviations 0.83 and 2.5 per run), so requiring the
    arithmetic mean to be lower by at least 2 leaves a margin of about 5 standard errors of the
    difference (deterministic at these seeds; other seeds would fail by chance about 1e-6)."""
    assert duplicates(run(peaked(), 0, n=32)) < duplicates(
        run(peaked(), 0, n=32, codes="independent")
    )
    ours = [duplicates(run(peaked(), s, n=32)) for s in range(40)]
    theirs = [duplicates(run(peaked(), s, n=32, codes="independent")) for s in range(40)]
    assert np.mean(ours) <= np.mean(theirs) - 2, (np.mean(ours), np.mean(theirs))


def test_arithmetic_is_reproducible_and_batches_share_the_codes():
    a, b = run(chained_prior(), 7), run(chained_prior(), 7)
    assert [t.value for t in a.traces] == [t.value for t in b.traces]
    assert [t.value for t in run(chained_prior(), 8).traces] != [t.value for t in a.traces]
    # batch_size splits the run, not the codes: the first tokens (decided by the shared codes,
    # not by refreshed low bits) are the same as in one batch
    whole = run(peaked(), 3, n=32)
    split = run(peaked(), 3, n=32, batch_size=5)
    assert [t["w"].token_ids[:1] for t in whole.traces] == [
        t["w"].token_ids[:1] for t in split.traces
    ]
    assert duplicates(split) < duplicates(run(peaked(), 3, n=32, codes="independent"))


def test_codes_share_one_offset():
    cs = [c.value for c in codes(8, 0.95)]
    assert cs[0] == 0.95 and all(0 <= c < 1 for c in cs)
    gaps = np.diff(sorted(cs))
    assert np.allclose(gaps, 1 / 8)


AT_MOST_ONE_A = lc.constraints.predicate(lambda text: text.count("a") <= 1)


@lc.program
def predicate_then_free():
    """A predicate-constrained site (drawn by AWRS, leaving the code alone), then a free one."""
    x = yield lc.gen("x", PEAKED, "", max_tokens=3, constraint=AT_MOST_ONE_A)
    y = yield lc.gen("y", PEAKED, x, max_tokens=2)
    return x + "|" + y


def test_arithmetic_falls_back_to_rejection_for_predicates():
    r = run(predicate_then_free(), 0, n=24)
    assert all(t["x"].value.count("a") <= 1 for t in r.traces)
    # 8 duplicates against 10 at this seed (7.6 against 8.2 over 30 seeds: only "y" uses codes)
    assert duplicates(r) < duplicates(run(predicate_then_free(), 0, n=24, codes="independent"))
    p = lc.infer(predicate_then_free(), method="priority", num_samples=500, progress=False)
    e = lc.infer(predicate_then_free(), method="enumerate")
    assert all(t["x"].value.count("a") <= 1 for t in p.traces)
    assert len(p.traces) == len(e.traces)
    assert p.log_evidence == pytest.approx(e.log_evidence, abs=1e-9)


def test_arithmetic_with_scalar_choices_and_conditions():
    r = run(categorical_prompt(), 0, n=16)
    assert len(r.traces) == 16 and r.stats["num_zero_weight"] < 16
    assert math.isfinite(r.log_evidence)


# --- priority sampling ---------------------------------------------------------------------


def choice_log_prob(trace) -> float:
    """The log-probability of a trace's choices (what priority sampling orders by)."""
    return sum(s.log_prob for s in trace.sites if s.kind == "sample")


def decisions(trace) -> tuple:
    return tuple(
        (s.name, s.token_ids if s.token_ids is not None else s.value)
        for s in trace.sites
        if s.kind == "sample"
    )


def check_priority(result) -> None:
    """Unique traces; popped priorities non-increasing; each sample no more probable than its
    branch's priority."""
    keys = [decisions(t) for t in result.traces]
    assert len(set(keys)) == len(keys)
    pri = result.stats["priorities"]
    assert len(pri) == len(result.traces) and pri[0] == 0.0
    assert all(b <= a + 1e-12 for a, b in zip(pri, pri[1:], strict=False)), pri
    for t, p in zip(result.traces, pri, strict=True):
        assert choice_log_prob(t) <= p + 1e-9


def greedy_value(program):
    engine = Engine(sampler=Greedy(), seed=0)
    return engine.run([Particle(program)])[0].trace.value


def test_priority_first_sample_is_greedy_decoding():
    r = lc.infer(chained_prior(), method="priority", num_samples=5, progress=False)
    assert r.traces[0].value == greedy_value(chained_prior())
    cold = run(chained_prior(temperature=0.0), 0, n=1, codes="independent")
    assert r.traces[0].value == cold.traces[0].value


def test_priority_unique_non_increasing_deterministic():
    r = lc.infer(chained_prior(), method="priority", num_samples=40, progress=False)
    check_priority(r)
    again = lc.infer(chained_prior(), method="priority", num_samples=40, seed=5, progress=False)
    assert [t.value for t in again.traces] == [t.value for t in r.traces]
    narrow = lc.infer(chained_prior(), method="priority", num_samples=40, branching=1)
    check_priority(narrow)
    assert narrow.traces[0].value == r.traces[0].value


def test_priority_finds_the_whole_support():
    """With num_samples above the number of traces, priority returns every trace: the same
    posterior and log Z as enumeration (its evidence is a lower bound, here exact)."""
    r = lc.infer(categorical_prompt(), method="priority", num_samples=100, progress=False)
    e = lc.infer(categorical_prompt(), method="enumerate")
    assert r.stats["exhausted"] and len(r.traces) < 100
    check_priority(r)
    assert r.log_evidence == pytest.approx(e.log_evidence, abs=1e-9)
    got, want = r.distribution(), e.distribution()
    assert set(got) == set(want)
    assert all(got[k] == pytest.approx(want[k], abs=1e-9) for k in want)
    fewer = lc.infer(categorical_prompt(), method="priority", num_samples=6, progress=False)
    assert fewer.log_evidence < e.log_evidence  # a lower bound


def test_priority_hostile():
    @lc.program
    def continuous():
        x = yield lc.sample("mu", Normal(0.0, 1.0))
        return x

    with pytest.raises(NotEnumerableError, match="'mu'"):
        lc.infer(continuous(), method="priority", progress=False)

    @lc.program
    def impossible():
        c = yield lc.sample("c", Categorical(torch.tensor([0.5, 0.5])))
        text = yield lc.gen("t", LM, "q", max_tokens=1)
        yield lc.condition("never", c > 5 and text == "x")
        return text

    with pytest.raises(AllWeightsZeroError, match="never"):
        lc.infer(impossible(), method="priority", num_samples=4, progress=False)


@pytest.mark.parametrize(
    ("method", "options", "named"),
    [
        ("forward", {"codes": "foo"}, "codes"),
        ("forward", {"codes": 3}, "codes"),
        ("forward", {"codes": "arithmetic", "num_samples": 0}, "num_samples"),
        ("forward", {"codes": "arithmetic", "num_samples": -1}, "num_samples"),
        ("forward", {"codes": "arithmetic", "num_samples": True}, "num_samples"),
        ("priority", {"num_samples": 0}, "num_samples"),
        ("priority", {"num_samples": -1}, "num_samples"),
        ("priority", {"num_samples": True}, "num_samples"),
        ("priority", {"branching": 0}, "branching"),
        ("priority", {"branching": True}, "branching"),
        ("priority", {"branching": "all"}, "branching"),
        ("priority", {"codes": "arithmetic"}, "codes"),
    ],
)
def test_bad_options_name_the_option(method, options, named):
    with pytest.raises(OptionError, match=named):
        lc.infer(chained_prior(), method=method, **options)


# --- the tiny random-weight HF model, through the batched path ----------------------------


@pytest.fixture(scope="module", params=["transformers", "llamacpp"])
def hf(request):
    pytest.importorskip("transformers")
    from tiny_gguf import tiny_model

    return tiny_model(seed=0, backend=request.param)


@lc.program
def short(model):
    return (yield lc.gen("text", model, "Q:", max_tokens=2))


def test_hf_arithmetic_marginally_exact_and_diverse(hf):
    """1000 populations of 4 (each with its own shared uniform) in one engine, one batched
    model call per step; sample j = 1 of each population pooled: i.i.d. draws that must follow
    the exact distribution (57 texts).  Chi-square: false-alarm rate <= 1e-3; detects TV >=
    0.108 with probability 0.9 (asserted <= 0.12).  Then lc.infer at seed 0: fewer duplicates
    than independent sampling (N = 16: 6 against 9; over 20 seeds 5.9 against 7.2 on average)."""
    stats: dict = {}
    groups = populations(short(hf), 1000, 4, stats=stats)
    assert stats["model_calls"] <= 3  # one batched call per decoding step
    draws = [traces[1].value for traces in groups]
    result = assert_matches(draws, exact(short(hf)))
    assert result.detectable_tv <= 0.12, str(result)
    ours = run(short(hf), 0, n=16)
    theirs = run(short(hf), 0, n=16, codes="independent")
    assert duplicates(ours) < duplicates(theirs)


def test_hf_priority(hf):
    r = lc.infer(short(hf), method="priority", num_samples=80, progress=False)
    e = lc.infer(short(hf), method="enumerate")
    check_priority(r)
    assert r.traces[0].value == greedy_value(short(hf))
    assert len(r.traces) == len(e.traces) and r.stats["exhausted"]
    assert r.log_evidence == pytest.approx(e.log_evidence, abs=1e-5)
    got, want = r.distribution(), e.distribution()
    assert set(got) == set(want)
    assert all(got[k] == pytest.approx(want[k], abs=1e-5) for k in want)
