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


@pytest.mark.parametrize("method", ["enumerate", "forward", "smc", "importance"])
def test_a_weight_that_overflows_names_its_site(method):
    options = {"smc": {"particles": 4}, "enumerate": {}}.get(method, {"num_samples": 4})
    with pytest.raises(SiteError, match=r"site 'b' \(factor\).*overflows"):
        lc.infer(two_huge_factors(), method=method, seed=0, **options)


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


@pytest.mark.parametrize("temperature", [1e-41])
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


@pytest.mark.parametrize("temperature", [1e-41])
def test_a_vanishing_temperature_on_a_transformer_is_greedy_without_ties(temperature):
    # float32 scores divided by these overflow: without the limit rule every row is NaN
    from tiny_hf import tiny_lm

    lm = tiny_lm()

    @lc.program
    def cold(t):
        return (yield lc.gen("x", lm, "ab", max_tokens=4, temperature=t))

    frozen = lc.infer(cold(temperature), method="enumerate").distribution()
    greedy = lc.infer(cold(0), method="enumerate").distribution()
    assert frozen == greedy and len(frozen) == 1
    sampled = lc.infer(cold(temperature), method="smc", particles=4, seed=0, progress=False)
    assert set(sampled.values) == set(greedy)


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
    passes = []
    forward = lm.hf.forward
    lm.hf.forward = lambda *a, **k: passes.append(1) or forward(*a, **k)
    for prompt, n, message in cases:
        with pytest.raises(ModelError, match=f"site 'x'.*{message}"):
            lc.infer(gen(prompt, n), method="forward", num_samples=2, seed=0)
        assert not passes  # refused before any work
    lc.infer(gen("a" * 200, 56), method="forward", num_samples=1, seed=0)
    assert passes  # the counter does see real work
    with pytest.raises(ModelError, match="holds 256"):
        lc.LM(lm, "a" * 300, max_tokens=2).sample(seed=0)
    with pytest.raises(ModelError, match="holds 256"):
        lc.LM(lm, "a" * 100, max_tokens=500).log_prob("b" * 200)


def test_a_population_too_big_for_memory_fails_before_the_run(monkeypatch):
    monkeypatch.setattr(lmcascade.inference.base, "available_memory", lambda *a: 10**6)

    @lc.program
    def flip():
        return (yield lc.sample("x", lc.distributions.Bernoulli(0.5)))

    with pytest.raises(OptionError, match=r"particles=1,000 needs about 2.9 MiB"):
        lc.infer(flip(), method="smc", particles=1000)
    assert len(lc.infer(flip(), method="smc", particles=100, seed=0)) == 100


@pytest.mark.filterwarnings("ignore:.*could need")  # the first chunk fits, and warns
def test_a_step_that_cannot_fit_fails_before_it_runs(monkeypatch):
    from tiny_hf import tiny_lm

    lm = tiny_lm()
    per_token = lm.cache_bytes_per_token
    assert per_token == 2 * 2 * 2 * 8 * 4  # layers, keys and values, kv heads, head dim, fp32
    row = lm.vocab_size * 4 * lmcascade.memory.LOGIT_COPIES

    @lc.program
    def gen(n):
        first = yield lc.gen("first", TOY, "", max_tokens=2)  # a model without a cache
        return first + (yield lc.gen("second", lm, "ba", max_tokens=n))

    # the first steps are the toy model's; the transformer's site is checked when it starts
    room = 40 * row - 1
    monkeypatch.setattr(lmcascade.memory, "available_memory", lambda *a: room)
    with pytest.raises(ModelError, match="site 'second'.*40 generations"):
        lc.infer(gen(3), method="forward", num_samples=40, seed=0)


def test_caches_that_could_outgrow_memory_warn_and_run(monkeypatch):
    from tiny_hf import tiny_lm

    lm = tiny_lm()
    per_token = lm.cache_bytes_per_token
    room = 4 * lm.vocab_size * 4 * lmcascade.memory.LOGIT_COPIES + 100 * per_token
    monkeypatch.setattr(lmcascade.memory, "available_memory", lambda *a: room)

    @lc.program
    def gen(n):
        return (yield lc.gen("x", lm, "ab", max_tokens=n))

    with pytest.warns(UserWarning, match="could need"):
        r = lc.infer(gen(30), method="smc", particles=4, seed=0, progress=False)
    assert len(r) == 4  # 4 x 30 tokens might not fit; the run goes on, warned once


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


# --- potentials steer, they cannot forbid -----------------------------------------------------

FOUR = ToyLM(["a", "b", "c", "<eos>"], lambda ctx: [0.0, 0.0, -1.0, -2.0])


