"""Search on the default model: power sampling (MCMC), beam search, diverse samples, one run.

Three parts, each against a baseline measured in the same run, on SmolLM2-135M-Instruct:

1. **Power sampling** ("Reasoning with Sampling", Karan and Du 2025): one LM site on a chat
   prompt (a short arithmetic question), ``max_tokens=32``, target ``p(text) ** 4``
   (``alpha=4``), Metropolis-Hastings with suffix proposals — pick a position ``t`` uniformly
   among the current text's ``n`` tokens (eos included), keep ``x[:t]``, draw the rest from
   the model at temperature ``1 / alpha``.  Ours: ``lc.infer(..., method="mcmc",
   proposal="suffix", burn_in=0)`` with one chain, and with 8 chains (steps per second count
   every chain's steps).  Baseline, written here the straightforward way: one chain; each step
   calls Hugging Face ``generate`` on prompt + ``x[:t]`` (``do_sample=True``,
   ``temperature=1/alpha``, ``top_k=0``, ``top_p=1``, ``max_new_tokens = 32 - t``, stopping at
   eos), then a full teacher-forced forward pass of the current and of the proposed sequence
   for each token's ``log p`` (the model) and ``log q`` (temperature ``1 / alpha``), and accepts
   with ``log A = alpha [log p(x'_{>=t}) - log p(x_{>=t})] + log q(x_{>=t}) - log q(x'_{>=t})
   + log n(x) - log n(x')``, both suffixes scored in full.  ``top_k=0`` makes the proposal the
   exact tempered model; the paper's code leaves ``generate``'s default ``top_k=50``, whose
   proposal is not the ``q`` its ratio uses, so its chain does not target ``p ** alpha``
   exactly.  Both use the same model object (the same weights, dtype and threads), both are
   warmed up first, both time their whole run (the initial state included: ours draws it from
   a batch of 16 prior samples, the baseline with one ``generate``).  Target: ours at least
   3x the baseline's MH steps per second, with similar acceptance rates (the same kernel).
2. **Beam search**: widths 1, 4, 16 on one chat prompt, 24 new tokens, ``length_penalty=1``:
   ``lc.infer(..., method="beam", beam_width=W, length_penalty=1.0)`` against
   ``generate(num_beams=W, do_sample=False, num_return_sequences=1, length_penalty=1.0)``
   (greedy search at W = 1): wall times and whether the top beam is the same text.  Target:
   no slower, the same top beam.
3. **Diversity**: 32 samples of up to 24 tokens from one prompt with a short answer — the
   distinct texts among them, the most repeated one's count and the wall time, for
   independent samples (``method="forward"``), arithmetic sampling (``codes="arithmetic"``)
   and stochastic beam search (``method="beam", stochastic=True, beam_width=32``: distinct by
   construction), over ``--seeds`` seeds, at temperature 1 and at 0.5 (at temperature 1 this
   small model's texts are nearly all distinct whatever the sampler; at 0.5 one answer
   dominates, which is where the samplers differ).

Timings in parts 1 and 2 are the best of ``--repeats`` runs, the systems compared taking
turns (on a shared machine each then sees the same load); part 3 times one run per seed.

Run: ``.venv/bin/python benchmarks/bench_search.py [--device cpu|cuda] [--quick]
[--steps 40] [--repeats 2] [--seeds 3] [--threads T] [--parts mcmc,beam,diversity]``; writes
``benchmarks/results/bench_search_<device>.json`` and prints a summary table.  ``--quick`` runs
small sizes (10 MH steps, 1 and 4 chains, widths 1 and 4, 8 samples, one seed) as a smoke
test.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from timing import interleaved, machine, timed  # benchmarks/timing.py

import lmcascade as lc

RESULTS = Path(__file__).parent / "results"
QUESTION = "What is 17 + 25? Answer in one short sentence."
BEAM_PROMPT = "Name three colours of the rainbow."
DIVERSE_PROMPT = "What is the capital of France? Answer in one word."


# -- 1. power sampling ----------------------------------------------------------------------


def power_program(lm, prompt: str, max_tokens: int, alpha: float):
    @lc.program
    def answer():
        return (yield lc.gen("answer", lm, prompt, max_tokens=max_tokens, alpha=alpha))

    return answer


def ours_mcmc(lm, prog, steps: int, chains: int, seed: int):
    lm.prefix_index.clear()  # every timed run computes the prompt itself
    return lc.infer(
        prog(),
        method="mcmc",
        proposal="suffix",
        num_samples=steps,
        burn_in=0,
        chains=chains,
        seed=seed,
        progress=False,
    )


class NaivePowerSampler:
    """The baseline: one chain of suffix-proposal MH on ``p ** alpha`` with ``generate`` for
    each proposal and a full teacher-forced recompute of both sequences' log-probs."""

    def __init__(self, lm, prompt: str, max_tokens: int, alpha: float) -> None:
        self.lm = lm
        self.prompt = lm.encode_prompt(prompt)
        self.max_tokens = max_tokens
        self.alpha = alpha
        self.device = lm.device

    def generate(self, prefix: list[int], budget: int) -> list[int]:
        ids = torch.tensor([self.prompt + prefix], device=self.device)
        out = self.lm.hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0 / self.alpha,
            top_k=0,  # exact: the paper's code keeps generate's default top_k=50
            top_p=1.0,
            max_new_tokens=budget,
            eos_token_id=self.lm.eos_id,
            pad_token_id=self.lm.eos_id,
        )
        return out[0, ids.shape[1] :].tolist()

    def score(self, x: list[int]) -> tuple[list[float], list[float]]:
        """Each token's ``log p`` (the model) and ``log q`` (temperature ``1 / alpha``)."""
        ids = torch.tensor([self.prompt + x], device=self.device)
        logits = self.lm.hf(input_ids=ids).logits[0, len(self.prompt) - 1 : -1].float()
        tokens = torch.tensor(x, device=self.device)[:, None]
        logp = torch.log_softmax(logits, -1).gather(1, tokens)[:, 0]
        logq = torch.log_softmax(logits * self.alpha, -1).gather(1, tokens)[:, 0]
        return logp.tolist(), logq.tolist()

    def run(self, steps: int, seed: int) -> dict:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        a = self.alpha
        accepted = generated = 0
        with torch.inference_mode():
            x = self.generate([], self.max_tokens)
            generated += len(x)
            for _ in range(steps):
                n = len(x)
                t = int(rng.integers(n))
                new = x[:t] + self.generate(x[:t], self.max_tokens - t)
                generated += len(new) - t
                lp, lq = self.score(x)
                lp2, lq2 = self.score(new)
                log_a = (
                    a * (math.fsum(lp2[t:]) - math.fsum(lp[t:]))
                    + math.fsum(lq[t:])
                    - math.fsum(lq2[t:])
                    + math.log(n)
                    - math.log(len(new))
                )
                if log_a >= 0 or rng.random() < math.exp(log_a):
                    x = new
                    accepted += 1
        return {
            "acceptance_rate": accepted / steps,
            "tokens_generated": generated,
            "final": self.lm.decode([i for i in x if i != self.lm.eos_id]),
        }


