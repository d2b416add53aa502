"""Speculative decoding: target-only sampling, lmcascade's speculative sampler and Hugging Face
assisted generation, one run.

Two parts, each system against its own target-only baseline measured in the same run:

(a) **copy** — the default model (SmolLM2-135M-Instruct), a chat prompt asking it to repeat a
    67-word paragraph exactly, 64 new tokens, greedy (temperature 0) and sampling
    (temperature 1, no top-k, top-p 1).  Ours: ``lc.infer(..., method="forward")`` (plain)
    and ``lc.infer(..., method="speculative", draft="prompt_lookup", lookahead=k)``
    (adaptive lookahead, starting at ``k``).  Hugging Face on the same model object
    (``lm.hf``): plain ``generate`` and ``generate(prompt_lookup_num_tokens=k)``.
(b) **code** (slow: several minutes on a CPU) — qwen2.5-coder-1.5b as target with
    qwen2.5-coder-0.5b as draft on a code-writing prompt: ours with ``draft=<the 0.5b
    model>`` against ``generate(assistant_model=<the 0.5b model>)``; ours also with two
    drafts per block, with a chain (the 0.5b model drafted by prompt lookup) and with an
    FR-Spec head (the 0.5b model's output head cut to ``--head-tokens`` frequent tokens of
    Python's standard library).  Skipped, with the
    reason printed, when either model is not fetched (``lmcascade models fetch NAME``).

Fairness: every system generates exactly ``--max-tokens`` tokens (``min_tokens = max_tokens``
for ours, ``min_new_tokens = max_new_tokens`` for ``generate``; the paragraph is longer than
64 tokens, so the copy is still under way when the budget ends), and speeds are compared as
time per generated token.  Sampling runs ``--seeds`` generations (seeds 0, 1, ...) per timing
so that acceptance statistics are not those of one text.  Timings are the best of
``--repeats`` rounds, the systems taking turns (on a shared machine each sees the same
load); ours clears the prefix index first, so both compute the prompt.  Every run is one
sequence (batch 1: ``generate``'s assisted decoding supports only that).

Reported per system: seconds per token, speedup over its own target-only baseline, target
passes, alpha (acceptance rate: accepted draft tokens / draft tokens tested, i.e. up to and
including the first rejection of each block) and tau (block efficiency: tokens emitted per
verifying target pass, the accepted tokens plus the correction or bonus token), for HF from
its candidate generator's counts, plus our predicted tau ``(1 - alpha^(k+1)) / (1 - alpha)``.
Under greedy decoding the report says whether the speculative texts are identical to the
plain ones (they must be: greedy speculative decoding is the target's greedy decoding).

Target: our speedup over target-only at least HF's, and above 1 on (a) on a CPU.

Run: ``.venv/bin/python benchmarks/bench_speculative.py [--device cpu|cuda] [--quick]
[--repeats 3] [--seeds 3] [--lookaheads 4,8] [--max-tokens 64] [--threads T]
[--parts copy,code] [--head-tokens 16384]``; writes
``benchmarks/results/bench_speculative_<device>.json`` (one part alone:
``bench_speculative_<device>_<part>.json``) and prints a table.  ``--quick`` is a smoke test
(32 tokens, one round, one seed, lookahead 8).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch
from timing import interleaved, machine  # benchmarks/timing.py

import lmcascade as lc

RESULTS = Path(__file__).parent / "results"
PARAGRAPH = (
    "The old lighthouse stood on a rocky point at the edge of the bay. For more than a century "
    "its keepers climbed the narrow spiral stairs each evening to light the lamp, trim the wick "
    "and wind the clockwork that turned the great lens. Ships passing in the night watched for "
    "its steady beam, and fishermen returning late knew that home was near when they saw it."
)
COPY_TASK = f"Repeat the following paragraph exactly, word for word:\n\n{PARAGRAPH}"
CODE_TASK = (
    "Write a Python function merge_sorted(a, b) that merges two sorted lists of integers into "
    "one sorted list in linear time, with type hints and a docstring. Then write three "
    "assert-based tests for it."
)
CODE_TARGET, CODE_DRAFT = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"


# -- ours ------------------------------------------------------------------------------------


def make_program(lm, prompt: str, n: int, temperature: float):
    @lc.program
    def reply():
        return (
            yield lc.gen("reply", lm, prompt, max_tokens=n, min_tokens=n, temperature=temperature)
        )

    return reply


def ours(lm, prog, seeds: list[int], options: dict) -> dict:
    """One generation per seed; the token ids and the pooled statistics."""
    texts, passes, tokens = [], 0, 0
    accepted = tested = emitted = blocks = 0
    lookahead_sum = 0.0
    drafts = options.get("draft")
    drafts = drafts if isinstance(drafts, list) else [drafts]
    caches = [m.prefix_index for m in [lm, *drafts] if hasattr(m, "prefix_index")]
    for seed in seeds:
        for cache in caches:  # every timed run computes the prompt itself, as generate does
            cache.clear()
        r = lc.infer(prog(), num_samples=1, seed=seed, progress=False, **options)
        texts.append(list(r.traces[0].sites[0].token_ids))
        s = r.stats
        passes += s["model_calls"]
        tokens += s["tokens_generated"]
        if s.get("verify_calls"):
            alpha = s["acceptance_rate"]
            accepted += s["accepted_tokens"]
            tested += round(s["accepted_tokens"] / alpha) if alpha > 0 else _tested(s)
            emitted += round(s["block_efficiency"] * s["verify_calls"])  # batch 1: a block a pass
            blocks += s["verify_calls"]
            lookahead_sum += s["mean_lookahead"] * s["verify_calls"]
    return _stats(texts, passes, tokens, accepted, tested, emitted, blocks, lookahead_sum)


def _tested(stats: dict) -> int:
    """Draft tokens tested when none was accepted: the first of each block."""
    return stats["verify_calls"]


def _stats(texts, passes, tokens, accepted, tested, emitted, blocks, lookahead_sum) -> dict:
    alpha = accepted / tested if tested else math.nan
    k = lookahead_sum / blocks if blocks else math.nan
    if math.isnan(alpha) or math.isnan(k):
        predicted = math.nan
    elif alpha == 1.0:
        predicted = k + 1.0
    else:
        predicted = (1 - alpha ** (k + 1)) / (1 - alpha)
    return {
        "texts": texts,
        "target_passes": passes,
        "tokens": tokens,
        "verify_passes": blocks,
        "alpha": alpha,
        "tau": emitted / blocks if blocks else math.nan,
        "predicted_tau": predicted,
        "mean_lookahead": k,
    }


# -- Hugging Face ----------------------------------------------------------------------------


class HFCounts:
    """Counts ``generate``'s target forward passes (a hook on the model) and its assisted
    blocks: candidate tokens proposed and matched, from the candidate generators' own calls."""

    def __init__(self) -> None:
        self.passes = 0
        self.pending = 0  # candidate tokens of the block being verified
        self.accepted = self.tested = self.emitted = self.blocks = 0
        self.lookahead_sum = 0

    @contextlib.contextmanager
    def watching(self, model):
        from transformers.generation import candidate_generator as cg

        hook = model.register_forward_hook(lambda *_: self._pass())
        patched = []
        for cls in (cg.PromptLookupCandidateGenerator, cg.AssistedCandidateGenerator):
            get, update = cls.get_candidates, cls.update_candidate_strategy
            patched.append((cls, get, update))
            cls.get_candidates = self._wrap_get(get)
            cls.update_candidate_strategy = self._wrap_update(update)
        try:
            yield self
        finally:
            hook.remove()
            for cls, get, update in patched:
                cls.get_candidates, cls.update_candidate_strategy = get, update

    def _pass(self) -> None:
        self.passes += 1

    def _wrap_get(self, original):
        counts = self

        def get_candidates(gen, input_ids, *args, **kwargs):
            out = original(gen, input_ids, *args, **kwargs)
            counts.pending = out[0].shape[1] - input_ids.shape[1]
            return out

        return get_candidates

    def _wrap_update(self, original):
        counts = self

        def update_candidate_strategy(gen, input_ids, scores, num_matches):
            n, m = counts.pending, int(num_matches)
            if n > 0:
                counts.accepted += m
                counts.tested += min(m + 1, n)
                counts.emitted += m + 1
                counts.blocks += 1
                counts.lookahead_sum += n
            counts.pending = 0
            return original(gen, input_ids, scores, num_matches)

        return update_candidate_strategy


