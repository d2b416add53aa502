"""Engine overhead: forward sampling of 1,000 traces of a program with two 20-token LM sites.

The model is a ToyLM whose ``next_logprobs`` is a table lookup, so nearly all the time is the
engine's own: driving generators, batching requests, sampling, bookkeeping.  The contract
checked here is structural — one batched model call per decoding step per model, so 1,000
traces x 40 tokens cost 40 calls — and the throughput is reported, not asserted.

Run: ``.venv/bin/python benchmarks/bench_engine.py [--traces 1000]``
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

import lmcascade as lc
from lmcascade.models import ToyLM

VOCAB = [chr(ord("a") + i) for i in range(26)] + [" ", "<eos>"]
RESULTS = Path(__file__).parent / "results"


def table_model() -> ToyLM:
    """A bigram table over 28 tokens; eos is forbidden so every site runs its 20 tokens."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(len(VOCAB), len(VOCAB), generator=g, dtype=torch.float64)
    table[:, -1] = -math.inf
    rows = [table[i] for i in range(len(VOCAB))]
    return ToyLM(VOCAB, lambda ctx: rows[ctx[-1]], name="bigram-table")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lm = table_model()

    @lc.program
    def two_sites():
        first = yield lc.gen("first", lm, "a", max_tokens=20)
        second = yield lc.gen("second", lm, "a" + first, max_tokens=20)
        return second

    times, result = [], None
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = lc.infer(two_sites(), method="forward", num_samples=args.traces, seed=0)
        times.append(time.perf_counter() - start)
    best = min(times)
    tokens = result.stats["tokens_generated"]
    row = {
        "benchmark": "engine_forward_two_20_token_sites",
        "traces": args.traces,
        "model_calls": result.stats["model_calls"],
        "tokens_generated": tokens,
        "best_wall_s": best,
        "traces_per_s": args.traces / best,
        "tokens_per_s": tokens / best,
        "us_per_token": 1e6 * best / tokens,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    print(
        f"{'traces':>8} {'model calls':>12} {'tokens':>8} {'wall s':>8} {'traces/s':>10} "
        f"{'us/token':>9}"
    )
    print(
        f"{args.traces:>8} {row['model_calls']:>12} {tokens:>8} {best:>8.3f} "
        f"{row['traces_per_s']:>10.0f} {row['us_per_token']:>9.2f}"
    )
    assert row["model_calls"] == 40, "the engine must make one batched call per decoding step"
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_engine.json"
    out.write_text(json.dumps(row, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
