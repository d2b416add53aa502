"""``draft=`` under forward, importance, rejection, SMC and MCMC: still exact, checked against
enumeration.

Every check turns a method's output into i.i.d. draws and tests them with ``assert_matches``
(Pearson chi-square, tests/stats.py): a correct sampler fails it with probability at most
ALPHA = 1e-3 (simulated there), and the check detects, with probability 0.9, a sampling
distribution whose total-variation distance from the exact posterior on the pooled cells
exceeds ``stats.detectable_tv(df, n)`` (the ``detects TV >= ...`` printed on failure).  For the
sizes below (df and n as run with these seeds) that smallest detectable error is:

- forward (4,000 weighted samples thinned by weight: 2,092 draws, df 54): TV 0.088;
- importance from the prior (4,000 thinned: 2,042 draws, df 51): TV 0.088; with a proposal
  program (4,000 thinned by the exact bound on p/q: 1,578 draws, df 40): TV 0.096;
- rejection (1,500 exact draws, df 38): TV 0.098;
- SMC (300 runs, one draw from each run's final weights, df 8): TV 0.17.  SMC's own
  finite-population bias at 16 particles is far below that: the mean weighted distribution
  q_N of 2,000 further runs (seeds 1000-2999, with this draft) gave ``300 * chi2(q_N ||
  posterior)`` of 0.27 (token) and 0.30 (segment), noise included, so the false-alarm rate
  stays about 1e-3;
- MCMC (the last state of each of 500 independent chains after 20 moves, df 13 and 17): TV
  0.14-0.15.  The chains' own distance from the posterior after 20 moves is negligible: 6,000
  chains (with this draft) gave ``500 * chi2`` of 0.2 (suffix moves) and 1.8 (site moves),
  within that measurement's own sampling noise (1.1 and 1.4).

The wrong rule of ``test_smc_with_always_accept_is_caught`` (every drafted token accepted,
with a nearly disjoint draft) gives chi2 = 97 against a rejection threshold of 28 at this seed.

Each test also asserts that the draft ran: verify_calls > 0, a draft acceptance rate in
[0, 1], more than one token per verified block and per target call.
"""

from __future__ import annotations

import math

import pytest
from test_speculative import toy

import lmcascade as lc
from lmcascade.errors import OptionError
from lmcascade.models import ToyLM
from lmcascade.samplers import Ancestral
from lmcascade.samplers.speculative import Speculative
from stats import accepted_by_weight, assert_matches, chi2_gof, one_draw_per_run

TARGET = toy(0.0, "target")
DRAFT = toy(0.3, "perturbed")  # accepted about 85% of the time
FAR = toy(4.0, "far")  # nearly disjoint from the target


@lc.program
def scored():
    """A condition and a factor after an LM site: every log-weight is at most 0."""
    t = yield lc.gen("t", TARGET, "ab", max_tokens=4)
    yield lc.condition("no_cc", "cc" not in t)
    yield lc.factor("short", -0.3 * len(t))
    return t


@lc.program
def prior():
    return (yield lc.gen("t", TARGET, "ab", max_tokens=4))


@lc.program
def guide():
    """An importance proposal: the target's model at temperature 1.2 (flatter)."""
    yield lc.gen("t", TARGET, "ab", max_tokens=4, temperature=1.2)


def a_bonus(text: str) -> float:
    return 0.5 * text.count("a")


@lc.program
def steered():
    """A twist (a function potential) weights every prefix, so SMC's token-level resampling
    acts inside the site, between blocks; the reward itself is a factor at the end."""
    t = yield lc.gen("t", TARGET, "ab", max_tokens=5, potential=a_bonus)
    yield lc.factor("reward", a_bonus(t))
    yield lc.condition("not_empty", len(t) > 0)
    return t


def exact(program) -> dict:
    return lc.infer(program(), method="enumerate").distribution()


def assert_drafted(r: lc.Result) -> None:
    """The draft path ran: target passes verified drafts, some were accepted, and a verified
    block gave more than one token on average."""
    s = r.stats
    assert s["verify_calls"] > 0 and s["drafted_tokens"] > 0, s
    assert 0.0 <= s["draft_acceptance_rate"] <= 1.0, s
    assert s["accepted_tokens"] > 0 and s["block_efficiency"] > 1.0, s
    assert s["tokens_per_target_call"] > 1.0, s


