"""Cases the method tests leave out: the chi-square test's own calibration, ``batch_size``,
SMC's segment rules and step guard, prefix-index eviction, and multi-byte detokenisation."""

import math

import numpy as np
import pytest
import torch

import lmcascade as lc
from lmcascade.errors import OptionError
from lmcascade.lm import Detokenizer
from lmcascade.models import ToyLM
from lmcascade.models.kv import KVBatch, PrefixIndex
from programs import PROGRAMS, expert_then_tail, trap_chain, twisted_reward, verified_steps
from stats import (
    ALPHA,
    accepted_by_weight,
    assert_matches,
    chi2_gof,
    critical_value,
    detectable_divergence,
    false_alarm_rate,
    merge_cells,
)

# --- the chi-square test is calibrated ------------------------------------------------------

CALIBRATION_CASES = [
    (trap_chain, 300),
    (twisted_reward, 300),
    (verified_steps, 300),
    (expert_then_tail, 300),
    (PROGRAMS["chained_soft"], 600),
    (PROGRAMS["chained_soft"], 3000),
    (PROGRAMS["hard_condition"], 1000),
]


@pytest.mark.parametrize(
    ("program", "n"), CALIBRATION_CASES, ids=[f"{p.name}-{n}" for p, n in CALIBRATION_CASES]
)
def test_chi2_false_alarm_rate_and_power(program, n):
    """On a correct sampler (n i.i.d. draws from the exact distribution itself) the test
    rejects at most ALPHA of the time: 40000 simulations, so the observed rate may exceed
    ALPHA by 3 Monte Carlo standard errors at most (the one-off with 10^6 simulations per case
    is described in stats.py: 6.2e-4 to 8.1e-4).  And a sampler off by the stated detectable
    divergence is rejected about 90% of the time (asserted >= 80%: the power formula is an
    approximation)."""
    probs = lc.infer(program(), method="enumerate").distribution()
    sims = 40_000
    for alpha in (ALPHA, 0.01):
        rate = false_alarm_rate(probs, n, sims=sims, alpha=alpha, seed=1)
        assert rate <= alpha + 3 * math.sqrt(alpha / sims), (alpha, rate)
    # power: tilt the cells' probabilities (alternately up and down) by the detectable divergence
    cells = merge_cells(probs, n)
    p = np.array([sum(probs[k] for k in cell) for cell in cells])
    df = len(cells) - 1
    d = detectable_divergence(df, n)
    signs = np.where(np.arange(len(p)) % 2 == 0, 1.0, -1.0)
    direction = p * (signs - np.sum(p * signs))
    step = math.sqrt(d / np.sum(direction**2 / p))
    q = p + step * direction
    assert q.min() > 0
    rng = np.random.default_rng(2)
    counts = rng.multinomial(n, q, size=4000)
    stats = np.sum((counts - n * p) ** 2 / (n * p), axis=1)
    assert np.mean(stats >= critical_value(df)) >= 0.8


def test_impossible_value_fails_outright():
    probs = {"a": 0.5, "b": 0.5}
    assert not chi2_gof(["a", "b"] * 50 + ["c"], probs).passed()
    assert chi2_gof(["a", "b"] * 50, probs).passed()


# --- batch_size ---------------------------------------------------------------------------

hard_condition = PROGRAMS["hard_condition"]  # one LM site of at most 3 tokens, then a condition


