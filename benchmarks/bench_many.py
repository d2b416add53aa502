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

Run: ``.venv/bin/python benchmarks/bench_many.py [--questions 64] [--samples 4]
[--device cpu|cuda]``; writes ``benchmarks/results/bench_many_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    lm = lc.models.load(device=args.device)
    solve = make_program(lm)
    inputs = questions(args.questions)
    options = {"method": "forward", "seed": args.seed, "num_samples": args.samples}

    lc.infer(solve(**inputs[0]), **options)  # warm up: model and code paths loaded

    lm.prefix_index.clear()
    start = time.perf_counter()
    loop = [lc.infer(solve(**item), **options) for item in inputs]
    loop_s = time.perf_counter() - start
    loop_calls = sum(r.stats["model_calls"] for r in loop)

    lm.prefix_index.clear()
    start = time.perf_counter()
    runs = lc.infer_many(solve, inputs, progress=False, **options)
    many = {item["question"]: result for item, result in runs}
    many_s = time.perf_counter() - start

    identical = sum(
        many[item["question"]].values == r.values for item, r in zip(inputs, loop, strict=True)
    )
    tokens = sum(r.stats.get("tokens_generated", 0) for r in loop)
    report = {
        "benchmark": "bench_many",
        "device": args.device if args.device != "cuda" else torch.cuda.get_device_name(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}",
        "questions": args.questions,
        "samples": args.samples,
        "tokens_generated": tokens,
        "loop_s": round(loop_s, 3),
        "loop_model_calls": loop_calls,
        "infer_many_s": round(many_s, 3),
        "infer_many_model_calls": runs.stats["model_calls"],
        "speedup": round(loop_s / many_s, 2),
        "inputs_with_identical_values": identical,
        "target_speedup": 3.0,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bench_many_{args.device}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
