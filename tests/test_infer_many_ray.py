"""lc.infer_many(..., backend="ray") on a local Ray of 2 CPUs started here: the same results as
the local backend for the same seed (ToyLM exactly; the default model token for token), no
input lost when a worker is killed mid-run, resume from the out file, a raising input
recorded while the rest complete, and a model too large for a worker refused before any
input runs.

Every comparison is exact equality against a local run of the same inputs, so a worker that
ran an input with another seed, lost or duplicated an input, or sent back another input's
result fails it."""

import json
import math

import pytest
import ray
import torch
from test_infer_many import QUESTIONS, _same, fragile, two_sites

import lmcascade as lc
from lmcascade.cli import main as cli_main
from lmcascade.errors import (
    ModelNotFoundError,
    ModelTooLargeError,
    OptionError,
    ProgramError,
    RemoteError,
    SiteError,
    WorkerLostError,
)
from lmcascade.inference import shipping
from lmcascade.models import ToyLM
from lmcascade.models.base import Recipe

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    if ray.is_initialized():  # started by an earlier test or a docs page: start our own
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _delay_scores(ctx):
    import os
    import time

    time.sleep(float(os.environ.get("LMCASCADE_TEST_DELAY", "0")))
    n_a = sum(1 for t in ctx if t == 0)
    return [0.3 * n_a - 0.2 * len(ctx), 0.1 * len(ctx), -3.0, -0.5]


SLOW_LM = ToyLM(["a", "b", "?", "<eos>"], _delay_scores)


@lc.program
def slow_words(question):
    return (yield lc.gen("w", SLOW_LM, question, max_tokens=4))


SLOW_WORKERS = {"runtime_env": {"env_vars": {"LMCASCADE_TEST_DELAY": "0.02"}}}
MANY = [format(i + 2, "b").replace("0", "a").replace("1", "b") for i in range(12)]


def _kill_a_worker_after_the_first_result(runs) -> dict:
    """Every (input, result) of ``runs``, killing its first worker once one input finished
    — through Ray, as a node failure or the out-of-memory killer would."""
    got = {}
    with runs:
        for item, result in runs:
            if not got:
                ray.kill(runs.workers[0])
            got[item] = result
    return got


@pytest.mark.parametrize(
    "method, options",
    [("smc", {"particles": 8}), ("forward", {"num_samples": 6}), ("enumerate", {})],
)
def test_same_results_as_local_for_the_same_seed(method, options):
    program = two_sites if method != "enumerate" else fragile
    inputs = QUESTIONS if method != "enumerate" else [1, 2, 5, 6]
    local = dict(lc.infer_many(program, inputs, method=method, seed=5, **options))
    runs = lc.infer_many(
        program, inputs, method=method, seed=5, backend="ray", num_workers=2, **options
    )
    remote = dict(runs)
    assert sorted(remote, key=str) == sorted(local, key=str)
    for key in local:
        _same(local[key], remote[key])
    assert runs.stats["inputs_done"] == len(inputs)
    if method != "enumerate":  # both workers had a share, and their calls are counted
        calls = [seat.stats["model_calls"] for seat in runs._pool.seats]
        assert min(calls) > 0 and runs.stats["model_calls"] == sum(calls)


def test_a_worker_killed_mid_run_loses_no_input(tmp_path):
    out = tmp_path / "r.jsonl"
    local = dict(lc.infer_many(slow_words, MANY, method="forward", seed=1, num_samples=3))
    runs = lc.infer_many(
        slow_words,
        MANY,
        method="forward",
        seed=1,
        num_samples=3,
        out=out,
        concurrency=2,
        backend="ray",
        num_workers=2,
        worker_options=SLOW_WORKERS,
    )
    got = _kill_a_worker_after_the_first_result(runs)
    assert runs.stats["workers_lost"] == 1 and runs.stats["inputs_retried"] >= 1
    assert sorted(got) == sorted(MANY)
    for item in MANY:
        _same(local[item], got[item])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["input"] for line in lines) == sorted(MANY)  # each once, none lost
    assert "retried after 1 worker died" in runs.summary()


@lc.program
def crashes_on_bbb(question):
    if question == "bbb":
        import os

        os._exit(1)  # as a segfault in native code or the out-of-memory killer would
    return (yield lc.gen("w", SLOW_LM, question, max_tokens=2))


