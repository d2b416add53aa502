"""Speculative sampling: exact target samples whatever the draft, checked against enumeration.

Forward speculative sampling of a program without weights gives i.i.d. draws, so
``assert_matches`` (chi-square, false-alarm rate below 1e-3, tests/stats.py) applies directly;
with 3,000 draws it detects, with probability 0.9, a sampler whose TV distance from the exact
distribution on the pooled cells exceeds about 0.06-0.07 (printed on failure).  The check can
fail: with an always-accept rule (``test_always_accept_is_caught``) the same test rejects.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_gguf import BACKENDS, tiny_model

import lmcascade as lc
from lmcascade.errors import OptionError
from lmcascade.models import ToyLM
from lmcascade.samplers.speculative import PromptLookup, Speculative
from stats import accepted_by_weight, assert_matches, chi2_gof

VOCAB = ["a", "b", "c", "<eos>"]


def toy(shift: float, name: str) -> ToyLM:
    """A context-dependent toy model; ``shift`` moves mass between tokens (0: the target)."""

    def scores(ctx):
        h = (sum((i + 2) * (t + 1) for i, t in enumerate(ctx)) * 7919) % 101
        return [
            (h % 5) / 2.0 + shift,
            ((h // 5) % 4) / 2.0 - shift,
            ((h // 20) % 3) / 1.5 + 2 * shift,
            -1.0 + 0.5 * len(ctx),
        ]

    return ToyLM(VOCAB, scores, name=name)


TARGET = toy(0.0, "target")
DRAFTS = {"identical": TARGET, "perturbed": toy(0.7, "perturbed"), "disjoint": toy(4.0, "far")}


def program(lm, **params):
    @lc.program
    def text():
        return (yield lc.gen("t", lm, "ab", max_tokens=4, **params))

    return text()


@pytest.mark.parametrize("name", sorted(DRAFTS))
def test_samples_are_exact_whatever_the_draft(name):
    exact = lc.infer(program(TARGET), method="enumerate").distribution()
    r = lc.infer(
        program(TARGET), method="speculative", draft=DRAFTS[name], num_samples=3000, seed=1
    )
    assert_matches(r.values, exact)
    assert r.stats["verify_calls"] > 0 and r.stats["drafted_tokens"] > 0
    if name == "identical":
        assert r.stats["acceptance_rate"] == 1.0


def test_shaping_applies_to_both_models():
    """Temperature, top-k and top-p shape the target and the draft before the test."""
    params = {"temperature": 0.7, "top_k": 3, "top_p": 0.9}
    exact = lc.infer(program(TARGET, **params), method="enumerate").distribution()
    r = lc.infer(
        program(TARGET, **params),
        method="speculative",
        draft=DRAFTS["perturbed"],
        num_samples=3000,
        seed=2,
    )
    assert_matches(r.values, exact)


def test_prompt_lookup_is_exact():
    exact = lc.infer(program(TARGET), method="enumerate").distribution()
    r = lc.infer(
        program(TARGET), method="speculative", draft="prompt_lookup", num_samples=3000, seed=3
    )
    assert_matches(r.values, exact)
    assert r.stats["drafted_tokens"] > 0


def always_accept(candidates, targets, gen, bonus=True):
    """A broken test: the first draft is taken whole, then a bonus token from the target."""
    from lmcascade.samplers.ancestral import draw

    tokens = list(candidates[0][0])
    return tokens + [int(draw(targets[0][len(tokens)][None], gen)[0])], len(tokens), 0, 1


def test_always_accept_is_caught(monkeypatch):
    """The same check rejects a sampler that accepts every drafted token."""
    exact = lc.infer(program(TARGET), method="enumerate").distribution()

    monkeypatch.setattr(Speculative, "accept", staticmethod(always_accept))
    r = lc.infer(
        program(TARGET), method="speculative", draft=DRAFTS["disjoint"], num_samples=3000, seed=1
    )
    assert not chi2_gof(r.values, exact).passed()


GREEDY_DRAFTS = [
    *({"draft": d} for d in [*DRAFTS.values(), "prompt_lookup"]),
    {"draft": [DRAFTS["perturbed"], DRAFTS["disjoint"]]},
    {"draft": [DRAFTS["disjoint"], "prompt_lookup"]},
    {"draft": DRAFTS["disjoint"], "num_drafts": 3},
    {"draft": "prompt_lookup", "num_drafts": 2},
]


@pytest.mark.parametrize("options", GREEDY_DRAFTS, ids=range(len(GREEDY_DRAFTS)))
def test_greedy_equals_target_greedy(options):
    r = lc.infer(program(TARGET, temperature=0), method="speculative", num_samples=3, **options)
    greedy = lc.infer(program(TARGET, temperature=0), method="forward", num_samples=1)
    assert set(r.values) == set(greedy.values)


PERFECT = {
    "one draft": {"draft": TARGET},
    "a chain": {"draft": [TARGET, TARGET]},
    "three drafts": {"draft": TARGET, "num_drafts": 3},
}


@pytest.mark.parametrize("name", sorted(PERFECT))
def test_a_perfect_draft_gives_k_plus_one_tokens_per_target_call(name):
    @lc.program
    def long():
        return (yield lc.gen("t", TARGET, "ab", max_tokens=11, min_tokens=11))

    r = lc.infer(long(), method="speculative", lookahead=4, adaptive=False, num_samples=1,
                 seed=0, **PERFECT[name])  # fmt: skip
    assert r.stats["block_efficiency"] == 5.0  # two blocks of 4 + 1, then one of 1
    assert r.stats["model_calls"] == 3
    assert r.stats["predicted_block_efficiency"] == pytest.approx(1 + r.stats["mean_lookahead"])


@pytest.mark.parametrize(
    "draft", [DRAFTS["perturbed"], [DRAFTS["perturbed"], DRAFTS["disjoint"]]], ids=["one", "chain"]
)
def test_measured_block_efficiency_matches_the_prediction(draft):
    """tau = (1 - alpha^(k+1)) / (1 - alpha) for i.i.d. acceptances; the measured tau of a
    perturbed draft agrees within 15% (blocks cut short by max_tokens and eos count less).
    A chain's tokens are exact draws from its first model, so the same holds for it.  (Several
    drafts beat the formula: ``test_more_drafts_accept_more``.)"""

    @lc.program
    def long():
        return (yield lc.gen("t", TARGET, "ab", max_tokens=40, min_tokens=40))

    r = lc.infer(long(), method="speculative", draft=draft, lookahead=3,
                 adaptive=False, num_samples=200, seed=0)  # fmt: skip
    s = r.stats
    assert 0 < s["acceptance_rate"] < 1
    assert s["block_efficiency"] == pytest.approx(s["predicted_block_efficiency"], rel=0.15)


def test_constrained_sites_fall_back_to_exact_draws():
    params = {"constraint": lc.constraints.forbid("c")}
    exact = lc.infer(program(TARGET, **params), method="enumerate").distribution()
    r = lc.infer(program(TARGET, **params), method="speculative", draft=TARGET,
                 num_samples=4000, seed=4)  # fmt: skip
    assert_matches(accepted_by_weight(r, 0.0), exact)  # weights: the allowed mass, <= 1


def test_bad_drafts_and_options():
    with pytest.raises(OptionError, match="needs draft="):
        lc.infer(program(TARGET), method="speculative")
    with pytest.raises(OptionError, match="prompt_lookup"):
        lc.infer(program(TARGET), method="speculative", draft="ngram")
    with pytest.raises(OptionError, match="lookahead"):
        lc.infer(program(TARGET), method="speculative", draft=TARGET, lookahead=0)
    with pytest.raises(OptionError, match="adaptive"):
        lc.infer(program(TARGET), method="speculative", draft=TARGET, adaptive="yes")
    other = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, 0.0])
    with pytest.raises(OptionError, match="vocabulary"):
        lc.infer(program(TARGET), method="speculative", draft=other, num_samples=2)


def test_prompt_lookup_proposals():
    look = PromptLookup()
    assert look.lookup([1, 2, 3, 9, 1, 2], 2) == [3, 9]
    assert look.lookup([4, 5], 3) == []


# -- the tiny random-weight HF model, through the batched path ------------------------------


@pytest.fixture(scope="module", params=BACKENDS)
def hf_pair(request):
    pytest.importorskip("transformers")
    return tiny_model(seed=0, backend=request.param), tiny_model(seed=1, backend=request.param)


def test_exact_on_the_batched_hf_path(hf_pair):
    target, draft = hf_pair

    @lc.program
    def text():
        return (yield lc.gen("t", target, "Q:", max_tokens=3))

    exact = lc.infer(text(), method="enumerate").distribution()
    r = lc.infer(text(), method="speculative", draft=draft, num_samples=2000, seed=5)
    assert_matches(r.values, exact)
    assert not math.isnan(r.stats["acceptance_rate"])
    greedy = lc.infer(text(), method="forward", num_samples=1)
    del greedy  # (greedy on HF: below)

    @lc.program
    def greedy_text():
        return (yield lc.gen("t", target, "Q:", max_tokens=8, temperature=0))

    ours = lc.infer(greedy_text(), method="speculative", draft=draft, num_samples=2)
    plain = lc.infer(greedy_text(), method="forward", num_samples=1)
    assert set(ours.values) == set(plain.values)
    with torch.inference_mode():
        assert isinstance(ours.values[0], str)


@pytest.mark.parametrize(
    "params",
    [
        {"stop": "ba", "max_tokens": 5},
        {"min_tokens": 3, "max_tokens": 5},
        {"alpha": 2.0, "max_tokens": 4},
        {"max_tokens": 2},
    ],
)
def test_stop_min_tokens_power_and_short_sites(params):
    """Blocks that cross a stop string, eos masked below min_tokens, a power target, sites
    with no room for a block; a second, constrained site (drawn without drafts) in the same
    population.  Weighted samples thinned by weight (exact bound: the largest weight)."""

    @lc.program
    def two():
        t = yield lc.gen("t", TARGET, "ab", **params)
        u = yield lc.gen("u", TARGET, "c" + t, max_tokens=2, constraint=lc.constraints.forbid("a"))
        return t + "|" + u

    exact = lc.infer(two(), method="enumerate").distribution()
    r = lc.infer(two(), method="speculative", draft=DRAFTS["perturbed"], num_samples=3000, seed=0)
    assert_matches(accepted_by_weight(r, float(max(r.log_weights))), exact)


def test_many_inputs_with_a_draft():
    @lc.program
    def text(prompt):
        return (yield lc.gen("t", TARGET, prompt, max_tokens=6, temperature=0))

    inputs = [{"prompt": "ab"}, {"prompt": "ba"}, {"prompt": "abab"}]
    many = list(lc.infer_many(text, inputs, method="speculative", draft="prompt_lookup",
                              num_samples=2, seed=0))  # fmt: skip
    assert len(many) == len(inputs)
    for given, result in many:  # in the order they finish
        alone = lc.infer(text(**given), method="forward", num_samples=1, seed=0)
        assert set(result.values) == set(alone.values)


def test_a_drafted_position_that_allows_nothing():
    """min_tokens forbids the only token the model allows after "c": such traces get weight
    zero, as in forward sampling, instead of a NaN (regression)."""
    inf = math.inf
    lm = ToyLM(
        VOCAB, lambda ctx: [-inf, -inf, -inf, 0.0] if ctx[-1] == 2 else [0.0, 0.0, -0.5, 0.0]
    )

    @lc.program
    def p():
        return (yield lc.gen("t", lm, "ab", max_tokens=5, min_tokens=3))

    enumerated = lc.infer(p(), method="enumerate")
    exact = enumerated.distribution()
    dead_mass = 1 - math.exp(enumerated.log_evidence)
    for draft in (lm, toy(0.5, "other"), "prompt_lookup"):
        r = lc.infer(p(), method="speculative", draft=draft, lookahead=2, num_samples=2000,
                     seed=0)  # fmt: skip
        # weight zero as often as the target reaches the dead end (a draft must not avoid
        # it): 0.44 of 2,000 traces, standard error 0.011, bound 4.5 of them (7e-6 each)
        dead = r.stats["num_zero_weight"] / 2000
        assert abs(dead - dead_mass) < 0.05, (draft, dead, dead_mass)
        assert_matches(accepted_by_weight(r, 0.0), exact)


def test_details_has_the_model_log_probs_of_every_token():
    @lc.program
    def d():
        g = yield lc.gen("t", TARGET, "ab", max_tokens=6, min_tokens=6, details=True)
        return g.token_log_probs

    spec = lc.infer(d(), method="speculative", draft=TARGET, num_samples=3, seed=0)
    assert all(math.isfinite(x) for v in spec.values for x in v)
    plain = lc.infer(d(), method="forward", num_samples=3, seed=0)
    assert all(math.isfinite(x) for v in plain.values for x in v)


# -- chains of drafts, several drafts, confidence, restricted heads ------------------------

CHAINS = {
    "two models": [DRAFTS["perturbed"], DRAFTS["disjoint"]],
    "model then lookup": [DRAFTS["perturbed"], "prompt_lookup"],
    "three levels": [toy(0.3, "mid"), DRAFTS["perturbed"], DRAFTS["disjoint"]],
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_chains_of_drafts_are_exact(name):
    """Each level of a chain verifies the next with the exact test, so the target's draws
    are exact whatever the levels (3,000 i.i.d. draws: detectable TV about 0.06)."""
    exact = lc.infer(program(TARGET), method="enumerate").distribution()
    r = lc.infer(program(TARGET), method="speculative", draft=CHAINS[name], num_samples=3000,
                 seed=6)  # fmt: skip
    assert_matches(r.values, exact)
    levels = r.stats["draft_calls_by_level"]
    assert len(levels) == len(CHAINS[name]) and all(n > 0 for n in levels[:-1])


def test_a_lenient_chain_level_is_caught(monkeypatch):
    """The chain's middle level taking every token of the cheap draft (the reference code's
    lenient review) breaks the target's exactness, and the same check sees it."""
    from lmcascade.samplers.drafts import DraftChain

    monkeypatch.setattr(DraftChain, "accept", staticmethod(always_accept))
    exact = lc.infer(program(TARGET), method="enumerate").distribution()
    r = lc.infer(program(TARGET), method="speculative", draft=CHAINS["two models"],
                 num_samples=3000, seed=6)  # fmt: skip
    assert not chi2_gof(r.values, exact).passed()


