"""Options every method takes (progress, on_tool_error), rejection sampling of constrained
programs, and the values of zero-weight traces (issue 10: defects 5, 7 and 9)."""

import json
import math
import pickle

import pytest
from pyro.distributions import Bernoulli, Normal

import lmcascade as lc
from lmcascade.errors import InferenceError, OptionError
from lmcascade.inference import progress
from lmcascade.models import ToyLM
from lmcascade.policy import ON_TOOL_ERROR
from lmcascade.result import REJECTED
from programs import NO_B, TRAPPY, hard_condition
from stats import tv_bound, tv_distance

# Small options for each method, so that every method runs the same test.
SMALL = {
    "forward": {"num_samples": 6},
    "importance": {"num_samples": 6},
    "rejection": {"num_samples": 3, "max_attempts": 200},
    "smc": {"num_samples": 6},
    "enumerate": {},
}


# --- progress --------------------------------------------------------------------------------


class RecordingBar:
    """Stands in for tqdm: records how it was made and how often it ticked."""

    made: list["RecordingBar"] = []

    def __init__(self, **kwargs):
        self.kwargs, self.ticks, self.closed = kwargs, 0, False
        self.disable = kwargs["disable"] is True
        RecordingBar.made.append(self)

    def update(self, n=1):
        self.ticks += n

    def set_postfix_str(self, text, refresh=True):
        self.status = text

    def set_postfix(self, refresh=True, **kwargs):
        self.status = kwargs

    def close(self):
        self.closed = True


@pytest.mark.parametrize("method", sorted(SMALL))
@pytest.mark.parametrize("shown", [True, False])
def test_every_method_has_a_progress_bar_that_progress_false_turns_off(method, shown, monkeypatch):
    """One bar per run, ticked per decoding step, drawn only in a terminal (``disable=None``
    lets tqdm decide) after two seconds, and never with ``progress=False``."""
    RecordingBar.made = []
    monkeypatch.setattr(progress, "tqdm", RecordingBar)
    lc.infer(hard_condition(), method=method, seed=0, progress=shown, **SMALL[method])
    assert len(RecordingBar.made) == 1
    bar = RecordingBar.made[0]
    assert bar.kwargs["disable"] is (None if shown else True)
    assert bar.kwargs["delay"] == pytest.approx(2.0) and bar.kwargs["desc"] == method
    assert bar.ticks >= 1 and bar.closed  # one tick per decoding step


def test_the_bar_shows_how_far_rejection_has_got(monkeypatch):
    RecordingBar.made = []
    monkeypatch.setattr(progress, "tqdm", RecordingBar)
    monkeypatch.setattr(progress, "STATUS_EVERY", 1)
    lc.infer(hard_condition(), method="rejection", num_samples=20, seed=0, progress=True)
    assert "accepted" in RecordingBar.made[0].status


@pytest.mark.parametrize("method", sorted(SMALL))
def test_common_options_are_checked_by_every_method(method):
    with pytest.raises(OptionError, match="option progress must be True or False"):
        lc.infer(hard_condition(), method=method, progress="yes", **SMALL[method])
    with pytest.raises(OptionError, match="on_tool_error must be 'zero' .* or 'raise'"):
        lc.infer(hard_condition(), method=method, on_tool_error="ignore", **SMALL[method])
    with pytest.raises(OptionError, match="progress, .*on_tool_error|on_tool_error, .*progress"):
        lc.infer(hard_condition(), method=method, progres=False, **SMALL[method])


# --- on_tool_error ---------------------------------------------------------------------------


@lc.program
def reads_the_mode():
    coin = yield lc.sample("coin", Bernoulli(0.5))
    mode = yield lc.call("mode", ON_TOOL_ERROR.get)
    return f"{int(coin)}:{mode}"


@pytest.mark.parametrize("method", sorted(SMALL))
@pytest.mark.parametrize("mode", ["zero", "raise", None])
def test_on_tool_error_is_set_inside_the_run_and_restored_after(method, mode):
    """Tools see the run's ``on_tool_error`` (the default is ``"zero"``)."""
    options = {} if mode is None else {"on_tool_error": mode}
    r = lc.infer(reads_the_mode(), method=method, seed=0, **options, **SMALL[method])
    assert {v.split(":")[1] for v in r.values} == {mode or "zero"}
    assert ON_TOOL_ERROR.get() == "zero"


def test_on_tool_error_is_restored_when_the_run_fails():
    @lc.program
    def breaks():
        mode = yield lc.call("mode", ON_TOOL_ERROR.get)
        raise RuntimeError(f"program failed in mode {mode}")
        yield  # a generator

    with pytest.raises(RuntimeError, match="in mode raise"):
        lc.infer(breaks(), method="forward", num_samples=2, on_tool_error="raise", seed=0)
    assert ON_TOOL_ERROR.get() == "zero"


# --- rejection with constraints --------------------------------------------------------------


@lc.program
def constrained_with_condition():
    """A site under the hard constraint "no b" on a model that favours b after a (allowed
    mass 0.3) and not after c (0.95): the weights differ a lot from trace to trace."""
    x = yield lc.gen("x", TRAPPY, "c", max_tokens=3, constraint=NO_B)
    yield lc.condition("two_or_more", len(x) >= 2)
    return x