@pytest.mark.parametrize(
    "potential, message",
    [
        (lambda s: -math.inf, "returned -inf"),
        (lambda s: -math.inf if "a" in s else 0.0, "returned -inf for 'a'"),
        (lambda s: math.nan, "returned nan"),
        (lambda s: None, "returned None"),
        (lambda s: [1.0], r"returned \[1.0\]"),
        (lambda s: "1.0", "returned '1.0'"),
        (lambda s: 10**400, "returned 1000"),
    ],
)
def test_a_potential_must_be_finite(potential, message):
    @lc.program
    def steered():
        return (yield lc.gen("x", FOUR, "", max_tokens=4, potential=potential))

    with pytest.raises(SiteError, match=f"{message}.*cannot forbid"):
        lc.infer(steered(), method="smc", particles=8, seed=0, progress=False)


def test_an_exception_in_a_potential_names_the_site():
    def broken(text):
        if text:
            raise KeyError("oops")
        return 0.0

    @lc.program
    def steered():
        return (yield lc.gen("steered_site", FOUR, "", max_tokens=4, potential=broken))

    with pytest.raises(KeyError) as caught:
        lc.infer(steered(), method="smc", particles=4, seed=0, progress=False)
    assert any("steered_site" in note for note in caught.value.__notes__)


@pytest.mark.parametrize(
    "options", [{"top_k": 1}, {"temperature": 0.5}, {"top_p": 0.5}, {"min_tokens": 1}]
)
def test_an_lm_potential_may_not_rule_tokens_out(options):
    with pytest.raises(SiteError, match="cannot forbid a token"):
        lc.LM(FOUR, "", potential=lc.LM(FOUR, "a", **options))


# --- a site that allows nothing has weight zero -----------------------------------------------


def test_min_tokens_against_a_model_that_insists_on_eos():
    only_eos = ToyLM(
        ["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, 0.0] if not ctx else [-math.inf, -math.inf, 0]
    )
    dist = lc.LM(only_eos, "", max_tokens=4, min_tokens=3)
    assert dist.log_prob("aa") == -math.inf  # what scoring says, sampling must agree with

    @lc.program
    def p():
        return (yield lc.gen("x", only_eos, "", max_tokens=4, min_tokens=3))

    for method, options in [("enumerate", {}), ("forward", {"num_samples": 4})]:
        with pytest.raises(lc.errors.AllWeightsZeroError, match="site 'x'"):
            lc.infer(p(), method=method, seed=0, **options)


# --- values that do not fit their type --------------------------------------------------------


@pytest.mark.parametrize("weight", [10**400, "1.0", b"1", [1.0]])
def test_factor_values_that_are_not_floats(weight):
    @lc.program
    def f():
        yield lc.factor("f", weight)
        return 1

    with pytest.raises(SiteError, match="site 'f': factor needs a number"):
        lc.infer(f(), method="enumerate")


def test_observing_a_huge_int_is_a_short_error():
    from pyro.distributions import Normal

    @lc.program
    def f():
        yield lc.observe("o", Normal(0.0, 1.0), 10**5000)
        return 1

    with pytest.raises(SiteError, match="site 'o'") as caught:
        lc.infer(f(), method="enumerate")
    assert len(str(caught.value)) < 500


def test_top_k_beyond_the_vocabulary_is_no_top_k():
    big = lc.LM(FOUR, "", max_tokens=1, top_k=10**20)
    assert big.log_prob("a") == pytest.approx(lc.LM(FOUR, "", max_tokens=1).log_prob("a"))


@pytest.mark.parametrize("schema", [{"enum": []}, {"type": {1}}])
def test_json_schemas_that_admit_nothing_or_cannot_be_read(schema):
    with pytest.raises(SiteError, match="schema"):
        lc.constraints.json_schema(schema)


# --- distributions merge equal values only ----------------------------------------------------


def test_distribution_keys_keep_types():
    def trace(value):
        t = Trace()
        t.value, t.done = value, True
        return t

    values = [[1, 2], "[1, 2]", [1, 2], {1: "a"}, {"1": "a"}, math.nan, float("nan")]
    values += [{"x": 1, "y": 2}, {"y": 2, "x": 1}]
    dist = Result([trace(v) for v in values], [0.0] * len(values)).distribution()
    probs = sorted(round(p * len(values)) for p in dist.values())
    assert probs == [1, 1, 1, 2, 2, 2]  # [1, 2] twice, NaN twice, the two equal dicts
    assert len(dist) == 6


def test_a_second_request_for_a_compiling_pattern_waits_for_the_first():
    calls = []

    def slow(pattern, vocabulary):
        calls.append(pattern)
        time.sleep(0.5)
        return "index"

    model = object()
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(compile_index(slow, "p", None, model)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["index", "index"] and calls == ["p"]