def hf_generate(lm, ids: torch.Tensor, seeds: list[int], n: int, temperature: float, **assist):
    """One ``generate`` per seed, exactly ``n`` new tokens; the token ids and statistics."""
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    )
    counts = HFCounts()
    texts = []
    with torch.inference_mode(), counts.watching(lm.hf):
        for seed in seeds:
            torch.manual_seed(seed)
            out = lm.hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                eos_token_id=lm.eos_id,
                pad_token_id=lm.eos_id,
                **sampling,
                **assist,
            )
            texts.append(out[0, ids.shape[1] :].tolist())
    c = counts
    return _stats(
        texts,
        c.passes,
        sum(map(len, texts)),
        c.accepted,
        c.tested,
        c.emitted,
        c.blocks,
        c.lookahead_sum,
    )


# -- one comparison --------------------------------------------------------------------------


def systems(lm, ids, prompt, n, temperature, seeds, drafts, hf_assist) -> dict:
    """The timed functions, by (system, method): plain, then the speculative ones."""
    prog = make_program(lm, prompt, n, temperature)
    fns = {("ours", "plain"): lambda: ours(lm, prog, seeds, {"method": "forward"})}
    for name, options in drafts.items():
        fns[("ours", name)] = lambda o=options: ours(
            lm, prog, seeds, {"method": "speculative", **o}
        )
    fns[("hf", "plain")] = lambda: hf_generate(lm, ids, seeds, n, temperature)
    for name, kwargs in hf_assist.items():
        fns[("hf", name)] = lambda k=kwargs: hf_generate(lm, ids, seeds, n, temperature, **k)
    return fns


