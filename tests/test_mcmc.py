"""MCMC over traces and power targets, checked against exact enumeration.

How the distribution tests get i.i.d. draws: ``chains=C, num_samples=1, burn_in=B`` runs C
independent chains (one batched engine) and keeps the state each reaches after B + 1 steps.
Those C states are i.i.d. draws from the chain's (B+1)-step marginal, which for a correct
kernel converges to the target geometrically; the ToyLM programs mix within a few steps, so
with B = 30 the remaining bias is far below what C = 600 draws can see.  ``chi2_gof`` then
rejects a correct sampler with probability below ``ALPHA = 1e-3`` (see tests/stats.py), and
detects, with probability 0.9, a sampler whose TV distance from the target on the pooled
cells exceeds the "detects TV >=" figure it prints (0.13-0.15 for these programs at 600
draws).  Each check was run once against a deliberately wrong kernel and failed it:
without the position correction n(x)/n(x') (chained_soft suffix: chi2 = 130 against a
critical 61), without the proposal densities (chained_soft site: chi2 = 381; the power target:
494 against 20), without the site-count correction (``grows``: 278 against 22).
"""

from __future__ import annotations

import math

import pytest
import torch
from pyro.distributions import Bernoulli, Categorical, Normal
from tiny_gguf import BACKENDS, tiny_model

import lmcascade as lc
from lmcascade.errors import AllWeightsZeroError, OptionError, ProgramError, SiteError
from programs import LM, PROGRAMS, expert_then_tail, trap_chain
from stats import assert_matches

CHAINS, BURN = 600, 30


def mcmc_draws(prog, proposal: str, seed: int = 1, chains: int = CHAINS, burn: int = BURN):
    r = lc.infer(
        prog,
        method="mcmc",
        proposal=proposal,
        chains=chains,
        num_samples=1,
        burn_in=burn,
        seed=seed,
        progress=False,
    )
    assert len(r.values) == chains
    return r


@pytest.mark.parametrize(
    "name,proposal",
    [
        ("chained_soft", "site"),
        ("chained_soft", "suffix"),
        ("categorical_prompt", "site"),
        ("categorical_prompt", "suffix"),
        ("categorical_prompt", "independent"),
        ("observe_bernoulli", "suffix"),
        ("trap_chain", "site"),
        ("trap_chain", "suffix"),
        ("expert_then_tail", "site"),
    ],
)
def test_chains_reach_the_exact_posterior(name, proposal):
    prog = {"trap_chain": trap_chain, "expert_then_tail": expert_then_tail, **PROGRAMS}[name]
    exact = lc.infer(prog(), method="enumerate").distribution()
    r = mcmc_draws(prog(), proposal)
    assert_matches(r.values, exact)
    assert 0 < r.stats["acceptance_rate"] < 1


@lc.program
def maybe_second():
    """The number of choices changes between traces (a site exists only when b = 1), and a
    Categorical's support depends on an earlier choice: the site-count correction and the
    "changed shape" rule both matter."""
    b = yield lc.sample("b", Bernoulli(torch.tensor(0.4, dtype=torch.float64)))
    k = yield lc.sample("k", Categorical(torch.ones(2 + int(b), dtype=torch.float64)))
    text = ""
    if b:
        text = yield lc.gen("text", LM, "q" * (k + 1), max_tokens=2)
    yield lc.factor("likes_a", 1.2 * text.count("a") - 0.5 * k)
    return f"{int(b)}/{k}/{text}"


@lc.program
def grows():
    """Two choices or six: a kernel without the site-count correction log|C(x)|/|C(x')| is
    far off here (measured: chi2 = 278 against a critical 22 at 600 draws; the right kernel
    gave 1.9)."""
    b = yield lc.sample("b", Bernoulli(torch.tensor(0.3, dtype=torch.float64)))
    n = 0
    if b:
        for i in range(5):
            n += int((yield lc.sample(f"z{i}", Bernoulli(torch.tensor(0.5, dtype=torch.float64)))))
    yield lc.factor("f", 0.3 * n)
    return f"{int(b)}/{n}"


