"""Selection-inference on the default model: pick facts, infer a new one, then answer.

``selection_inference`` alternates two steps.  *Selection*: every fact is scored as the
model's continuation of the selection prompt and one is drawn from those probabilities,
renormalised over the facts.  *Inference*: the model writes one new fact from the selected
facts alone (it does not see the question), which joins the facts.  After the steps it
answers.  The program runs under any method; here forward sampling draws a few independent
runs and ``self_consistency`` votes over their answers.

Run: .venv/bin/python examples/pattern_selection_inference.py
"""

from __future__ import annotations

import lmcascade as lc
from lmcascade.patterns.reasoning import normalise, self_consistency
from lmcascade.patterns.selection_inference import selection_inference, si_steps


def first_word(answer: str) -> str:
    """Votes by the answer's first word ("Yes, he does" and "yes" vote together)."""
    words = normalise(answer).replace(",", " ").split()
    return words[0] if words else ""


FACTS = [
    "Every cat is a mammal.",
    "Tom is a cat.",
    "Every mammal breathes air.",
]
QUESTION = "Does Tom breathe air?"


def main() -> None:
    lm = lc.models.load()
    si = selection_inference(
        lm,
        FACTS,
        QUESTION,
        steps=2,
        select=2,
        infer_tokens=12,
        answer_tokens=3,
        answer_stop=["\n", "."],
        chat=False,
        temperature=0.7,
    )
    vote = self_consistency(si, method="forward", num_samples=3, seed=0, key=first_word)
    print(vote.summary())
    print("\nthe reasoning of each run (selected facts -> inferred fact):")
    for n, trace in enumerate(vote.result.traces):
        print(f"  run {n}:")
        for picked, new in si_steps(trace, FACTS):
            print(f"    {' + '.join(picked)[:60]!r} -> {new[:50]!r}")
        print(f"    answer: {trace.value!r}")


if __name__ == "__main__":
    main()
