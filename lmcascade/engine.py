"""The population engine: one stepping loop that every inference method runs on.

A :class:`Particle` is a trace plus, as a cache, the live generator that produced it.  The
engine drives every particle until it asks for a language model (or finishes), then makes one
batched decoding step for all waiting particles — *distributions* (one model call per model),
*choose* (the engine's token sampler), *feed* (see :mod:`lmcascade.lm.step`) — hands finished
sites back and repeats.  Methods differ in three pluggable things, never in a copy of the loop:

- the :class:`~lmcascade.policy.Policy`: what a new site means (sample from the prior, or
  alternatives for enumeration);
- the token sampler (:mod:`lmcascade.samplers`): ancestral draws, greedy, all children...;
- the :class:`Schedule`: which waiting particles step now and what happens between steps
  (SMC holds particles at boundaries and resamples; enumeration bounds the population).

When a policy returns alternatives, or a sampler gives a run several children, the particle
branches: the engine adds a particle per extra alternative.

**A particle's weight** is assembled in one place, :attr:`Particle.log_weight`: the trace's
weight (``log p - log q`` of each finished sample site, plus every observe, factor and
condition), plus the site in progress (its run's ``log p - log q`` so far and the potential's
twist), plus the twist carried from finished sites (``Particle.twist``), plus ``log_offset``
(SMC's reset after resampling).

**Carried twists.**  A potential anticipates a weight the program applies later (an observe
or factor of the finished text).  When its site ends, the run's last twist (the potential of
the finished text) is not dropped but carried in the particle's weight until the next
weight-changing site — an observe, factor or condition, :data:`TWIST_ENDS` — is recorded,
and is removed in the same moment that site's weight arrives; the program's end removes it
too.  So no particle is ever seen (by a resampling point) between the two with neither weight,
or with both; the final weights, and so every method's target and evidence, are unchanged.

**Replay.**  Generators cannot be copied, so a cloned particle starts a fresh generator and
*resumes*: its own recorded sites are sent back in order (tool calls and scores are not
re-run) until they are used up, then execution continues live.  A program that yields different sites on
resume is not deterministic given its choices, and gets a :class:`ReplayDivergenceError`.
Beyond its own sites, a particle may take values by name from another trace (``replay``),
rescored under the program's distributions (:func:`lmcascade.policy.rescore`).

**Failing tools.**  A tool call that raised (``site.error``) has weight zero and ends its
particle on the spot — even in an engine made with ``stop_dead=False``, since the program
cannot go on without the tool's value; ``stats["tool_errors"]`` counts them.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, 0.0])
>>> @lc.program
... def two():
...     x = yield lc.gen("x", lm, "", max_tokens=3)
...     y = yield lc.gen("y", lm, x, max_tokens=3)
...     return x + "|" + y
>>> engine = Engine(seed=0)
>>> particles = engine.run([Particle(two()) for _ in range(100)])
>>> engine.stats["model_calls"] <= 6   # 100 particles, two 3-token sites: batched per step
True
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

import torch

from lmcascade.distributions import is_lm
from lmcascade.errors import (
    BadYieldError,
    DSLError,
    LMCascadeError,
    ProgramError,
    ReplayDivergenceError,
    SiteError,
    TooManyTracesError,
)
from lmcascade.generation import Generation
from lmcascade.lm.step import Observer, step_runs
from lmcascade.lm.text_score import score_texts
from lmcascade.memory import check_step_fits
from lmcascade.policy import Policy
from lmcascade.program import EFFECT_TYPES, BoundProgram, Effect, send
from lmcascade.requests import Pending
from lmcascade.samplers import ANCESTRAL, TokenSampler
from lmcascade.samplers.base import seeded_generator
from lmcascade.trace import VALUE_KINDS, Site, Trace

__all__ = ["TWIST_ENDS", "Engine", "Particle", "Pending", "Policy", "Schedule"]

TWIST_ENDS = ("observe", "factor", "condition")
"""The site kinds whose recording ends the twist a particle carries from finished sites
(their weight is what a potential anticipates); the program's end ends it too.