def test_site_count_correction():
    exact = lc.infer(grows(), method="enumerate").distribution()
    assert_matches(mcmc_draws(grows(), "site").values, exact)


@pytest.mark.parametrize("proposal", ["site", "suffix"])
def test_trans_dimensional_program(proposal):
    """Traces without an LM site too: a suffix proposal moves scalars by site moves."""
    exact = lc.infer(maybe_second(), method="enumerate").distribution()
    assert_matches(mcmc_draws(maybe_second(), proposal).values, exact)


def test_suffix_proposals_move_scalar_choices():
    """A scalar whose posterior (0.95) is far from its prior (0.5): suffix moves must change
    it too (a kernel that only moves LM sites stays at the prior: measured 0.495)."""

    @lc.program
    def biased():
        b = yield lc.sample("b", Bernoulli(torch.tensor(0.5, dtype=torch.float64)))
        text = yield lc.gen("text", LM, "q", max_tokens=2)
        yield lc.factor("likes_b", 3.0 * b)
        return f"{int(b)}/{text}"

    exact = lc.infer(biased(), method="enumerate").distribution()
    assert_matches(mcmc_draws(biased(), "suffix").values, exact)


def power_program(alpha: float, **params):
    @lc.program
    def power():
        text = yield lc.gen("text", LM, "q", max_tokens=3, alpha=alpha, **params)
        return text

    return power()


def test_power_target_enumerates_as_p_to_the_alpha():
    """Enumeration of an alpha site is the path distribution raised to alpha, renormalised:
    computed here independently from the alpha = 1 paths."""
    base = lc.infer(power_program(1.0), method="enumerate")
    sharp = lc.infer(power_program(3.0), method="enumerate")
    mass: dict[str, float] = {}
    for trace, lw in zip(base.traces, base.log_weights, strict=True):
        mass[trace.value] = mass.get(trace.value, 0.0) + math.exp(3.0 * lw)
    z = sum(mass.values())
    got = sharp.distribution()
    assert set(got) == set(mass)
    assert max(abs(got[k] - v / z) for k, v in mass.items()) < 1e-12
    assert sharp.log_evidence == pytest.approx(math.log(z), abs=1e-12)


@pytest.mark.parametrize("proposal", ["suffix", "site", "independent"])
def test_power_target_mcmc_matches_enumeration(proposal):
    """p**3 over whole texts is far from the model at temperature 1/3 token by token (the
    empty text has 0.58 of the target's mass, 0.09 of the proposal's), so suffix chains
    started from the proposal need ~100 steps: at 30 steps 2,000 chains are still visibly
    off (chi2 = 81, df = 7), at 150 they fit (chi2 = 0.6)."""
    exact = lc.infer(power_program(3.0), method="enumerate").distribution()
    assert_matches(mcmc_draws(power_program(3.0), proposal, chains=400, burn=150).values, exact)


def test_power_target_with_a_constraint_and_own_proposal_temperature():
    prog = power_program(2.0, constraint=lc.constraints.forbid("b"), proposal_temperature=1.0)
    exact = lc.infer(prog, method="enumerate").distribution()
    assert_matches(mcmc_draws(prog, "suffix", chains=400, burn=150).values, exact)


def test_power_target_weighs_forward_samples():
    """Forward sampling proposes from the model at temperature 1/alpha and weighs by
    p**alpha / q: accepted by weight (thinned with the exact bound), the draws are exact."""
    from stats import accepted_by_weight

    prog = power_program(3.0)
    exact = lc.infer(prog, method="enumerate").distribution()
    r = lc.infer(prog, method="forward", num_samples=4000, seed=3, progress=False)
    bound = max(r.log_weights)  # a bound the weights reach: the draws are only thinned
    assert_matches(accepted_by_weight(r, float(bound), seed=0), exact)


