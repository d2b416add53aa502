"""STaR rationalisation on the default model: rationales conditioned on the known answer.

``rationalise`` is a chain of thought whose answer is *observed*: each thought is weighted by
the exact probability that the model, having written it, answers with the known answer.  So
the rationales it returns are draws from the posterior over thoughts given the answer, not
thoughts that happened to be followed by a right answer.  ``star_rationales`` runs it over a
small dataset (importance sampling, a few thoughts per question, all questions batched by
``lc.infer_many``) and keeps each question's most probable rationale: STaR's data-collection
step.  The last question is rationalised with the answer given as a hint, as STaR does for the
questions the model gets wrong.

Run: .venv/bin/python examples/pattern_star.py
"""

from __future__ import annotations

import lmcascade as lc
from lmcascade.patterns.star import star_rationales

EXAMPLES = [
    ("Tom has 3 apples and buys 2 more. How many apples does Tom have now?", " 5"),
    ("A box holds 4 pens. Sam takes 1 pen out. How many pens are left in the box?", " 3"),
]
HINTED = [("Ann reads 2 pages a day for 3 days. How many pages does she read?", " 6")]


def main() -> None:
    lm = lc.models.load()

    def think(question: str, answer: str | None = None) -> str:
        hint = f" (The answer is{answer}.)" if answer else ""
        return lm.chat(f"{question}{hint} Explain briefly.")

    def answer(question: str, thought: str) -> str:  # the reply after the thought, unhinted
        return think(question) + thought + " So the answer is"

    common = dict(
        answer_prompt=answer,
        chat=False,  # the functions build the chat prompts themselves
        think_tokens=20,
        answer_tokens=3,
        think_stop="\n",
        answer_stop=["\n", "."],
        method="importance",
        method_options={"num_samples": 4},
        seed=0,
    )
    kept = star_rationales(lm, EXAMPLES, think=think, **common)
    kept += star_rationales(lm, HINTED, think=think, hint=True, **common)
    print("STaR rationales: the most probable thought given the known answer")
    print(f"  {'answer':>6}  {'posterior probability':>21}  {'P(answer | thought)':>19}  thought")
    for k in kept:
        print(f"  {k.answer.strip():>6}  {k.posterior:21.3f}  {k.answer_prob:19.3f}  "
              f"{k.rationale[:60]!r}")  # fmt: skip
    print("\n(the last row was written with the answer as a hint; its weight is how well the")
    print(" thought leads to that answer without the hint)")


if __name__ == "__main__":
    main()