>>> TWIST_ENDS
('observe', 'factor', 'condition')
"""


class Particle:
    """One execution of a bound program: its trace, and the generator replaying/extending it.

    ``waiting`` is the request the particle is blocked on (model runs in progress);
    ``resolved`` a finished site not yet handed to the program; ``log_offset`` is added to the
    weight (SMC resets weights after resampling through it); ``replay`` is a trace whose
    values the particle takes by site name, rescored (importance proposals, MCMC moves).
    ``twist`` is the twist of finished LM sites with a potential, carried in the weight until
    the next observe, factor or condition (:data:`TWIST_ENDS`) or the program's end.
    ``tag`` is what an inference method keeps per particle (an arithmetic code, a beam's
    perturbed score): every LM run the particle starts gets it as ``run.tag``, so the token
    sampler can read it; a clone shares it (a method that needs its own copy replaces it).
    """

    __slots__ = (
        "program",
        "trace",
        "replay",
        "waiting",
        "resolved",
        "dead",
        "log_offset",
        "twist",
        "tag",
        "_gen",
        "_cursor",
        "_counters",
        "_send",
        "_current",
        "_scope",
    )

    def __init__(
        self, program: BoundProgram, trace: Trace | None = None, replay: Trace | None = None
    ) -> None:
        self.program = program
        self.trace = trace if trace is not None else Trace()
        self.replay = replay
        self.waiting: Pending | None = None
        self.resolved: Site | None = None
        self.dead = False
        self.log_offset = 0.0
        self.twist = 0.0
        self.tag: Any = None
        self._gen: Any = None
        self._cursor = 0
        self._counters: dict[str, int] = {}
        self._send: Any = None
        self._current: tuple[Effect, str] | None = None
        self._scope: tuple[str, ...] = ()

    @property
    def done(self) -> bool:
        return self.trace.done

    @property
    def log_weight(self) -> float:
        """The particle's current log-weight: finished sites, the site in progress, the
        carried twist (until the program's end), offset."""
        lw = self.trace.log_weight + self.log_offset
        if not self.trace.done:
            lw += self.twist
        if self.waiting is not None:
            lw += sum(r.log_weight for r in self.waiting.runs)
        return lw

    def clone(self, waiting: Pending | None = None) -> Particle:
        """A copy that resumes by replaying the shared trace.  A site in progress is forked
        (its model contexts share their caches) unless ``waiting`` gives the clone its own.
        No generator or model state is copied."""
        twin = Particle(self.program, self.trace.copy(), self.replay)
        twin.dead = self.dead
        twin.log_offset = self.log_offset
        twin.twist = self.twist
        twin.tag = self.tag
        twin.resolved = self.resolved
        if waiting is not None:
            twin.waiting = waiting
        elif self.waiting is not None:
            runs = [r.branch(r.model.fork(r.ctx)) for r in self.waiting.runs]
            # texts being scored are shared: the score is the same for both
            twin.waiting = Pending(
                runs, self.waiting.finish, dict(self.waiting.meta), list(self.waiting.texts)
            )
        return twin

    def release(self) -> None:
        """Drops the particle: its model contexts and its live generator."""
        if self.waiting is not None:
            for r in self.waiting.runs:
                if not r.done:
                    r.release()
        self.close()

    def close(self) -> None:
        """Drops the live generator (the trace stays)."""
        if self._gen is not None:
            self._gen.close()
            self._gen = None
        self._current = None

    def __repr__(self) -> str:
        state = "dead" if self.dead else "done" if self.done else "running"
        return f"Particle({self.program!r}, {len(self.trace)} sites, {state})"


def at_site(name: str, err: LMCascadeError) -> LMCascadeError:
    """The same error with the site's name in front of its message."""
    msg = str(err)
    if f"site {name!r}" in msg:
        return err
    return type(err)(f"site {name!r}: {msg}")


class Schedule:
    """When waiting particles step and what happens between steps.  This default steps every
    waiting particle every time and does nothing in between (forward sampling, importance,
    rejection, enumeration); SMC's schedule holds particles at boundaries and resamples."""

    def select(
        self, engine: Engine, particles: list[Particle], waiting: list[Particle]
    ) -> tuple[list[Particle], list[Particle]]:
        """The population (possibly changed) and which of its waiting particles step now."""
        return particles, waiting

    def after_step(self, engine: Engine, particles: list[Particle]) -> list[Particle]:
        """Called after every decoding step; returns the population."""
        return particles


ENGINES: ContextVar[list | None] = ContextVar("lmcascade_engines", default=None)
"""The engines created inside the current ``lc.infer`` call (None outside one)."""


class Engine:
    """Drives particles of a program; one batched model call per decoding step per model.

    ``policy`` resolves new sites, ``sampler`` chooses tokens (ancestral by default);
    ``seed`` seeds the token draws (one ``torch.Generator`` per device); ``stop_dead`` ends a
    particle as soon as its weight is zero (a failed tool call ends it either way: see
    ``stats["tool_errors"]``); ``max_sites`` stops a runaway program;
    ``max_particles`` bounds the live population when sites branch (enumeration).  Functions
    appended to ``observers`` see each step's distributions (:class:`~lmcascade.lm.step.Rows`).
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        sampler: TokenSampler | None = None,
        seed: int | None = None,
        stop_dead: bool = True,
        max_sites: int = 10_000,
        max_particles: int | None = None,
    ) -> None:
        self.policy = policy or Policy()
        self.sampler = sampler or ANCESTRAL
        self.seed = seed
        self.stop_dead = stop_dead
        self.max_sites = max_sites
        self.max_particles = max_particles
        self.generators: dict[torch.device, torch.Generator] = {}
        self.observers: list[Observer] = []
        self._warned: set[int] = set()  # models already warned about memory
        self.stats: dict[str, Any] = {
            "model_calls": 0,
            "tokens_generated": 0,
            "tokens_scored": 0,
            "tool_errors": 0,
        }
        watching = ENGINES.get()
        if watching is not None:  # lc.infer reports their progress if the run is interrupted
            watching.append(self)

    def generator(self, device: torch.device) -> torch.Generator:
        gen = self.generators.get(device)
        if gen is None:
            gen = self.generators[device] = seeded_generator(device, self.seed)
        return gen

    # -- the loop -----------------------------------------------------------------------------

    def run(
        self, particles: Sequence[Particle], schedule: Schedule | None = None
    ) -> list[Particle]:
        """Runs the population until every particle has finished; returns it (branching may
        have added particles; a schedule may have replaced some)."""
        schedule = schedule or Schedule()
        population = list(particles)
        while True:
            population = self.advance_all(population)
            waiting = [p for p in population if p.waiting is not None]
            if not waiting:
                return population
            population, to_step = schedule.select(self, population, waiting)
            population.extend(self.step(to_step))
            population = schedule.after_step(self, population)

    def advance_all(self, particles: Sequence[Particle]) -> list[Particle]:
        """Advances every particle to its next model request (or its end), adding the
        particles that branch off on the way."""
        out: list[Particle] = []
        queue = deque(particles)
        live = sum(not p.dead for p in particles)
        while queue:
            p = queue.popleft()
            born = self.advance(p)
            if born and self.max_particles is not None:
                live += len(born)
                if live > self.max_particles:
                    name = born[0].resolved.name if born[0].resolved else "?"
                    raise TooManyTracesError(
                        f"more than {self.max_particles} traces when site {name!r} branched; "
                        "raise max_traces or shrink the program's choices"
                    )
            queue.extend(born)
            out.append(p)
        return out

    def step(self, particles: Sequence[Particle]) -> list[Particle]:
        """One decoding step for every LM run of ``particles``; finishes sites whose runs ended.
        Returns the particles that branched off (a sampler that gave a run several children)."""
        runs = [r for p in particles for r in p.waiting.runs]  # type: ignore[union-attr]
        for model in {id(r.model): r.model for r in runs if r.forced is None}.values():
            self.generator(model.device)
        texts = {id(t): t for p in particles for t in p.waiting.texts if t.log_prob is None}  # type: ignore[union-attr]
        try:
            if any(not r.tokens for r in runs):  # new sites: check the step fits first
                check_step_fits(runs, self._warned)
            if texts:
                score_texts(list(texts.values()), self.stats)
            branches = step_runs(runs, self.generators, self.stats, self.sampler, self.observers)
        except Exception as err:
            found = (
                p.waiting.meta.get("site") or (p._current[1] if p._current else None)  # type: ignore[union-attr]
                for p in particles
            )
            names = [n for n in dict.fromkeys(found) if n is not None]
            if not names:
                raise
            shown = ", ".join(repr(n) for n in names[:3]) + (" ..." if len(names) > 3 else "")
            if not isinstance(err, LMCascadeError) or isinstance(err, DSLError):
                err.add_note(f"raised while stepping lmcascade site {shown}")
                raise
            raise type(err)(f"while stepping site {shown}: {err}") from None
        born: list[Particle] = []
        for p in particles:
            pending = p.waiting
            assert pending is not None
            if branches and len(pending.runs) == 1 and pending.runs[0] in branches:
                for child in branches[pending.runs[0]]:
                    born.append(p.clone(Pending([child], pending.finish, dict(pending.meta))))
        for p in [*particles, *born]:
            pending = p.waiting
            if pending.ready:  # type: ignore[union-attr]
                p.waiting = None
                p.resolved = pending.finish(pending.runs)  # type: ignore[union-attr]
                p.twist += sum(r.twist for r in pending.runs)  # type: ignore[union-attr]
        return born

    def advance(self, p: Particle) -> list[Particle]:
        """Runs ``p``'s program until it waits on a model, dies or returns.  Returns the
        particles that branch off when a policy gives a site several alternatives."""
        if p.done or p.waiting is not None:
            return []
        born: list[Particle] = []
        if p._gen is None:
            p._gen = iter(p.program)
            p._cursor = 0
            p._counters = {}
            p._send = None
            p._current = None
            p._scope = ()
        while True:
            if p._current is None:
                eff = self._next_effect(p)
                if eff is None:
                    return born
                name = self._name(p, eff.name)
                if p._cursor < len(p.trace):
                    self._resume(p, eff, name)
                    if p.done:
                        return born
                    continue
                p._current = (eff, name)
            eff, name = p._current
            if p.resolved is not None:
                site, p.resolved = p.resolved, None
                if site.name != name:
                    raise ReplayDivergenceError(
                        f"program {p.program.name!r} diverged on replay: the site in progress "
                        f"was {site.name!r}, the program now yields {name!r}"
                    )
                out: Any = site
            else:
                out = self._resolve(p, eff, name)
            if isinstance(out, list):  # alternatives: the others continue in new particles
                if not out:
                    out = Site(name, "sample", None, -math.inf, 0.0)
                else:
                    for alt in out[1:]:
                        twin = p.clone()
                        twin.resolved = alt
                        born.append(twin)
                    out = out[0]
            if isinstance(out, Site):
                p._current = None
                self.record(p, out, eff)
                if p.done:
                    return born
            else:
                if p.tag is not None:
                    for run in out.runs:
                        run.tag = p.tag
                p.waiting = out
                return born

    def _resolve(self, p: Particle, eff: Effect, name: str) -> Site | Pending | list[Site]:
        if len(p.trace) >= self.max_sites:
            raise ProgramError(
                f"program {p.program.name!r} reached {self.max_sites} sites at "
                f"{name!r}; is a loop unbounded? Raise max_sites if this is intended"
            )
        try:
            if p.replay is not None and name in p.replay:
                found = self.policy.replay(eff, name, p.replay[name])
                if found is not None:
                    return found
            return self.policy.resolve(eff, name)
        except LMCascadeError as err:
            raise at_site(name, err) from None

    def _next_effect(self, p: Particle) -> Effect | None:
        """The program's next effect, or None once it has returned (recorded as done)."""
        try:
            eff, p._scope = send(p._gen, p._send, p._scope)
        except (TypeError, AttributeError) as err:
            said = str(err)
            effect = next(
                (
                    t.__name__
                    for t in EFFECT_TYPES
                    if f"'{t.__name__}'" in said or f'"{t.__name__}"' in said
                ),
                None,
            )
            if effect is None:
                raise
            raise ProgramError(
                f"program {p.program.name!r} used an effect ({effect}) as an ordinary value "
                f"({said}); did you forget `yield`? Write `x = yield lc.gen(...)`"
            ) from err
        except StopIteration as stop:
            if p._cursor < len(p.trace):
                raise ReplayDivergenceError(
                    f"program {p.program.name!r} returned before its recorded site "
                    f"{p.trace.sites[p._cursor].name!r} on replay; it must be deterministic "
                    "given its site values (draw randomness with lc.sample)"
                ) from None
            p.trace.value = stop.value
            p.trace.done = True
            p._gen = None
            return None
        if not isinstance(eff, EFFECT_TYPES):
            last = p.trace.sites[p._cursor - 1].name if p._cursor else None
            where = f"after site {last!r}" if last else "before its first site"
            hint = (
                " Compose sub-programs with `yield from sub(...)`."
                if isinstance(eff, BoundProgram)
                else ""
            )
            raise BadYieldError(
                f"program {p.program.name!r} yielded {eff!r} ({type(eff).__name__}) {where}; "
                f"yield effects such as lc.sample, lc.observe, lc.factor, lc.condition, "
                f"lc.call, lc.score or lc.gen.{hint}"
            )
        return eff

    def record(self, p: Particle, site: Site, eff: Effect | None = None) -> None:
        """Appends a new site to ``p``'s trace and sends its value (as ``eff`` asks for it)
        to the program next; an observe, factor or condition ends the carried twist."""
        if site.kind in TWIST_ENDS:
            p.twist = 0.0
        p.trace.add(site)
        p._cursor += 1
        p._send = sent_value(eff, site)
        if site.error is not None:
            self.stats["tool_errors"] = self.stats.get("tool_errors", 0) + 1
        if site.error is not None or (self.stop_dead and p.trace.log_weight == -math.inf):
            end_dead(p)

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _name(p: Particle, name: str) -> str:
        if name.endswith("[]"):
            base = name[:-2]
            index = p._counters.get(base, 0)
            p._counters[base] = index + 1
            return f"{base}[{index}]"
        return name

    @staticmethod
    def _resume(p: Particle, eff: Effect, name: str) -> None:
        """Sends the particle's own recorded site back (its value was made by this very
        execution, so it is trusted, not rescored)."""
        site = p.trace.sites[p._cursor]
        diverged = site.name != name or site.kind != eff.kind
        if not diverged and is_lm(site.dist) and is_lm(getattr(eff, "dist", None)):
            diverged = site.dist.prompt != eff.dist.prompt  # type: ignore[attr-defined]
        elif not diverged and site.kind == "score":
            diverged = site.dist.prompt != eff.prompt  # type: ignore[attr-defined]
        if diverged:
            raise ReplayDivergenceError(
                f"program {p.program.name!r} diverged on replay at site #{p._cursor}: recorded "
                f"{site.kind} {site.name!r}, program now yields {eff.kind} {name!r}"
                + (" with a different prompt" if site.name == name else "")
                + "; a program must be deterministic given its site values (draw randomness "
                "with lc.sample, not random/numpy)"
            )
        p._cursor += 1
        p._send = sent_value(eff, site)
        if site.error is not None:  # a prefix ending in a failed tool call: no value to send
            end_dead(p)


def sent_value(eff: Effect | None, site: Site) -> Any:
    """What the program receives for ``site``: its value (sample, call and score sites), as a
    :class:`~lmcascade.generation.Generation` for an LM site asked with ``details=True``;
    None for the others."""
    if site.kind not in VALUE_KINDS:
        return None
    if site.kind == "sample" and getattr(eff, "details", False):
        out = Generation.from_site(site)
        if not out.token_ids and site.log_prob > -math.inf:
            raise SiteError(
                f"site {site.name!r} asks for details=True, but its value was scored as a text "
                "(it came from a model with another vocabulary), so it has no token "
                "log-probabilities; propose from a model that shares this one's vocabulary"
            )
        return out
    return site.value


def end_dead(p: Particle) -> None:
    """Ends ``p`` with weight zero: its trace is done and its generator dropped."""
    p.dead = True
    p.trace.done = True
    p.close()