def test_suffix_moves_of_the_prior_are_always_accepted_at_fixed_length():
    """alpha = 1 and the prior as proposal: the ratio is n(x)/n(x'), exactly 1 when every
    text has the same number of tokens (here min_tokens = max_tokens)."""

    @lc.program
    def fixed():
        return (yield lc.gen("t", LM, "q", max_tokens=3, min_tokens=3))

    r = lc.infer(fixed(), method="mcmc", proposal="suffix", num_samples=200, burn_in=0, seed=0)
    assert r.stats["acceptance_rate"] == 1.0
    assert all(p == 1.0 for p in r.chains[0].accept_prob)
    # with alpha != 1 the same program rejects some moves
    sharp = lc.infer(
        power_program(4.0, min_tokens=3), method="mcmc", proposal="suffix", num_samples=200, seed=0
    )
    assert sharp.stats["acceptance_rate"] < 1.0


def test_suffix_acceptance_is_the_length_ratio_at_alpha_one():
    """With variable lengths, each move's acceptance probability is min(1, n(x) / n(x'))."""
    r = lc.infer(
        power_program(1.0), method="mcmc", proposal="suffix", num_samples=300, burn_in=0, seed=2
    )
    chain = r.chains[0]
    before = None
    for trace, prob, accepted in zip(chain.traces, chain.accept_prob, chain.accepted, strict=True):
        if before is not None and accepted and trace is not before:
            n, n_new = len(before["text"].token_ids), len(trace["text"].token_ids)
            assert prob == pytest.approx(min(1.0, n / n_new), abs=1e-12)
        before = trace


def test_continuous_choice_conjugate_normal():
    """x ~ N(0, 1), observe 1.0 ~ N(x, 1): the posterior is N(0.5, 1/2).  The mean of 600
    i.i.d. final states has standard error sqrt(0.5/600) = 0.029; the bound 0.13 is 4.5
    standard errors (false alarm 7e-6) and detects a mean off by 0.16."""

    @lc.program
    def normal():
        x = yield lc.sample("x", Normal(torch.tensor(0.0), torch.tensor(1.0)))
        yield lc.observe("y", Normal(torch.as_tensor(x), torch.tensor(1.0)), torch.tensor(1.0))
        return float(x)

    r = mcmc_draws(normal(), "site", burn=60)
    values = torch.tensor(r.values, dtype=torch.float64)
    assert abs(float(values.mean()) - 0.5) < 0.13
    assert abs(float(values.var()) - 0.5) < 0.15


def test_chains_result_and_diagnostics():
    prog = PROGRAMS["chained_soft"]()
    r = lc.infer(
        prog, method="mcmc", num_samples=50, burn_in=10, thin=2, chains=4, seed=0, progress=False
    )
    assert len(r.values) == 200 and len(r.chains) == 4
    assert all(len(c.values) == 50 and len(c.accepted) == 110 for c in r.chains)
    assert set(r.weights.tolist()) == {1 / 200}
    assert r.stats["steps"] == 110
    assert set(r.stats["acceptance_by_site"]) <= {"x", "y"}
    assert 0.8 < r.r_hat(len) < 1.2
    assert 1 <= r.chain_ess(len) <= 200 * 1.5
    assert math.isnan(r.log_evidence)
    single = lc.infer(prog, method="mcmc", num_samples=5, burn_in=0, seed=0, progress=False)
    with pytest.raises(OptionError, match="chains=2"):
        single.r_hat(len)
    with pytest.raises(OptionError, match="number"):
        r.chain_ess(lambda v: "not a number")
    # the result's own ESS is that of the log target; summary and JSON show it
    assert 1 <= r.ess <= 300 and f"ESS: {r.ess:.2f}" in r.summary()
    short = lc.infer(prog, method="mcmc", num_samples=3, chains=3, burn_in=2, seed=0)
    for diagnostic in (short.r_hat, short.chain_ess):
        with pytest.raises(OptionError, match="at least 10 states"):
            diagnostic(len)
    assert math.isnan(short.ess)


