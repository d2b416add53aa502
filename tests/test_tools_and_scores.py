"""Failing tools end one trace (not the run), lc.tool timeouts, gen(details=True) and lc.score.

Exact answers are computed here by hand from the ToyLMs' score functions (log-softmax over the
vocabulary), independently of the engine; sampling methods are compared with the exact
answer by the chi-square tests of tests/stats.py (false-alarm rate 1e-3, fixed seeds).
"""

from __future__ import annotations

import itertools
import json
import math
import threading

import pytest
import torch
from pyro.distributions import Categorical

import lmcascade as lc
from lmcascade.engine import Engine, Particle
from lmcascade.errors import AllWeightsZeroError, SiteError
from lmcascade.generation import Generation
from lmcascade.models import ToyLM
from lmcascade.policy import ON_TOOL_ERROR
from stats import accepted_by_weight, assert_matches, one_draw_per_run


@pytest.fixture(autouse=True)
def one_thread():
    """ToyLM tensors are tiny: torch's thread pool only adds waiting on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- two small models and their exact next-token log-probabilities ---------------------------

DIGIT_VOCAB = ["1", "2", "x", "<eos>"]


def digit_scores(ctx: tuple[int, ...]) -> list[float]:
    return [0.4 * len(ctx), 0.0, -0.3, 0.2 if len(ctx) > 1 else -0.5]


DIGITS = ToyLM(DIGIT_VOCAB, digit_scores, name="digits")

AB_VOCAB = ["a", "b", "<eos>"]


def ab_scores(ctx: tuple[int, ...]) -> list[float]:
    return [1.0, 0.0, 0.5] if len(ctx) == 1 else [0.0, 1.0 + 0.5 * ctx[-1], -0.2]


AB = ToyLM(AB_VOCAB, ab_scores, name="ab")


def log_softmax(weights: list[float], temperature: float = 1.0) -> list[float]:
    scaled = [w / temperature for w in weights]
    top = max(scaled)
    norm = top + math.log(sum(math.exp(w - top) for w in scaled))
    return [w - norm for w in scaled]


def paths(vocab: list[str], prompt_ids: tuple[int, ...], max_tokens: int):
    """Every token path a generation can take (eos ends it), with how it ends."""
    eos = vocab.index("<eos>")
    for n in range(1, max_tokens + 1):
        for path in itertools.product(range(len(vocab)), repeat=n):
            if eos in path[:-1]:
                continue
            if path[-1] == eos:
                yield path, "eos"
            elif n == max_tokens:
                yield path, "max_tokens"


def path_log_probs(scores, prompt_ids, path, temperature=1.0) -> list[float]:
    ctx, out = tuple(prompt_ids), []
    for tok in path:
        out.append(log_softmax(scores(ctx), temperature)[tok])
        ctx = (*ctx, tok)
    return out


def text_probs(vocab, scores, prompt_ids, max_tokens, temperature=1.0) -> dict[str, float]:
    """Exact P(text) of a generation (no stop strings): sums over paths."""
    out: dict[str, float] = {}
    for path, _ in paths(vocab, prompt_ids, max_tokens):
        text = "".join(vocab[t] for t in path if vocab[t] != "<eos>")
        lp = sum(path_log_probs(scores, prompt_ids, path, temperature))
        out[text] = out.get(text, 0.0) + math.exp(lp)
    return out


def normalise(weights: dict) -> dict:
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items() if v > 0}


def assert_close(a: dict, b: dict, tol: float = 1e-9) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert abs(a[k] - b[k]) <= tol, (k, a[k], b[k])


# -- 1. a failing tool kills one trace, not the run -----------------------------------------


@lc.program
def parse_number():
    text = yield lc.gen("text", DIGITS, "1", max_tokens=2)
    n = yield lc.call("n", int, text)  # int("") and int("x") raise ValueError
    return n


def exact_parse() -> dict:
    """P(n) given that the text parses, from the model by hand."""
    weights: dict[int, float] = {}
    for text, p in text_probs(DIGIT_VOCAB, digit_scores, (0,), 2).items():
        if text and "x" not in text:
            weights[int(text)] = weights.get(int(text), 0.0) + p
    return normalise(weights)


def failing_share() -> float:
    probs = text_probs(DIGIT_VOCAB, digit_scores, (0,), 2)
    return sum(p for t, p in probs.items() if not t or "x" in t)


def test_enumeration_with_failing_tool_is_exact():
    r = lc.infer(parse_number(), method="enumerate")
    assert_close(r.distribution(), exact_parse())
    # the failed traces are out of the evidence: log Z = log P(the text parses)
    assert abs(r.log_evidence - math.log(1 - failing_share())) < 1e-9
    failed = {"", "x", "1x", "2x", "x1", "x2", "xx"}
    assert r.stats["tool_errors"] == len(failed)


def test_forward_sampling_goes_on_past_tool_errors():
    r = lc.infer(parse_number(), method="forward", num_samples=3000, seed=0)
    errors = [t for t in r.traces if any(s.error is not None for s in t)]
    assert r.stats["tool_errors"] == len(errors) > 0
    # about failing_share() of the traces fail (binomial, 6 standard deviations)
    share = failing_share()
    assert abs(len(errors) / 3000 - share) < 6 * math.sqrt(share * (1 - share) / 3000)
    assert_matches(accepted_by_weight(r, 0.0, seed=1), exact_parse())


def test_failed_call_site_records_the_error_and_ends_the_trace():
    r = lc.infer(parse_number(), method="forward", num_samples=200, seed=0)
    trace = next(t for t in r.traces if t.log_weight == -math.inf and "n" in t)
    site = trace["n"]
    assert site.kind == "call" and site.value is None and site.log_prob == -math.inf
    assert isinstance(site.error, ValueError)
    assert trace.names == ["text", "n"]  # nothing after the failed call
    assert trace.log_joint == -math.inf
    assert site.to_dict()["error"].startswith("ValueError: invalid literal for int()")
    data = json.loads(r.to_json())
    shown = [s for t in data["traces"] for s in t["sites"] if "error" in s]
    assert shown and all(s["error"].startswith("ValueError") for s in shown)


@lc.program
def parse_guide():
    yield lc.gen("text", DIGITS, "1", max_tokens=2, temperature=2.0)


def test_importance_with_a_proposal_past_tool_errors():
    r = lc.infer(
        parse_number(), method="importance", proposal=parse_guide(), num_samples=2000, seed=4
    )
    assert r.stats["tool_errors"] > 0
    p = text_probs(DIGIT_VOCAB, digit_scores, (0,), 2)
    q = text_probs(DIGIT_VOCAB, digit_scores, (0,), 2, temperature=2.0)
    bound = max(math.log(p[t]) - math.log(q[t]) for t in p)
    assert_matches(accepted_by_weight(r, bound, seed=5), exact_parse())


def test_on_tool_error_raise_restores_the_exception():
    with pytest.raises(ValueError, match="invalid literal") as info:
        lc.infer(parse_number(), method="forward", num_samples=200, seed=0, on_tool_error="raise")
    assert any("call site 'n'" in note for note in info.value.__notes__)


@pytest.mark.parametrize(
    ("mode", "error", "message"),
    [
        ("raise", ValueError, "invalid literal"),
        ("ignore", SiteError, "'n': on_tool_error must be one of zero, raise"),
    ],
)
def test_the_engine_reads_on_tool_error(mode, error, message):
    token = ON_TOOL_ERROR.set(mode)  # what lc.infer(..., on_tool_error=...) sets for a run
    try:
        with pytest.raises(error, match=message):
            Engine(seed=0).run([Particle(parse_number()) for _ in range(200)])
    finally:
        ON_TOOL_ERROR.reset(token)


def test_every_trace_failing_is_all_weights_zero():
    @lc.program
    def always_fails():
        text = yield lc.gen("text", DIGITS, "1", max_tokens=2)
        return (yield lc.call("n", int, "not " + text))

    with pytest.raises(AllWeightsZeroError, match="'n'") as info:
        lc.infer(always_fails(), method="forward", num_samples=20, seed=0)
    assert all(isinstance(t["n"].error, ValueError) for t in info.value.traces)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("timeout", [None, 30.0])
def test_interrupts_and_exits_in_tools_propagate(stop, timeout):
    def tool(_):
        raise stop()

    @lc.program
    def prog():
        return (yield lc.call("t", lc.tool(tool, timeout=timeout), 1))

    with pytest.raises(stop):
        lc.infer(prog(), method="forward", num_samples=2, seed=0)


def test_a_dead_tool_ends_the_particle_even_without_stop_dead():
    calls = []

    @lc.program
    def prog():
        x = yield lc.factor("zero", -math.inf)  # stop_dead=False: this particle goes on
        calls.append(x)
        yield lc.call("bad", int, "")
        calls.append("after")  # never reached: the program has no value to go on with
        yield lc.factor("later", 0.0)

    engine = Engine(stop_dead=False)
    (p,) = engine.run([Particle(prog())])
    assert p.dead and p.done and p.trace.names == ["zero", "bad"]
    assert calls == [None] and engine.stats["tool_errors"] == 1


def test_replaying_a_prefix_ending_in_a_failed_call_stays_dead_without_rerunning_it():
    ran = []

    def tool(text):
        ran.append(text)
        return int(text)

    @lc.program
    def prog():
        text = yield lc.gen("text", DIGITS, "1", max_tokens=2)
        return (yield lc.call("n", tool, text + "x"))

    engine = Engine(seed=0)
    (p,) = engine.run([Particle(prog())])
    assert p.dead and len(ran) == 1
    again = Engine(seed=1)
    (q,) = again.run([Particle(prog(), trace=p.trace.prefix(2))])
    assert q.dead and q.trace.names == ["text", "n"] and len(ran) == 1
    assert again.stats["tool_errors"] == 0  # replayed, not a new failure


def test_clones_replay_tool_calls_without_running_them_again():
    ran = []

    def tool(x):
        ran.append(x)
        return x

    @lc.program
    def prog():
        k = yield lc.call("k", tool, 1)
        text = yield lc.gen("text", AB, "a", max_tokens=2)
        return text * k

    runs = lc.infer(prog(), method="smc", particles=16, ess_threshold=1.0, seed=0)
    assert runs.stats["resamples"] > 0
    assert len(ran) == 16  # once per particle: resampled copies replay the recorded site


# -- tool timeouts --------------------------------------------------------------------------


def test_a_tool_past_its_timeout_is_a_tool_error():
    release = threading.Event()

    def hangs(_):
        release.wait(60)
        return 1

    @lc.program
    def prog():
        text = yield lc.gen("text", DIGITS, "1", max_tokens=1)
        n = yield lc.call("n", lc.tool(hangs if text == "x" else int, timeout=0.05), text)
        return n

    try:
        r = lc.infer(prog(), method="enumerate")
    finally:
        release.set()
    assert r.distribution().keys() == {1, 2}
    assert r.stats["tool_errors"] == 2  # "x" timed out, "" raised ValueError


def test_tool_passes_results_and_errors_through_its_thread():
    wrapped = lc.tool(int, timeout=30.0)
    assert wrapped("12") == 12 and wrapped.__name__ == "int"
    with pytest.raises(ValueError, match="invalid literal"):
        wrapped("x")
    assert lc.tool(int)("3") == 3  # no timeout: a plain call

    @lc.tool(timeout=30.0)
    def named():
        return threading.current_thread().name

    assert "lmcascade tool" in named()


@pytest.mark.parametrize("timeout", [0, -1.0, "5", True, math.inf, math.nan])
def test_a_bad_timeout_is_refused(timeout):
    with pytest.raises(SiteError, match="timeout must be a positive number"):
        lc.tool(int, timeout=timeout)


def test_tool_needs_a_callable():
    with pytest.raises(SiteError, match="needs a callable"):
        lc.tool(42)


# -- 2. confidence inside a program: gen(details=True) --------------------------------------


@lc.program
def confident(temperature):
    out = yield lc.gen("x", AB, "a", max_tokens=2, temperature=temperature, details=True)
    yield lc.condition("sure", out.mean_log_prob > -1.0)
    return (out.text, out.finish_reason)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_enumeration_with_details_is_exact(temperature):
    weights: dict = {}
    for path, end in paths(AB_VOCAB, (0,), 2):
        model = path_log_probs(ab_scores, (0,), path)
        drawn = path_log_probs(ab_scores, (0,), path, temperature)
        if sum(model) / len(model) > -1.0:
            text = "".join(AB_VOCAB[t] for t in path if t != 2)
            weights[(text, end)] = weights.get((text, end), 0.0) + math.exp(sum(drawn))
    r = lc.infer(confident(temperature), method="enumerate")
    assert_close(r.distribution(), normalise(weights))
    assert abs(r.log_evidence - math.log(sum(weights.values()))) < 1e-9


def test_details_hold_the_models_own_log_probs():
    @lc.program
    def prog(temperature):
        out = yield lc.gen("x", AB, "a", max_tokens=2, temperature=temperature, details=True)
        return out

    for temperature in (0.5, 0.0):
        r = lc.infer(prog(temperature), method="forward", num_samples=20, seed=0)
        for trace in r.traces:
            out, site = trace.value, trace["x"]
            assert isinstance(out, Generation) and str(out) == out.text == site.value
            assert out.token_ids == site.token_ids
            model = path_log_probs(ab_scores, (0,), out.token_ids)
            assert out.token_log_probs == pytest.approx(model, abs=1e-6)
            assert out.mean_log_prob == pytest.approx(sum(model) / len(model), abs=1e-6)
            shaped = path_log_probs(ab_scores, (0,), out.token_ids, temperature or 1e-9)
            assert site.token_log_probs == pytest.approx(shaped, abs=1e-6)
            assert out.token_log_probs != site.token_log_probs  # not the tempered ones
    # greedy: the site's own log-probs are 0, the model's are not
    assert all(lp == 0.0 for lp in trace["x"].token_log_probs)
    assert out.mean_log_prob < 0


def test_details_report_how_the_generation_ended():
    @lc.program
    def prog():
        out = yield lc.gen("x", AB, "a", max_tokens=3, stop="bb", details=True)
        return out.finish_reason, out.text

    r = lc.infer(prog(), method="enumerate")
    for (reason, text), trace in zip(r.values, r.traces, strict=True):
        ids = trace["x"].token_ids
        if ids[-1] == 2:
            assert reason == "eos"
        elif "bb" in "".join(AB_VOCAB[t] for t in ids):
            assert reason == "stop" and "bb" not in text
        else:
            assert reason == "max_tokens" and len(ids) == 3
    assert {reason for reason, _ in r.values} == {"eos", "stop", "max_tokens"}


def test_replayed_sites_send_the_same_details():
    @lc.program
    def prog():
        out = yield lc.gen("x", AB, "a", max_tokens=2, details=True)
        then = yield lc.gen("y", AB, "b", max_tokens=2)
        return out, then

    r = lc.infer(prog(), method="smc", particles=32, ess_threshold=1.0, seed=0)
    assert r.stats["resamples"] > 2  # the final particles are copies resumed by replay
    for trace in r.traces:
        out, _ = trace.value
        assert out == Generation.from_site(trace["x"])
        assert out.token_log_probs == pytest.approx(
            path_log_probs(ab_scores, (0,), out.token_ids), abs=1e-6
        )


@lc.program
def ab_guide(model):
    yield lc.gen("x", model, "a", max_tokens=2, temperature=2.0)


@lc.program
def ab_target():
    out = yield lc.gen("x", AB, "a", max_tokens=2, details=True)
    return out


def test_details_of_a_rescored_proposal_value():
    r = lc.infer(ab_target(), method="importance", proposal=ab_guide(AB), num_samples=30, seed=0)
    for trace in r.traces:
        out = trace.value
        assert out.finish_reason in ("eos", "max_tokens") and out.token_ids
        assert out.token_log_probs == pytest.approx(
            path_log_probs(ab_scores, (0,), out.token_ids), abs=1e-6
        )
    # a proposal model with another vocabulary: the value is scored as a text, with no token
    # path, so details cannot be given: an error, never made-up numbers (a program reading
    # them would branch wrongly and silently)
    other = ToyLM(["a", "b", "ab", "<eos>"], lambda ctx: [0.0, 0.0, 0.0, 0.0], name="other")
    with pytest.raises(SiteError, match="'x' asks for details=True, but its value was scored"):
        lc.infer(ab_target(), method="importance", proposal=ab_guide(other), num_samples=10, seed=0)


def test_details_must_be_a_bool():
    with pytest.raises(SiteError, match="'x': details must be True or False"):
        lc.gen("x", AB, "a", details="yes")


# -- 3. lc.score ------------------------------------------------------------------------------


def hand_score(prompt_ids, text_ids, scores=ab_scores, vocab=AB_VOCAB) -> float:
    return sum(path_log_probs(scores, prompt_ids, text_ids))


def test_score_is_the_models_continuation_log_prob_and_leaves_the_weight():
    @lc.program
    def prog():
        lp = yield lc.score("s", AB, "a", "abb")
        return lp

    r = lc.infer(prog(), method="forward", num_samples=2, seed=0)
    trace = r.traces[0]
    assert trace.value == pytest.approx(hand_score((0,), (0, 1, 1)), abs=1e-9)
    site = trace["s"]
    assert site.kind == "score" and site.log_prob == 0.0 and site.value == trace.value
    assert trace.log_weight == 0.0 and trace.log_joint == 0.0
    assert site.token_ids == (0, 1, 1)
    assert sum(site.token_log_probs) == pytest.approx(site.value)
    assert json.loads(r.to_json())["traces"][0]["sites"][0]["kind"] == "score"


def test_score_matches_the_details_of_the_same_tokens():
    @lc.program
    def prog():
        out = yield lc.gen("x", AB, "a", max_tokens=2, details=True)
        lp = yield lc.score("s", AB, "a", out.text)
        return out, lp

    r = lc.infer(prog(), method="enumerate")
    for out, lp in r.values:
        text_tokens = [t for t in out.token_ids if t != 2]  # the eos is not part of a score
        assert lp == pytest.approx(sum(out.token_log_probs[: len(text_tokens)]), abs=1e-9)


@lc.program
def scored(texts):
    k = yield lc.sample("k", Categorical(logits=torch.zeros(len(texts))))
    return (yield lc.score("s", AB, "a", texts[k]))


def test_particles_waiting_on_scores_share_one_model_call():
    texts = ("a", "ab", "bba", "abab")
    for n in (8, 64):
        engine = Engine(seed=0)
        done = engine.run([Particle(scored(texts)) for _ in range(n)])
        assert engine.stats["model_calls"] == 1  # one teacher-forced pass, not n
        for p in done:
            ids = tuple(AB.encode(texts[p.trace["k"].value]))
            assert p.trace.value == pytest.approx(hand_score((0,), ids), abs=1e-9)


def test_a_replayed_score_is_not_recomputed():
    @lc.program
    def prog():
        lp = yield lc.score("s", AB, "a", "ab")
        text = yield lc.gen("x", AB, "a", max_tokens=2)
        return lp, text

    first = Engine(seed=0)
    (p,) = first.run([Particle(prog())])
    assert first.stats["tokens_scored"] == 2
    again = Engine(seed=1)
    (q,) = again.run([Particle(prog(), trace=p.trace.prefix(1))])
    assert again.stats["tokens_scored"] == 0 and q.trace.value[0] == p.trace.value[0]


def test_score_edge_cases():
    @lc.program
    def empty():
        return (yield lc.score("s", AB, "a", ""))

    engine = Engine(seed=0)
    (p,) = engine.run([Particle(empty())])
    assert p.trace.value == 0.0 and engine.stats["model_calls"] == 0
    with pytest.raises(SiteError, match="score needs a LanguageModel"):
        lc.score("s", "gpt", "a", "b")
    with pytest.raises(SiteError, match="score's text must be a string"):
        lc.score("s", AB, "a", 3)
    eos_text = ToyLM(["a", "<eos>"], lambda ctx: [0.0, 0.0], name="e")
    eos_text.tokenizer._ids["<eos>"] = 1  # a tokenizer that spells the end-of-text token
    eos_text.tokenizer._max_len = 5

    @lc.program
    def holds_eos():
        return (yield lc.score("s", eos_text, "a", "a<eos>"))

    with pytest.raises(SiteError, match="'s'.*end-of-text token"):
        lc.infer(holds_eos(), method="forward", num_samples=1, seed=0)


# -- every method on a cascade with a failing tool and a score ----------------------------------


@lc.program
def cascade():
    """Parse a draft (fails on "" and "x"); keep it only when a second look is sure of it."""
    draft = yield lc.gen("draft", DIGITS, "1", max_tokens=2)
    n = yield lc.call("n", int, draft)
    sure = yield lc.score("sure", DIGITS, "2", draft)
    yield lc.condition("confident", sure > -2.3)
    return n


def exact_cascade() -> dict:
    weights: dict[int, float] = {}
    for text, p in text_probs(DIGIT_VOCAB, digit_scores, (0,), 2).items():
        ids = tuple(DIGITS.encode(text))
        if text and "x" not in text and hand_score((1,), ids, digit_scores) > -2.3:
            weights[int(text)] = p
    return normalise(weights)


def test_tools_and_scores_under_every_method():
    exact = exact_cascade()
    assert len(exact) == 4  # 12 and 22 are not sure enough; "", "x"... fail to parse
    r = lc.infer(cascade(), method="enumerate")
    assert_close(r.distribution(), exact)
    assert r.stats["tool_errors"] == 7
    r = lc.infer(cascade(), method="forward", num_samples=2000, seed=0)
    assert r.stats["tool_errors"] > 0
    assert_matches(accepted_by_weight(r, 0.0, seed=1), exact)
    r = lc.infer(cascade(), method="rejection", num_samples=1000, seed=2)
    assert r.stats["tool_errors"] > 0
    assert_matches(r.values, exact)
    r = lc.infer(cascade(), method="importance", num_samples=2000, seed=3)
    assert_matches(accepted_by_weight(r, 0.0, seed=4), exact)
    # SMC: one draw per run from 300 runs, resampling at every token and at every site
    runs = [
        lc.infer(cascade(), method="smc", particles=16, ess_threshold=1.0, seed=s)
        for s in range(300)
    ]
    assert sum(r.stats["tool_errors"] for r in runs) > 0
    assert_matches(one_draw_per_run(runs, seed=5), exact)
