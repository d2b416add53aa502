"""Self-consistency on the default model: think, answer, and vote over the answers.

``chain_of_thought`` builds the two-step program (a thought, then an answer that reads it);
``self_consistency`` samples it, sums the thought out and takes the majority vote.  The
prompts are functions here: the answer continues the model's own reply after its thought
("... So the answer is"), which suits a small model better than a second question.  The key
keeps the first number of each answer, so "5", "5 apples" and "5." vote together.

Run: .venv/bin/python examples/pattern_self_consistency.py
"""

from __future__ import annotations

import re

import lmcascade as lc
from lmcascade.patterns.reasoning import chain_of_thought, normalise, self_consistency


def first_number(answer: str) -> str:
    """The first number in the answer, or the normalised answer when it has none."""
    found = re.search(r"-?\d+", answer)
    return found.group() if found else normalise(answer)


def main() -> None:
    lm = lc.models.load()

    def think(question: str) -> str:
        return lm.chat(f"{question} Explain briefly, then give the number.")

    def answer(question: str, thought: str) -> str:
        return think(question) + thought + " So the answer is"

    cot = chain_of_thought(
        lm,
        "Tom has 3 apples and buys 2 more. How many apples does Tom have now?",
        think=think,
        answer=answer,
        chat=False,  # the functions build the chat prompts themselves
        think_tokens=32,
        answer_tokens=5,
        think_stop="\n",
        answer_stop=["\n", "."],
        temperature=0.7,
    )
    vote = self_consistency(cot, method="forward", num_samples=8, seed=0, key=first_number)
    print(vote.summary())
    print("\nthe chains of thought:")
    for trace in vote.result.traces:
        thought, answer = trace["cot[0]/thought"].value, trace["cot[0]/answer"].value
        print(f"  {thought[:70]!r:74} -> {answer!r}")


if __name__ == "__main__":
    main()
