"""Batched population decoding on a real model, against Hugging Face baselines in the same run.

For N = 1, 8, 32, 128 samples of 32 tokens from one chat prompt (eos masked until 32 tokens on
every side, so every method does the same work):

- engine: ``lc.infer(..., method="forward", num_samples=N)``;
- (a) N sequential ``model.generate`` calls;
- (b) one ``model.generate(num_return_sequences=N)``;
- (c) the floor: a bare loop of batched forward passes with a KV cache (prompt encoded once,
  cache expanded to N rows, 31 decode steps, arg-max tokens) — the model's own cost.

Then N = 32 with a ~400-token shared prompt, reporting the prompt tokens computed, and the
engine's peak memory at N = 128.  Targets (at N = 32): engine >= 8x (a), no slower than (b),
within 1.3x of (c); prompt tokens computed = the prompt's length, not N times it.

Run: ``.venv/bin/python benchmarks/bench_decode.py [--device cpu|cuda] [--sizes 1,8,32,128]
[--repeats 3]`` (``--repeats`` keeps the best of several timings of the engine, (b) and (c)).

``--backend llamacpp`` measures the engine on :class:`~lmcascade.models.llamacpp.LlamaCppLM`
instead (default sizes 1, 8, 32), against its floor — a bare llama.cpp loop on a context with
LlamaCppLM's settings: the prompt decoded once into sequence 0, copied to sequences 1..N-1,
then 31 decodes of N tokens with logits for each, arg-max on numpy — and against the engine on
TransformersLM in the same run, taking turns in each of the ``--repeats`` rounds.  Targets:
within 1.2x of the floor at every N; at least 3x TransformersLM's engine at N = 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from timing import interleaved, machine  # benchmarks/timing.py

import lmcascade as lc

RESULTS = Path(__file__).parent / "results"
TOKENS = 32


class PeakRSS:
    """Samples the process's resident memory in a thread; ``peak_mb`` after the block."""

    def __enter__(self):
        self.peak = self.start = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def added_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int = 1):
    """Best wall time of ``repeats`` runs (on a shared machine the best is the least
    disturbed), and the last run's result."""
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def engine_run(lm, prompt: str, n: int, seed: int = 0):
    @lc.program
    def sample_text():
        text = yield lc.gen("text", lm, prompt, max_tokens=TOKENS, min_tokens=TOKENS)
        return text

    return lc.infer(sample_text(), method="forward", num_samples=n, seed=seed)


def gen_kwargs(lm) -> dict:
    return dict(
        do_sample=True,
        max_new_tokens=TOKENS,
        min_new_tokens=TOKENS,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        pad_token_id=lm.eos_id,
    )


def hf_sequential(lm, ids: torch.Tensor, n: int):
    with torch.inference_mode():
        for _ in range(n):
            lm.hf.generate(ids, attention_mask=torch.ones_like(ids), **gen_kwargs(lm))


def hf_batched(lm, ids: torch.Tensor, n: int):
    with torch.inference_mode():
        lm.hf.generate(
            ids, attention_mask=torch.ones_like(ids), num_return_sequences=n, **gen_kwargs(lm)
        )