def power_sampling(lm, args) -> dict:
    prompt = lm.chat(QUESTION)
    prog = power_program(lm, prompt, args.max_tokens, args.alpha)
    naive = NaivePowerSampler(lm, prompt, args.max_tokens, args.alpha)
    device = lm.device
    ours_mcmc(lm, prog, 2, 1, args.seed)  # warm up both
    naive.run(2, args.seed)

    fns = {"baseline": lambda: naive.run(args.steps, args.seed)}
    for chains in args.chains:
        fns[chains] = lambda c=chains: ours_mcmc(lm, prog, args.steps, c, args.seed)
    timings = interleaved(fns, device, args.repeats)
    t_base, base = timings["baseline"]
    rows = [
        {
            "system": "baseline: generate + full recompute",
            "chains": 1,
            "mh_steps": args.steps,
            "wall_s": t_base,
            "steps_per_s": args.steps / t_base,
            "acceptance_rate": base["acceptance_rate"],
            "tokens_generated": base["tokens_generated"],
        }
    ]
    for chains in args.chains:
        t, r = timings[chains]
        made = args.steps * chains
        rows.append(
            {
                "system": "lmcascade mcmc suffix",
                "chains": chains,
                "mh_steps": made,
                "wall_s": t,
                "steps_per_s": made / t,
                "acceptance_rate": r.stats["acceptance_rate"],
                "tokens_generated": r.stats.get("tokens_generated"),
                "model_calls": r.stats.get("model_calls"),
                "speedup": (made / t) / (args.steps / t_base),
            }
        )
    return {
        "prompt_tokens": len(naive.prompt),
        "max_tokens": args.max_tokens,
        "alpha": args.alpha,
        "target_speedup": 3.0,
        "rows": rows,
    }


# -- 2. beam search --------------------------------------------------------------------------


