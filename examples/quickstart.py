"""Quickstart: a two-stage cascade (think, then answer) checked by a calculator tool.

The model here is a ToyLM — a tiny model defined by a Python function — so every number this
script prints can be checked against exact enumeration.  The same program runs unchanged
with any inference method.

Run: ``.venv/bin/python examples/quickstart.py``
"""

from __future__ import annotations

import math

import lmcascade as lc
from lmcascade.models import ToyLM

DIGITS = [str(d) for d in range(10)]
VOCAB = DIGITS + ["+", "=", " ", "think:", "carry", "no-carry", "<eos>"]


def noisy_arithmetic(ctx: tuple[int, ...]) -> list[float]:
    """Prefers the right digit after '=', a little more so after a correct 'carry' thought."""
    scores = [-math.inf] * len(VOCAB)
    text = "".join(VOCAB[i] for i in ctx)
    if text.endswith("think:"):
        scores[VOCAB.index("carry")] = 0.0
        scores[VOCAB.index("no-carry")] = 0.4
    elif text.endswith("="):
        a, b = (int(x) for x in text.split(" ")[-1].rstrip("=").split("+"))
        hint = 1.5 if ("no-carry" in text) == (a + b < 10) else 0.0
        for d in DIGITS:
            scores[VOCAB.index(d)] = -abs(int(d) - (a + b) % 10) + hint * (int(d) == (a + b) % 10)
    else:
        scores[VOCAB.index("<eos>")] = 0.0
    return scores


LM = ToyLM(VOCAB, noisy_arithmetic, name="noisy-arithmetic")


@lc.program
def think_then_answer(a: int, b: int):
    """Chain of thought: a short thought, then the last digit of a + b, checked by a tool."""
    thought = yield lc.gen("thought", LM, "think:", max_tokens=2)
    answer = yield lc.gen("answer", LM, f"{thought} {a}+{b}=", max_tokens=2)
    truth = yield lc.call("calculator", lambda x, y: str((x + y) % 10), a, b)
    yield lc.condition("verified", answer == truth)
    return thought


if __name__ == "__main__":
    program = think_then_answer(4, 7)
    exact = lc.infer(program, method="enumerate")
    print("Which thought leads to a verified answer? (exact)")
    print(exact.summary())
    for method, options in [
        ("rejection", {"num_samples": 500}),
        ("importance", {"num_samples": 500}),
    ]:
        result = lc.infer(program, method=method, seed=0, **options)
        print()
        print(result.summary())
    print(f"\nexact P(verified) = {math.exp(exact.log_evidence):.4f}")
