"""ToyLM programs shared by the inference tests: small enough to enumerate exactly."""

from __future__ import annotations

import math
from functools import cache

import torch
from pyro.distributions import Bernoulli, Categorical

import lmcascade as lc
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
