"""Careless and hostile use of the command line: each ends in one clear line and exit 1 (or
130 for Ctrl-C), never a traceback, and a valid run's JSON is strict."""

import json

import pytest

import lmcascade as lc
from lmcascade.cli import main
from lmcascade.errors import Interrupted

COIN = """
program coin(p) {
    x ~ bernoulli(p)
    condition x or p < 0.5
    return x
}
"""


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def coin(tmp_path):
    path = tmp_path / "coin.lmc"
    path.write_text(COIN)
    return path


def test_json_output_is_strict_with_zero_weight_traces(capsys, coin):
    code, out, err = run_cli(
        capsys, "run", coin, "--method", "forward", "--input", "p=0.7", "--json", "--seed", "0"
    )
    assert code == 0, err

    def refuse(name):
        raise ValueError(name)

    data = json.loads(out, parse_constant=refuse)
    assert "-inf" in [t["log_weight"] for t in data["traces"]]


@pytest.mark.parametrize("seed", ["-1", str(2**70)])
@pytest.mark.parametrize("method", ["smc", "forward"])
def test_out_of_range_seeds_are_one_line_errors(capsys, coin, seed, method):
    code, _, err = run_cli(
        capsys, "run", coin, "--input", "p=0.3", "--method", method, "--seed", seed
    )
    assert code == 1 and "seed must be a whole number" in err and "Traceback" not in err


def test_a_path_with_braces_is_a_path(capsys, tmp_path):
    odd = tmp_path / "we{ird}"
    odd.mkdir()
    path = odd / "c{1}.lmc"
    path.write_text(COIN)
    code, out, err = run_cli(capsys, "run", path, "--method", "enumerate", "--input", "p=0.3")
    assert code == 0, err
    assert "log evidence" in out


def test_a_file_that_is_not_utf8(capsys, tmp_path):
    path = tmp_path / "latin1.lmc"
    path.write_bytes('program f() { return "caf\xe9" }'.encode("latin-1"))
    for command in ("check", "run"):
        code, _, err = run_cli(capsys, command, path)
        assert code == 1 and "not UTF-8" in err and "offset 25" in err, err


def test_program_names_are_looked_up_among_programs_only(capsys, coin):
    for name in ("__getattribute__", "__class__", "missing"):
        code, _, err = run_cli(capsys, "run", coin, name)
        assert code == 1 and f"no program {name!r}" in err and "it has: coin" in err, err


def test_wrong_inputs_name_the_program(capsys, coin):
    code, _, err = run_cli(capsys, "run", coin, "--input", "q=1")
    assert code == 1 and "program 'coin' called with bad arguments" in err


def test_a_deeply_nested_input_is_refused(capsys, coin):
    deep = "[" * 995 + "]" * 995
    code, _, err = run_cli(capsys, "run", coin, "--input", f"p={deep}")
    assert code == 1 and "nested too deep" in err
    deeper = "[" * 100_000 + "]" * 100_000
    code, _, err = run_cli(capsys, "run", coin, "--input", f"p={deeper}")
    assert code == 1 and "nested too deep" in err


def test_graph_output_into_a_missing_folder_or_onto_a_folder(capsys, coin, tmp_path):
    code, _, err = run_cli(capsys, "graph", coin, "-o", tmp_path / "missing" / "g.dot")
    assert code == 1 and "needs the folder" in err
    code, _, err = run_cli(capsys, "graph", coin, "-o", tmp_path)
    assert code == 1 and "is a folder" in err
    code, out, _ = run_cli(capsys, "graph", coin, "-o", tmp_path / "g.dot")
    assert code == 0 and (tmp_path / "g.dot").read_text().startswith("digraph")


def test_ctrl_c_prints_one_line_with_the_progress(capsys, coin, monkeypatch):
    def interrupted(*args, **kwargs):
        raise Interrupted("smc", {"model_calls": 12, "resamples": 3, "seconds": 1.5})

    monkeypatch.setattr(lc, "infer", interrupted)
    code, out, err = run_cli(capsys, "run", coin, "--input", "p=0.3")
    assert code == 130 and out == ""
    assert err.strip().splitlines() == [
        "lmcascade: interrupted: smc was interrupted (model calls 12, resamples 3, seconds 1.5); "
        "no result"
    ]


def test_ctrl_c_outside_inference_is_one_line_too(capsys, coin, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lc, "load", interrupted)
    code, _, err = run_cli(capsys, "run", coin)
    assert code == 130 and err.strip() == "lmcascade: interrupted; no result"


