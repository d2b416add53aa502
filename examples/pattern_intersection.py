"""Prompt intersection on the default model: an answer two prompts both find likely.

One prompt is a list of fruits, the other a list of red things; each continues its list (a
base-model style prompt: a 135M model continues a list more reliably than it answers a
question). ``prompt_intersection`` samples a reply whose distribution is proportional to
p(reply | fruit prompt) * p(reply | red prompt): generated under the first prompt, weighted by
the second, and steered by the second token by token while SMC runs. The first table is the
fruit prompt alone; the second the intersection, whose answers lean to red fruit. Its
``log evidence`` estimates log sum_x p1(x) p2(x), how much the two prompts overlap.

Run: .venv/bin/python examples/pattern_intersection.py
"""

from __future__ import annotations

import lmcascade as lc
from lmcascade.patterns.intersection import prompt_intersection

PARTICLES = 32
SETTINGS = {"max_tokens": 4, "stop": ["\n", ".", ","]}


def main() -> None:
    lm = lc.models.load()
    fruit = "A list of fruits: banana, pear, grape,"
    red = "A list of red things: fire truck, blood, ruby,"

    @lc.program
    def fruit_alone():
        return (yield lc.gen("text", lm, fruit, **SETTINGS))

    alone = lc.infer(fruit_alone(), method="forward", num_samples=PARTICLES, seed=0)
    print("the fruit prompt alone:")
    print(alone.summary(top=5))
    # (a 135M model's idea of red things is loose: expect "apple" to gain, not perfection)

    both = lc.infer(
        prompt_intersection(lm, fruit, red, **SETTINGS),
        method="smc",
        particles=PARTICLES,
        seed=0,
    )
    print("\nfruit AND red (prompt intersection, SMC steered by the second prompt):")
    print(both.summary(top=5))


if __name__ == "__main__":
    main()
