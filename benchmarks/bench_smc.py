"""SMC on the "no letter e" task, against LLaMPPL and a bare forward step, in one run.

The default model is asked for a sentence about the ocean; up to 24 tokens; every token whose
text contains "e" is forbidden (and special tokens other than eos).  Tokens per second count
the non-eos tokens sampled by all particles, including those later dropped by resampling.  For N = 8 and 32 particles this reports wall time, tokens/s,
constraint satisfaction, ESS and the best text for lmcascade's SMC (token-level resampling,
mass-corrected constrained sampling), the time of one SMC step against one bare batched
forward step with a KV cache at the same batch size, and — when its environment exists —
the same task run by LLaMPPL 0.2.3 on the same model, prompt, N and token budget.

LLaMPPL is never a dependency of lmcascade: ``bash benchmarks/llamppl_env.sh`` builds its own
virtual environment (``benchmarks/.venv-llamppl``), and this script runs
``benchmarks/llamppl_no_e.py`` there in a subprocess.

``--backend llamacpp`` runs lmcascade's side on :class:`~lmcascade.models.llamacpp.LlamaCppLM`
(the registered GGUF on llama.cpp; LLaMPPL stays on transformers, as it has no other backend
on the CPU), its bare step being one llama.cpp decode of N tokens (``bench_decode.BareLlama``);
results go to ``bench_smc_cpu_llamacpp.json``.  Target there: at least 5x LLaMPPL in wall time
at N = 32.

Run: ``.venv/bin/python benchmarks/bench_smc.py [--device cpu|cuda] [--sizes 8,32]
[--backend transformers|llamacpp]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch
from bench_decode import BareLlama, llama_settings  # benchmarks/bench_decode.py
from timing import machine  # benchmarks/timing.py

import lmcascade as lc
from lmcascade.constraints import forbid

HERE = Path(__file__).parent
RESULTS = HERE / "results"
LLAMPPL_PY = HERE / ".venv-llamppl" / "bin" / "python"
TOKENS = 24
QUESTION = "Write a sentence about the ocean."


def smc_run(lm, prompt: str, n: int, seed: int = 0):
    no_e = forbid("e", "<|")  # no "e"; no special tokens but eos (as the LLaMPPL side)

    @lc.program
    def ocean():
        text = yield lc.gen("text", lm, prompt, max_tokens=TOKENS, constraint=no_e)
        return text

    return lc.infer(ocean(), method="smc", particles=n, seed=seed, progress=False)


def bare_step_time(lm, prompt: str, n: int, steps: int = 12) -> float:
    """Seconds per bare batched forward step (batch n, KV cache, arg-max), the model's cost."""
    from transformers import DynamicCache

    ids = torch.tensor([lm.encode_prompt(prompt)], device=lm.device)
    kw = lm._cache_kw
    with torch.inference_mode():
        cache = DynamicCache(config=lm.config)
        out = lm.hf(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        cache.batch_repeat_interleave(n)
        tok = out.logits[:, -1].argmax(-1, keepdim=True).expand(n, 1)
        length = ids.shape[1]
        start = None
        for i in range(steps + 2):
            if i == 2:
                start = time.perf_counter()
            pos = torch.full((n, 1), length, device=lm.device)
            out = lm.hf(
                input_ids=tok, position_ids=pos, use_cache=True, logits_to_keep=1, **{kw: cache}
            )
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            length += 1
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps


def bare_llama_step_time(lm, prompt: str, n: int, steps: int = 12) -> float:
    """Seconds per bare llama.cpp decode of n tokens (one per sequence), arg-max on numpy."""
    bare = BareLlama(lm)
    try:
        ids = lm.encode_prompt(prompt)
        tokens = bare.prefill(ids, n)
        start = None
        for i in range(steps + 2):
            if i == 2:
                start = time.perf_counter()
            tokens = bare.step(tokens, len(ids) + i)
        return (time.perf_counter() - start) / steps
    finally:
        bare.close()


def run_llamppl(model_dir: Path, n: int) -> dict | None:
    if not LLAMPPL_PY.exists():
        return None
    done = subprocess.run(
        [
            str(LLAMPPL_PY),
            str(HERE / "llamppl_no_e.py"),
            "--model-path",
            str(model_dir),
            "--particles",
            str(n),
            "--max-tokens",
            str(TOKENS),
            "--question",
            QUESTION,
        ],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if done.returncode != 0:
        print(f"LLaMPPL run failed:\n{done.stderr[-2000:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=lc.models.DEFAULT_MODEL)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sizes", default="8,32")
    parser.add_argument("--backend", choices=("transformers", "llamacpp"), default="transformers")
    args = parser.parse_args()
    llama = args.backend == "llamacpp"
    lm = lc.models.load(args.model, device=args.device, backend=args.backend)
    bare_step = bare_llama_step_time if llama else bare_step_time
    prompt = lm.chat(QUESTION)
    smc_run(lm, prompt, 4)  # warm-up
    rows = []
    print(f"model {lm.name} on {lm.device}, {TOKENS} tokens max, tokens containing 'e' forbidden")
    print(
        f"{'N':>4} {'system':>9} {'wall s':>8} {'tok/s':>8} {'satisfied':>9} {'ESS':>6} "
        f"{'step ms':>8} {'bare ms':>8}  best text"
    )
    for n in [int(s) for s in args.sizes.split(",")]:
        start = time.perf_counter()
        r = smc_run(lm, prompt, n)
        wall = time.perf_counter() - start
        tokens = r.stats["tokens_generated"] - r.stats.get("eos_generated", 0)  # as LLaMPPL
        steps = r.stats["steps"]
        bare = bare_step(lm, prompt, n)
        row = {
            "n": n,
            "system": "lmcascade",
            "wall_s": wall,
            "tokens_generated": tokens,
            "tokens_per_s": tokens / wall,
            "satisfied": sum("e" not in v for v in r.values) / len(r.values),
            "ess": r.ess,
            "steps": steps,
            "step_s": wall / steps,
            "bare_step_s": bare,
            "step_over_bare": wall / steps / bare,
            "resamples": r.stats["resamples"],
            "best_text": r.best(),
            "log_evidence": r.log_evidence,
        }
        rows.append(row)
        print(
            f"{n:>4} {'lmcascade':>9} {wall:>8.2f} {row['tokens_per_s']:>8.1f} "
            f"{row['satisfied']:>9.2f} {r.ess:>6.1f} {1e3 * row['step_s']:>8.1f} "
            f"{1e3 * bare:>8.1f}  {r.best()!r}"
        )
        theirs = run_llamppl(lc.models.registry.home() / lm.name, n)
        if theirs is not None:
            theirs["system"] = "llamppl"
            rows.append(theirs)
            print(
                f"{n:>4} {'llamppl':>9} {theirs['wall_s']:>8.2f} "
                f"{theirs['tokens_per_s']:>8.1f} {theirs['satisfied']:>9.2f} "
                f"{theirs.get('ess', float('nan')):>6.1f} {'':>8} {'':>8}  "
                f"{theirs.get('best_text')!r}"
            )
            row["speedup_vs_llamppl"] = row["tokens_per_s"] / theirs["tokens_per_s"]
            print(f"     tokens/s vs LLaMPPL: {row['speedup_vs_llamppl']:.1f}x")
            if llama:
                row["wall_speedup_vs_llamppl"] = theirs["wall_s"] / wall
                print(f"     wall time vs LLaMPPL: {row['wall_speedup_vs_llamppl']:.1f}x")
    report = {"benchmark": "smc_no_e", "model": lm.name, "device": str(lm.device), "rows": rows}
    suffix = ""
    if llama:
        suffix = "_llamacpp"
        report.update(**machine(lm.device), **llama_settings(lm))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench_smc_{lm.device.type}{suffix}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
