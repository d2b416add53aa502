"""Many inputs at once: ``lc.infer_many`` against a loop of ``lc.infer`` calls, same run.

64 arithmetic questions through a two-site program on the default model (SmolLM2-135M-
Instruct): a short chain of thought, then an answer whose prompt holds the thought; forward
sampling, 4 samples per question, one seed.  Every question's prompt starts with the same
system prompt.  The loop runs the questions one after another (each run batches its own 4
samples); ``infer_many`` runs them together, one batched model call per step for all 256
samples.  Both do the same decoding work; the report counts the questions whose sampled
values are identical in both (on a transformer, logits depend on the batch size in the last
bits — about 2e-5 on the default model between batches of 1 and 64 — so a draw near a tie
can differ; on ToyLM every value is identical, as tests/test_infer_many.py checks).  Target:
``infer_many`` at least 3x faster than the loop.

The ``ray`` row runs the same ``infer_many`` over ``--workers`` Ray actors (each with its
own replica of the model and its share of the CPUs, or a GPU each); its time counts starting
the workers and loading their models (``ray_startup_s``, reported apart), not starting Ray.
On a 2-core machine two workers of one thread each can at best match one process of two
threads on the model's arithmetic; what they gain is the per-input Python work, which one
process does on one core.

Run: ``.venv/bin/python benchmarks/bench_many.py [--questions 64] [--samples 4]
[--device cpu|cuda] [--rows loop,many,ray] [--workers 2]``; writes
``benchmarks/results/bench_many_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import lmcascade as lc

RESULTS = Path(__file__).parent / "results"
SYSTEM = (
    "You are a careful assistant for arithmetic word problems. Think briefly, step by step, "
    "then give the final answer as a number."
)


def questions(n: int) -> list[dict]:
    out = []
    for i in range(n):
        a, b = 3 + (7 * i) % 41, 2 + (5 * i) % 23
        out.append({"question": f"Sam has {a} apples and buys {b} more. How many now?"})
    return out


def make_program(lm):
    @lc.program
    def solve(question):
        thought = yield lc.gen(
            "thought", lm, lm.chat(question, system=SYSTEM), max_tokens=24, temperature=0.8
        )
        answer = yield lc.gen(
            "answer",
            lm,
            lm.chat(f"{question}\nReasoning: {thought}\nFinal answer (a number):", system=SYSTEM),
            max_tokens=6,
            stop="\n",
        )
        return answer.strip()

    return solve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rows",
        default="loop,many,ray",
        help="which runs, comma-separated: loop (lc.infer per question), many (infer_many "
        "here), ray (infer_many over Ray workers)",
    )
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (ray row)")
    args = parser.parse_args()
    rows = set(args.rows.split(","))
    if not rows or rows - {"loop", "many", "ray"}:
        parser.error(f"--rows takes loop, many and ray, got {args.rows!r}")
    lm = lc.models.load(device=args.device)
    solve = make_program(lm)
    inputs = questions(args.questions)
    options = {"method": "forward", "seed": args.seed, "num_samples": args.samples}

    lc.infer(solve(**inputs[0]), **options)  # warm up: model and code paths loaded
    report: dict = {
        "benchmark": "bench_many",
        "device": args.device if args.device != "cuda" else torch.cuda.get_device_name(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}",
        "questions": args.questions,
        "samples": args.samples,
    }
    loop = many = None
    if "loop" in rows:
        lm.prefix_index.clear()
        start = time.perf_counter()
        loop = {item["question"]: lc.infer(solve(**item), **options) for item in inputs}
        report["loop_s"] = round(time.perf_counter() - start, 3)
        report["loop_model_calls"] = sum(r.stats["model_calls"] for r in loop.values())
        report["tokens_generated"] = sum(r.stats.get("tokens_generated", 0) for r in loop.values())
    if "many" in rows:
        lm.prefix_index.clear()
        start = time.perf_counter()
        runs = lc.infer_many(solve, inputs, progress=False, **options)
        many = {item["question"]: result for item, result in runs}
        report["infer_many_s"] = round(time.perf_counter() - start, 3)
        report["infer_many_model_calls"] = runs.stats["model_calls"]
        if loop is not None:
            report["speedup"] = round(report["loop_s"] / report["infer_many_s"], 2)
            report["inputs_with_identical_values"] = _identical(many, loop)
            report["target_speedup"] = 3.0
    if "ray" in rows:
        report.update(_ray_row(solve, inputs, options, args.workers))
        if "infer_many_s" in report:
            report["ray_speedup_over_many"] = round(report["infer_many_s"] / report["ray_s"], 2)
            report["ray_speedup_over_many_after_startup"] = round(
                report["infer_many_s"] / (report["ray_s"] - report["ray_startup_s"]), 2
            )
            report["ray_inputs_identical_to_many"] = _identical(report.pop("_ray"), many)
        else:
            report.pop("_ray")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bench_many_{args.device}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def _identical(a: dict, b: dict) -> int:
    return sum(a[q].values == b[q].values for q in a)


def _ray_row(solve, inputs, options, workers: int) -> dict:
    """infer_many over Ray workers: Ray itself is started first (a cluster is long-lived);
    the time counts starting the workers and loading their models, reported apart too."""
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    start = time.perf_counter()
    runs = lc.infer_many(
        solve, inputs, progress=False, backend="ray", num_workers=workers, **options
    )
    ready_s = time.perf_counter() - start
    spread = {item["question"]: result for item, result in runs}
    total_s = time.perf_counter() - start
    ray.shutdown()
    return {
        "ray_workers": workers,
        "ray_s": round(total_s, 3),
        "ray_startup_s": round(ready_s, 3),
        "ray_model_calls": runs.stats["model_calls"],
        "_ray": spread,
    }


if __name__ == "__main__":
    main()
