"""Best-of-N on the default model: draw several answers, keep the one the model is surest of.

``best_of_n`` runs a program N times inside one trace and returns the output with the highest
reward.  The reward here is scored by the model itself (``lm_reward``): the mean
log-probability per token it gives the candidate as a reply to the question, so the most
confident of the N samples wins.  ``lm_reward(judge, prompt, " Yes")`` would score a judge's
verdict instead, and a reward can as well be a plain Python function of the output
(``best_of_n(prog, len, 4)``).

Run: .venv/bin/python examples/pattern_best_of_n.py
"""

from __future__ import annotations

import lmcascade as lc
from lmcascade.patterns.selection import best_of_n, lm_reward

N = 4


def main() -> None:
    lm = lc.models.load()
    question = lm.chat("Which fruit is long, curved and yellow?")

    @lc.program
    def fruit():
        return (yield lc.gen("fruit", lm, question, max_tokens=6, stop=["\n", "."]))

    reward = lm_reward(lm, question, per_token=True)  # mean log p(candidate | question)
    best = best_of_n(fruit(), reward, N)
    result = lc.infer(best, method="forward", num_samples=2, seed=0)
    print(result.summary())
    for k, trace in enumerate(result.traces):
        print(f"\nrun {k}: the {N} candidates and their rewards (mean log p per token)")
        for i in range(N):
            candidate = trace[f"best_of_n[0]/try[{i}]/fruit"].value
            score = trace[f"best_of_n[0]/reward[{i}]"].value
            print(f"  {candidate!r:32} {score:8.3f}")
        print(f"  best: {result.values[k]!r}")


if __name__ == "__main__":
    main()
