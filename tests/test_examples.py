"""Examples run end to end as a user would run them.

Every ``examples/*.py`` runs here (each once: the tests below share one run per example).
Examples that need a model CI does not fetch live in ``examples/extra/`` and are not run.
"""

import functools
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
# What each example's output must contain (the summary's header by default).
MARKERS = {"calculator_check.py": "log evidence"}
# Examples that take over a minute on a 2-core CPU: marked, so `-m "not slow"` skips them
SLOW = {"pattern_self_consistency.py"}


@functools.cache
def run_example(name: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    "example",
    [pytest.param(p, marks=[pytest.mark.slow] if p.name in SLOW else []) for p in EXAMPLES],
    ids=lambda p: p.name,
)
def test_example_runs(example):
    done = run_example(example.name)
    assert done.returncode == 0, done.stderr[-3000:]
    assert MARKERS.get(example.name, "probability") in done.stdout


def test_quickstart_reports_exact_and_sampled():
    done = run_example("quickstart.py")
    for method in ("enumerate", "rejection", "importance"):
        assert f"method '{method}'" in done.stdout


def readme_example() -> str:
    """The example the README's first command runs (a single line, after the setup script)."""
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    command = [line for line in first.splitlines() if line and not line.startswith("#")]
    assert len(command) == 1, command
    assert command[0].startswith("bash scripts/setup.sh && .venv/bin/python examples/")
    found = re.fullmatch(r".*\.venv/bin/python examples/(\w+\.py)", command[0])
    assert found, command[0]
    return found.group(1)


def table(stdout: str) -> dict[str, dict[str, float]]:
    """The side-by-side table the README's example prints: method -> its numbers."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["method"])
    assert lines[header].split()[:7] == [
        "method",
        "pass",
        "log",
        "evidence",
        "tokens",
        "wall",
        "time",
    ]
    rows = {}
    for line in lines[header + 1 :]:
        if not line.strip():
            break
        method, passed, log_z, tokens, wall = line.split()[:5]
        rows[method] = {
            "pass": float(passed),
            "log_evidence": float(log_z),
            "tokens": float(tokens),
            "wall": float(wall.rstrip("s")),
        }
    return rows


def test_readme_command_prints_the_side_by_side_table():
    name = readme_example()
    assert (ROOT / "examples" / name).is_file()
    done = run_example(name)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = table(done.stdout)
    assert list(rows) == ["forward", "rejection", "smc"]
    for method, row in rows.items():
        assert 0.0 <= row["pass"] <= 1.0, (method, row)
        assert row["log_evidence"] <= 0.0 or math.isnan(row["log_evidence"]), (method, row)
    # Rejection returns only answers the calculator accepted, whatever the draws were.
    assert rows["rejection"]["pass"] == 1.0


def test_the_table_reader_rejects_a_missing_column():
    with pytest.raises(AssertionError):
        table("method      pass  log evidence  tokens\nforward 0.5 -1.0 10\n")
    rows = table("method pass log evidence tokens wall time answers\nsmc 1.00 -1.20 165 1.0s 13\n")
    assert rows == {"smc": {"pass": 1.0, "log_evidence": -1.2, "tokens": 165.0, "wall": 1.0}}


def test_extra_examples_are_not_run_here():
    extra = sorted((ROOT / "examples" / "extra").glob("*.py"))
    assert extra, "examples/extra/ holds the examples that need a model CI does not fetch"
    assert not set(extra) & set(EXAMPLES)
