"""Examples run end to end as a user would run them."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(example):
    done = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "probability" in done.stdout


def test_quickstart_reports_exact_and_sampled():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    for method in ("enumerate", "rejection", "importance"):
        assert f"method '{method}'" in done.stdout