def floor_loop(lm, ids: torch.Tensor, n: int):
    """The model's own cost: prefill once, expand the cache, then TOKENS - 1 decode steps."""
    from transformers import DynamicCache

    kw = lm._cache_kw
    with torch.inference_mode():
        cache = DynamicCache(config=lm.config)
        out = lm.hf(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        cache.batch_repeat_interleave(n)
        logits = out.logits[:, -1].float().expand(n, -1)
        length = ids.shape[1]
        for _ in range(TOKENS - 1):
            tok = logits.argmax(-1, keepdim=True)
            pos = torch.full((n, 1), length, device=ids.device)
            out = lm.hf(
                input_ids=tok, position_ids=pos, use_cache=True, logits_to_keep=1, **{kw: cache}
            )
            logits = out.logits[:, -1].float()
            length += 1
        logits.argmax(-1)


def llama_settings(lm) -> dict:
    """What a llama.cpp results file records about the backend's settings."""
    import llama_cpp

    return {
        "backend": "llamacpp",
        "llama_cpp_python": llama_cpp.__version__,
        "llama_threads": lm.threads,
        "kv_type": lm.kv_type,
        "flash_attention": "llama.cpp decides"
        if lm.flash_attention is None
        else lm.flash_attention,
    }


class BareLlama:
    """The llama.cpp backend's floor: its own model and context (LlamaCppLM's settings), fed
    directly through llama-cpp-python's low-level API, no lmcascade in between."""

    def __init__(self, lm) -> None:
        from lmcascade.models.llama_lanes import context_params
        from lmcascade.models.llamacpp import llama_cpp_module

        L = self.L = llama_cpp_module()  # llama_cpp, its logs silenced
        params = L.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(str(lm.path).encode(), params)
        cp = context_params(lm, lm.n_ctx)  # the same settings as LlamaCppLM
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(lm.batch_tokens, 0, 1)
        self.vocab = lm.vocab_size

    def decode(self, tokens, positions, seqs, logits_from: int) -> np.ndarray:
        """One llama_decode; the logits of entries ``logits_from`` on."""
        b = self.batch
        b.n_tokens = len(tokens)
        for j, (tok, pos, seq) in enumerate(zip(tokens, positions, seqs, strict=True)):
            b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = tok, pos, 1, j >= logits_from
            b.seq_id[j][0] = seq
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        rows = len(tokens) - logits_from
        return np.ctypeslib.as_array(self.L.llama_get_logits(self.ctx), shape=(rows, self.vocab))

    def prefill(self, ids: list[int], n: int) -> np.ndarray:
        """A fresh cache: the prompt in sequence 0, copied to 1..n-1; the first tokens."""
        self.L.llama_memory_clear(self.mem, True)
        logits = self.decode(ids, range(len(ids)), [0] * len(ids), len(ids) - 1)
        for seq in range(1, n):
            self.L.llama_memory_seq_cp(self.mem, 0, seq, 0, len(ids))
        return np.repeat(logits.argmax(-1), n)

    def step(self, tokens: np.ndarray, position: int) -> np.ndarray:
        """One token for each of the sequences 0..n-1 at ``position``; the next tokens."""
        n = len(tokens)
        return self.decode(tokens.tolist(), [position] * n, range(n), 0).argmax(-1)

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)

    def loop(self, ids: list[int], n: int) -> None:
        """Prefill, then TOKENS - 1 steps: TOKENS tokens per sequence, as the engine makes."""
        tokens = self.prefill(ids, n)
        for k in range(TOKENS - 1):
            tokens = self.step(tokens, len(ids) + k)