def compare(lm, prompt: str, drafts: dict, args, hf_assist: dict) -> dict:
    """Every system on ``prompt`` at each temperature.  ``drafts``: our speculative options by
    name; ``hf_assist``: ``generate`` keyword arguments by name (both beside plain)."""
    ids = torch.tensor([lm.encode_prompt(prompt)], device=lm.device)
    n = args.max_tokens
    out = {"prompt_tokens": ids.shape[1], "new_tokens": n, "temperatures": []}
    for temperature in args.temperatures:
        seeds = [args.seed] if temperature == 0 else [args.seed + i for i in range(args.seeds)]
        for fn in systems(lm, ids, prompt, 8, temperature, seeds[:1], drafts, hf_assist).values():
            fn()  # warm up every code path on a short run
        fns = systems(lm, ids, prompt, n, temperature, seeds, drafts, hf_assist)
        timings = interleaved(fns, lm.device, args.repeats)
        rows = []
        for (system, name), (wall, r) in timings.items():
            base_wall, base = timings[(system, "plain")]
            per_token = wall / r["tokens"]
            row = {
                "system": "lmcascade" if system == "ours" else "HF generate",
                "method": name,
                "wall_s": wall,
                "tokens": r["tokens"],
                "ms_per_token": 1000 * per_token,
                "speedup": (base_wall / base["tokens"]) / per_token,
                "target_passes": r["target_passes"],
                "tokens_per_target_pass": r["tokens"] / r["target_passes"],
                **{k: r[k] for k in ("alpha", "tau", "predicted_tau", "mean_lookahead")},
            }
            if name != "plain":
                row["verify_passes"] = r["verify_passes"]
            if temperature == 0:
                row["same_text_as_own_plain"] = r["texts"] == base["texts"]
                row["same_text_as_ours_plain"] = (
                    r["texts"] == timings[("ours", "plain")][1]["texts"]
                )
            rows.append(row)
        out["temperatures"].append(
            {
                "temperature": temperature,
                "seeds": seeds,
                "sample_text": lm.decode(timings[("ours", "plain")][1]["texts"][0]),
                "rows": rows,
            }
        )
    return out


# -- the parts -------------------------------------------------------------------------------


def copy_part(args) -> dict:
    lm = lc.models.load(args.model, device=args.device)
    print(f"(a) copy: {lm.name} on {lm.device}, {lm.dtype}")
    drafts = {
        f"prompt_lookup k={k}": {"draft": "prompt_lookup", "lookahead": k} for k in args.lookaheads
    }
    assist = {f"prompt_lookup k={k}": {"prompt_lookup_num_tokens": k} for k in args.lookaheads}
    return {
        "model": lm.name,
        "task": COPY_TASK,
        **compare(lm, lm.chat(COPY_TASK), drafts, args, assist),
    }


def code_part(args) -> dict:
    """(b): the draft model alone (each lookahead), and at the first lookahead two drafts per
    block, a chain (the 0.5b model drafted by prompt lookup) and an FR-Spec head (the 0.5b
    model's head cut to the most frequent tokens of Python's own standard library)."""
    from lmcascade.models import registry

    missing = [name for name in (CODE_TARGET, CODE_DRAFT) if not registry.is_installed(name)]
    if missing:
        reason = ", ".join(missing) + " not fetched (lmcascade models fetch NAME)"
        print(f"(b) code: skipped: {reason}")
        return {"run": False, "reason": reason}
    target = lc.models.load(CODE_TARGET, device=args.device)
    draft = lc.models.load(CODE_DRAFT, device=args.device)
    print(f"(b) code: {target.name} drafted by {draft.name} on {target.device}, {target.dtype}")
    drafts = {f"draft model k={k}": {"draft": draft, "lookahead": k} for k in args.lookaheads}
    k = args.lookaheads[0]
    head = lc.models.restrict_head(draft, top=args.head_tokens, corpus=code_corpus())
    drafts.update(
        {
            f"2 drafts k={k}": {"draft": draft, "lookahead": k, "num_drafts": 2},
            f"chain 0.5b <- prompt lookup k={k}": {
                "draft": [draft, "prompt_lookup"],
                "lookahead": k,
            },
            f"FR-Spec head {args.head_tokens} k={k}": {"draft": head, "lookahead": k},
        }
    )
    assist = {"assistant_model": {"assistant_model": draft.hf}}
    result = compare(target, target.chat(CODE_TASK), drafts, args, assist)
    return {"run": True, "model": target.name, "draft": draft.name, "task": CODE_TASK, **result}


