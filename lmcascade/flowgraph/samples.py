"""The sampled runs a program's graph starts from: forward samples that never stop early.

:func:`sample_traces` runs ``runs`` forward samples on the batched engine, with three changes
that suit looking at a program rather than weighing its outputs:

- a run goes on past a failed condition (the engine's ``stop_dead=False``), so every site of
  the program is reached even when a condition always fails;
- a run that raises — in the program's own code, in a tool, or on a bad site — ends there
  instead of ending every run: its trace keeps the sites before, and its value is a
  :class:`Stopped` saying what was raised where;
- each generation stops after ``max_tokens`` tokens (the text's shape rarely matters to a
  graph), and observing a text under an LM is not scored (its weight is not used).

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "<eos>"], lambda ctx: [0.0, 0.0])
>>> @lc.program
... def never():
...     x = yield lc.gen("x", lm, "", max_tokens=50)
...     yield lc.condition("impossible", False)
...     return int(x)
>>> traces = sample_traces(never(), runs=2, max_tokens=3, seed=0)
>>> [t.names for t in traces], [len(t["x"].value) <= 3 for t in traces]
([['x', 'impossible'], ['x', 'impossible']], [True, True])
>>> traces[0].value
Stopped(ValueError: invalid literal for int() with base 10: ..., after 'impossible')
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import torch

from lmcascade.distributions import is_lm
from lmcascade.engine import Engine, Particle
from lmcascade.flowgraph.replay import site_name
from lmcascade.policy import Policy
from lmcascade.program import BoundProgram, Effect, Factor, Observe, Program, Sample
from lmcascade.requests import Pending
from lmcascade.trace import Site, Trace, safe_repr


class Failed:
    """The value a site gets when resolving it raised (the run that reached it stops)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Stopped:
    """The return value of a run that did not return: ``error`` was raised ``after`` a site
    (None: before the first) or ``at`` it (resolving that site raised)."""

    __slots__ = ("error", "site", "at_site")

    def __init__(self, error: BaseException, site: str | None, at_site: bool = False) -> None:
        self.error, self.site, self.at_site = error, site, at_site

    @property
    def message(self) -> str:
        """``Type: message`` of the error, on one line and at most 300 characters."""
        text = " ".join(str(self.error).split())
        text = text if len(text) <= 300 else text[:297] + "..."
        return f"{type(self.error).__name__}: {text}" if text else type(self.error).__name__

    def __repr__(self) -> str:
        where = f"{'at' if self.at_site else 'after'} {self.site!r}" if self.site else "at start"
        return f"Stopped({self.message}, {where})"


class _Lenient(Policy):
    """The prior, except that a site whose resolution raises gets a :class:`Failed` value."""

    def resolve(self, eff: Effect, name: str) -> Site | Pending | list[Site]:
        try:
            return super().resolve(eff, name)
        except Exception as err:
            return Site(name, "call", Failed(err), -math.inf)


def capped(eff: Effect, max_tokens: int | None) -> Effect:
    """``eff`` with its generation cut to ``max_tokens`` tokens, and an LM observe as a zero
    factor (unscored); any other effect unchanged."""
    dist = getattr(eff, "dist", None)
    if isinstance(eff, Observe) and is_lm(dist):
        return Factor(eff.name, 0.0)
    if isinstance(eff, Sample) and is_lm(dist) and max_tokens and dist.max_tokens > max_tokens:
        short = copy.copy(dist)
        short.max_tokens = max_tokens
        short.min_tokens = min(dist.min_tokens, max_tokens)
        return dataclasses.replace(eff, dist=short)
    return eff


def guarded(bound: BoundProgram, max_tokens: int | None) -> BoundProgram:
    """``bound`` wrapped so that its runs end with a :class:`Stopped` value instead of raising,
    with generations capped (:func:`capped`)."""

    def run():
        gen = iter(bound)
        counters: dict[str, int] = {}
        names: set[str] = set()
        value: Any = None
        last: str | None = None
        while True:
            try:
                eff = gen.send(value)
            except StopIteration as stop:
                return stop.value
            except Exception as err:
                return Stopped(err, last)
            if not isinstance(eff, Effect):
                gen.close()
                hint = "; compose sub-programs with `yield from`" * isinstance(eff, BoundProgram)
                return Stopped(
                    TypeError(f"yielded {safe_repr(eff, 200)}, not an effect{hint}"), last
                )
            name = site_name(counters, eff.name)
            if name in names:  # the engine would refuse it and end every run
                gen.close()
                return Stopped(ValueError(f"site name {name!r} used twice in one run"), last)
            names.add(name)
            value = yield capped(eff, max_tokens)
            if isinstance(value, Failed):
                gen.close()
                return Stopped(value.error, name, at_site=True)
            last = name

    run.__name__ = run.__qualname__ = bound.name
    return Program(run)()


def sample_traces(bound: BoundProgram, runs: int, max_tokens: int | None, seed: int) -> list[Trace]:
    """``runs`` forward samples of ``bound`` (seeded by ``seed``) that go past failed
    conditions and end, rather than raise, on errors (see the module's notes)."""
    from lmcascade.inference.base import seeded

    engine = Engine(_Lenient(), seed=seed, stop_dead=False)
    program = guarded(bound, max_tokens)
    with seeded(seed), torch.inference_mode():
        particles = engine.run([Particle(program) for _ in range(runs)])
    return [p.trace for p in particles]
