"""lc.infer_many: every input's result is the one a separate lc.infer gives (same seed), model
calls are batched across inputs, failures stay with their input, and an out file resumes."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from pyro.distributions import Bernoulli, Categorical
from tiny_gguf import BACKENDS, tiny_model

import lmcascade as lc
from lmcascade.errors import OptionError, ProgramError, SiteError
from lmcascade.models import ToyLM

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ["a", "b", "?", "<eos>"]


def _scores(ctx):
    # depends on the whole context, so different inputs really get different rows
    n_a = sum(1 for t in ctx if t == 0)
    return [0.3 * n_a - 0.2 * len(ctx), 0.1 * len(ctx), -3.0, -0.5]


LM = ToyLM(VOCAB, _scores)


@lc.program
def two_sites(question, strict=False):
    """A pyro draw, two LM sites, a soft factor and (optionally) a hard condition."""
    k = yield lc.sample("k", Categorical(torch.tensor([0.5, 0.3, 0.2])))
    thought = yield lc.gen("thought", LM, question + "a" * int(k), max_tokens=3)
    again = yield lc.sample("again", Bernoulli(0.5))  # a global-RNG draw between model calls
    answer = yield lc.gen("answer", LM, question + thought + "?" * int(again), max_tokens=2)
    yield lc.factor("likes_a", 0.5 * answer.count("a"))
    if strict:
        yield lc.condition("nonempty", answer != "")
    return [thought, answer]


QUESTIONS = ["a", "b", "ab", "ba", "aab", "bbb", "abab", "b?"]


def _same(a: lc.Result, b: lc.Result) -> None:
    assert a.values == b.values
    np.testing.assert_array_equal(a.log_weights, b.log_weights)
    assert (math.isnan(a.log_evidence) and math.isnan(b.log_evidence)) or (
        a.log_evidence == b.log_evidence
    )


@pytest.mark.parametrize(
    "method, options",
    [
        ("forward", {"num_samples": 12}),
        ("importance", {"num_samples": 12}),
        ("smc", {"particles": 12, "ess_threshold": 1.0}),
        ("rejection", {"num_samples": 6, "max_log_weight": 1.0}),
        ("enumerate", {}),
    ],
)
def test_results_identical_to_separate_runs(method, options):
    questions = QUESTIONS[:3] if method == "enumerate" else QUESTIONS
    inputs = [{"question": q, "strict": method == "rejection"} for q in questions]
    got = list(lc.infer_many(two_sites, inputs, method=method, seed=7, **options))
    assert sorted(json.dumps(i, sort_keys=True) for i, _ in got) == sorted(
        json.dumps(i, sort_keys=True) for i in inputs
    )
    for item, result in got:
        alone = lc.infer(two_sites(**item), method=method, seed=7, **options)
        _same(result, alone)


def test_calls_are_batched_across_inputs():
    inputs = [(q,) for q in QUESTIONS]
    runs = lc.infer_many(two_sites, inputs, method="forward", seed=1, num_samples=16)
    results = [r for _, r in runs]
    separate = sum(r.stats["model_calls"] for r in results)
    longest = max(r.stats["model_calls"] for r in results)
    # one batched call per step for all inputs: as many as the longest run needs, not the sum
    assert runs.stats["model_calls"] == longest < separate
    assert runs.stats["rows"] == sum(r.stats.get("tokens_generated", 0) for r in results)


def test_concurrency_does_not_change_results():
    inputs = QUESTIONS[:5]
    wide = dict(lc.infer_many(two_sites, inputs, method="smc", seed=3, particles=8))
    narrow = lc.infer_many(two_sites, inputs, method="smc", seed=3, particles=8, concurrency=2)
    for q, result in narrow:
        _same(result, wide[q])
    assert narrow.stats["inputs_done"] == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_hf_model_batched_path(backend):
    """On a real (random-weight) transformer the joint batch pads prompts of different lengths
    (on llama.cpp: sequences of different lengths in one decode); the draws are the same and
    the weights agree to float precision."""
    lm = tiny_model(seed=0, backend=backend)

    @lc.program
    def say(prompt):
        text = yield lc.gen("text", lm, prompt, max_tokens=4)
        yield lc.factor("short", -0.1 * len(text))
        return text

    prompts = ["Q: ab", "Q: abcd dc", "a", "Q: b b b b"]
    for prompt, result in lc.infer_many(say, prompts, method="smc", seed=5, particles=6):
        alone = lc.infer(say(prompt), method="smc", seed=5, particles=6)
        assert result.values == alone.values
        np.testing.assert_allclose(result.log_weights, alone.log_weights, rtol=1e-5, atol=1e-5)


def test_input_forms_and_program_checks():
    @lc.program
    def add(x, y=10):
        z = yield lc.sample("z", Bernoulli(0.5))
        return x + y + int(z)

    got = dict(
        (json.dumps(i), r.distribution())
        for i, r in lc.infer_many(add, [{"x": 1}, (2, 20), 3], method="enumerate")
    )
    assert got == {
        '{"x": 1}': {11: 0.5, 12: 0.5},
        "[2, 20]": {22: 0.5, 23: 0.5},
        "3": {13: 0.5, 14: 0.5},
    }
    with pytest.raises(ProgramError, match="not a bound call"):
        lc.infer_many(add(1), [1])
    with pytest.raises(OptionError, match="iterable of inputs"):
        lc.infer_many(add, "abc")
    with pytest.raises(OptionError, match="concurrency"):
        lc.infer_many(add, [1], concurrency=0)
    with pytest.raises(OptionError, match="seed"):
        lc.infer_many(add, [1], seed=-1)


@lc.program
def fragile(n):
    """Raises for n == 3 (a bad input), fails its condition for n == 4."""
    x = yield lc.sample("x", Bernoulli(0.5))
    if n == 3:
        yield lc.factor("bad", "not a number")
    yield lc.condition("possible", n != 4)
    return n + int(x)


def test_a_raising_input_is_recorded_and_the_rest_complete(tmp_path):
    out = tmp_path / "r.jsonl"
    pairs = list(lc.infer_many(fragile, [1, 2, 3, 4, 5, {"m": 1}], method="enumerate", out=out))
    got = {json.dumps(item): result for item, result in pairs}
    assert isinstance(got["3"], SiteError) and "factor needs a number" in str(got["3"])
    assert isinstance(got["4"], lc.errors.AllWeightsZeroError)
    assert got["5"].distribution() == {5: 0.5, 6: 0.5}
    assert isinstance(got['{"m": 1}'], ProgramError)  # no parameter m
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(json.dumps(line["input"]) for line in lines if "result" in line) == [
        "1",
        "2",
        "5",
    ]
    errors = {json.dumps(line["input"]): line["error"]["type"] for line in lines if "error" in line}
    assert errors == {"3": "SiteError", "4": "AllWeightsZeroError", '{"m": 1}': "ProgramError"}
    with pytest.raises(SiteError):
        list(lc.infer_many(fragile, [1, 3, 5], method="enumerate", on_error="raise"))


def test_out_file_resumes_and_checks_its_settings(tmp_path):
    out = tmp_path / "r.jsonl"
    inputs = list(range(6))
    first = lc.infer_many(fragile, inputs, method="forward", seed=2, out=out, num_samples=4)
    taken = [next(first) for _ in range(2)]
    first.close()
    assert len(out.read_text().splitlines()) == 2
    rest = lc.infer_many(fragile, inputs, method="forward", seed=2, out=out, num_samples=4)
    again = dict(rest)
    assert rest.stats["inputs_skipped"] == 2 and sorted(again) == sorted(
        set(inputs) - {i for i, _ in taken}
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["input"] for line in lines) == inputs  # once each: 3 and 4 as errors
    # a rerun skips what has a result and runs failed inputs again
    third = lc.infer_many(fragile, inputs, method="forward", seed=2, out=out, num_samples=4)
    assert sorted(i for i, _ in third) == [3, 4]
    with pytest.raises(OptionError, match="method 'forward'"):
        lc.infer_many(fragile, inputs, method="importance", seed=2, out=out, num_samples=4)
    with pytest.raises(OptionError, match="seed 2"):
        lc.infer_many(fragile, inputs, method="forward", seed=9, out=out, num_samples=4)
    # no seed given: the file's seed is used, so the experiment continues as it began
    assert lc.infer_many(fragile, inputs, method="forward", out=out, num_samples=4).seed == 2


def test_out_file_cut_short_or_corrupted(tmp_path):
    out = tmp_path / "r.jsonl"
    list(lc.infer_many(fragile, [1, 2], method="enumerate", out=out))
    text = out.read_text()
    out.write_text(text + text.splitlines()[0][:25])  # killed while writing a third line
    list(lc.infer_many(fragile, [1, 2, 5], method="enumerate", out=out))
    assert [json.loads(line)["input"] for line in out.read_text().splitlines()] == [1, 2, 5]
    out.write_text("not json\n" + out.read_text())
    with pytest.raises(OptionError, match="line 1: not a result line"):
        lc.infer_many(fragile, [1], method="enumerate", out=out)
    with pytest.raises(OptionError, match="folder"):
        lc.infer_many(fragile, [1], method="enumerate", out=tmp_path)


def test_the_callers_random_state_is_untouched():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for _ in lc.infer_many(two_sites, QUESTIONS[:3], method="forward", seed=1, num_samples=4):
        pass
    assert torch.equal(torch.rand(3), expected)


def test_killed_part_way_then_resumed(tmp_path):
    """A run killed (SIGKILL, no clean-up) after some inputs finished: the rerun skips them and
    the file ends with one result per input, each equal to a separate run's."""
    out = tmp_path / "r.jsonl"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import lmcascade as lc
        from test_infer_many import two_sites
        for n, _ in enumerate(lc.infer_many(two_sites, {QUESTIONS!r}, method="forward",
                                            seed=4, out={str(out)!r}, num_samples=6,
                                            concurrency=2)):
            if n == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=300)
    assert done.returncode == -signal.SIGKILL
    assert len(out.read_text().splitlines()) == 3
    rest = lc.infer_many(two_sites, QUESTIONS, method="forward", seed=4, out=out, num_samples=6)
    assert len(list(rest)) == len(QUESTIONS) - 3 and rest.stats["inputs_skipped"] == 3
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["input"] for line in lines) == sorted(QUESTIONS)
    for line in lines:
        alone = lc.infer(two_sites(line["input"]), method="forward", seed=4, num_samples=6)
        assert line["result"]["distribution"] == alone.to_dict()["distribution"]
    assert os.path.getsize(out) > 0