@pytest.mark.parametrize("draft", ["perturbed", "disjoint", "prompt_lookup"])
def test_several_drafts_are_exact(draft):
    """Three independent drafts per run, tried in turn against the running residual."""
    exact = lc.infer(program(TARGET), method="enumerate").distribution()
    r = lc.infer(program(TARGET), method="speculative", draft=DRAFTS.get(draft, draft),
                 num_drafts=3, num_samples=3000, seed=7)  # fmt: skip
    assert_matches(r.values, exact)


def residual_free(candidates, targets, gen, bonus=True):
    """A broken multi-draft test: every candidate is tested against the target row itself
    (no residual), and after all fail the correction comes from the last candidate's."""
    from lmcascade.samplers.ancestral import draw

    out: list[int] = []
    alive = list(range(len(candidates)))
    while True:
        m = len(out)
        row = targets[alive[0]][m]
        tries = [c for c in alive if len(candidates[c][0]) > m]
        if not tries:
            return out + [int(draw(row[None], gen)[0])], m, alive[0], m
        taken = None
        for c in tries:
            x, q = candidates[c][0][m], candidates[c][1]
            qx = 1.0 if q is None else float(q[m, x].exp())
            if float(torch.rand((), generator=gen, dtype=torch.float64)) * qx < row[x].exp():
                taken = x
                break
        if taken is None:
            q = candidates[tries[-1]][1]
            rest = row.exp() - (0.0 if q is None else q[m].to(row.dtype).exp())
            return out + [int(draw(rest.clamp_min(0).log()[None], gen)[0])], m, tries[-1], m
        out.append(taken)
        alive = [c for c in alive if len(candidates[c][0]) > m and candidates[c][0][m] == taken]