def code_corpus(files: int = 60) -> list[str]:
    """Python source to rank tokens by for the FR-Spec head: the first ``files`` modules of the
    standard library, in name order (on every machine, no download)."""
    import os

    root = Path(os.__file__).parent
    return [p.read_text(errors="ignore") for p in sorted(root.glob("*.py"))[:files]]


# -- the run ---------------------------------------------------------------------------------


def _fmt(x, spec: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_part(title: str, part: dict) -> None:
    if not part.get("run", True):
        print(f"\n{title}: skipped ({part['reason']})")
        return
    print(f"\n{title}: {part['prompt_tokens']}-token prompt, {part['new_tokens']} new tokens")
    head = (
        f"{'temp':>4} {'system':<11} {'method':<20} {'ms/tok':>7} {'speedup':>8} "
        f"{'passes':>6} {'alpha':>6} {'tau':>5} {'pred':>5} {'k':>5} {'greedy =':>8}"
    )
    print(head)
    for block in part["temperatures"]:
        for r in block["rows"]:
            same = r.get("same_text_as_own_plain")
            print(
                f"{block['temperature']:>4g} {r['system']:<11} {r['method']:<20} "
                f"{r['ms_per_token']:>7.1f} {r['speedup']:>7.2f}x {r['target_passes']:>6} "
                f"{_fmt(r['alpha'], '.2f'):>6} {_fmt(r['tau'], '.2f'):>5} "
                f"{_fmt(r['predicted_tau'], '.2f'):>5} {_fmt(r['mean_lookahead'], '.1f'):>5} "
                f"{'' if same is None else str(same):>8}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=lc.models.DEFAULT_MODEL, help="part (a)'s model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--parts", default="copy,code", help="copy, code (slow) or both")
    parser.add_argument("--max-tokens", type=int, default=None, help="new tokens (64)")
    parser.add_argument("--lookaheads", default=None, help="draft lengths k (4,8)")
    parser.add_argument("--temperatures", default="0,1")
    parser.add_argument("--repeats", type=int, default=None, help="best of this many (3)")
    parser.add_argument("--seeds", type=int, default=None, help="sampled texts per timing (3)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (torch's default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--head-tokens", type=int, default=16384, help="(b): the FR-Spec draft head's tokens"
    )
    args = parser.parse_args()
    quick = args.quick
    args.max_tokens = args.max_tokens or (32 if quick else 64)
    args.lookaheads = [int(k) for k in (args.lookaheads or ("8" if quick else "4,8")).split(",")]
    args.temperatures = [float(t) for t in args.temperatures.split(",")]
    args.repeats = args.repeats or (1 if quick else 3)
    args.seeds = args.seeds or (1 if quick else 3)
    parts = set(args.parts.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    report: dict = {
        "benchmark": "speculative",
        "device": device.type,
        **machine(device),
        "quick": quick,
        "repeats": args.repeats,
        "equal_lengths": "min_tokens = max_tokens (ours), min_new_tokens = max_new_tokens (HF)",
        "target": "speedup over target-only at least HF's, and > 1 on (a) on a CPU",
    }
    start = time.perf_counter()
    if "copy" in parts:
        report["copy"] = copy_part(args)
    if "code" in parts:
        report["code"] = code_part(args)
    report["total_s"] = time.perf_counter() - start
    if "copy" in report:
        print_part("(a) copy, prompt lookup", report["copy"])
    if "code" in report:
        print_part("(b) code, draft model", report["code"])
    print(f"\ntotal {report['total_s']:.0f} s")
    RESULTS.mkdir(exist_ok=True)
    # both parts: one file; one part alone gets its own (never overwriting the other's)
    suffix = "" if parts >= {"copy", "code"} else "_" + "_".join(sorted(parts))
    out = RESULTS / f"bench_speculative_{device.type}{suffix}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out.relative_to(Path(__file__).parent.parent)}")


if __name__ == "__main__":
    main()