# -- every method, against enumeration -----------------------------------------------------


def test_forward():
    r = lc.infer(scored(), method="forward", draft=DRAFT, num_samples=4000, seed=0)
    assert_matches(accepted_by_weight(r, 0.0), exact(scored))
    assert_drafted(r)
    assert r.stats["acceptance_rate"] == r.stats["draft_acceptance_rate"]
    assert r.stats["block_efficiency"] > 2.0  # a good draft: blocks of several tokens


def test_importance_from_the_prior():
    r = lc.infer(scored(), method="importance", draft=DRAFT, num_samples=4000, seed=1)
    assert_matches(accepted_by_weight(r, 0.0), exact(scored))
    assert_drafted(r)


def test_importance_with_a_proposal_and_prompt_lookup():
    """The proposal program's site is drafted by prompt lookup; the target replays it.  The
    weights are p(t) / q(t) times the condition and factor (at most 1): their exact bound is
    the largest p / q over the texts, from enumerating both programs."""
    p, q = exact(prior), lc.infer(guide(), method="enumerate")
    q_of = {tr.sites[0].value: math.exp(tr.log_joint) for tr in q.traces}
    log_bound = max(math.log(p[t]) - math.log(w) for t, w in q_of.items() if p.get(t, 0) > 0)
    r = lc.infer(scored(), method="importance", proposal=guide(), draft="prompt_lookup",
                 num_samples=4000, seed=2)  # fmt: skip
    assert_matches(accepted_by_weight(r, log_bound), exact(scored))
    assert_drafted(r)


def test_rejection():
    r = lc.infer(scored(), method="rejection", draft=DRAFT, max_log_weight=0.0,
                 num_samples=1500, seed=3)  # fmt: skip
    assert_matches(r.values, exact(scored))
    assert_drafted(r)
    assert 0 < r.stats["acceptance_rate"] < 1  # the traces', kept apart from the draft's
    assert r.stats["acceptance_rate"] != r.stats["draft_acceptance_rate"]


def smc_runs(runs: int = 300, draft=DRAFT, **options) -> list[lc.Result]:
    return [
        lc.infer(
            steered(),
            method="smc",
            draft=draft,
            lookahead=2,
            adaptive=False,
            particles=16,
            ess_threshold=1.0,
            seed=s,
            **options,
        )  # fmt: skip
        for s in range(runs)
    ]


def test_smc_token_resampling_between_blocks():
    """Resampling after every step (ess_threshold=1): at block boundaries, up to 3 tokens
    apart (lookahead 2 + 1), inside the site where the twist makes the weights differ."""
    runs = smc_runs(resample_every="token")
    assert_matches(one_draw_per_run(runs, seed=1), exact(steered))
    for r in runs[:20]:
        assert_drafted(r)
        assert r.stats["resamples"] >= 2 and min(r.stats["ess"]) < 0.99 * len(r)


def test_smc_segments_with_blocks():
    """segment_tokens=2: a segment ends at the first block boundary at or past 2 tokens."""
    runs = smc_runs(resample_every="segment", segment_tokens=2)
    assert_matches(one_draw_per_run(runs, seed=1), exact(steered))
    assert all(r.stats["resamples"] >= 2 for r in runs)
    assert_drafted(runs[0])


def test_smc_with_always_accept_is_caught(monkeypatch):
    """The SMC check rejects a speculative rule that accepts every drafted token."""
    from test_speculative import always_accept

    monkeypatch.setattr(Speculative, "accept", staticmethod(always_accept))
    runs = smc_runs(draft=FAR, resample_every="token")
    assert not chi2_gof(one_draw_per_run(runs, seed=1), exact(steered)).passed()


