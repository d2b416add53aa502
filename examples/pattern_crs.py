"""Cascade reward sampling on the default model: write segment by segment, redraw a segment
until a reward accepts it.

The task: describe the sea to a child without the word "the". The reward is a plain Python
function standing in for a reward model: minus the number of times "the" appears in the text
so far. Each segment (a few tokens, cut early where the model was unsure of a token) must
reach a threshold of 0 (no "the" yet); a segment that falls short is drawn again, up to three
times, after which the best draw is kept.

The table compares the model on its own with the same model under CRS: the mean reward of
the texts, and the tokens each spent (CRS pays for its redraws, and for the tokens drawn after
a cut). Then one CRS run is shown draw by draw, from its trace. CRS is a heuristic search:
its texts follow the law of the search, not an exact reward-tilted posterior (see
docs/patterns/cascades.md).

Run: .venv/bin/python examples/pattern_crs.py
"""

from __future__ import annotations

import re

import lmcascade as lc
from lmcascade.patterns.crs import cascade_reward_sampling

SAMPLES = 4
MAX_TOKENS = 12


def no_the(prompt: str, text: str) -> float:
    """Minus the number of times the word "the" appears in ``text``."""
    return 0.0 - len(re.findall(r"\bthe\b", text, flags=re.IGNORECASE))


def main() -> None:
    lm = lc.models.load()
    prompt = lm.chat("Describe the sea to a small child in one sentence.")

    @lc.program
    def plain():
        return (yield lc.gen("text", lm, prompt, max_tokens=MAX_TOKENS, temperature=0.8))

    searched = cascade_reward_sampling(
        lm,
        prompt,
        no_the,
        threshold=0.0,
        budget=3,
        max_tokens=MAX_TOKENS,
        segment_tokens=6,
        uncertainty=0.05,
        segment_min=3,
        temperature=0.8,
    )
    base = lc.infer(plain(), method="forward", num_samples=SAMPLES, seed=0)
    crs = lc.infer(searched, method="forward", num_samples=SAMPLES, seed=0)

    print(f"{'sampler':8} {'mean reward':>11} {'tokens':>7}")
    for name, result in (("model", base), ("crs", crs)):
        reward = sum(no_the(prompt, t) for t in result.values) / SAMPLES
        print(f"{name:8} {reward:11.3f} {result.stats['tokens_generated']:7d}")

    print("\none CRS run, draw by draw (a draw is cut where a segment ends):")
    trace = crs.traces[0]
    for name in trace.names:
        if name.endswith("/text"):
            draw = trace[name].value
            reward = trace[name[: -len("text")] + "reward"].value
            print(f"  {name:28} {draw!r:44} reward {reward:.2f}")

    print()
    print(crs.summary(top=SAMPLES))


if __name__ == "__main__":
    main()