def test_an_input_that_kills_its_worker_is_isolated_and_recorded_as_lost():
    """The input that kills every worker it runs on is found by running the dead worker's
    inputs apart, halving the group at each death; only it is charged, and after
    max_retries more deaths running alone it is recorded; the inputs that shared its worker
    finish, each once."""
    inputs = ["a", "bbb", "b", "ab", "ba", "aa"]
    runs = lc.infer_many(
        crashes_on_bbb, inputs, method="forward", seed=1, num_samples=2, concurrency=2,
        backend="ray", num_workers=2, max_retries=1,
    )  # fmt: skip
    got = dict(runs)
    assert sorted(got) == sorted(inputs)
    assert isinstance(got["bbb"], WorkerLostError) and "2 times while running it alone" in str(
        got["bbb"]
    )
    local = dict(
        lc.infer_many(crashes_on_bbb, [q for q in inputs if q != "bbb"], seed=1, num_samples=2)
    )
    for q, result in local.items():
        _same(result, got[q])
    assert runs.stats["inputs_failed"] == 1 and runs.stats["inputs_done"] == 5
    assert runs.stats["workers_lost"] >= 3  # at least: the first death, then twice alone


def test_workers_ray_cannot_place_are_refused_not_waited_for():
    with pytest.raises(OptionError, match="room for 2 of the 3 workers.*num_workers=2"):
        lc.infer_many(fragile, [1], backend="ray", num_workers=3)
    with pytest.raises(OptionError, match="has no GPU at all"):
        lc.infer_many(fragile, [1], backend="ray", worker_options={"num_gpus": 1})
    with pytest.raises(OptionError, match="num_cpus|CPU must be a number"):
        lc.infer_many(fragile, [1], backend="ray", worker_options={"num_cpus": "x"})
    with pytest.raises(OptionError, match="worker_options: .*bogus"):
        lc.infer_many(fragile, [1], backend="ray", worker_options={"bogus": 1})
    first = lc.infer_many(two_sites, QUESTIONS, seed=0, backend="ray", num_workers=2)
    with first:
        next(first)  # two workers hold both CPUs while `first` is open
        with pytest.raises(OptionError, match="ManyRun still open"):
            lc.infer_many(fragile, [1], backend="ray", num_workers=1)
    again = lc.infer_many(fragile, [1], backend="ray", num_workers=1)  # closed: room again
    assert len(list(again)) == 1


def test_resume_skips_the_inputs_already_done(tmp_path):
    out = tmp_path / "r.jsonl"
    kwargs = dict(method="smc", seed=2, particles=4, out=out, backend="ray", num_workers=2)
    first = lc.infer_many(two_sites, QUESTIONS, **kwargs)
    with first:
        done = [next(first)[0] for _ in range(3)]
    rest = dict(lc.infer_many(two_sites, QUESTIONS, **kwargs))
    assert sorted(rest) == sorted(set(QUESTIONS) - set(done))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["input"] for line in lines) == sorted(QUESTIONS)
    local = dict(lc.infer_many(two_sites, QUESTIONS, method="smc", seed=2, particles=4))
    for line in lines:
        want = local[line["input"]].to_dict()
        assert line["result"]["distribution"] == want["distribution"]
        assert line["result"]["log_evidence"] == want["log_evidence"]


def test_a_raising_input_is_recorded_and_the_rest_complete(tmp_path):
    out = tmp_path / "r.jsonl"
    inputs = [1, 2, 3, 4, 5, {"m": 1}]
    runs = lc.infer_many(fragile, inputs, method="enumerate", out=out, backend="ray")
    got = {json.dumps(item): result for item, result in runs}
    assert isinstance(got["3"], SiteError) and "factor needs a number" in str(got["3"])
    assert "bad arguments" in str(got['{"m": 1}'])
    assert got["1"].distribution() == {1: 0.5, 2: 0.5} and got["5"].best() in (5, 6)
    assert runs.stats["inputs_done"] == 3 and runs.stats["inputs_failed"] == 3
    errors = [json.loads(x) for x in out.read_text().splitlines() if '"error"' in x]
    assert sorted(e["error"]["type"] for e in errors) == [
        "AllWeightsZeroError",
        "ProgramError",
        "SiteError",
    ]


def test_an_unpicklable_result_comes_back_as_an_error_naming_it():
    @lc.program
    def handle(n):
        yield lc.factor("f", 0.0)
        return (x for x in range(n))  # a generator: cannot leave the worker

    ((item, error),) = list(lc.infer_many(handle, [2], method="enumerate", backend="ray"))
    assert item == 2 and "cannot be sent back" in str(error) and "plain values" in str(error)


def test_a_model_too_large_is_refused_before_any_work(monkeypatch):
    lm = lc.models.load()
    names = lc.load(
        source='model lm = "smollm2-135m"\nprogram p(q) { a ~ lm(q, max_tokens=2)\n return a }',
        models={"lm": lm},
    )
    with pytest.raises(ModelTooLargeError, match=r"smollm2-135m \(513\.1 MiB\).*memory=9\.5 MiB"):
        lc.infer_many(names.p, ["x"], backend="ray", worker_options={"memory": 10**7})
    monkeypatch.setattr(shipping, "_sizes", lambda models, slots: [2**50 for _ in models])
    with pytest.raises(ModelTooLargeError, match="any Ray node"):
        lc.infer_many(names.p, ["x"], backend="ray")
    assert not ray.util.list_named_actors()  # nothing was started


