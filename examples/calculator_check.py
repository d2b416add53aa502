"""Why inference: one program, three methods, and a calculator that checks the answer.

The default model (SmolLM2-135M-Instruct, a 4-bit quantised 135M model) is asked a sum. On its
own it is often wrong. The program asks a calculator tool for the sum, lets the model answer,
and *conditions* on the calculator agreeing — so the program's posterior is "the model's
answers, given that they are right". Each method is a different way to reach it:

- ``forward`` samples the model alone (the prior); the condition only weighs its draws, so
  its ``pass`` column is how often the model is right unaided;
- ``rejection`` draws until enough answers pass: every answer it returns is right, at the cost
  of the draws it threw away (the ``tokens`` column);
- ``smc`` runs the calculator's check on every *partial* answer (a potential: ``-20`` once the
  digits written so far cannot be the calculator's number) and resamples after every token, so
  the population drops wrong answers while they are being written — right answers for about
  the cost of one forward pass. The potential only steers: it is removed when the answer is
  complete, so the target is the same program's posterior.

``log evidence`` is each method's estimate of the same number, log P(the model is right); the
three agree (up to Monte Carlo error), which is how you know they run the same program.

Measured (``.venv/bin/python examples/calculator_check.py SEED``, seeds 0, 1, 2): forward
passed 0.25, 0.19 and 0.47 of its draws; rejection and smc passed 1.00 in every run, so
inference won in 3 of 3 seeds. Log evidence: forward -1.39, -1.67, -0.76; rejection -1.18,
-1.58, -1.08; smc -1.42, -1.68, -0.79. Tokens generated: forward 153-158, rejection 476-984,
smc 159-168.

Run: ``.venv/bin/python examples/calculator_check.py`` (under a minute of CPU time).
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter

import lmcascade as lc
from lmcascade.dsl.tools import calc  # the calculator .lmc programs call as calc(...)
from lmcascade.errors import AllWeightsZeroError, NothingAcceptedError

QUESTION = "What is 6 + 7?"
EXPRESSION = "6 + 7"
SAMPLES = 32
WRONG = -20.0  # the potential of a partial answer whose digits cannot be the calculator's


def first_number(text: str) -> int | None:
    """The first whole number in ``text`` (the model's answer), or None."""
    found = re.search(r"-?\d+", text)
    return int(found.group()) if found else None


def partial_check(truth: int):
    """A potential: 0 while the digits written so far can still become ``truth``, else WRONG."""

    def potential(text: str) -> float:
        found = re.search(r"-?\d+", text)
        if found is None:
            return 0.0
        digits = found.group()
        complete = found.end() < len(text)  # something follows the number: it is finished
        ok = digits == str(truth) if complete else str(truth).startswith(digits)
        return 0.0 if ok else WRONG

    return potential


def main(seed: int = 0) -> None:
    lm = lc.models.load()  # the default model, on CUDA when there is one

    @lc.program
    def checked_answer(question: str, expression: str):
        truth = yield lc.call("calculator", calc, expression)
        text = yield lc.gen(
            "answer",
            lm,
            lm.chat(f"{question} Answer with a number.") + "The answer is ",
            max_tokens=6,
            stop="\n",
            potential=partial_check(truth),  # steers smc; forward and rejection ignore it
        )
        yield lc.condition("calculator_agrees", first_number(text) == truth)
        return first_number(text)

    program = checked_answer(QUESTION, EXPRESSION)
    truth = calc(EXPRESSION)
    print(f"{QUESTION}  (the calculator says {truth}; {SAMPLES} samples per method, seed {seed})")
    print()
    print(
        f"{'method':<10} {'pass':>5} {'log evidence':>13} {'tokens':>7} {'wall time':>10}  answers"
    )
    methods = {
        "forward": {},
        "rejection": {},
        "smc": {"ess_threshold": 1.0},  # resample after every token: drop wrong answers at once
    }
    for method, options in methods.items():
        try:
            result = lc.infer(program, method=method, num_samples=SAMPLES, seed=seed, **options)
        except (AllWeightsZeroError, NothingAcceptedError) as err:  # not one answer was right
            traces = err.traces
            log_z, tokens, wall = -math.inf, math.nan, math.nan
        else:
            traces = result.traces
            log_z = result.log_evidence
            tokens = result.stats["tokens_generated"]
            wall = result.stats["wall_time_s"]
        values = [first_number(trace["answer"].value) for trace in traces]  # what it answered
        passed = sum(v == truth for v in values) / len(values)
        answers = ", ".join(f"{v} x{n}" for v, n in Counter(values).most_common(4))
        print(f"{method:<10} {passed:>5.2f} {log_z:>13.2f} {tokens:>7} {wall:>9.1f}s  {answers}")
    print()
    print(
        "pass: the fraction of the method's outputs the calculator accepts; log evidence: its "
        "estimate of log P(the model is right); tokens: the tokens the model generated."
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
