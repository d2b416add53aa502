"""`lmcascade run FILE.lmc --inputs data.jsonl --out results.jsonl` on the default model."""

import json

import pytest
from test_cli_and_graph import cli  # the real entry point, in a subprocess

PROGRAM = """\
model lm = "smollm2-135m"

program add(a, b) {
  answer ~ lm("{a} + {b} = ", max_tokens=3, stop="\\n")
  factor 0 - abs(len(strip(answer)) - len(str(calc("{a} + {b}"))))
  return strip(answer)
}
"""


@pytest.fixture
def files(tmp_path):
    program = tmp_path / "add.lmc"
    program.write_text(PROGRAM)
    data = tmp_path / "data.jsonl"
    data.write_text('{"a": 1, "b": 1}\n\n{"a": 20, "b": 5}\n{"a": 3}\n')
    return program, data, tmp_path / "results.jsonl"


def test_inputs_out_and_resume(files):
    program, data, out = files
    args = ["run", program, "--inputs", data, "--out", out, "--method", "forward"]
    first = cli(*args, "--particles", "3", "--seed", "0")
    assert first.returncode == 1  # {"a": 3} misses b: recorded, the others complete
    assert "1 of 3 inputs failed" in first.stderr
    printed = first.stdout.splitlines()
    assert len(printed) == 3 and sum("best " in line for line in printed) == 2
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(json.dumps(line["input"], sort_keys=True) for line in lines) == [
        '{"a": 1, "b": 1}',
        '{"a": 20, "b": 5}',
        '{"a": 3}',
    ]
    assert sum("result" in line for line in lines) == 2
    assert all(line["seed"] == 0 and line["method"] == "forward" for line in lines)
    again = cli(*args, "--particles", "3", "--json")  # no seed: the file's seed goes on
    assert "2 inputs already in" in again.stderr
    assert [json.loads(line)["input"] for line in again.stdout.splitlines()] == [{"a": 3}]
    other = cli(*args, "--particles", "4", "--seed", "0")
    assert other.returncode == 1 and "Use another out file" in other.stderr


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json\n", "line 1, is not JSON"),
        ('{"a": 1}\n[1, 2]\n', "line 2, must be a JSON object"),
        ('{"a": NaN}\n', "finite numbers"),
        ("\n\n", "holds no inputs"),
        (b'{"a": "\xff"}\n', "line 1, is not UTF-8"),
    ],
)
def test_bad_inputs_files(files, content, message):
    program, data, _ = files
    if isinstance(content, bytes):
        data.write_bytes(content)
    else:
        data.write_text(content)
    done = cli("run", program, "--inputs", data)
    assert done.returncode == 1 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_inputs_flags_that_do_not_go_together(files):
    program, data, out = files
    alone = cli("run", program, "--out", out)
    assert alone.returncode == 1 and "--out goes with --inputs" in alone.stderr
    both = cli("run", program, "--inputs", data, "--input", "a=1")
    assert both.returncode == 1 and "not both" in both.stderr
    folder = cli("run", program, "--inputs", out.parent)
    assert folder.returncode == 1 and "is a folder" in folder.stderr