def test_options_are_checked():
    with pytest.raises(OptionError, match="num_workers goes with backend='ray'"):
        lc.infer_many(fragile, [1], num_workers=2)
    with pytest.raises(OptionError, match="backend must be 'local'"):
        lc.infer_many(fragile, [1], backend="spark")
    with pytest.raises(OptionError, match="num_workers must be a whole number"):
        lc.infer_many(fragile, [1], backend="ray", num_workers=0)
    with pytest.raises(OptionError, match="max_retries must be"):
        lc.infer_many(fragile, [1], backend="ray", max_retries=-1)
    with pytest.raises(OptionError, match="already connected to a Ray"):
        lc.infer_many(fragile, [1], backend="ray", address="ray://elsewhere:10001")
    with pytest.raises(OptionError, match="worker_options must be a dict"):
        lc.infer_many(fragile, [1], backend="ray", worker_options=["num_cpus", 1])


@lc.program
def default_model_answer(question):
    lm = DEFAULT["lm"]
    answer = yield lc.gen("a", lm, lm.chat(question), max_tokens=6, temperature=0.8)
    return answer


DEFAULT: dict = {}


def test_default_model_same_results_and_a_killed_worker(tmp_path):
    DEFAULT["lm"] = lc.models.load()
    questions = [f"Name a colour that starts with {c}." for c in "bgrpwy"]
    # a worker of 1 CPU computes with 1 thread, and the thread count changes a transformer's
    # logits in the last bits (enough to flip a draw now and then), as does running several
    # inputs in one batch: compare like with like (1 thread, one input at a time)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = dict(
            lc.infer_many(default_model_answer, questions, seed=4, num_samples=2, concurrency=1)
        )
    finally:
        torch.set_num_threads(threads)
    runs = lc.infer_many(
        default_model_answer,
        questions,
        seed=4,
        num_samples=2,
        concurrency=1,
        out=tmp_path / "r.jsonl",
        backend="ray",
        num_workers=2,
    )
    assert all(info["devices"] == ["cpu"] and info["threads"] == 1 for info in runs._pool.info)
    got = _kill_a_worker_after_the_first_result(runs)
    assert sorted(got) == sorted(questions) and runs.stats["workers_lost"] == 1
    assert all(isinstance(r, lc.Result) for r in got.values())
    same = sum(local[q].values == got[q].values for q in questions)
    assert same == len(questions), {q: (local[q].values, got[q].values) for q in questions}
    for q in questions:
        assert got[q].log_weights.tolist() == pytest.approx(local[q].log_weights.tolist())
        assert not math.isnan(got[q].log_weights[0])


def test_cli_runs_a_text_program_over_ray(tmp_path, capsys):
    program = tmp_path / "colour.lmc"
    program.write_text(
        'model lm = "smollm2-135m"\n'
        "program colour(c) {\n"
        '  a ~ lm("Name a colour that starts with {c}:", max_tokens=4)\n'
        '  if a == "" { factor -1 } else { factor 0 }\n'  # a site named by its AST node
        "  return a\n"
        "}\n"
    )
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"c": c}) + "\n" for c in "bgr"))
    out = tmp_path / "results.jsonl"
    argv = [
        "run", str(program), "--inputs", str(data), "--out", str(out), "--backend", "ray",
        "--workers", "2", "--method", "forward", "--particles", "2", "--seed", "0", "--json",
    ]  # fmt: skip
    assert cli_main(argv) == 0
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["input"]["c"] for x in printed) == sorted(x["input"]["c"] for x in lines)
    assert sorted(x["input"]["c"] for x in lines) == ["b", "g", "r"]
    assert all("result" in x for x in lines), [x.get("error") for x in lines]
    assert cli_main(argv) == 0  # a rerun: everything is already there
    assert "3 inputs already in" in capsys.readouterr().err
    assert cli_main(["run", str(program), "--input", "c=b", "--backend", "ray"]) == 1


