"""SMC against exact enumeration: every resampling point and scheme, constraints, twists."""

import math
from collections import Counter

import numpy as np
import pytest
import torch

import lmcascade as lc
from lmcascade.constraints import forbid, max_word_length
from lmcascade.errors import AllWeightsZeroError, OptionError
from lmcascade.inference.resampling import SCHEMES
from lmcascade.models import ToyLM
from programs import LM, VOCAB, chained_soft
from stats import tv_bound, tv_distance

# --- resampling schemes -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_expected_offspring_counts(name):
    w = np.array([0.05, 0.3, 0.15, 0.4, 0.1])
    n = len(w)
    counts = np.zeros(n)
    reps = 4000
    rng = np.random.default_rng(0)
    for _ in range(reps):
        idx = SCHEMES[name](w, rng)
        assert len(idx) == n and idx.min() >= 0 and idx.max() < n
        counts += np.bincount(idx, minlength=n)
    mean = counts / reps
    # offspring counts are bounded by N, so 4 standard errors is at most 4 * N / sqrt(reps)
    assert np.all(np.abs(mean - n * w) < 4 * n / math.sqrt(reps) * 0.5), (mean, n * w)
    if name in ("systematic", "residual", "stratified"):
        floor = np.floor(n * w)
        if name == "residual":
            assert np.all(np.bincount(SCHEMES[name](w, rng), minlength=n) >= floor)
        if name == "systematic":
            for _ in range(200):
                c = np.bincount(SCHEMES[name](w, rng), minlength=n)
                assert np.all((c >= floor) & (c <= np.ceil(n * w)))


def test_zero_weights_never_chosen():
    w = np.array([0.0, 0.5, 0.0, 0.5])
    for fn in SCHEMES.values():
        idx = fn(w, np.random.default_rng(1))
        assert set(idx.tolist()) <= {1, 3}


# --- programs ------------------------------------------------------------------------------

NO_B = forbid("b")


@lc.program
def hard_constraint():
    text = yield lc.gen("text", LM, "q", max_tokens=3, constraint=NO_B)
    return text


def count_a(text: str) -> float:
    return 0.8 * text.count("a")


@lc.program
def twisted():
    """The twist anticipates the final reward: same target as without it, better steering."""
    text = yield lc.gen("text", LM, "q", max_tokens=3, potential=count_a)
    yield lc.factor("reward", count_a(text))
    return text


OTHER = ToyLM(
    VOCAB,
    lambda ctx: [0.5 * (len(ctx) % 2), 0.0, -0.5, -math.inf, -math.inf, -0.7],
    name="other-toy",
)


@lc.program
def product_of_experts():
    """The same text scored by a second model (prompt intersection)."""
    text = yield lc.gen("text", LM, "q", max_tokens=3)
    yield lc.observe("second_opinion", lc.LM(OTHER, "q:", max_tokens=3), text)
    return text


EXPERT = lc.LM(OTHER, "q:", max_tokens=3)


@lc.program
def steered_experts():
    """The same product, steered token by token by the second model's prefix probability."""
    text = yield lc.gen("text", LM, "q", max_tokens=3, potential=EXPERT)
    yield lc.observe("second_opinion", EXPERT, text)
    return text


PROGRAMS = {
    "steered_experts": steered_experts,
    "hard_constraint": hard_constraint,
    "twisted": twisted,
    "chained_verifier": chained_soft,
    "product_of_experts": product_of_experts,
}
MODES = [
    {"resample_every": "token"},
    {"resample_every": "segment", "segment_tokens": 2},
    {"resample_every": "site"},
]


@pytest.fixture(scope="module")
def exact():
    return {name: lc.infer(prog(), method="enumerate") for name, prog in PROGRAMS.items()}


def pooled(prog, runs, **opts):
    """The average of the posterior estimates of independent SMC runs, and a conservative
    sample count: the sum over runs of the smallest ESS seen at any resampling check."""
    total: Counter = Counter()
    ess = 0.0
    for seed in range(runs):
        r = lc.infer(prog, method="smc", seed=seed, **opts)
        for value, p in r.distribution().items():
            total[value] += p / runs
        ess += min(r.stats["ess"] + [r.ess])
    return dict(total), ess


@pytest.mark.parametrize("program", sorted(PROGRAMS))
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m["resample_every"])
@pytest.mark.parametrize("resampling", sorted(SCHEMES))
def test_smc_matches_enumeration(exact, program, mode, resampling):
    want = exact[program].distribution()
    got, ess = pooled(
        PROGRAMS[program](), 4, particles=250, resampling=resampling, ess_threshold=0.7, **mode
    )
    assert tv_distance(got, want) < tv_bound(ess, len(want)), tv_distance(got, want)


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_evidence_unbiased_over_200_seeds(exact, program):
    z = math.exp(exact[program].log_evidence)
    est = np.array(
        [
            math.exp(
                lc.infer(
                    PROGRAMS[program](), method="smc", particles=8, ess_threshold=0.9, seed=s
                ).log_evidence
            )
            for s in range(200)
        ]
    )
    se = est.std(ddof=1) / math.sqrt(len(est))
    assert abs(est.mean() - z) < 3 * se + 1e-12, (est.mean(), z, se)


def test_site_level_evidence_unbiased(exact):
    z = math.exp(exact["chained_verifier"].log_evidence)
    est = np.array(
        [
            math.exp(
                lc.infer(
                    chained_soft(),
                    method="smc",
                    particles=8,
                    resample_every="site",
                    ess_threshold=1.0,
                    seed=s,
                ).log_evidence
            )
            for s in range(200)
        ]
    )
    assert abs(est.mean() - z) < 3 * est.std(ddof=1) / math.sqrt(len(est))