def test_several_drafts_without_the_residual_are_caught(monkeypatch):
    monkeypatch.setattr(Speculative, "accept", staticmethod(residual_free))
    exact = lc.infer(program(TARGET), method="enumerate").distribution()
    r = lc.infer(program(TARGET), method="speculative", draft=DRAFTS["disjoint"],
                 num_drafts=3, num_samples=3000, seed=7)  # fmt: skip
    assert not chi2_gof(r.values, exact).passed()


def test_more_drafts_accept_more():
    """With a perturbed draft, three drafts per run accept more tokens per verifying pass
    than one (each position gets three chances)."""

    @lc.program
    def long():
        return (yield lc.gen("t", TARGET, "ab", max_tokens=30, min_tokens=30))

    def tau(k):
        r = lc.infer(long(), method="speculative", draft=DRAFTS["perturbed"], num_drafts=k,
                     lookahead=3, adaptive=False, num_samples=100, seed=0)  # fmt: skip
        return r.stats["block_efficiency"]

    assert tau(3) > tau(1) + 0.3


def test_confidence_ends_drafts_early_and_stays_exact():
    exact = lc.infer(program(TARGET), method="enumerate").distribution()
    r = lc.infer(program(TARGET), method="speculative", draft=DRAFTS["perturbed"],
                 confidence=0.6, num_samples=3000, seed=8)  # fmt: skip
    assert_matches(r.values, exact)
    plain = lc.infer(program(TARGET), method="speculative", draft=DRAFTS["perturbed"],
                     num_samples=3000, seed=8)  # fmt: skip
    assert r.stats["mean_lookahead"] < plain.stats["mean_lookahead"]