def test_what_cannot_travel_is_named():
    import threading

    lock = threading.Lock()

    @lc.program
    def holds_a_lock(n):
        with lock:
            yield lc.factor("f", 0.0)
        return n

    with pytest.raises(ProgramError, match="program 'holds_a_lock' cannot be sent.*lock"):
        lc.infer_many(holds_a_lock, [1], method="enumerate", backend="ray")

    @lc.program
    def echo(x, model=None):
        yield lc.factor("f", 0.0)
        return x if model is None else (x, model.name)

    # an input that does not pickle fails alone; a model in an input travels as the model
    runs = lc.infer_many(
        echo, [1, (threading.Lock(),), {"x": 2, "model": SLOW_LM}], method="enumerate",
        backend="ray",
    )  # fmt: skip
    got = {repr(item): result for item, result in runs}
    assert got["1"].best() == 1 and got[repr({"x": 2, "model": SLOW_LM})].best() == (2, "toy")
    (error,) = [r for r in got.values() if isinstance(r, Exception)]
    assert isinstance(error, ProgramError) and "input (<unlocked _thread.lock" in str(error)


def test_without_ray_installed_the_error_says_how(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, as when not installed
    with pytest.raises(OptionError, match=r"pip install 'lmcascade\[ray\]'"):
        lc.infer_many(fragile, [1], backend="ray")


def _no_such_model():
    raise ModelNotFoundError("model 'ghost' is not installed; try: lmcascade models fetch ghost")


def _too_big_to_load():
    raise MemoryError


@pytest.mark.parametrize(
    "make, error, message",
    [
        (_no_such_model, ModelNotFoundError, "model 'ghost' is not installed"),
        (_too_big_to_load, ModelTooLargeError, "do not fit in this worker's memory"),
    ],
)
def test_a_worker_that_cannot_load_its_model_says_why_before_any_input(make, error, message):
    ghost = ToyLM(["a", "<eos>"], lambda ids: [0.0, 0.0], name="ghost")
    ghost.recipe = Recipe(make)  # what a worker runs to make its replica

    @lc.program
    def uses_ghost(q):
        return (yield lc.gen("w", ghost, q, max_tokens=1))

    with pytest.raises(error, match=message) as caught:
        lc.infer_many(uses_ghost, ["a"], backend="ray", num_workers=1)
    assert "Traceback" not in str(caught.value) and "\x1b[" not in str(caught.value)


class NeedsTwo(Exception):
    """Pickles, but cannot be unpickled: its __init__ wants two arguments."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


@lc.program
def returns_what_it_gets(x):
    yield lc.factor("f", 0.0)
    return NeedsTwo("value", 3) if x == "odd" else x


def test_what_cannot_be_unpickled_fails_its_input_alone():
    inputs = ["a", "odd", (NeedsTwo("input", 1),), "b"]
    got = list(lc.infer_many(returns_what_it_gets, inputs, method="enumerate", backend="ray"))
    results = {repr(item): r for item, r in got}
    assert len(got) == 4 and results["'a'"].best() == "a" and results["'b'"].best() == "b"
    errors = [r for r in results.values() if isinstance(r, RemoteError)]
    assert len(errors) == 2 and all("cannot be unpickled" in str(e) for e in errors)


@lc.program
def no_b(question):
    return (
        yield lc.gen("w", SLOW_LM, question, max_tokens=3, constraint=lc.constraints.forbid("b"))
    )


def test_a_constrained_site_comes_back_whole():
    """A result's sites hold their constraint, whose per-model caches (weak references)
    do not pickle: they stay on the worker, and the result matches the local one."""
    local = dict(lc.infer_many(no_b, QUESTIONS[:4], method="smc", seed=0, particles=4))
    remote = dict(
        lc.infer_many(no_b, QUESTIONS[:4], method="smc", seed=0, particles=4, backend="ray")
    )
    for q in QUESTIONS[:4]:
        assert isinstance(remote[q], lc.Result), remote[q]
        _same(local[q], remote[q])
        assert all("b" not in v for v in remote[q].values)


def _tool_that_fails_oddly(x):
    import threading

    error = RuntimeError(f"no answer for {x}")
    error.lock = threading.Lock()  # an exception holding something that does not pickle
    raise error


@lc.program
def asks_a_tool(x):
    from pyro.distributions import Bernoulli

    if (yield lc.sample("ask", Bernoulli(0.5))):
        return (yield lc.call("tool", _tool_that_fails_oddly, x))
    return "no tool"


def test_a_result_whose_sites_hold_unpicklable_things_still_comes_back():
    """The failed tool call's trace (weight zero) keeps the error in its site; that error
    does not pickle, so the result comes back with it as a RemoteError of the same text."""
    ((item, result),) = list(
        lc.infer_many(asks_a_tool, [3], method="importance", num_samples=8, seed=0, backend="ray")
    )
    assert isinstance(result, lc.Result), result
    assert result.distribution() == {"no tool": 1.0}
    failed = next(t for t in result.traces if "tool" in t)
    assert isinstance(failed["tool"].error, RemoteError)
    assert "RuntimeError: no answer for 3" in str(failed["tool"].error)
