"""The "no letter e" task run by LLaMPPL 0.2.3 — the baseline for benchmarks/bench_smc.py.

Runs in LLaMPPL's own environment (``bash benchmarks/llamppl_env.sh``), on the same local model
folder, prompt, particle count and token budget as lmcascade's side, and prints one JSON line.
LLaMPPL's standard pattern: each step observes that the next token is not forbidden (weight
times the allowed mass), then samples it from the masked distribution; ``smc_standard``
resamples when the ESS drops below half the particles.  Its HF backend keeps a KV cache only
for sequences passed to ``cache_kv`` (here the prompt), so each step re-feeds the tokens
generated so far; its log-probability cache is cleared before the timed run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from llamppl import CachedCausalLM, LMContext, Model, smc_standard  # noqa: E402

COUNTS = {"tokens": 0, "eos": 0}


class NoLetter(Model):
    def __init__(self, lm, prompt: str, forbidden: set[int], max_tokens: int) -> None:
        super().__init__()
        self.context = LMContext(lm, prompt)
        self.eos = lm.tokenizer.eos_token_id
        self.forbidden = forbidden
        self.max_tokens = max_tokens

    async def step(self) -> None:
        await self.observe(self.context.mask_dist(self.forbidden), False)
        token = await self.sample(self.context.next_token())
        COUNTS["eos" if token.token_id == self.eos else "tokens"] += 1
        if token.token_id == self.eos or self.context.token_count >= self.max_tokens:
            self.finish()

    def immutable_properties(self):
        return {"forbidden", "max_tokens", "eos"}

    def text_ids(self) -> list[int]:
        start = self.context.prompt_token_count
        return [t for t in self.context.tokens[start:] if t != self.eos]


def run(lm, prompt: str, forbidden: set[int], n: int, max_tokens: int, seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    lm.clear_cache()
    lm.reset_async_queries()
    lm.cache_kv(lm.tokenizer.encode(prompt))
    return asyncio.run(
        smc_standard(NoLetter(lm, prompt, forbidden, max_tokens), n, ess_threshold=0.5)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--particles", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--question", default="Write a sentence about the ocean.")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    lm = CachedCausalLM.from_pretrained(
        args.model_path,
        backend="hf",
        batch_size=args.particles,
        hf_opts={"device_map": "cpu", "torch_dtype": torch.float32},
    )
    tok = lm.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": args.question}], add_generation_prompt=True, tokenize=False
    )
    eos = tok.eos_token_id
    # tokens containing "e" are forbidden; eos ('<|im_end|>' contains an e) stays allowed
    forbidden = {i for i, v in enumerate(lm.str_vocab) if "e" in v} | set(tok.all_special_ids)
    forbidden.discard(eos)
    run(lm, prompt, forbidden, args.particles, args.max_tokens, args.seed + 1000)  # warm-up
    COUNTS.update(tokens=0, eos=0)
    start = time.perf_counter()
    particles = run(lm, prompt, forbidden, args.particles, args.max_tokens, args.seed)
    wall = time.perf_counter() - start
    w = np.array([p.weight for p in particles], dtype=np.float64)
    lse = np.logaddexp.reduce(w)
    texts = [tok.decode(p.text_ids(), skip_special_tokens=True) for p in particles]
    print(
        json.dumps(
            {
                "n": args.particles,
                "wall_s": wall,
                "tokens_generated": COUNTS["tokens"],
                "eos_generated": COUNTS["eos"],
                "tokens_per_s": COUNTS["tokens"] / wall,
                "satisfied": sum("e" not in t for t in texts) / len(texts),
                "ess": float(np.exp(2 * lse - np.logaddexp.reduce(2 * w))),
                "best_text": texts[int(np.argmax(w))],
                "log_evidence": float(lse - np.log(len(w))),
            }
        )
    )


if __name__ == "__main__":
    main()
