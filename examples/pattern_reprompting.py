"""Reprompting on the default model: chain-of-thought recipes that work as demonstrations.

``reprompting`` is a program with one recipe (a short chain of thought) per training example;
its target weighs a set of recipes by how probable the model finds each worked example —
recipe, then the known answer — when shown the others as few-shot demonstrations.
``reprompting_recipes`` runs Metropolis-Hastings on it: each step redraws one example's recipe
and accepts by the ratio of the target, so recipes that lead the model to the right answers,
in their own example and as demonstrations for the others, survive.  The table shows the
best recipes found and, for each example, the probability of its worked example given the
others.

Run: .venv/bin/python examples/pattern_reprompting.py
"""

from __future__ import annotations

import math

import lmcascade as lc
from lmcascade.patterns.reprompting import reprompting_recipes

EXAMPLES = [
    ("Tom has 3 apples and buys 2 more. How many apples?", "5"),
    ("A box holds 4 pens. Sam takes 1 out. How many pens are left?", "3"),
    ("Ann reads 2 pages a day for 3 days. How many pages?", "6"),
]


def main() -> None:
    lm = lc.models.load()
    found = reprompting_recipes(
        lm, EXAMPLES, num_samples=6, burn_in=0, seed=0, recipe_tokens=14, recipe_stop="\n"
    )
    result = found.result
    best = max(result.traces, key=lambda t: t.log_joint)
    print(f"Reprompting — {result.stats['steps']} MCMC steps, acceptance rate "
          f"{result.stats['acceptance_rate']:.2f}, best log target {found.best_log_target:.2f}")  # fmt: skip
    print(f"  {'answer':>6}  {'probability':>11}  recipe")
    for j, ((_, answer), recipe) in enumerate(zip(EXAMPLES, found.best, strict=True)):
        recipe_lp = best["reprompt[0]/paths"].value[j]  # the few-shot recipe, as drawn
        p = math.exp(recipe_lp + best[f"reprompt[0]/answer[{j}]"].value)
        print(f"  {answer:>6}  {p:11.2e}  {recipe[:64]!r}")
    print("  (probability: the model's, of writing the recipe as drawn, ending included, and")
    print("   then the answer line, shown the other examples with their recipes first)")
    print("\nthe few-shot prompt the best recipes make, for a new question:")
    print(found.prompt("Max has 5 coins and loses 2. How many coins?"))


if __name__ == "__main__":
    main()
