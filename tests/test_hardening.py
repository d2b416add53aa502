"""Hostile and careless input to the core: no wrong answer with a clean exit, no lost result,
no unbounded run, and a clear error naming the site or option instead of a traceback."""

import _thread
import json
import math
import threading
import time

import pytest
import torch
from pyro.distributions import Beta

import lmcascade as lc
import lmcascade.memory
from lmcascade.constraints import compile_index
from lmcascade.errors import (
    Interrupted,
    ModelError,
    OptionError,
    SiteError,
)
from lmcascade.models import ToyLM
from lmcascade.result import Result
from lmcascade.trace import Trace, jsonable
from programs import LM as TOY

# --- weights that are NaN or infinite ---------------------------------------------------------


@lc.program
def two_huge_factors():
    yield lc.factor("a", 1e308)
    yield lc.factor("b", 1e308)
    return 1


@lc.program
def infinite_density():
    yield lc.observe("edge", Beta(0.5, 0.5), torch.tensor(0.0))
    return 1


@pytest.mark.parametrize("method", ["forward", "enumerate"])
def test_an_infinite_log_density_is_an_error(method):
    with pytest.raises(SiteError, match="log-probability inf"):
        lc.infer(infinite_density(), method=method, seed=0)


def test_trace_refuses_nan_and_keeps_minus_infinity():
    t = Trace()
    t.add(lc.Site("zero", "factor", -math.inf, -math.inf))
    assert t.log_weight == -math.inf
    with pytest.raises(SiteError, match="'n'"):
        t.add(lc.Site("n", "observe", 1.0, math.nan))
    assert t.names == ["zero"]  # the refused site left the trace as it was


# --- temperature ------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-41, 1e-30, 1e-21])
def test_a_vanishing_temperature_is_its_limit(temperature):
    lm = ToyLM(["a", "b", "c", "<eos>"], lambda ctx: [0.0, 0.0, -1.0, -2.0])

    @lc.program
    def one():
        return (yield lc.gen("x", lm, "", max_tokens=1, temperature=temperature))

    r = lc.infer(one(), method="enumerate")
    assert r.distribution() == pytest.approx({"a": 0.5, "b": 0.5})  # the tied arg-maxes
    assert r.log_evidence == 0.0
    sampled = lc.infer(one(), method="forward", num_samples=50, seed=0)
    assert set(sampled.values) == {"a", "b"} and not any(math.isnan(w) for w in sampled.weights)


def test_a_vanishing_temperature_on_a_transformer_is_greedy_without_ties():
    from tiny_hf import tiny_lm

    lm = tiny_lm()

    @lc.program
    def cold(t):
        return (yield lc.gen("x", lm, "ab", max_tokens=4, temperature=t))

    frozen = lc.infer(cold(1e-35), method="enumerate").distribution()
    greedy = lc.infer(cold(0), method="enumerate").distribution()
    assert frozen == greedy and len(frozen) == 1


@pytest.mark.parametrize("bad", [math.inf, math.nan, -1.0, True, "0.5"])
def test_temperature_must_be_finite_and_non_negative(bad):
    with pytest.raises(SiteError, match="temperature"):
        lc.LM(TOY, "", temperature=bad)


# --- results are strict JSON, never lost ------------------------------------------------------


def strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_with_zero_weight_traces_is_strict():
    from programs import hard_condition

    r = lc.infer(hard_condition(), method="forward", num_samples=20, seed=1)
    assert any(w == -math.inf for w in r.log_weights)
    data = strict_json(r.to_json())
    weights = [t["log_weight"] for t in data["traces"]]
    assert "-inf" in weights and all(isinstance(w, float | str) for w in weights)
    assert [float(w) for w in weights] == list(r.log_weights)


def test_json_of_an_estimate_a_method_does_not_make():
    t = Trace()
    t.value, t.done = 1, True
    data = strict_json(Result([t], [0.0]).to_json())
    assert data["log_evidence"] == "nan"


@pytest.mark.parametrize("depth", [5, 500, 5000])
def test_a_deeply_nested_result_survives_formatting(depth):
    @lc.program
    def nested(n):
        x = yield lc.sample("x", lc.distributions.Bernoulli(0.5))
        yield lc.condition("one", x == 1)
        value: list = []
        for _ in range(n):
            value = [value]
        return value

    r = lc.infer(nested(depth), method="enumerate")
    kept = r.values[1] if r.values[0] is None else r.values[0]
    inner, levels = kept, 0
    while inner:
        inner, levels = inner[0], levels + 1
    assert levels == depth  # the value itself is untouched
    strict_json(r.to_json())
    assert "probability" in r.summary() and len(r.distribution()) == 1


def test_jsonable_marks_non_finite_numbers():
    assert jsonable([1.0, math.inf, -math.inf, math.nan]) == [1.0, "inf", "-inf", "nan"]


