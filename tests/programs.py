"""ToyLM programs shared by the inference tests: small enough to enumerate exactly."""

from __future__ import annotations

import math
from functools import cache

import torch
from pyro.distributions import Bernoulli, Categorical

import lmcascade as lc
from lmcascade.constraints import forbid
from lmcascade.models import ToyLM

VOCAB = ["a", "b", "c", "q", ":", "<eos>"]


@cache
def _scores(ctx: tuple[int, ...]) -> tuple[float, ...]:
    """Context-dependent, deterministic next-token scores (q and : never generated)."""
    h = (sum((i + 1) * (t + 3) for i, t in enumerate(ctx)) * 2654435761) % 997
    a = (h % 7) / 3.0
    b = ((h // 7) % 5) / 2.5
    c = ((h // 35) % 3) / 1.5
    eos = 0.5 + 0.4 * len(ctx)
    return (a, b, c, -math.inf, -math.inf, eos)


def toy_lm() -> ToyLM:
    return ToyLM(VOCAB, _scores, name="hashed-toy")


LM = toy_lm()


@lc.program
def hard_condition():
    """One LM site with a hard condition."""
    text = yield lc.gen("text", LM, "q", max_tokens=3)
    yield lc.condition("has_a", "a" in text)
    return text


@lc.program
def chained_soft():
    """Two chained LM sites, the second prompted by the first, with a soft factor."""
    x = yield lc.gen("x", LM, "q", max_tokens=2)
    y = yield lc.gen("y", LM, "q" + x + ":", max_tokens=2)
    yield lc.factor("prefer_b", 1.0 * y.count("b") - 1.0 * len(x) - 1.5)
    return x + "|" + y


@lc.program
def categorical_prompt():
    """An LM site whose prompt depends on a Categorical choice."""
    c = yield lc.sample("topic", Categorical(torch.tensor([0.3, 0.7], dtype=torch.float64)))
    text = yield lc.gen("text", LM, ["a", "b"][c] + ":", max_tokens=2)
    yield lc.condition("nonempty", len(text) > 0)
    return f"{c}/{text}"


@lc.program
def observe_bernoulli():
    """An LM site followed by an observation of a pyro Bernoulli whose rate depends on it."""
    text = yield lc.gen("text", LM, "q", max_tokens=2)
    rate = torch.tensor(0.9 if "c" in text else 0.2, dtype=torch.float64)
    yield lc.observe("saw_one", Bernoulli(rate), 1.0)
    return text


PROGRAMS = {
    "hard_condition": hard_condition,
    "chained_soft": chained_soft,
    "categorical_prompt": categorical_prompt,
    "observe_bernoulli": observe_bernoulli,
}

# Upper bounds on each program's log-weight, for rejection sampling of soft programs.
MAX_LOG_WEIGHT = {
    "hard_condition": None,
    "chained_soft": 0.5,
    "categorical_prompt": None,
    "observe_bernoulli": 0.0,
}


# --- programs for SMC: weights that vary at every kind of resampling point -----------------
#
# Each returns a value with few outcomes and has weights that differ between particles at
# token, segment and site boundaries (so resampling there is not a no-op), yet mild enough
# that SMC with 16 particles is nearly unbiased (its O(1/N) bias is measured in test_smc.py).

_L = math.log


def _trap(ctx: tuple[int, ...]) -> tuple[float, ...]:
    """After "a" the forbidden "b" is likely; after "c" it is rare (vocab a, b, c, eos)."""
    if ctx[-1] == 0:
        return (_L(0.1), _L(0.7), _L(0.1), _L(0.1))
    if ctx[-1] == 2:
        return (_L(0.4), _L(0.05), _L(0.35), _L(0.2))
    return (_L(0.3), _L(0.3), _L(0.3), _L(0.1))


TRAPPY = ToyLM(["a", "b", "c", "<eos>"], _trap, name="trappy")
NO_B = forbid("b")


@lc.program
def trap_chain():
    """Two sites under the hard constraint "no b": the allowed mass (the weight) depends on
    the prefix, so masking without the weight correction, or resampling that ignores the
    weights, is far off."""
    x = yield lc.gen("x", TRAPPY, "c", max_tokens=3, constraint=NO_B)
    y = yield lc.gen("y", TRAPPY, "c" + x, max_tokens=1, constraint=NO_B)
    return x + "|" + y


def count_a(text: str) -> float:
    return 0.8 * text.count("a")


@lc.program
def twisted_reward():
    """A twist that anticipates the reward (in the weights token by token), the reward itself,
    then a second site so that the reward sits at a site boundary too."""
    x = yield lc.gen("x", LM, "q", max_tokens=3, potential=count_a)
    yield lc.factor("reward", count_a(x))
    yield lc.gen("tail", LM, "q" + x + ":", max_tokens=1)
    return x


@lc.program
def verified_steps():
    """A verifier after each of two chained steps (weights arrive at site boundaries)."""
    x = yield lc.gen("x", LM, "q", max_tokens=2)
    yield lc.factor("check_x", x.count("c") - 0.5 * len(x))
    y = yield lc.gen("y", LM, "q" + x + ":", max_tokens=1)
    yield lc.factor("check_y", y.count("b") - 0.5)
    return x + "|" + y


OTHER = ToyLM(
    VOCAB,
    lambda ctx: [0.5 * (len(ctx) % 2), 0.0, -0.5, -math.inf, -math.inf, -0.7],
    name="other-toy",
)
EXPERT = lc.LM(OTHER, "q:", max_tokens=3)


@lc.program
def expert_then_tail():
    """Text steered by a second model's prefix probability and scored by it (a product of
    experts), then a short site: the expert's opinion is a weight at a site boundary."""
    text = yield lc.gen("text", LM, "q", max_tokens=3, potential=EXPERT)
    yield lc.observe("second_opinion", EXPERT, text)
    yield lc.gen("tail", LM, "q" + text + ":", max_tokens=1)
    return text