@pytest.mark.parametrize("method", ["forward", "importance", "rejection"])
def test_batch_size_runs_in_batches_and_keeps_the_distribution(method):
    """Batches of 100: the model is called once per token step per batch (so about 13 times
    as often as unbatched), and the results still match the exact posterior (chi-square, alpha
    1e-3, 700-1300 i.i.d. draws: detects TV >= 0.10-0.13 with probability 0.9)."""
    want = lc.infer(hard_condition(), method="enumerate").distribution()
    n, batch = 1300, 100
    whole = lc.infer(hard_condition(), method=method, num_samples=n, seed=5)
    parts = lc.infer(hard_condition(), method=method, num_samples=n, seed=5, batch_size=batch)
    steps = 3 + 1  # max_tokens, and one more for eos
    if method == "rejection":
        attempts = parts.stats["attempts"]
        assert attempts % batch == 0 and attempts >= n
        batches = attempts // batch
        assert batches <= parts.stats["model_calls"] <= steps * batches
        draws = parts.values
    else:
        batches = n // batch
        assert whole.stats["model_calls"] <= steps
        assert len(parts.values) == n
        assert batches <= parts.stats["model_calls"] <= steps * batches
        draws = accepted_by_weight(parts, 0.0, seed=1)
    assert_matches(draws, want)
    # a batch larger than the run is one batch
    big = lc.infer(hard_condition(), method=method, num_samples=50, seed=5, batch_size=10_000)
    assert big.stats["model_calls"] <= steps


@pytest.mark.parametrize("method", ["forward", "importance", "rejection"])
@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_batch_size(method, bad):
    with pytest.raises(OptionError, match="batch_size"):
        lc.infer(hard_condition(), method=method, batch_size=bad)


# --- SMC: segment rules and the step guard -------------------------------------------------

FLIPS = ToyLM(
    ["a", "b", "<eos>"],
    # six fair coin flips (entropy log 2 each), then eos for certain
    lambda ctx: [0.0, 0.0, -math.inf] if len(ctx) < 7 else [-math.inf, -math.inf, 0.0],
    name="flips",
)
PATTERN = "babbab"
FIXED = ToyLM(
    ["a", "b", "<eos>"],
    # always the text "babbab", then eos
    lambda ctx: (
        [-math.inf, -math.inf, 0.0]
        if len(ctx) > len(PATTERN)
        else [0.0 if PATTERN[len(ctx) - 1] == t else -math.inf for t in "ab"] + [-math.inf]
    ),
    name="fixed",
)


@lc.program
def flips():
    text = yield lc.gen("text", FLIPS, "a", max_tokens=10)
    return text


@lc.program
def fixed():
    text = yield lc.gen("text", FIXED, "a", max_tokens=10)
    return text


def checks(program, **opts) -> int:
    """The number of resampling points (ESS checks) of one SMC run; each resamples."""
    r = lc.infer(program(), method="smc", particles=4, ess_threshold=1.0, seed=0, **opts)
    assert r.stats["resamples"] == len(r.stats["ess"]) == len(r.genealogy)
    return len(r.stats["ess"])


def test_segment_rules_set_the_resampling_points():
    """Relative to site-only resampling (one point, at the site's start), each rule adds one
    point per segment that ends before the last token's eos step."""
    base = checks(flips, resample_every="site")
    assert base == 1
    segment = {"resample_every": "segment"}
    # six high-entropy tokens: segment_min tokens per segment
    for least, extra in [(1, 6), (2, 3), (3, 2), (4, 1), (7, 0)]:
        got = checks(flips, **segment, segment_entropy=0.5, segment_min=least)
        assert got - base == extra, (least, got)
    # entropy below the limit never ends a segment; segment_max still does
    assert checks(flips, **segment, segment_entropy=1.0) == base
    assert checks(flips, **segment, segment_entropy=1.0, segment_max=2) - base == 3
    assert checks(flips, **segment, segment_tokens=4) - base == 1
    # "babbab": a segment ends when the text since the last point contains the stop string
    assert checks(fixed, **segment, segment_stop="a") - base == 2  # "ba", "bba", then "b"
    assert checks(fixed, **segment, segment_stop="bb") - base == 1  # "babb", then "ab"
    assert checks(fixed, **segment, segment_stop="c") == base
    # token mode checks after every step: six tokens and the eos step
    assert checks(flips, resample_every="token") >= 7