def test_rejection_of_a_constrained_site_is_exact_without_options():
    """Rejection accepts each trace with probability exp(weight), the allowed mass of its
    constraint (a probability, so no bound is needed): its accepted values are i.i.d. draws
    from the posterior, compared with ``enumerate``'s exact distribution over its 12 values.

    Bound: Bretagnolle-Huber-Carol, P(TV(empirical, truth) > eps) <= 2^k exp(-2 n eps^2), with
    n = 3000 accepted draws and k = 12 values gives eps = 0.050 at a false-alarm rate of 1e-3
    (over seeds; the seed is fixed).  With the same probability the test detects any sampler
    whose distribution is at total variation 2 * eps = 0.10 or more from the posterior.
    Accepting every trace that meets the condition (ignoring the constraint's weight) is at
    0.32, accepting with probability exp(weight / 2) at 0.17 and exp(2 * weight) at 0.26
    (exact figures); each was run once in place of the right rule and failed this test.
    The acceptance rate estimates the evidence: it must be within 4 binomial standard errors.
    """
    exact = lc.infer(constrained_with_condition(), method="enumerate")
    truth = exact.distribution()
    n = 3000
    r = lc.infer(constrained_with_condition(), method="rejection", num_samples=n, seed=0)
    assert len(r) == n and r.stats["log_weight_bound"] == 0.0
    empirical = {v: r.values.count(v) / n for v in set(r.values)}
    assert set(empirical) <= set(truth)
    eps = tv_bound(n, len(truth), delta=1e-3)
    assert eps < 0.051
    assert tv_distance(empirical, truth) < eps, (tv_distance(empirical, truth), eps)
    z, tried = math.exp(exact.log_evidence), r.stats["attempts"]
    assert abs(r.stats["acceptance_rate"] - z) < 4 * math.sqrt(z * (1 - z) / tried)
    assert r.log_evidence == pytest.approx(math.log(r.stats["acceptance_rate"]))


def counting_lm() -> tuple[ToyLM, list]:
    calls: list = []

    def scores(ctx):
        calls.append(ctx)
        return [0.0, 0.0]

    return ToyLM(["a", "<eos>"], scores), calls


def test_a_factor_without_a_bound_stops_rejection_before_any_model_call():
    lm, calls = counting_lm()

    @lc.program
    def scored():
        yield lc.factor("prefer", -1.0)
        return (yield lc.gen("x", lm, "", max_tokens=2))

    with pytest.raises(InferenceError, match="site 'prefer' is a factor .*max_log_weight"):
        lc.infer(scored(), method="rejection", num_samples=50, seed=0)
    assert calls == []
    r = lc.infer(scored(), method="rejection", num_samples=50, max_log_weight=0.0, seed=0)
    assert len(r) == 50 and 0.2 < r.stats["acceptance_rate"] < 0.6  # exp(-1) = 0.37


def test_rejection_bounds_observes_that_are_probabilities_and_asks_for_densities():
    @lc.program
    def discrete():
        x = yield lc.sample("x", Bernoulli(0.5))
        yield lc.observe("y", Bernoulli(0.9 if x else 0.2), 1.0)
        return int(x)

    r = lc.infer(discrete(), method="rejection", num_samples=400, seed=0)
    assert abs(r.distribution()[1] - 0.9 / 1.1) < 0.08  # 4.4 standard errors

    @lc.program
    def continuous():
        x = yield lc.sample("x", Bernoulli(0.5))
        yield lc.observe("y", Normal(float(x), 0.1), 1.0)
        return int(x)

    with pytest.raises(InferenceError, match="site 'y' is an observe of a continuous density"):
        lc.infer(continuous(), method="rejection", num_samples=5, seed=0)


def test_a_bound_that_fails_is_an_error():
    @lc.program
    def big():
        yield lc.factor("f", 2.0)
        return 1

    with pytest.raises(OptionError, match="log-weight 2 > max_log_weight 1"):
        lc.infer(big(), method="rejection", num_samples=5, max_log_weight=1.0, seed=0)
    with pytest.raises(OptionError, match="max_log_weight must be a finite number"):
        lc.infer(big(), method="rejection", max_log_weight=True)


# --- values of zero-weight traces ------------------------------------------------------------


@lc.program
def none_or_nothing():
    x = yield lc.sample("x", Bernoulli(0.5))
    yield lc.condition("heads", x == 1)
    return None


@pytest.mark.parametrize("method", ["forward", "importance", "smc"])
def test_zero_weight_traces_are_rejected_not_none(method):
    r = lc.infer(none_or_nothing(), method=method, num_samples=40, seed=0, progress=False)
    dead = [lw == -math.inf for lw in r.log_weights]
    assert 0 < sum(dead) < 40 and r.num_rejected == sum(dead)
    assert [v is REJECTED for v in r.values] == dead
    assert all(v is None for v, d in zip(r.values, dead, strict=True) if not d)
    assert r.distribution() == {None: 1.0} and r.best() is None
    assert REJECTED not in r.sample(20, seed=0)
    data = json.loads(r.to_json())
    assert [t["rejected"] for t in data["traces"]] == dead
    assert f"({sum(dead)} rejected: weight zero)" in r.summary().splitlines()[0]


def test_rejected_is_one_falsy_object_that_survives_pickling():
    assert not REJECTED and repr(REJECTED) == "REJECTED"
    assert pickle.loads(pickle.dumps(REJECTED)) is REJECTED


def test_the_summary_ends_with_one_short_stats_line():
    r = lc.infer(hard_condition(), method="forward", num_samples=10, seed=0)
    *_, evidence, stats = r.summary().splitlines()
    assert evidence.lstrip().startswith("log evidence") and stats.lstrip().startswith("stats:")
    assert "seed=0" in stats and "tokens_scored" not in stats  # counters at zero left off
    assert "model_calls=" in stats and len(stats) < 200
