"""Replay that rescores: recorded values kept, scored under the program's distributions now.

The reference everywhere is exact enumeration: a trace replayed after an upstream edit must
carry exactly the per-site log-probabilities enumeration gives the same values.
"""

from __future__ import annotations

import math

import pytest
import torch
from pyro.distributions import Bernoulli, Categorical

import lmcascade as lc
from lmcascade.engine import Engine, Particle
from lmcascade.errors import ReplayDivergenceError
from lmcascade.models import ToyLM
from lmcascade.trace import Site
from programs import LM
from stats import tv_distance

INF = math.inf


def _prompt_lm() -> ToyLM:
    """After prompt "a:" the token "b" is impossible; after "b:" everything is possible."""

    def scores(ctx):
        if ctx[:2] == (0, 4):
            return [0.5, -INF, 0.2, -INF, -INF, 0.3 + 0.5 * len(ctx)]
        return [0.1, 0.4, -0.2, -INF, -INF, 0.2 + 0.5 * len(ctx)]

    return ToyLM(["a", "b", "c", "q", ":", "<eos>"], scores, name="prompt-dependent")


PLM = _prompt_lm()


@lc.program
def topic_then_text():
    c = yield lc.sample("topic", Categorical(torch.tensor([0.4, 0.6], dtype=torch.float64)))
    text = yield lc.gen("text", PLM, ["a", "b"][c] + ":", max_tokens=2)
    yield lc.factor("short", -0.5 * len(text))
    return (c, text)


def _enumerated(bound) -> dict:
    """(topic, text) -> the exact trace of that outcome."""
    result = lc.infer(bound, method="enumerate")
    return {tuple(t.value): t for t in result.traces}


def _edit(trace, name, value):
    """The trace with site ``name`` given ``value`` (an MCMC-style upstream edit)."""
    edited = trace.copy()
    sites = [
        Site(s.name, s.kind, value, s.log_prob, s.proposal_log_prob, dist=s.dist)
        if s.name == name
        else s
        for s in trace.sites
    ]
    edited.sites = sites
    return edited


@pytest.mark.parametrize("trusted", [0, 1])
def test_upstream_edit_rescores_downstream_sites_to_the_enumerated_values(trusted):
    exact = _enumerated(topic_then_text())
    engine = Engine(seed=0)
    checked = 0
    for (topic, text), trace in exact.items():
        if topic != 1:
            continue
        edited = _edit(trace, "topic", 0)  # the prompt of "text" changes from "b:" to "a:"
        prefix = trace.prefix(0) if trusted == 0 else edited.prefix(1)
        (p,) = engine.run([Particle(topic_then_text(), prefix, replay=edited)])
        assert p.trace["text"].value == text  # the value was kept, not regenerated
        if "b" in text:  # impossible after "a:": weight zero, not an exception
            assert p.trace["text"].log_prob == -INF and p.dead
            continue
        reference = exact[(0, text)]
        for site in reference.sites:
            if trusted == 1 and site.name == "topic":
                continue  # a trusted prefix keeps the recorded (edited) site as it is
            assert p.trace[site.name].log_prob == pytest.approx(site.log_prob, abs=1e-9)
        if trusted == 0:
            assert p.trace.log_joint == pytest.approx(reference.log_weight, abs=1e-9)
        checked += 1
    assert checked >= 3


def test_rescored_lm_site_keeps_per_token_log_probs():
    exact = _enumerated(topic_then_text())
    trace = next(t for (c, x), t in exact.items() if c == 1 and x == "ac")
    (p,) = Engine(seed=0).run([Particle(topic_then_text(), replay=_edit(trace, "topic", 0))])
    site = p.trace["text"]
    assert len(site.token_log_probs) == len(site.token_ids)
    assert sum(site.token_log_probs) == pytest.approx(site.log_prob, abs=1e-9)
    assert site.proposal_log_prob == trace["text"].proposal_log_prob  # the density it came from


def test_rescored_scalar_value_outside_the_support_weighs_zero():
    @lc.program
    def prog(n):
        x = yield lc.sample("x", Categorical(torch.ones(n, dtype=torch.float64) / n))
        return int(x)

    recorded = lc.infer(prog(4), method="enumerate").traces[-1]  # x = 3
    (p,) = Engine(seed=0).run([Particle(prog(2), replay=recorded)])
    assert p.trace["x"].log_prob == -INF and p.dead


def test_sites_missing_from_the_record_are_drawn_afresh():
    @lc.program
    def prog():
        a = yield lc.sample("a", Bernoulli(0.5))
        if a:
            yield lc.sample("b", Bernoulli(0.9))
        return int(a)

    @lc.program
    def only_a():
        yield lc.sample("a", Bernoulli(0.5))

    (guide,) = Engine(seed=0).run([Particle(only_a())])
    guide.trace.sites[0] = Site("a", "sample", 1.0, math.log(0.5), math.log(0.5))
    (p,) = Engine(seed=1).run([Particle(prog(), replay=guide.trace)])
    assert p.trace["a"].value == 1.0 and "b" in p.trace


def test_importance_with_a_proposal_rescoring_lm_sites_matches_enumeration():
    @lc.program
    def guide():
        yield lc.sample("topic", Categorical(torch.tensor([0.5, 0.5], dtype=torch.float64)))
        yield lc.gen("text", LM, "b:", max_tokens=2, temperature=1.5)

    exact = lc.infer(topic_then_text(), method="enumerate").distribution()
    r = lc.infer(topic_then_text(), method="importance", proposal=guide(), num_samples=4000, seed=1)
    # The guide's texts come from another model and prompt: every one is rescored by text.
    assert tv_distance(r.distribution(), exact) < 0.08


def test_branching_alternatives_continue_in_their_own_particles():
    """A particle stopped where a policy gave several values is cloned per value (the clone
    resumes by replay and takes its own value)."""

    @lc.program
    def two_coins():
        a = yield lc.sample("a", Bernoulli(0.3))
        b = yield lc.sample("b", Bernoulli(0.6))
        text = yield lc.gen("t", LM, "q", max_tokens=1)
        return (int(a), int(b), text)

    r = lc.infer(two_coins(), method="enumerate")
    values = {v[:2] for v in r.values}
    assert values == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert math.exp(r.log_evidence) == pytest.approx(1.0, abs=1e-6)  # float32 pyro params


def test_clone_of_a_particle_with_a_resolved_site_takes_that_site():
    @lc.program
    def prog():
        a = yield lc.sample("a", Bernoulli(0.5))
        return int(a)

    engine = Engine(seed=0)
    p = Particle(prog())
    p.resolved = Site("a", "sample", 1.0, math.log(0.5), math.log(0.5))
    twin = p.clone()
    (done,) = engine.run([twin])
    assert done.trace.value == 1


def test_prompt_divergence_on_resume_is_reported():
    switch = {"prompt": "a"}

    @lc.program
    def prog():
        yield lc.gen("x", LM, switch["prompt"], max_tokens=1)
        yield lc.factor("f", 0.0)

    engine = Engine(seed=0)
    (p,) = engine.run([Particle(prog())])
    switch["prompt"] = "b"  # the program is no longer deterministic given its sites
    q = p.clone()
    q.trace.done = False
    with pytest.raises(ReplayDivergenceError, match="with a different prompt"):
        engine.run([q])