# --- model context and memory -----------------------------------------------------------------


def test_prompts_that_cannot_fit_are_refused_before_any_work():
    from tiny_hf import tiny_lm

    lm = tiny_lm()  # holds 256 tokens

    @lc.program
    def gen(prompt, n):
        return (yield lc.gen("x", lm, prompt, max_tokens=n))

    cases = [
        ("", 2, "at least 1 token"),
        ("a" * 300, 2, "prompt has 300 tokens but model 'tiny-llama-0' holds 256"),
        ("a" * 200, 100, "lower max_tokens to at most 56"),
    ]
    for prompt, n, message in cases:
        before = lm.pop_counters()
        with pytest.raises(ModelError, match=f"site 'x'.*{message}"):
            lc.infer(gen(prompt, n), method="forward", num_samples=2, seed=0)
        assert not lm.pop_counters().get("forward_passes"), before


def test_a_population_too_big_for_memory_fails_before_the_run(monkeypatch):
    monkeypatch.setattr(lmcascade.inference.base, "available_memory", lambda *a: 10**6)

    @lc.program
    def flip():
        return (yield lc.sample("x", lc.distributions.Bernoulli(0.5)))

    with pytest.raises(OptionError, match=r"particles=1,000 needs about .* GiB"):
        lc.infer(flip(), method="smc", particles=1000)
    assert len(lc.infer(flip(), method="smc", particles=100, seed=0)) == 100


def test_model_caches_that_cannot_fit_fail_before_the_first_step(monkeypatch):
    from tiny_hf import tiny_lm

    lm = tiny_lm()
    per_token = lm.cache_bytes_per_token
    assert per_token == 2 * 2 * 2 * 8 * 4  # layers, keys and values, kv heads, head dim, fp32
    monkeypatch.setattr(lmcascade.memory, "available_memory", lambda *a: 100 * per_token)

    @lc.program
    def gen(n):
        return (yield lc.gen("x", lm, "ab", max_tokens=n))

    with pytest.raises(ModelError, match="4 generations of up to 30 tokens"):
        lc.infer(gen(30), method="smc", particles=4, seed=0)
    assert len(lc.infer(gen(20), method="smc", particles=4, seed=0)) == 4  # 2 + 4 * 20 < 100


# --- errors inside a batched step name their site --------------------------------------------


def test_nan_from_a_model_names_the_site():
    calls = []

    def scores(ctx):
        calls.append(ctx)
        return [0.0, -math.inf] if len(ctx) < 2 else [math.nan, 0.0]

    lm = ToyLM(["a", "<eos>"], scores)

    @lc.program
    def p():
        return (yield lc.gen("answer", lm, "", max_tokens=5))

    with pytest.raises(ModelError, match="site 'answer'.*NaN"):
        lc.infer(p(), method="smc", particles=3, seed=0, progress=False)


# --- Ctrl-C -----------------------------------------------------------------------------------


def test_ctrl_c_during_inference_reports_progress():
    calls = []

    def scores(ctx):
        calls.append(ctx)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return [0.0, 0.0, -5.0]

    lm = ToyLM(["a", "b", "<eos>"], scores)

    @lc.program
    def long():
        return (yield lc.gen("x", lm, "", max_tokens=50))

    with pytest.raises(Interrupted) as caught:
        lc.infer(long(), method="smc", particles=1, seed=0, progress=False)
    assert isinstance(caught.value, KeyboardInterrupt)
    assert caught.value.progress["model_calls"] == 5  # the sixth was interrupted
    assert caught.value.progress["tokens_generated"] == 5
    assert "smc was interrupted" in str(caught.value)


def test_a_slow_constraint_compilation_stays_interruptible(capsys):
    def slow(pattern, vocabulary):
        time.sleep(30)

    threading.Timer(0.3, _thread.interrupt_main).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        compile_index(slow, "x", None, "m")
    assert time.monotonic() - start < 5


def test_constraint_compilation_errors_reach_the_caller():
    def broken(pattern, vocabulary):
        raise ValueError("bad pattern")

    with pytest.raises(ValueError, match="bad pattern"):
        compile_index(broken, "x", None, "m")
    assert compile_index(lambda p, v: (p, v), "x", 1, "m") == ("x", 1)


def test_nan_from_a_transformer_is_a_model_error_naming_the_site():
    from tiny_hf import tiny_lm

    lm = tiny_lm(seed=3)
    with torch.no_grad():
        lm.hf.lm_head.weight[0, 0] = math.nan  # broken weights: every logit of eos is NaN

    @lc.program
    def p():
        return (yield lc.gen("reply", lm, "ab", max_tokens=3))

    with pytest.raises(ModelError, match="site 'reply'.*NaN next-token log-probabilities"):
        lc.infer(p(), method="forward", num_samples=2, seed=0)