# -- found in review ---------------------------------------------------------------------------


@lc.program
def echo(q):
    x = yield lc.sample("x", Bernoulli(0.5))
    return [type(q).__name__, int(x)]


@pytest.mark.parametrize(
    "first, second",
    [(("x",), ["x"]), (float("nan"), "nan"), (10**5000, 10**5000 + 1), (1, 1.0), (True, 1)],
    ids=["tuple-list", "nan-text", "huge-ints", "int-float", "bool-int"],
)
def test_resume_never_takes_one_input_for_another(tmp_path, first, second):
    out = tmp_path / "r.jsonl"
    list(lc.infer_many(echo, [first], method="enumerate", out=out))
    again = lc.infer_many(echo, [second], method="enumerate", out=out)
    assert len(list(again)) == 1 and again.stats["inputs_skipped"] == 0
    third = lc.infer_many(echo, [first], method="enumerate", out=out)
    assert list(third) == [] and third.stats["inputs_skipped"] == 1


def test_inputs_it_cannot_name_always_run(tmp_path):
    out = tmp_path / "r.jsonl"
    thing = object()
    list(lc.infer_many(echo, [thing], method="enumerate", out=out))
    assert len(list(lc.infer_many(echo, [thing], method="enumerate", out=out))) == 1


def test_after_close_nothing_runs_or_is_written(tmp_path):
    out = tmp_path / "r.jsonl"
    run = lc.infer_many(two_sites, QUESTIONS, method="forward", seed=0, out=out, concurrency=2)
    next(run)
    run.close()
    assert list(run) == [] and len(out.read_text().splitlines()) == 1