def test_every_particle_satisfies_the_hard_constraint():
    r = lc.infer(hard_constraint(), method="smc", particles=100, seed=0)
    assert all("b" not in v for v in r.values)
    words = max_word_length(2)

    @lc.program
    def short_words():
        text = yield lc.gen("text", LM, "q", max_tokens=6, constraint=words)
        return text

    r = lc.infer(short_words(), method="smc", particles=50, seed=0)
    assert all(len(w) <= 2 for v in r.values for w in v.split())


def trap(ctx):
    """First a or c evenly; after "a" the forbidden "b" is nearly certain, after "c" eos is."""
    inf = math.inf
    if len(ctx) == 1:
        return [0.0, -inf, 0.0, -inf]
    if ctx[-1] == 0:
        return [-inf, math.log(0.9), -inf, math.log(0.1)]
    return [-inf, -inf, -inf, 0.0]


TRAP = ToyLM(["a", "b", "c", "<eos>"], trap, name="trap")


@lc.program
def trapped():
    text = yield lc.gen("text", TRAP, "c", max_tokens=3, constraint=NO_B)
    return text


def test_local_masking_without_correction_is_biased():
    """Sampling the locally masked distribution and ignoring the weights misses p(text | C)."""
    want = lc.infer(trapped(), method="enumerate").distribution()
    assert want["c"] == pytest.approx(0.5 / 0.55) and want["a"] == pytest.approx(0.05 / 0.55)
    r = lc.infer(trapped(), method="forward", num_samples=4000, seed=0)
    unweighted = {k: c / len(r.values) for k, c in Counter(r.values).items()}
    bound = tv_bound(4000, len(want))
    assert tv_distance(unweighted, want) > 0.3 > 3 * bound  # the locally masked sampler
    assert tv_distance(r.distribution(), want) < tv_bound(r.ess, len(want))  # weights fix it
    smc = lc.infer(trapped(), method="smc", particles=400, seed=0)
    assert tv_distance(smc.distribution(), want) < tv_bound(smc.ess / 2, len(want))


def test_genealogy_and_stats():
    r = lc.infer(twisted(), method="smc", particles=32, ess_threshold=1.0, seed=3)
    assert r.stats["resamples"] == len(r.genealogy) > 0
    assert all(len(a) == 32 and min(a) >= 0 and max(a) < 32 for a in r.genealogy)
    assert len(r.stats["ess"]) >= r.stats["resamples"]
    a = lc.infer(twisted(), method="smc", particles=32, seed=3)
    b = lc.infer(twisted(), method="smc", particles=32, seed=3)
    assert a.values == b.values and list(a.log_weights) == list(b.log_weights)


def test_entropy_segments_run():
    r = lc.infer(
        chained_soft(),
        method="smc",
        particles=64,
        resample_every="segment",
        segment_entropy=0.5,
        segment_max=2,
        seed=0,
    )
    assert len(r.values) == 64


def test_steering_expert_matches_the_unsteered_product(exact):
    assert exact["steered_experts"].distribution() == pytest.approx(
        exact["product_of_experts"].distribution()
    )
    r = lc.infer(steered_experts(), method="smc", particles=16, seed=0)
    assert r.stats["model_calls"] > r.stats["steps"]  # the expert is called alongside


def test_all_zero_names_the_site():
    @lc.program
    def never():
        text = yield lc.gen("text", LM, "q", max_tokens=2)
        yield lc.condition("impossible", "q" in text)
        return text

    with pytest.raises(AllWeightsZeroError, match="'impossible'"):
        lc.infer(never(), method="smc", particles=8, seed=0)


def test_bad_options():
    for opts, fragment in [
        ({"resampling": "magic"}, "resampling"),
        ({"resample_every": "word"}, "resample_every"),
        ({"resample_every": "segment"}, "segment rule"),
        ({"ess_threshold": 2}, "ess_threshold"),
    ]:
        with pytest.raises(OptionError, match=fragment):
            lc.infer(hard_constraint(), method="smc", **opts)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m["resample_every"])
def test_smc_on_tiny_hf_model_matches_enumeration(mode):
    pytest.importorskip("transformers")
    from tiny_hf import tiny_lm

    lm = tiny_lm(seed=1)

    @lc.program
    def constrained():
        text = yield lc.gen("text", lm, "Q:", max_tokens=3, constraint=forbid("a", "Q"))
        yield lc.factor("likes_c", 0.5 * text.count("c"))
        return text

    want = lc.infer(constrained(), method="enumerate").distribution()
    got, ess = pooled(constrained(), 2, particles=300, ess_threshold=0.8, **mode)
    assert tv_distance(got, want) < tv_bound(ess, len(want))
    r = lc.infer(constrained(), method="smc", particles=50, seed=0)
    assert all("a" not in v and "Q" not in v for v in r.values)
    assert torch.isfinite(torch.tensor(r.log_evidence))


def test_ancestry_and_plot(tmp_path):
    from lmcascade.viz import ancestry, plot_smc

    lineage = ancestry([[0, 0, 1], [2, 1, 1]], 3)
    # final particle 0 came from 2 at the second resampling, which came from 1 at the first
    assert lineage[:, 0].tolist() == [1, 2, 0]
    assert lineage[:, 1].tolist() == [0, 1, 1]
    r = lc.infer(twisted(), method="smc", particles=16, ess_threshold=1.0, seed=0)
    path = plot_smc(r, tmp_path / "smc.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