def beam_landed() -> tuple[bool, str]:
    """Whether ``method="beam"`` runs (it was being written alongside this benchmark)."""
    from lmcascade.models import ToyLM

    toy = ToyLM(["a", "<eos>"], lambda ctx: [0.0, 0.0])

    @lc.program
    def tiny():
        return (yield lc.gen("x", toy, "", max_tokens=2))

    try:
        lc.infer(tiny(), method="beam", beam_width=2, progress=False)
    except Exception as err:  # noqa: BLE001 - any failure means: not runnable yet
        return False, f"{type(err).__name__}: {err}"
    return True, ""


def hf_beam(lm, ids: torch.Tensor, width: int, new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = lm.hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            num_beams=width,
            do_sample=False,
            num_return_sequences=1,
            max_new_tokens=new_tokens,
            length_penalty=1.0,
            early_stopping=False,
            pad_token_id=lm.eos_id,
        )
    gen = out[0, ids.shape[1] :].tolist()
    return gen[: gen.index(lm.eos_id) + 1] if lm.eos_id in gen else gen


def beam_search(lm, args) -> dict:
    ok, why = beam_landed()
    if not ok:
        return {"run": False, "reason": f"method='beam' does not run: {why}"}
    prompt = lm.chat(BEAM_PROMPT)
    ids = torch.tensor([lm.encode_prompt(prompt)], device=lm.device)
    n = args.beam_tokens

    @lc.program
    def answer():
        return (yield lc.gen("answer", lm, prompt, max_tokens=n))

    def ours(width: int):
        lm.prefix_index.clear()
        return lc.infer(
            answer(), method="beam", beam_width=width, length_penalty=1.0, progress=False
        )

    ours(2)  # warm up both
    hf_beam(lm, ids, 2, n)
    rows = []
    for w in args.widths:
        timings = interleaved(
            {"hf": lambda w=w: hf_beam(lm, ids, w, n), "ours": lambda w=w: ours(w)},
            lm.device,
            args.repeats,
        )
        (t_hf, hf_ids), (t_ours, r) = timings["hf"], timings["ours"]
        top = list(r.traces[0].sites[0].token_ids)
        rows.append(
            {
                "width": w,
                "ours_s": t_ours,
                "hf_generate_s": t_hf,
                "speedup": t_hf / t_ours,
                "same_top_beam": top == hf_ids,
                "top_beam": r.values[0],
                "hf_top_beam": lm.decode([i for i in hf_ids if i != lm.eos_id]),
                "model_calls": r.stats.get("model_calls"),
            }
        )
    return {"run": True, "prompt_tokens": ids.shape[1], "new_tokens": n, "rows": rows}


# -- 3. diversity ----------------------------------------------------------------------------


def diversity(lm, args) -> dict:
    prompt = lm.chat(DIVERSE_PROMPT)
    n = args.samples

    def program(temperature: float):
        @lc.program
        def answer():
            return (
                yield lc.gen(
                    "s", lm, prompt, max_tokens=args.diverse_tokens, temperature=temperature
                )
            )

        return answer

    methods = {
        "independent": {"method": "forward", "num_samples": n},
        "arithmetic": {"method": "forward", "codes": "arithmetic", "num_samples": n},
        "stochastic beam": {"method": "beam", "stochastic": True, "beam_width": n},
    }
    if not beam_landed()[0]:
        del methods["stochastic beam"]
    warm = program(1.0)
    for options in methods.values():
        lc.infer(warm(), seed=0, progress=False, **{**options, **_small(options)})

    def run(prog, options: dict, seed: int):
        lm.prefix_index.clear()
        return lc.infer(prog(), seed=seed, progress=False, **options)

    rows = []
    for temperature in args.temperatures:
        prog = program(temperature)
        found: dict[str, dict] = {
            name: {"distinct": [], "largest": [], "wall_s": []} for name in methods
        }
        for seed in range(args.seeds):
            for name, options in methods.items():  # in turns: the same load for each
                t, r = timed(lambda p=prog, o=options, s=seed: run(p, o, s), lm.device)
                counts = Counter(r.values)
                found[name]["distinct"].append(len(counts))
                found[name]["largest"].append(max(counts.values()))
                found[name]["wall_s"].append(t)
        for name, f in found.items():
            rows.append(
                {
                    "temperature": temperature,
                    "sampler": name,
                    "options": methods[name],
                    "distinct_per_seed": f["distinct"],
                    "distinct_mean": sum(f["distinct"]) / len(f["distinct"]),
                    "most_repeated_per_seed": f["largest"],
                    "wall_s_per_seed": f["wall_s"],
                    "wall_s_mean": sum(f["wall_s"]) / len(f["wall_s"]),
                }
            )
    return {
        "prompt": DIVERSE_PROMPT,
        "samples": n,
        "max_tokens": args.diverse_tokens,
        "seeds": args.seeds,
        "rows": rows,
    }


