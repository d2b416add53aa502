"""A model cascade with deferral, and its deferral curve swept offline.

A cheap setting answers each question (greedy, a few tokens); when its confidence (the
geometric mean of its tokens' probabilities) is below a threshold, the question goes to a
costlier one. The cascade runs once per question at ``threshold=1`` (both stages answer), and
``deferral_curve`` then gives accuracy, fraction deferred and cost at every threshold from
those records, without running a model again.

On these six questions the small stage is sure of the facts it knows and unsure of the sums
it gets wrong, so a threshold between the two groups sends only the sums on. The small stage
is the default model (SmolLM2-135M-Instruct). The large stage is
qwen2.5-coder-0.5b when it is installed (``lmcascade models fetch qwen2.5-coder-0.5b``), at a
per-token cost of 3.7 (its size over the small one's); otherwise it is the default model again,
asked to think a sentence first (more tokens, same cost per token), so the script runs
anywhere the default model does. ``--default-only`` forces the second pair.

Run: .venv/bin/python examples/pattern_deferral.py
"""

from __future__ import annotations

import sys

import lmcascade as lc
from lmcascade.models import registry
from lmcascade.patterns.deferral import deferral_cascade, deferral_curve, deferral_record

# Three facts the default model knows and three sums it gets wrong (picked so, to show the
# mechanism): question -> a word the right answer contains.
QUESTIONS = {
    "What is the capital of France?": "paris",
    "What is the capital of Japan?": "tokyo",
    "Which Python keyword defines a function?": "def",
    "What is 8 + 5?": "13",
    "What is 12 + 30?": "42",
    "What is 50 + 50?": "100",
}
TERSE = " Answer with one word."


def main() -> None:
    small = lc.models.load()
    if registry.is_installed("qwen2.5-coder-0.5b") and "--default-only" not in sys.argv:
        large, cost, how = lc.models.load("qwen2.5-coder-0.5b"), 3.7, "qwen2.5-coder-0.5b"
        large_prompt, large_tokens = (lambda q: large.chat(q + TERSE)), 8
    else:
        large, cost, how = small, 1.0, "the default model, thinking a sentence first"
        large_prompt = lambda q: small.chat(q + " Think in one sentence, then answer.")  # noqa: E731
        large_tokens = 32
    print(f"small: default model, terse and greedy; large: {how}\n")

    @lc.program
    def ask(question: str):
        return (
            yield from deferral_cascade(
                [small, large],
                [small.chat(question + TERSE), large_prompt(question)],
                threshold=1.0,  # both answer: every threshold is then swept offline
                params=[{"max_tokens": 12}, {"max_tokens": large_tokens}],
                costs=[1.0, cost],
                temperature=0.0,
                stop="\n",
            )
        )

    runs = list(lc.infer_many(ask, list(QUESTIONS), method="forward", num_samples=1, seed=0))
    labels = [QUESTIONS[q] for q, _ in runs]

    def correct(answer: str, label: str) -> bool:
        return label in answer.lower()

    print(f"{'question':42} {'confidence':>10}  small answer -> large answer")
    for question, result in runs:
        rec = deferral_record(result.traces[0])
        print(f"{question:42} {rec.confidences[0]:10.3f}  {rec.answers[0]!r} -> {rec.answers[1]!r}")

    print("\nthe deferral curve (swept from the records above; no model runs again)")
    print(f"{'threshold':>9}  {'deferred':>8}  {'accuracy':>8}  {'cost':>6}")
    for row in deferral_curve(runs, labels, correct=correct):
        print(f"{row.threshold:9.3f}  {row.deferred:8.2f}  {row.accuracy:8.2f}  {row.cost:6.1f}")

    print("\none question's result (answers with their probability):")
    print(runs[0][1].summary())


if __name__ == "__main__":
    main()
