"""Verifiers on the default model: a predicate and an LM judge re-weight the model's answers.

The model (SmolLM2-135M-Instruct) answers a question eight times. The same eight answers (same
seed, same draws) are then weighed three ways:

- ``model``: the model alone, every answer weight one (its share of the eight draws);
- ``predicate``: ``verify_with`` keeps the answers that name an Australian city (a lookup in a
  small gazetteer, as a downstream parser would need; ``lc.condition``);
- ``judge``: ``lm_judge`` multiplies each answer's weight by the model's own P("Yes") when asked
  whether the answer is correct, P(Yes) / (P(Yes) + P(No)).

A 135M-parameter judge is a weak one (its P(Yes) hardly separates right answers from wrong
ones); the point here is the mechanics, which are the same with a stronger judge.

Last, ``verification_at_k`` samples two answers per run, lets the judge vote on each and
compare them, and returns the winner.

Run: .venv/bin/python examples/pattern_verifier.py
"""

from __future__ import annotations

import math

import lmcascade as lc
from lmcascade.patterns.verify import (
    judge_compare,
    judge_vote,
    lm_judge,
    verification_at_k,
    verify_with,
)

QUESTION = "What is the capital of Australia?"
SAMPLES = 8


CITIES = ["Canberra", "Sydney", "Melbourne", "Brisbane", "Perth", "Adelaide", "Hobart", "Darwin"]


def names_a_city(answer: str) -> bool:
    """The predicate: the answer names a city of the gazetteer."""
    return any(city.lower() in answer.lower() for city in CITIES)


def main() -> None:
    lm = lc.models.load()

    @lc.program
    def answer(question: str):
        text = yield lc.gen(
            "answer",
            lm,
            lm.chat(f"{question} Reply with just the name."),
            max_tokens=6,
            stop=["\n", "."],
            temperature=1.0,
        )
        return text.strip()

    @lc.program
    def checked(question: str, check: str):
        text = yield from answer(question)
        if check == "predicate":
            yield from verify_with(names_a_city)(text)
        elif check == "judge":
            yield from lm_judge(lm, question, text)
        return text

    results = {}
    for check in ["predicate", "judge"]:
        program = checked(QUESTION, check)
        results[check] = lc.infer(program, method="forward", num_samples=SAMPLES, seed=0)

    # the judge's P(Yes) for each answer, read off the judge's two score sites
    p_yes = {}
    for trace in results["judge"].traces:
        log_yes, log_no = trace["judge[0]/yes"].value, trace["judge[0]/no"].value
        p_yes[trace.value] = 1.0 / (1.0 + math.exp(log_no - log_yes))
    answers = list(p_yes)

    print(f"{QUESTION}  ({SAMPLES} answers, each weighed three ways)\n")
    print(f"{'answer':<42} {'P(Yes)':>7} {'model':>7} {'predicate':>10} {'judge':>7}")
    dists = {check: r.distribution() for check, r in results.items()}
    # the model alone: each answer's share of the draws (every program drew the same answers)
    draws = [trace.value for trace in results["judge"].traces]
    dists["model"] = {text: draws.count(text) / len(draws) for text in draws}
    for text in sorted(answers, key=lambda t: -dists["model"].get(t, 0.0)):
        row = [dists[c].get(text, 0.0) for c in ("model", "predicate", "judge")]
        print(
            f"{text[:40]!r:<42} {p_yes[text]:>7.3f} {row[0]:>7.3f} {row[1]:>10.3f} {row[2]:>7.3f}"
        )
    print(
        "\ncolumns model, predicate, judge: each answer's posterior probability under that "
        "program;\nP(Yes): the judge's probability that the answer is correct.\n"
    )
    print(results["judge"].summary(top=3))

    best = verification_at_k(
        answer(QUESTION),
        lambda text: judge_vote(lm, QUESTION, text),
        n=2,
        k=1,
        top=2,
        compare=lambda a, b: judge_compare(lm, QUESTION, a, b),
    )
    vatk = lc.infer(best, method="forward", num_samples=4, seed=0)
    print("\nverification at k (n=2, k=1, top=2), four runs:")
    print(vatk.summary(top=3))


if __name__ == "__main__":
    main()