def test_a_restricted_draft_head_is_exact():
    """FR-Spec: the draft sees only its two most frequent tokens (and eos); the target's
    draws stay exact, and the draft never proposes the others."""
    small = lc.models.restrict_head(DRAFTS["perturbed"], top=2, corpus=["aab", "bab"])
    assert small.name == "perturbed[3 tokens]"
    exact = lc.infer(program(TARGET), method="enumerate").distribution()
    r = lc.infer(program(TARGET), method="speculative", draft=small, num_samples=3000, seed=9)
    assert_matches(r.values, exact)
    assert 0 < r.stats["acceptance_rate"] < 1


def test_several_drafts_and_restricted_heads_on_the_hf_path(hf_pair):
    """Forked contexts for extra drafts in one batched pass; a transformers head cut to a
    subset of rows (sharing the weights)."""
    target, draft = hf_pair
    if not hasattr(draft, "hf"):
        pytest.skip("a transformers head cut to a subset of rows")
    small = lc.models.restrict_head(draft, top=4, corpus="Q: a b c d e f g")
    assert small.hf.get_output_embeddings().weight.shape[0] == 5  # 4 tokens and eos
    assert small.hf.model is draft.hf.model  # the same body
    assert draft.hf.get_output_embeddings().weight.shape[0] == draft.vocab_size

    @lc.program
    def text():
        return (yield lc.gen("t", target, "Q:", max_tokens=3))

    exact = lc.infer(text(), method="enumerate").distribution()
    for chosen in ({"draft": draft, "num_drafts": 3}, {"draft": [small, "prompt_lookup"]}):
        r = lc.infer(text(), method="speculative", num_samples=2000, seed=10, **chosen)
        assert_matches(r.values, exact)

    @lc.program
    def greedy_text():
        return (yield lc.gen("t", target, "Q:", max_tokens=8, temperature=0))

    ours = lc.infer(greedy_text(), method="speculative", draft=draft, num_drafts=2,
                    num_samples=2)  # fmt: skip
    plain = lc.infer(greedy_text(), method="forward", num_samples=1)
    assert set(ours.values) == set(plain.values)