def test_segment_smc_stays_exact_on_flips():
    """Segments by entropy with a weight on the flips: one draw from each of 200 runs,
    chi-square at alpha 1e-3 (detects TV >= 0.20 with probability 0.9)."""

    @lc.program
    def weighted():
        text = yield lc.gen("text", FLIPS, "a", max_tokens=10)
        yield lc.factor("more_a", 0.5 * text.count("a"))
        return text.count("a")

    want = lc.infer(weighted(), method="enumerate").distribution()
    runs = [
        lc.infer(
            weighted(),
            method="smc",
            particles=8,
            resample_every="segment",
            segment_entropy=0.5,
            segment_min=2,
            ess_threshold=1.0,
            seed=s,
        )
        for s in range(200)
    ]
    draws = [r.sample(1, seed=s)[0] for s, r in enumerate(runs)]
    assert_matches(draws, want)


def test_max_steps_stops_a_long_run():
    r = lc.infer(flips(), method="smc", particles=4, seed=0)
    steps = r.stats["steps"]
    assert steps >= 7  # six tokens and eos
    lc.infer(flips(), method="smc", particles=4, seed=0, max_steps=steps)
    with pytest.raises(OptionError, match=f"max_steps={steps - 1}"):
        lc.infer(flips(), method="smc", particles=4, seed=0, max_steps=steps - 1)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("segment_tokens", 0),
        ("segment_min", 0),
        ("segment_max", 0),
        ("segment_max", 1.5),
        ("max_steps", 0),
        ("max_steps", -1),
        ("particles", 0),
    ],
)
def test_bad_smc_step_options(option, value):
    opts = {"resample_every": "segment", "segment_tokens": 2, option: value}
    with pytest.raises(OptionError, match=option):
        lc.infer(flips(), method="smc", **opts)


# --- prefix index: bounded, forgets, stays exact --------------------------------------------


def kv(rows: int = 1, width: int = 4) -> KVBatch:
    k = torch.zeros(rows, 1, width, 2)
    return KVBatch([(k, k.clone())], torch.ones(rows, width, dtype=torch.long))


def test_prefix_index_forgets_past_max_bytes():
    size = kv().nbytes()
    index = PrefixIndex(max_bytes=2 * size)
    a, b, c = kv(), kv(), kv()
    index.insert([1, 2, 3], a, 0)
    index.insert([1, 2, 4], b, 0)
    assert index.bytes_held == 2 * size
    assert index.longest([1, 2, 3, 9]) == (3, (a, 0))
    assert index.longest([1, 2, 4]) == (3, (b, 0))
    index.insert([7], c, 0)  # a third batch does not fit: everything is forgotten first
    assert index.bytes_held <= index.max_bytes
    assert index.longest([1, 2, 3]) == (0, None)
    assert index.longest([7, 8]) == (1, (c, 0))
    huge = kv(rows=3)  # bigger than the whole budget: never held
    index.insert([5, 6], huge, 0)
    assert index.longest([5, 6]) == (0, None) and index.bytes_held <= index.max_bytes


def test_prefix_index_forgets_past_max_nodes():
    index = PrefixIndex(max_nodes=5)
    a, b = kv(), kv()
    index.insert([1, 2, 3], a, 0)
    assert index.longest([1, 2, 3]) == (3, (a, 0))
    index.insert([4, 5, 6], b, 0)  # 3 + 3 nodes > 5: the first prefix is forgotten
    assert index.nodes <= 5
    assert index.longest([1, 2, 3]) == (0, None)
    assert index.longest([4, 5, 6]) == (3, (b, 0))


def test_prefix_index_never_holds_more_than_max_nodes():
    index = PrefixIndex(max_nodes=4)
    index.insert([1, 2, 3, 4, 5, 6], kv(), 0)
    assert index.nodes <= index.max_nodes