def test_mcmc_suffix_moves():
    """Independent chains, their last states: i.i.d. draws from the chain after 20 moves."""
    r = lc.infer(scored(), method="mcmc", draft=DRAFT, proposal="suffix", chains=500,
                 num_samples=1, burn_in=19, seed=4)  # fmt: skip
    assert len(r.values) == 500
    assert_matches(r.values, exact(scored))
    assert_drafted(r)
    assert 0 < r.stats["acceptance_rate"] < 1  # the chain's; the draft's is draft_...


def test_mcmc_keeps_exact_masks_for_constrained_sites():
    """A predicate-constrained site next to a drafted one: the constrained site falls back
    to MCMC's ancestral sampler, whose predicate masks are exact (the engine computes them
    because the speculative sampler takes the fallback's ``full_masks``)."""
    one_a = lc.constraints.predicate(lambda text: text.count("a") <= 1)

    @lc.program
    def two():
        t = yield lc.gen("t", TARGET, "ab", max_tokens=2, constraint=one_a)
        u = yield lc.gen("u", TARGET, "c" + t, max_tokens=3)
        yield lc.condition("no_bb", "bb" not in u)
        return t + "|" + u

    mcmc = lc.inference.methods()["mcmc"](draft=DRAFT)
    assert mcmc.token_sampler(Ancestral(exact_masks=True), seed=0).full_masks
    r = lc.infer(two(), method="mcmc", draft=DRAFT, proposal="site", chains=500,
                 num_samples=1, burn_in=19, seed=5)  # fmt: skip
    assert_matches(r.values, exact(two))
    assert_drafted(r)


# -- cheap invariants -----------------------------------------------------------------------


def test_forward_with_a_draft_is_method_speculative():
    a = lc.infer(prior(), method="forward", draft=DRAFT, num_samples=20, seed=7)
    b = lc.infer(prior(), method="speculative", draft=DRAFT, num_samples=20, seed=7)
    c = lc.infer(prior(), method="forward", draft=DRAFT, num_samples=20, seed=7)
    assert a.values == b.values == c.values
    assert a.stats["verify_calls"] == b.stats["verify_calls"]


@pytest.mark.parametrize("method", ["forward", "importance", "rejection", "smc"])
def test_a_perfect_draft_gives_k_plus_one_tokens_per_target_call(method):
    @lc.program
    def long():
        return (yield lc.gen("t", TARGET, "ab", max_tokens=11, min_tokens=11))

    r = lc.infer(long(), method=method, draft=TARGET, lookahead=4, adaptive=False,
                 num_samples=1, seed=0)  # fmt: skip
    assert r.stats["block_efficiency"] == 5.0  # two blocks of 4 + 1, then one of 1
    assert r.stats["model_calls"] == 3
    assert r.stats["draft_acceptance_rate"] == 1.0


def test_no_draft_adds_no_stats():
    r = lc.infer(prior(), method="smc", particles=4, seed=0)
    assert "verify_calls" not in r.stats and "draft_acceptance_rate" not in r.stats


# -- options ----------------------------------------------------------------------------------


def test_option_errors():
    cases = [
        ({"method": "forward", "draft": "ngram"}, "method 'forward': draft must be"),
        ({"method": "smc", "draft": 3}, "method 'smc': draft must be"),
        ({"method": "importance", "draft": DRAFT, "lookahead": 0}, "method 'importance': look"),
        ({"method": "rejection", "draft": DRAFT, "adaptive": "yes"}, "method 'rejection': ad"),
        ({"method": "mcmc", "lookahead": 8}, "method 'mcmc': option lookahead only applies"),
        (
            {"method": "forward", "draft": DRAFT, "codes": "arithmetic"},
            "codes='arithmetic' and draft= do not combine",
        ),
        (
            {"method": "smc", "draft": DRAFT, "resample_every": "segment", "segment_entropy": 1},
            "segment_entropy does not combine with draft=",
        ),
        ({"method": "enumerate", "draft": DRAFT}, "has no option 'draft'"),
        ({"method": "speculative"}, "needs draft="),
    ]
    for options, message in cases:
        with pytest.raises(OptionError, match=message):
            lc.infer(prior(), **options)
    other = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, 0.0])
    with pytest.raises(OptionError, match="vocabulary"):
        lc.infer(prior(), method="smc", draft=other, particles=2)