def test_closing_early_joins_threads_and_keeps_the_random_state():
    import gc
    import random
    import threading

    def runs_alive() -> int:
        return sum(t.name.startswith("lmcascade-input-") for t in threading.enumerate())

    @lc.program
    def steps(n):
        for i in range(n):
            yield lc.gen(f"t{i}", LM, "a", max_tokens=1)
        return n

    run = lc.infer_many(steps, [1, 6, 6, 6], method="smc", seed=0, particles=4)
    assert next(run)[0] == 1
    assert runs_alive() == 3  # the others are parked mid-run
    state = random.getstate(), torch.get_rng_state()
    run.close()
    assert random.getstate() == state[0] and torch.equal(torch.get_rng_state(), state[1])
    assert runs_alive() == 0
    for _ in lc.infer_many(steps, [1, 6, 6], method="forward", seed=0, num_samples=2):
        assert runs_alive() == 2
        break  # the iterator is dropped: collecting it cancels and joins its runs
    gc.collect()
    assert runs_alive() == 0


def test_settings_are_checked_once_and_normalised(tmp_path):
    with pytest.raises(lc.errors.UnknownMethodError, match="did you mean 'smc'"):
        lc.infer_many(two_sites, QUESTIONS, method="smcc")
    with pytest.raises(OptionError, match="num_sample"):
        lc.infer_many(two_sites, QUESTIONS, method="forward", num_sample=3)
    with pytest.raises(OptionError, match="progress must be True or False"):
        lc.infer_many(two_sites, QUESTIONS, progress="yes")
    with pytest.raises(OptionError, match="cannot write"):
        lc.infer_many(two_sites, QUESTIONS, out=tmp_path / "no" / "such" / "dir.jsonl")
    out = tmp_path / "r.jsonl"
    list(lc.infer_many(two_sites, QUESTIONS[:2], method="smc", seed=0, out=out, particles=4))
    same = lc.infer_many(
        two_sites, QUESTIONS[:2], method="SMC", seed=0, out=out, num_samples=4, ess_threshold=0.5
    )
    assert list(same) == [] and same.stats["inputs_skipped"] == 2


