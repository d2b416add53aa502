"""Chain of thought on a real model: think, then answer, then vote.

Runs on the default offline model (SmolLM2-135M-Instruct; ``scripts/setup.sh`` fetches it).
Eight particles decode together — one batched forward pass per token for all of them — and
the answers are merged into a distribution, which is self-consistency (majority vote).

Run: ``.venv/bin/python examples/chain_of_thought.py``
"""

from __future__ import annotations

import lmcascade as lc


def main() -> None:
    lm = lc.models.load()  # the default model, on CUDA when there is one

    @lc.program
    def think_then_answer(question: str):
        thought = yield lc.gen(
            "thought",
            lm,
            lm.chat(f"{question} Think it through in one sentence."),
            max_tokens=32,
            stop="\n",
            temperature=0.8,
        )
        answer = yield lc.gen(
            "answer",
            lm,
            lm.chat(f"{question}\nA thought: {thought}\nNow reply with just the answer."),
            max_tokens=8,
            stop=["\n", "."],
            temperature=0.8,
        )
        return answer.strip().lower()

    result = lc.infer(
        think_then_answer("What is the capital of France?"), method="forward", num_samples=8, seed=0
    )
    print(result.summary(top=5))
    print("\none chain of thought:")
    trace = result.traces[0]
    print(f"  thought: {trace['thought'].value!r}")
    print(f"  answer:  {trace['answer'].value!r}")


if __name__ == "__main__":
    main()
