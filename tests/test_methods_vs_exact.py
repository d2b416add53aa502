"""Every sampling method against exact enumeration on the shared ToyLM programs.

Tolerances come from the sample size (see ``stats.tv_bound``); seeds are fixed.
"""

import math

import numpy as np
import pytest
import torch
from pyro.distributions import Categorical

import lmcascade as lc
from lmcascade.models import ToyLM
from programs import LM, MAX_LOG_WEIGHT, PROGRAMS, VOCAB
from stats import tv_bound, tv_distance

N = 3000


@pytest.fixture(scope="module", params=sorted(PROGRAMS))
def case(request):
    prog = PROGRAMS[request.param]()
    exact = lc.infer(prog, method="enumerate")
    return request.param, prog, exact


def check_close(result, exact, n_eff):
    want = exact.distribution()
    got = result.distribution()
    bound = tv_bound(n_eff, len(want))
    assert tv_distance(got, want) < bound, (tv_distance(got, want), bound)


def test_forward_matches_exact(case):
    _, prog, exact = case
    r = lc.infer(prog, method="forward", num_samples=N, seed=11)
    assert len(r.values) == N
    check_close(r, exact, r.ess)


def test_importance_prior_matches_exact(case):
    _, prog, exact = case
    r = lc.infer(prog, method="importance", num_samples=N, seed=12)
    check_close(r, exact, r.ess)


def test_rejection_matches_exact(case):
    name, prog, exact = case
    r = lc.infer(
        prog, method="rejection", num_samples=N, seed=13, max_log_weight=MAX_LOG_WEIGHT[name]
    )
    assert len(r.values) == N and np.all(r.weights == 1.0 / N)
    assert 0 < r.stats["acceptance_rate"] <= 1
    check_close(r, exact, N)


def test_evidence_unbiased_over_seeds(case):
    """mean of exp(log_evidence) over seeds is within 3 standard errors of the exact Z."""
    _, prog, exact = case
    z = math.exp(exact.log_evidence)
    estimates = np.array(
        [
            math.exp(lc.infer(prog, method="importance", num_samples=100, seed=s).log_evidence)
            for s in range(40)
        ]
    )
    se = estimates.std(ddof=1) / math.sqrt(len(estimates))
    assert abs(estimates.mean() - z) < 3 * se + 1e-12, (estimates.mean(), z, se)


# --- importance with a proposal program ---------------------------------------------------

OTHER = ToyLM(
    VOCAB, lambda ctx: [0.0, 0.0, 0.0, -math.inf, -math.inf, 0.3 * len(ctx)], name="flat-toy"
)


@lc.program
def topic_proposal():
    yield lc.sample("topic", Categorical(torch.tensor([0.6, 0.4], dtype=torch.float64)))


@lc.program
def tempered_proposal():
    """Same model, hotter: target scores the proposal's token path directly."""
    yield lc.gen("text", LM, "q", max_tokens=3, temperature=1.7)


@lc.program
def other_model_proposal():
    """A different model: target scores the proposed text."""
    yield lc.gen("text", OTHER, "q", max_tokens=3)


@pytest.mark.parametrize(
    ("program", "proposal"),
    [
        ("categorical_prompt", topic_proposal),
        ("hard_condition", tempered_proposal),
        ("hard_condition", other_model_proposal),
    ],
)
def test_importance_with_proposal(program, proposal):
    prog = PROGRAMS[program]()
    exact = lc.infer(prog, method="enumerate")
    r = lc.infer(prog, method="importance", proposal=proposal(), num_samples=N, seed=21)
    check_close(r, exact, r.ess)
    # The evidence estimate is unbiased under the proposal too.
    z = math.exp(exact.log_evidence)
    est = np.array(
        [
            math.exp(
                lc.infer(
                    prog, method="importance", proposal=proposal(), num_samples=100, seed=s
                ).log_evidence
            )
            for s in range(30)
        ]
    )
    assert abs(est.mean() - z) < 3 * est.std(ddof=1) / math.sqrt(len(est)) + 1e-12


def test_enumerate_weights_are_joint_probabilities(case):
    _, _, exact = case
    assert math.isclose(float(np.sum(np.exp(exact.log_weights))), math.exp(exact.log_evidence))
    assert math.isclose(float(exact.weights.sum()), 1.0)