def _small(options: dict) -> dict:
    return {"beam_width": 2} if options["method"] == "beam" else {"num_samples": 2}


# -- the run ---------------------------------------------------------------------------------


def print_summary(report: dict) -> None:
    if "power_sampling" in report:
        ps = report["power_sampling"]
        print(f"\npower sampling: alpha {ps['alpha']}, max_tokens {ps['max_tokens']}, suffix")
        print(
            f"{'system':<38} {'chains':>6} {'steps':>6} {'wall s':>8} {'steps/s':>8} "
            f"{'accept':>7} {'speedup':>8}"
        )
        for r in ps["rows"]:
            sp = f"{r['speedup']:.2f}x" if "speedup" in r else ""
            print(
                f"{r['system']:<38} {r['chains']:>6} {r['mh_steps']:>6} {r['wall_s']:>8.2f} "
                f"{r['steps_per_s']:>8.2f} {r['acceptance_rate']:>7.0%} {sp:>8}"
            )
    if "beam" in report:
        b = report["beam"]
        if not b["run"]:
            print(f"\nbeam: not run ({b['reason']})")
        else:
            print(f"\nbeam search: {b['new_tokens']} new tokens, length_penalty 1.0")
            print(f"{'width':>5} {'ours s':>8} {'HF s':>8} {'speedup':>8} {'same top beam':>14}")
            for r in b["rows"]:
                print(
                    f"{r['width']:>5} {r['ours_s']:>8.2f} {r['hf_generate_s']:>8.2f} "
                    f"{r['speedup']:>7.2f}x {str(r['same_top_beam']):>14}"
                )
    if "diversity" in report:
        d = report["diversity"]
        print(
            f"\ndiversity: {d['samples']} samples, up to {d['max_tokens']} tokens, "
            f"{d['seeds']} seed(s)"
        )
        print(
            f"{'temp':>5} {'sampler':<16} {'distinct (per seed)':>20} {'mean':>6} "
            f"{'most repeated':>14} {'wall s':>7}"
        )
        for r in d["rows"]:
            per = ", ".join(map(str, r["distinct_per_seed"]))
            rep = ", ".join(map(str, r["most_repeated_per_seed"]))
            print(
                f"{r['temperature']:>5} {r['sampler']:<16} {per:>20} {r['distinct_mean']:>6.1f} "
                f"{rep:>14} {r['wall_s_mean']:>7.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=lc.models.DEFAULT_MODEL)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--parts", default="mcmc,beam,diversity")
    parser.add_argument("--steps", type=int, default=None, help="MH steps per chain (40)")
    parser.add_argument("--chains", default=None, help="our chain counts (1,8)")
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--widths", default=None, help="beam widths (1,4,16)")
    parser.add_argument("--beam-tokens", type=int, default=24)
    parser.add_argument(
        "--repeats", type=int, default=2, help="parts 1 and 2: best of this many, in turns"
    )
    parser.add_argument("--samples", type=int, default=None, help="diversity samples (32)")
    parser.add_argument("--diverse-tokens", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=None, help="diversity seeds (3)")
    parser.add_argument("--temperatures", default="1,0.5", help="diversity: sampling temperatures")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (torch's default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quick = args.quick
    args.steps = args.steps or (10 if quick else 40)
    args.chains = [int(c) for c in (args.chains or ("1,4" if quick else "1,8")).split(",")]
    args.widths = [int(w) for w in (args.widths or ("1,4" if quick else "1,4,16")).split(",")]
    args.samples = args.samples or (8 if quick else 32)
    args.seeds = args.seeds or (1 if quick else 3)
    args.temperatures = [float(t) for t in args.temperatures.split(",")]
    parts = set(args.parts.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = lc.models.load(args.model, device=args.device)
    device = lm.device
    print(f"model {lm.name} on {device} ({torch.get_num_threads()} CPU threads, {lm.dtype})")
    report: dict = {
        "benchmark": "search",
        "model": lm.name,
        "device": str(device),
        **machine(device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "quick": quick,
    }
    if "mcmc" in parts:
        report["power_sampling"] = power_sampling(lm, args)
    if "beam" in parts:
        report["beam"] = beam_search(lm, args)
    if "diversity" in parts:
        report["diversity"] = diversity(lm, args)
    print_summary(report)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench_search_{device.type}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out.relative_to(Path(__file__).parent.parent)}")


if __name__ == "__main__":
    main()