def test_a_whole_last_line_without_its_newline_is_kept(tmp_path):
    out = tmp_path / "r.jsonl"
    list(lc.infer_many(fragile, [1, 2], method="enumerate", out=out))
    out.write_text(out.read_text().rstrip("\n"))
    rest = lc.infer_many(fragile, [1, 2], method="enumerate", out=out)
    assert list(rest) == [] and rest.stats["inputs_skipped"] == 2
    assert len(out.read_text().splitlines()) == 2


def test_ctrl_c_inside_a_run_stops_infer_many():
    def tool(q):
        if q == "b":
            raise KeyboardInterrupt
        return q

    @lc.program
    def prog(q):
        t = yield lc.gen("t", LM, q, max_tokens=1)
        return (yield lc.call("tool", tool, q)) + t

    with pytest.raises(KeyboardInterrupt):
        list(lc.infer_many(prog, ["a", "b", "ab"], method="forward", seed=0, num_samples=2))


def test_a_timed_tool_that_calls_a_model_does_not_hang():
    """A tool with a timeout runs on its own thread, which inherits the run's context: its
    model calls go straight to the model instead of parking the run twice."""

    @lc.tool(timeout=5.0)
    def judge(text):
        return float(LM.next_logprobs([LM.open(LM.encode("a" + text))])[0, 0])

    @lc.program
    def prog(q):
        t = yield lc.gen("t", LM, q, max_tokens=2)
        return t, (yield lc.call("s", judge, q + t))

    got = dict(lc.infer_many(prog, ["a", "b", "ab"], method="forward", seed=0, num_samples=2))
    for q, result in got.items():
        assert result.values == lc.infer(prog(q), method="forward", seed=0, num_samples=2).values