def test_same_seed_same_chain():
    prog = PROGRAMS["categorical_prompt"]()
    a = lc.infer(prog, method="mcmc", num_samples=30, seed=5, progress=False)
    b = lc.infer(prog, method="mcmc", num_samples=30, seed=5, progress=False)
    assert a.values == b.values and a.chains[0].accepted == b.chains[0].accepted


@pytest.mark.parametrize(
    "options,match",
    [
        ({"num_samples": 0}, "num_samples"),
        ({"burn_in": -1}, "burn_in"),
        ({"burn_in": 1.5}, "burn_in"),
        ({"thin": 0}, "thin"),
        ({"chains": True}, "chains"),
        ({"proposal": "gibbs"}, "proposal"),
        ({"init_tries": 0}, "init_tries"),
        ({"num_samples": 10**9, "chains": 10}, "states"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(OptionError, match=match):
        lc.infer(PROGRAMS["hard_condition"](), method="mcmc", **options)


@pytest.mark.parametrize(
    "params",
    [
        {"alpha": 0},
        {"alpha": -1.0},
        {"alpha": math.nan},
        {"alpha": math.inf},
        {"alpha": True},
        {"alpha": "2"},
        {"proposal_temperature": 0.0},
        {"proposal_temperature": "hot"},
        {"alpha": 1e308},
        {"alpha": 2**2000},
        {"alpha": 1e-9},
    ],
)
def test_bad_power_parameters(params):
    with pytest.raises(SiteError, match="alpha|proposal_temperature"):
        lc.gen("t", LM, "q", **params)


def test_programs_a_proposal_cannot_move():
    @lc.program
    def no_choice():
        yield lc.factor("f", -1.0)
        return 1

    for proposal in ("site", "suffix"):
        with pytest.raises(ProgramError, match="nothing to sample"):
            lc.infer(no_choice(), method="mcmc", proposal=proposal, num_samples=3, progress=False)

    @lc.program
    def never():
        t = yield lc.gen("t", LM, "q", max_tokens=2)
        yield lc.condition("impossible", t == "zzz")

    with pytest.raises(AllWeightsZeroError, match="impossible"):
        lc.infer(never(), method="mcmc", num_samples=3, init_tries=5, progress=False)


# -- the tiny random-weight HF model, through the batched path -----------------------------


@pytest.fixture(scope="module", params=BACKENDS)
def hf(request):
    pytest.importorskip("transformers")
    return tiny_model(seed=0, backend=request.param)


def test_power_target_on_the_batched_hf_path(hf):
    @lc.program
    def sharp():
        return (yield lc.gen("t", hf, "Q:", max_tokens=3, alpha=2.0))

    exact = lc.infer(sharp(), method="enumerate").distribution()
    r = mcmc_draws(sharp(), "suffix", chains=400, burn=25)
    assert_matches(r.values, exact)


def test_two_sites_on_the_batched_hf_path(hf):
    @lc.program
    def two():
        x = yield lc.gen("x", hf, "Q:", max_tokens=2)
        y = yield lc.gen("y", hf, "Q:" + x + " ", max_tokens=1)
        yield lc.factor("likes_a", 1.5 * (x + y).count("a"))
        return x + "|" + y

    exact = lc.infer(two(), method="enumerate").distribution()
    r = mcmc_draws(two(), "site", chains=400, burn=25)
    assert_matches(r.values, exact)


def test_power_target_in_the_text_dsl():
    """``alpha=`` in a .lmc model call is the same site as in Python (enumerated exactly)."""
    source = 'program sharp() {\n  text ~ lm("q", max_tokens=3, alpha=3)\n  return text\n}\n'
    sharp = lc.load(source, models={"lm": LM}).sharp
    got = lc.infer(sharp(), method="enumerate").distribution()
    want = lc.infer(power_program(3.0), method="enumerate").distribution()
    assert got == pytest.approx(want, abs=1e-12)
    bad = 'program bad() {\n  text ~ lm("q", alpha=-1)\n  return text\n}\n'
    with pytest.raises(lc.errors.LMCascadeError, match="alpha"):
        lc.infer(lc.load(bad, models={"lm": LM}).bad(), method="forward", num_samples=2)