def llamacpp_main(args) -> None:
    """The engine on LlamaCppLM against its bare loop and against TransformersLM's engine."""
    import llama_cpp

    sizes = [int(s) for s in (args.sizes or "1,8,32").split(",")]
    lm = lc.models.load(args.model, backend="llamacpp")
    hf = lc.models.load(args.model, device="cpu")
    question = "Write a long story about a lighthouse keeper and the sea."
    prompt, hf_prompt = lm.chat(question), hf.chat(question)
    ids = lm.encode_prompt(prompt)
    bare = BareLlama(lm)
    cpu = torch.device("cpu")
    print(
        f"model {lm.name}: llama.cpp ({lm.threads} threads, llama-cpp-python "
        f"{llama_cpp.__version__}) against transformers ({torch.get_num_threads()} threads), "
        f"prompt {len(ids)} tokens, {TOKENS} new tokens per sample"
    )
    print(
        f"{'N':>4} {'engine s':>9} {'floor s':>8} {'hf eng s':>9} {'/ floor':>8} {'vs hf':>7} "
        f"{'tok/s':>7} {'floor':>7} {'hf':>7}"
    )
    rows = []
    for n in sizes:
        fns = {
            "engine": lambda n=n: engine_run(lm, prompt, n),
            "floor": lambda n=n: bare.loop(ids, n),
            "transformers": lambda n=n: engine_run(hf, hf_prompt, n),
        }
        for fn in fns.values():  # warm-up at this size
            fn()
        best = interleaved(fns, cpu, args.repeats)
        (t_engine, result), (t_floor, _), (t_hf, _) = best.values()
        tokens = result.stats["tokens_generated"]
        row = {
            "n": n,
            "engine_s": t_engine,
            "floor_s": t_floor,
            "transformers_engine_s": t_hf,
            "ratio_to_floor": t_engine / t_floor,
            "speedup_vs_transformers": t_hf / t_engine,
            "tokens_generated": tokens,
            "model_calls": result.stats["model_calls"],
            "prefill_tokens": result.stats.get("prefill_tokens"),
            "tokens_per_s": tokens / t_engine,
            "floor_tokens_per_s": n * TOKENS / t_floor,
            "transformers_tokens_per_s": n * TOKENS / t_hf,
        }
        rows.append(row)
        print(
            f"{n:>4} {t_engine:>9.2f} {t_floor:>8.2f} {t_hf:>9.2f} {row['ratio_to_floor']:>8.2f} "
            f"{row['speedup_vs_transformers']:>6.2f}x {row['tokens_per_s']:>7.0f} "
            f"{row['floor_tokens_per_s']:>7.0f} {row['transformers_tokens_per_s']:>7.0f}"
        )
    by_n = {row["n"]: row for row in rows}
    targets = {
        "ratio_to_floor_at_most": 1.2,
        "within_floor": all(row["ratio_to_floor"] <= 1.2 for row in rows),
        "speedup_vs_transformers_at_n1_at_least": 3.0,
        "faster_than_transformers": by_n[1]["speedup_vs_transformers"] >= 3.0
        if 1 in by_n
        else None,
    }
    print(f"targets: {targets}")
    report = {
        "benchmark": "decode",
        "model": lm.name,
        "device": "cpu",
        **machine(cpu),
        **llama_settings(lm),
        "repeats": args.repeats,
        "prompt_tokens": len(ids),
        "transformers_prompt_tokens": len(hf.encode_prompt(hf_prompt)),
        "new_tokens": TOKENS,
        "rows": rows,
        "targets": targets,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_decode_cpu_llamacpp.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def memory_probe(lm, prompt: str, n: int) -> None:
    """Runs the engine once at ``n`` in this (fresh) process and prints its peak memory."""
    if lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem:
        result = engine_run(lm, prompt, n)
    out = {
        "n": n,
        "peak_rss_mb": mem.peak_mb,
        "added_rss_mb": mem.added_mb,
        "oom_splits": result.stats.get("oom_splits", 0),
    }
    if lm.device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=lc.models.DEFAULT_MODEL)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--backend",
        choices=("transformers", "llamacpp"),
        default="transformers",
        help="llamacpp: the engine on LlamaCppLM against a bare llama.cpp loop and "
        "TransformersLM's engine",
    )
    parser.add_argument(
        "--sizes", default=None, help="default 1,8,32,128 (transformers), 1,8,32 (llamacpp)"
    )
    parser.add_argument(
        "--sequential-cap",
        type=int,
        default=32,
        help="at most this many sequential generate calls are timed; larger N "
        "is extrapolated per call (marked in the output)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="time the engine, (b) and (c) this many times each and keep the best",
    )
    parser.add_argument("--memory-probe", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend == "llamacpp":
        llamacpp_main(args)
        return
    sizes = [int(s) for s in (args.sizes or "1,8,32,128").split(",")]
    lm = lc.models.load(args.model, device=args.device)
    device = lm.device
    prompt = lm.chat("Write a long story about a lighthouse keeper and the sea.")
    if args.memory_probe:
        memory_probe(lm, prompt, args.memory_probe)
        return
    ids = torch.tensor([lm.encode_prompt(prompt)], device=device)

    # warm-up: every path once
    engine_run(lm, prompt, 2)
    hf_batched(lm, ids, 2)
    floor_loop(lm, ids, 2)

    rows = []
    print(
        f"model {lm.name} on {device} ({torch.get_num_threads()} CPU threads), prompt "
        f"{ids.shape[1]} tokens, {TOKENS} new tokens per sample"
    )
    print(
        f"{'N':>5} {'engine s':>9} {'(a) seq s':>10} {'(b) gen s':>10} {'(c) floor s':>11} "
        f"{'vs (a)':>7} {'vs (b)':>7} {'/ (c)':>6} {'tok/s':>8}"
    )
    for n in sizes:
        t_engine, result = timed(lambda n=n: engine_run(lm, prompt, n), device, args.repeats)
        calls = min(n, args.sequential_cap)
        t_seq, _ = timed(lambda c=calls: hf_sequential(lm, ids, c), device)
        t_seq *= n / calls
        t_gen, _ = timed(lambda n=n: hf_batched(lm, ids, n), device, args.repeats)
        t_floor, _ = timed(lambda n=n: floor_loop(lm, ids, n), device, args.repeats)
        row = {
            "n": n,
            "engine_s": t_engine,
            "hf_sequential_s": t_seq,
            "hf_sequential_extrapolated": calls < n,
            "hf_generate_s": t_gen,
            "floor_s": t_floor,
            "speedup_vs_sequential": t_seq / t_engine,
            "speedup_vs_generate": t_gen / t_engine,
            "ratio_to_floor": t_engine / t_floor,
            "tokens_generated": result.stats["tokens_generated"],
            "model_calls": result.stats["model_calls"],
            "prefill_tokens": result.stats.get("prefill_tokens"),
            "tokens_per_s": result.stats["tokens_generated"] / t_engine,
        }
        rows.append(row)
        mark = "*" if calls < n else " "
        print(
            f"{n:>5} {t_engine:>9.2f} {t_seq:>9.2f}{mark} {t_gen:>10.2f} {t_floor:>11.2f} "
            f"{row['speedup_vs_sequential']:>6.1f}x {row['speedup_vs_generate']:>6.2f}x "
            f"{row['ratio_to_floor']:>6.2f} {row['tokens_per_s']:>8.0f}"
        )

    # a long shared prompt: computed once, not once per particle
    long_prompt = lm.chat(
        " ".join(["The keeper climbed the stairs and lit the lamp again."] * 36)
        + " Continue the story."
    )
    long_ids = torch.tensor([lm.encode_prompt(long_prompt)], device=device)

    def long_engine():
        # every repeat computes the whole prompt, as the floor does
        lm.prefix_index.clear()
        return engine_run(lm, long_prompt, 32)

    t_long, long_result = timed(long_engine, device, args.repeats)
    t_long_floor, _ = timed(lambda: floor_loop(lm, long_ids, 32), device, args.repeats)
    shared = {
        "n": 32,
        "prompt_tokens": long_ids.shape[1],
        "prefill_tokens": long_result.stats.get("prefill_tokens"),
        "without_sharing": 32 * long_ids.shape[1],
        "engine_s": t_long,
        "floor_s": t_long_floor,
        "ratio_to_floor": t_long / t_long_floor,
    }
    print(
        f"shared prompt of {shared['prompt_tokens']} tokens, N = 32: prompt tokens computed "
        f"{shared['prefill_tokens']} (not {shared['without_sharing']}); engine "
        f"{t_long:.2f}s, floor {t_long_floor:.2f}s ({shared['ratio_to_floor']:.2f}x)"
    )

    probe = subprocess.run(
        [
            sys.executable,
            __file__,
            "--model",
            args.model,
            "--device",
            args.device,
            "--memory-probe",
            str(max(sizes)),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    memory = json.loads(probe.stdout.strip().splitlines()[-1])
    print(
        f"peak memory at N = {memory['n']} (fresh process): {memory['peak_rss_mb']:.0f} MB "
        f"RSS, {memory['added_rss_mb']:.0f} MB of it during the run"
        + (f"; CUDA {memory['cuda_peak_mb']:.0f} MB" if "cuda_peak_mb" in memory else "")
    )

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    report = {
        "benchmark": "decode",
        "model": lm.name,
        "device": str(device),
        "card": card,
        "cpu_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "torch": torch.__version__,
        "prompt_tokens": ids.shape[1],
        "new_tokens": TOKENS,
        "rows": rows,
        "shared_prompt": shared,
        "memory": memory,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench_decode_{device.type}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
