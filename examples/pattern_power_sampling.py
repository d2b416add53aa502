"""Power sampling on the default model: sample p(text) ** alpha by MCMC with suffix moves.

``power_sample(program, alpha)`` sharpens every LM site of a program to ``p ** alpha`` (the
target of "Reasoning with Sampling", Karan and Du, 2025) and samples it with
Metropolis-Hastings whose moves regenerate a suffix of the text.  A few short chains run here
next to plain sampling; the table compares how likely the model finds the texts each gives
(mean log-probability per token, under the model itself).  The chains are short, so this
shows the mechanism, not a converged sample.

Run: .venv/bin/python examples/pattern_power_sampling.py
"""

from __future__ import annotations

import statistics

import lmcascade as lc
from lmcascade.patterns.power import power_sample


def main() -> None:
    lm = lc.models.load()

    @lc.program
    def fact():
        return (
            yield lc.gen(
                "fact",
                lm,
                lm.chat("Tell me one short fact about the Moon."),
                max_tokens=10,
                stop=["\n"],
            )
        )

    plain = lc.infer(fact(), method="forward", num_samples=8, seed=0)
    sharp = power_sample(fact(), alpha=4.0, chains=4, burn_in=6, num_samples=4, seed=0)
    print(sharp.summary(top=6))

    def mean_log_p(result: lc.Result) -> float:
        """The mean per-token log-probability of the texts under the model (alpha 1)."""
        per_text = [
            sum(t["fact"].token_model_log_probs) / max(1, len(t["fact"].token_ids))
            for t in result.traces
        ]
        return statistics.fmean(per_text)

    print("\nsampler                          texts  mean log p per token")
    print(f"  plain sampling (alpha 1)       {len(plain.traces):5}  {mean_log_p(plain):8.3f}")
    print(f"  power sampling (alpha 4, MCMC) {len(sharp.traces):5}  {mean_log_p(sharp):8.3f}")
    print(f"  acceptance rate of the moves: {sharp.stats['acceptance_rate']:.2f}")
    print("\nthe last state of each chain:")
    for chain in sharp.chains:
        print(f"  {chain.values[-1]!r}")


if __name__ == "__main__":
    main()
