"""Edge cases of the one stepping loop found in review: each a clear error or an exact answer."""

from __future__ import annotations

import pytest
import torch
from pyro.distributions import Bernoulli, Categorical

import lmcascade as lc
from lmcascade.engine import Engine, Particle
from lmcascade.errors import OptionError, SiteError, TokenizationError, TooManyTracesError
from lmcascade.models import ToyLM
from lmcascade.samplers import Greedy

LM = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, -1.0])


def test_max_traces_bounds_scalar_branching():
    @lc.program
    def many():
        for i in range(12):
            yield lc.sample(f"x{i}", Bernoulli(0.5))

    with pytest.raises(TooManyTracesError, match="max_traces"):
        lc.infer(many(), method="enumerate", max_traces=100)


def test_dead_traces_leave_the_enumeration_and_are_counted():
    @lc.program
    def prog():
        c = yield lc.sample("c", Categorical(torch.ones(40, dtype=torch.float64) / 40))
        yield lc.condition("small", c < 3)
        return (yield lc.gen("x", LM, "a", max_tokens=2))

    r = lc.infer(prog(), method="enumerate", max_traces=45)
    assert r.stats["num_traces"] == 21 and r.stats["zero_weight_traces"] == 37


def test_max_traces_with_a_text_being_scored():
    @lc.program
    def prog():
        yield lc.sample("c", Categorical(torch.ones(50, dtype=torch.float64) / 50))
        yield lc.observe("o", lc.LM(LM, "a", max_tokens=3), "ab")

    with pytest.raises(TooManyTracesError, match="site 'c'"):
        lc.infer(prog(), method="enumerate", max_traces=10)


def test_a_proposal_value_of_the_wrong_type_is_an_error_naming_the_site():
    @lc.program
    def target():
        return (yield lc.gen("t", LM, "", max_tokens=2))

    @lc.program
    def guide():
        yield lc.sample("t", Categorical(torch.ones(2) / 2))

    with pytest.raises(SiteError, match="site 't'.*not text"):
        lc.infer(target(), method="importance", proposal=guide(), num_samples=4)


def test_an_untokenisable_observed_text_names_its_site():
    @lc.program
    def prog():
        yield lc.observe("obs", lc.LM(LM, ""), "zz")

    with pytest.raises(TokenizationError, match="site 'obs'"):
        lc.infer(prog(), method="forward", num_samples=2)


def test_a_condition_on_a_tensor_of_many_values_is_a_site_error():
    @lc.program
    def prog():
        yield lc.condition("c", torch.tensor([True, False]))

    with pytest.raises(SiteError, match="site 'c'"):
        lc.infer(prog(), num_samples=1)


@pytest.mark.parametrize("seed", [-1, 1.5, "x", 2**64, True])
def test_bad_seeds_are_option_errors(seed):
    @lc.program
    def prog():
        yield lc.factor("f", 0.0)

    with pytest.raises(OptionError, match="seed"):
        lc.infer(prog(), seed=seed)


def test_a_clone_waiting_on_a_text_score_finishes_on_its_own():
    @lc.program
    def prog():
        yield lc.observe("o", lc.LM(LM, "a", max_tokens=3), "ab")

    engine = Engine(seed=0)
    (original,) = engine.advance_all([Particle(prog())])
    (clone,) = engine.run([original.clone()])
    assert clone.trace["o"].log_prob == pytest.approx(LM_log_prob("ab"), abs=1e-9)


def LM_log_prob(text: str) -> float:
    return lc.LM(LM, "a", max_tokens=3).log_prob(text)


def test_greedy_respects_predicate_constraints():
    no_a = lc.constraints.predicate(lambda text: "a" not in text)

    @lc.program
    def prog():
        return (yield lc.gen("g", LM, "a", max_tokens=2, constraint=no_a))

    (p,) = Engine(sampler=Greedy(), seed=0).run([Particle(prog())])
    assert p.trace.value == "bb" and not p.dead


def test_segment_rules_outside_segment_mode_are_option_errors():
    @lc.program
    def prog():
        yield lc.gen("x", LM, "a", max_tokens=2)

    with pytest.raises(OptionError, match="segment"):
        lc.infer(prog(), method="smc", segment_tokens=2)