def test_budget_options_reach_the_interpreter(capsys, tmp_path):
    path = tmp_path / "loop.lmc"
    path.write_text("program loop() { x = 0 repeat 1000 { repeat 1000 { x = x + 1 } } return x }")
    code, _, err = run_cli(capsys, "run", path, "--method", "forward", "--max-steps", "5000")
    assert code == 1 and "--max-steps" in err and "Traceback" not in err, err


def test_registry_only_refuses_model_paths(capsys, tmp_path):
    path = tmp_path / "local.lmc"
    path.write_text('model lm = "./weights"\nprogram f() { x ~ lm("hi") return x }')
    code, _, err = run_cli(capsys, "run", path, "--registry-only")
    assert code == 1 and "allow_paths" in err and ":1:" in err, err


@pytest.mark.parametrize(
    "device, message", [("nonsense", "unknown device 'nonsense'"), ("meta", "cannot run a model")]
)
def test_device_applies_to_declared_models(capsys, tmp_path, device, message):
    path = tmp_path / "declared.lmc"
    path.write_text(
        'model lm = "smollm2-135m"\nprogram f() { x ~ lm("hi", max_tokens=1) return x }'
    )
    code, _, err = run_cli(capsys, "run", path, "--device", device, "--method", "forward")
    assert code == 1 and message in err, err


def test_inputs_given_twice_and_particles_for_enumerate(capsys, coin):
    code, _, err = run_cli(capsys, "run", coin, "--input", "p=0.3", "--input", "p=0.4")
    assert code == 1 and "given twice" in err
    code, _, err = run_cli(capsys, "run", coin, "--method", "enumerate", "--particles", "3")
    assert code == 1 and "does not apply" in err


@pytest.mark.parametrize("flag", ["--max-steps", "--max-size", "--max-depth"])
def test_budgets_must_be_positive(capsys, coin, flag):
    code, _, err = run_cli(capsys, "run", coin, "--input", "p=0.3", flag, "0")
    assert code == 1 and flag in err and "Traceback" not in err, err


def test_a_closed_or_full_output_is_not_a_traceback(coin):
    import subprocess
    import sys

    base = [sys.executable, "-m", "lmcascade.cli", "run", str(coin), "--input", "p=0.3"]
    piped = subprocess.run(
        f"{' '.join(base)} --json --particles 2000 | head -c 10",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert piped.stderr == "" and piped.stdout.startswith("{")
    with open("/dev/full", "w") as full:
        done = subprocess.run(base, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert (
        done.returncode == 1 and done.stderr.strip() == "lmcascade: error: No space left on device"
    )


def test_method_must_be_a_name():
    from lmcascade.errors import UnknownMethodError

    with pytest.raises(UnknownMethodError, match=r"\['smc'\]"):
        lc.infer(lc.load(source=COIN).coin(0.5), method=["smc"])


def test_ctrl_c_while_the_command_line_loads():
    import subprocess
    import sys

    # the console script imports torch for seconds before main() runs; Ctrl-C (SIGINT) lands
    # 50 ms into that import, sent by the process itself so no scheduling can miss the window
    child = (
        "import os, signal, sys, threading\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "sys.argv = ['lmcascade', 'models', 'list']\n"
        "threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()\n"
        "from lmcascade.cli import main\n"
        "sys.exit(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "lmcascade: interrupted; no result"


@pytest.mark.parametrize(
    "value, message",
    [
        ("NaN", "finite numbers, got NaN"),
        ("[1, Infinity]", "finite numbers, got Infinity"),
        ("9" * 5000, "more than 4,300 digits"),
        ('"\\ud800x"', "not valid text"),
    ],
)
def test_input_values_that_are_not_data(capsys, coin, value, message):
    code, _, err = run_cli(capsys, "run", coin, "--input", f"p={value}")
    assert code == 1 and message in err, err


def test_a_fifo_is_not_read(capsys, tmp_path):
    import os

    fifo = tmp_path / "pipe.lmc"
    os.mkfifo(fifo)
    code, _, err = run_cli(capsys, "check", fifo)
    assert code == 1 and "not a regular file" in err


def test_best_is_the_value_itself():
    @lc.program
    def pair():
        x = yield lc.sample("x", lc.distributions.Bernoulli(0.9))
        return [bool(x), "a"]

    best = lc.infer(pair(), method="enumerate").best()
    assert best == [True, "a"] and isinstance(best, list)