def test_bad_chain_and_draft_count_options():
    with pytest.raises(OptionError, match="chain"):
        lc.infer(program(TARGET), method="speculative", draft=["prompt_lookup", TARGET])
    with pytest.raises(OptionError, match="at least one"):
        lc.infer(program(TARGET), method="speculative", draft=[])
    with pytest.raises(OptionError, match="num_drafts"):
        lc.infer(program(TARGET), method="speculative", draft=TARGET, num_drafts=0)
    with pytest.raises(OptionError, match="confidence"):
        lc.infer(program(TARGET), method="speculative", draft=TARGET, confidence=1.5)
    other = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, 0.0])
    with pytest.raises(OptionError, match="vocabulary"):
        lc.infer(program(TARGET), method="speculative", draft=[TARGET, other], num_samples=2)


def test_restricting_a_restricted_head(hf_pair):
    """A twin restricted again computes the intersection, from the original head's rows
    (regression: the twin's own head rows were taken as token ids)."""
    _, draft = hf_pair
    once = lc.models.restrict_head(draft, tokens=[1, 2, 3, 5, 6])
    twice = lc.models.restrict_head(once, tokens=[3, 5, 7])
    direct = lc.models.restrict_head(draft, tokens=[3, 5])
    ids = draft.encode("Q:")
    got = twice.next_logprobs([twice.open(ids)])[0]
    want = direct.next_logprobs([direct.open(ids)])[0]
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.isinf(got).sum() == draft.vocab_size - 3  # 3, 5 and eos
    with pytest.raises(OptionError, match="whole numbers"):
        lc.models.restrict_head(draft, tokens=[1.5])
    with pytest.raises(OptionError, match="flat list"):
        lc.infer(program(TARGET), method="speculative", draft=[TARGET, [TARGET]])
