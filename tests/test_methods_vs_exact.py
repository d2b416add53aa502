"""Every sampling method against exact enumeration on the shared ToyLM programs.

Forward and importance sampling return an i.i.d. weighted population: thinned by weight with a
known bound on the weights (``stats.accepted_by_weight``) it becomes i.i.d. draws from the
exact posterior, whatever its size.  Rejection sampling's accepted samples are i.i.d. posterior
draws already.  Both are tested with ``stats.assert_matches``: a chi-square test with a 1e-3
false-alarm rate; each test's docstring gives the total-variation distance it detects with
probability 0.9 (``stats.detectable_tv`` for its number of draws).  Seeds are fixed.
"""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from pyro.distributions import Categorical

import lmcascade as lc
from lmcascade.models import ToyLM
from programs import LM, MAX_LOG_WEIGHT, PROGRAMS, VOCAB
from stats import accepted_by_weight, assert_matches, evidence_check

N = 3000
# chained_soft accepts only exp(log Z - 0.5) = 7.5% of its samples when thinned by weight,
# and as many of its traces in rejection sampling
SAMPLES = {"chained_soft": 8000}
ACCEPTED = {"chained_soft": 1500}


@pytest.fixture(scope="module", params=sorted(PROGRAMS))
def case(request):
    prog = PROGRAMS[request.param]()
    exact = lc.infer(prog, method="enumerate")
    return request.param, prog, exact


def test_forward_matches_exact(case):
    """Forward samples thinned by weight: 600-1900 exact draws (detect TV >= 0.08-0.14)."""
    name, prog, exact = case
    n = SAMPLES.get(name, N)
    r = lc.infer(prog, method="forward", num_samples=n, seed=11)
    assert len(r.values) == n
    draws = accepted_by_weight(r, MAX_LOG_WEIGHT[name] or 0.0, seed=1)
    assert_matches(draws, exact.distribution())


def test_importance_prior_matches_exact(case):
    """Importance samples (prior proposal) thinned by weight, as for forward sampling."""
    name, prog, exact = case
    n = SAMPLES.get(name, N)
    r = lc.infer(prog, method="importance", num_samples=n, seed=12)
    draws = accepted_by_weight(r, MAX_LOG_WEIGHT[name] or 0.0, seed=1)
    assert_matches(draws, exact.distribution())


def test_rejection_matches_exact(case):
    """3000 accepted samples (1500 for chained_soft), i.i.d. exact draws (detect TV >=
    0.06-0.10)."""
    name, prog, exact = case
    n = ACCEPTED.get(name, N)
    r = lc.infer(
        prog, method="rejection", num_samples=n, seed=13, max_log_weight=MAX_LOG_WEIGHT[name]
    )
    assert len(r.values) == n and np.all(r.weights == 1.0 / n)
    assert 0 < r.stats["acceptance_rate"] <= 1
    assert_matches(r.values, exact.distribution())


def test_evidence_unbiased_over_seeds(case):
    """Mean of exp(log_evidence) over 40 seeds (100 samples each) within 3 standard errors of
    the exact Z.  The estimates' relative sd is 0.07-0.17 here, so this detects (probability
    about 0.9) a relative bias of 4.28 * sd / sqrt(40) = 5-11%; evidence_check asserts <= 15%."""
    _, prog, exact = case
    z = math.exp(exact.log_evidence)
    estimates = [
        math.exp(lc.infer(prog, method="importance", num_samples=100, seed=s).log_evidence)
        for s in range(40)
    ]
    evidence_check(estimates, z, max_detectable=0.15)


# --- importance with a proposal program ---------------------------------------------------

OTHER = ToyLM(
    VOCAB, lambda ctx: [0.0, 0.0, 0.0, -math.inf, -math.inf, 0.3 * len(ctx)], name="flat-toy"
)


@lc.program
def topic_proposal():
    topic = yield lc.sample("topic", Categorical(torch.tensor([0.6, 0.4], dtype=torch.float64)))
    return topic


@lc.program
def tempered_proposal():
    """Same model, hotter: target scores the proposal's token path directly."""
    text = yield lc.gen("text", LM, "q", max_tokens=3, temperature=1.7)
    return text


@lc.program
def other_model_proposal():
    """A different model: target scores the proposed text."""
    text = yield lc.gen("text", OTHER, "q", max_tokens=3)
    return text


def text_weight_bound(target, proposal) -> float:
    """max over texts of log p(text, conditions) - log q(text): the largest importance weight
    of a one-site text program, by exact enumeration of both."""
    exact = lc.infer(target, method="enumerate")
    joint: Counter = Counter()
    for trace, lw in zip(exact.traces, exact.log_weights, strict=True):
        joint[trace.value] += math.exp(lw)
    q = lc.infer(proposal, method="enumerate").distribution()
    return max(math.log(p) - math.log(q[v]) for v, p in joint.items() if p > 0)


@pytest.mark.parametrize(
    ("program", "proposal"),
    [
        ("categorical_prompt", topic_proposal),
        ("hard_condition", tempered_proposal),
        ("hard_condition", other_model_proposal),
    ],
)
def test_importance_with_proposal(program, proposal):
    """Thinned by weight: 480-1060 exact draws (detects TV >= 0.10-0.15).  The evidence check
    (30 seeds, relative sd 0.08-0.15) detects a relative bias of 6-12%; asserted <= 15%."""
    prog = PROGRAMS[program]()
    exact = lc.infer(prog, method="enumerate")
    if proposal is topic_proposal:  # weight p(topic) / q(topic) <= 0.7 / 0.4; text from prior
        bound = math.log(0.7 / 0.4)
    else:
        bound = text_weight_bound(prog, proposal())
    r = lc.infer(prog, method="importance", proposal=proposal(), num_samples=N, seed=21)
    assert_matches(accepted_by_weight(r, bound, seed=1), exact.distribution())
    # The evidence estimate is unbiased under the proposal too.
    z = math.exp(exact.log_evidence)
    estimates = [
        math.exp(
            lc.infer(
                prog, method="importance", proposal=proposal(), num_samples=100, seed=s
            ).log_evidence
        )
        for s in range(30)
    ]
    evidence_check(estimates, z, max_detectable=0.15)


def test_enumerate_weights_are_joint_probabilities(case):
    _, _, exact = case
    assert math.isclose(float(np.sum(np.exp(exact.log_weights))), math.exp(exact.log_evidence))
    assert math.isclose(float(exact.weights.sum()), 1.0)