def test_tiny_prefix_cache_recomputes_but_stays_exact():
    """A model whose prefix cache holds (almost) nothing gives exactly the same enumeration
    and the same SMC run as one with the default cache; it just reuses fewer tokens."""
    pytest.importorskip("transformers")
    from tiny_hf import tiny_lm

    roomy = tiny_lm(seed=0)
    tight = tiny_lm(seed=0, prefix_cache_gb=2e-7)  # about 200 bytes: less than one batch
    nodes = tiny_lm(seed=0)
    nodes.prefix_index = PrefixIndex(max_nodes=6)

    def program(lm):
        @lc.program
        def two_sites():
            x = yield lc.gen("x", lm, "Q: ab", max_tokens=2)
            y = yield lc.gen("y", lm, "Q: ab" + x + ":", max_tokens=2)
            return x + "|" + y

        return two_sites()

    results = {}
    for name, lm in [("roomy", roomy), ("tight", tight), ("nodes", nodes)]:
        exact = lc.infer(program(lm), method="enumerate")
        smc = lc.infer(program(lm), method="smc", particles=12, ess_threshold=1.0, seed=3)
        # the model's counters end up in the results' stats
        counts = {
            key: exact.stats.get(key, 0) + smc.stats.get(key, 0)
            for key in ("prefill_tokens", "reused_prompt_tokens")
        }
        results[name] = (exact.distribution(), smc, counts)
        assert lm.prefix_index.bytes_held <= lm.prefix_index.max_bytes
    want, smc_want, counts = results["roomy"]
    assert counts["reused_prompt_tokens"] > 0
    for name in ("tight", "nodes"):
        exact, smc, forgetful = results[name]
        assert exact.keys() == want.keys()
        for value, p in want.items():
            assert exact[value] == pytest.approx(p, rel=1e-4, abs=1e-7), (name, value)
        assert smc.values == smc_want.values
        np.testing.assert_allclose(smc.log_weights, smc_want.log_weights, rtol=1e-4, atol=1e-5)
        assert forgetful["reused_prompt_tokens"] < counts["reused_prompt_tokens"], name
        assert forgetful["prefill_tokens"] > counts["prefill_tokens"], name


# --- detokenisation of multi-byte characters on a real tokenizer -----------------------------


@pytest.fixture(scope="module")
def smol():
    from lmcascade.models import registry

    if not registry.is_installed("smollm2-135m"):
        pytest.skip("the default model is not installed (lmcascade models fetch smollm2-135m)")
    return lc.models.load("smollm2-135m", device="cpu")


def pushes(tokenizer, ids):
    d = Detokenizer(tokenizer)
    return [d.push(i) for i in ids], d.text


def test_detokenizer_holds_back_split_characters(smol):
    tok = smol.tokenizer
    hf = tok.hf
    # byte-level BPE: "é" is one token, but its two UTF-8 bytes are tokens too
    e_bytes = hf.convert_tokens_to_ids(["Ã", "©"])
    assert tok.decode([e_bytes[0]]).endswith("\ufffd") and tok.decode(e_bytes) == "é"
    assert pushes(tok, e_bytes) == (["", "é"], "é")
    # an emoji is split over three tokens by the tokenizer itself
    parrot = tok.encode("🦜")
    assert len(parrot) == 3
    assert pushes(tok, parrot) == (["", "", "🦜"], "🦜")
    # mixed text: nothing is emitted mid-character, nothing is lost, the sum is decode(ids)
    for text in ["naïve 🦜 über", "日本語 é🦜é", "x" + "😀" * 3]:
        ids = tok.encode(text)
        pieces, joined = pushes(tok, ids)
        assert joined == "".join(pieces) == tok.decode(ids) == text
        assert all("\ufffd" not in p for p in pieces)
        assert any(p == "" for p in pieces)  # some token ended mid-character
    # the byte tokens of "é" spliced into a word
    ids = tok.encode("caf") + e_bytes + tok.encode(" ok")
    pieces, joined = pushes(tok, ids)
    assert joined == tok.decode(ids) == "café ok" and "" in pieces
