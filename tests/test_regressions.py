"""Regression tests for bugs found in review."""

import gc
import math

import pytest

import lmcascade as lc
from lmcascade.constraints import forbid, regex
from lmcascade.errors import ModelError
from lmcascade.models import ToyLM
from programs import LM
from stats import tv_bound, tv_distance


def test_constrained_proposal_uses_its_masked_density():
    @lc.program
    def target():
        x = yield lc.gen("x", LM, "q", max_tokens=3)
        yield lc.condition("no_b", "b" not in x)
        return x

    @lc.program
    def guide():
        yield lc.gen("x", LM, "q", max_tokens=3, constraint=forbid("b"))

    exact = lc.infer(target(), method="enumerate")
    r = lc.infer(target(), method="importance", proposal=guide(), num_samples=3000, seed=0)
    assert abs(r.log_evidence - exact.log_evidence) < 0.05
    want = exact.distribution()
    assert tv_distance(r.distribution(), want) < tv_bound(r.ess, len(want))


def test_a_failed_proposal_site_gives_weight_zero():
    digits = ToyLM(["a", "b", "c", "<eos>"], lambda ctx: [0.0, 0.0, -2.0, 0.0])

    @lc.program
    def target():
        x = yield lc.gen("x", digits, "a", max_tokens=3)
        return x

    @lc.program
    def guide():
        yield lc.gen("x", digits, "a", max_tokens=3, constraint=regex("[ab]*c"))

    r = lc.infer(target(), method="importance", proposal=guide(), num_samples=200, seed=0)
    assert any(w == 0 for w in r.weights) and all(
        v.endswith("c") for v, w in zip(r.values, r.weights, strict=True) if w > 0
    )


def test_constraint_caches_die_with_their_model():
    c = forbid("x")
    for vocab in (["x", "y", "<eos>"], ["y", "x", "<eos>"]):
        lm = ToyLM(vocab, lambda ctx: [0.0, 0.0, 0.0])
        assert c.mask(lm, None).tolist() == [t != "x" for t in vocab]
        del lm
        gc.collect()
    assert len(c._per_model) == 0


def test_site_mode_resamples_once_per_site_start():
    @lc.program
    def four_sites():
        text = ""
        for i in range(4):
            text += yield lc.gen(f"s{i}", LM, "q" + text, max_tokens=1 + i % 3)
        return text

    r = lc.infer(
        four_sites(), method="smc", particles=24, resample_every="site", ess_threshold=1.0, seed=0
    )
    assert len(r.stats["ess"]) == 4 and r.stats["resamples"] == 4


def test_duplicate_stop_strings_count_once():
    dist = lc.LM(LM, "q", max_tokens=3, stop=[":", ":"])
    assert dist.stop == (":",)


def test_empty_prompt_scoring_is_a_clear_error():
    pytest.importorskip("transformers")
    from tiny_hf import tiny_lm

    lm = tiny_lm(seed=0)
    with pytest.raises(ModelError, match="at least one token"):
        lc.LM(lm, "", max_tokens=2).log_prob("a")
    assert math.isfinite(lc.LM(lm, "Q", max_tokens=2).log_prob("a"))
