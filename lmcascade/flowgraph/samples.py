"""The sampled runs a program's graph starts from: forward samples that never stop early.

:func:`sample_runs` runs ``runs`` forward samples on the batched engine, with three changes
that suit looking at a program rather than weighing its outputs:

- a run goes on past a failed condition (the engine's ``stop_dead=False``), so every site of
  the program is reached even when a condition always fails;
- a run that raises — in the program's own code, in a tool, or on a bad site — ends there
  instead of ending every run: its trace keeps the sites before, and a :class:`Stopped`
  says what was raised where;
- a run ends, with a :class:`~lmcascade.errors.ProgramError`, when it reaches
  :data:`~lmcascade.flowgraph.replay.MAX_SITES` sites (a loop that rarely ends ends it
  there, not every run);
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
>>> runs = sample_runs(never(), runs=2, max_tokens=3, seed=0)
>>> [r.trace.names for r in runs], [len(r.sent["x"]) <= 3 for r in runs]
([['x', 'impossible'], ['x', 'impossible']], [True, True])
>>> runs[0].stopped
Stopped(ValueError: invalid literal for int() with base 10: ..., after 'impossible')
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lmcascade.distributions import is_lm
from lmcascade.engine import Engine, Particle
from lmcascade.errors import BadYieldError, DuplicateSiteError, ProgramError
from lmcascade.flowgraph.replay import MAX_SITES, STOP, site_name
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
    """How a run that did not return ended: ``error`` was raised after ``site`` (None: before
    the first site) or, with ``at_site``, at it (resolving that site raised)."""

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


@dataclass
class Run:
    """One sampled run: its trace, what the program received at each site (by name; the
    program's own view, e.g. a ``Generation`` for ``details=True``), and how it stopped
    (None: it returned, or the engine ended it on a failed tool call, recorded on the site)."""

    trace: Trace = field(default_factory=Trace)
    sent: dict[str, Any] = field(default_factory=dict)
    stopped: Stopped | None = None


def guarded(bound: BoundProgram, max_tokens: int | None, run: Run) -> BoundProgram:
    """``bound`` wrapped so that a run notes in ``run`` what the program received and ends
    with a :class:`Stopped` (in ``run.stopped``) instead of raising; generations are capped
    (:func:`capped`).  A site where resolving raised is noted as :data:`STOP`."""

    def stop(error: BaseException, site: str | None, at_site: bool = False) -> None:
        run.stopped = Stopped(error, site, at_site)

    def program():
        gen = iter(bound)
        counters: dict[str, int] = {}
        value: Any = None
        last: str | None = None
        while True:
            try:
                eff = gen.send(value)
            except StopIteration as done:
                return done.value
            except Exception as err:
                return stop(err, last)
            if not isinstance(eff, Effect):
                gen.close()
                hint = "; compose sub-programs with `yield from`" * isinstance(eff, BoundProgram)
                return stop(
                    BadYieldError(f"yielded {safe_repr(eff, 200)}, not an effect{hint}"), last
                )
            name = site_name(counters, eff.name)
            if len(run.sent) >= MAX_SITES:  # the engine's own cap would end every run
                gen.close()
                return stop(
                    ProgramError(
                        f"reached {MAX_SITES} sites at {name!r} (lc.graph's limit for one run); "
                        "is a loop unbounded?"
                    ),
                    last,
                )
            if name in run.sent:  # the engine would refuse it and end every run
                gen.close()
                return stop(DuplicateSiteError(f"site {name!r} appears twice in one run"), last)
            value = yield capped(eff, max_tokens)
            if isinstance(value, Failed):
                gen.close()
                run.sent[name] = STOP
                return stop(value.error, name, at_site=True)
            run.sent[name] = value
            last = name

    program.__name__ = program.__qualname__ = bound.name
    return Program(program)()


def sample_runs(bound: BoundProgram, runs: int, max_tokens: int | None, seed: int) -> list[Run]:
    """``runs`` forward samples of ``bound`` (seeded by ``seed``) that go past failed
    conditions and end, rather than raise, on errors (see the module's notes)."""
    from lmcascade.inference.base import seeded

    engine = Engine(_Lenient(), seed=seed, stop_dead=False)
    found = [Run() for _ in range(runs)]
    particles = [Particle(guarded(bound, max_tokens, run)) for run in found]
    with seeded(seed), torch.inference_mode():
        engine.run(particles)
    for run, particle in zip(found, particles, strict=True):
        run.trace = particle.trace
    return found
