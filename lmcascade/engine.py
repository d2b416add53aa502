"""The population engine: runs many particles of one program, batching their model requests.

A :class:`Particle` is a trace plus, as a cache, the live generator that produced it.  The
engine drives every particle until it asks for a language model (or finishes), then makes one
batched call per model for all waiting particles, hands the tokens back and repeats.  What a
*new* site means — sample from the prior, take a proposal's value, branch over all values —
is decided by a :class:`Policy`; inference methods differ mainly in their policy and in what
they do between steps.

Generators cannot be copied, so a cloned particle starts a fresh generator and **replays** its
trace: recorded values are sent back in order (tool calls are not re-run) until the recorded
sites are used up, then execution continues live.  A program that yields different sites on
replay is not deterministic given its choices, and gets a :class:`ReplayDivergenceError`.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, 0.0])
>>> @lc.program
... def two():
...     x = yield lc.gen("x", lm, "", max_tokens=3)
...     y = yield lc.gen("y", lm, x, max_tokens=3)
...     return x + "|" + y
>>> engine = Engine(seed=0)
>>> particles = [Particle(two()) for _ in range(100)]
>>> engine.run(particles)
>>> engine.stats["model_calls"] <= 6   # 100 particles, two 3-token sites: batched per step
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmcascade.distributions import draw_value, is_lm, score
from lmcascade.errors import (
    BadYieldError,
    LMCascadeError,
    ProgramError,
    ReplayDivergenceError,
    SiteError,
)
from lmcascade.lm.run import LMRun
from lmcascade.lm.scoring import logsumexp, path_log_prob, scoring_runs
from lmcascade.lm.step import step_runs
from lmcascade.program import (
    EFFECT_TYPES,
    BoundProgram,
    Call,
    Condition,
    Effect,
    Factor,
    Observe,
    send,
)
from lmcascade.trace import Site, Trace


@dataclass
class Pending:
    """A site waiting on language-model runs; ``finish`` builds the site once all have ended."""

    runs: list[LMRun]
    finish: Callable[[list[LMRun]], Site]
    released: bool = False  # SMC: allowed past the boundary at the site's start


@dataclass
class Branch:
    """A sample site left open for the caller to fill (exact enumeration uses it)."""

    name: str
    effect: Effect
    data: dict = field(default_factory=dict)


class Particle:
    """One execution of a bound program: its trace, and the generator replaying/extending it.

    ``waiting`` is the site the particle is blocked on (model runs in progress, or a branch);
    ``resolved`` a finished site not yet handed to the program; ``log_offset`` is added to the
    trace's weight (SMC resets weights after resampling through it).
    """

    __slots__ = (
        "program",
        "trace",
        "waiting",
        "resolved",
        "dead",
        "log_offset",
        "_gen",
        "_cursor",
        "_counters",
        "_send",
        "_current",
        "_scope",
    )

    def __init__(self, program: BoundProgram, trace: Trace | None = None) -> None:
        self.program = program
        self.trace = trace if trace is not None else Trace()
        self.waiting: Pending | Branch | None = None
        self.resolved: Site | None = None
        self.dead = False
        self.log_offset = 0.0
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
        """The particle's current log-weight: finished sites, the site in progress, offset."""
        lw = self.trace.log_weight + self.log_offset
        if isinstance(self.waiting, Pending):
            lw += sum(r.log_weight for r in self.waiting.runs)
        return lw

    def clone(self) -> Particle:
        """A copy that resumes by replaying the shared trace; a site in progress is forked
        (its model contexts share their caches).  No generator or model state is copied."""
        twin = Particle(self.program, self.trace.copy())
        twin.dead = self.dead
        twin.log_offset = self.log_offset
        twin.resolved = self.resolved
        if isinstance(self.waiting, Pending):
            runs = [r.branch(r.model.fork(r.ctx)) for r in self.waiting.runs]
            twin.waiting = Pending(runs, self.waiting.finish)
        elif self.waiting is not None:
            raise ProgramError("cannot clone a particle stopped at a branch point")
        return twin

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


class Policy:
    """How new sites are resolved.  This base class samples from the prior.

    Subclasses override :meth:`sample` (or others) to propose from elsewhere; each returns a
    finished :class:`Site`, a :class:`Pending` request for model runs, or a :class:`Branch`.
    """

    def resolve(self, engine: Engine, particle: Particle, eff: Effect, name: str):
        if isinstance(eff, Factor):
            return self.factor(eff, name)
        if isinstance(eff, Condition):
            return Site(name, "condition", bool(eff.ok), 0.0 if eff.ok else -math.inf)
        if isinstance(eff, Call):
            return self.call(eff, name)
        if isinstance(eff, Observe):
            return self.observe(eff, name)
        return self.sample(engine, particle, eff, name)

    def sample(self, engine: Engine, particle: Particle, eff: Effect, name: str):
        dist = eff.dist  # type: ignore[attr-defined]
        if is_lm(dist):
            return Pending([LMRun(dist)], lambda runs: lm_site(name, dist, runs[0]))
        try:
            value, lp = draw_value(dist)
        except (RuntimeError, ValueError, NotImplementedError) as err:
            raise SiteError(f"site {name!r}: sampling {dist!r} failed: {err}") from err
        return Site(name, "sample", value, lp, lp, dist=dist)

    def observe(self, eff: Observe, name: str):
        if is_lm(eff.dist):
            if not isinstance(eff.value, str):
                raise SiteError(
                    f"site {name!r}: observing an LM needs a string value, got "
                    f"{type(eff.value).__name__}"
                )
            runs = scoring_runs(eff.dist, eff.value)
            return Pending(
                runs,
                lambda rs: Site(
                    name,
                    "observe",
                    eff.value,
                    logsumexp([path_log_prob(r, eff.value) for r in rs]),
                    dist=eff.dist,
                ),
            )
        try:
            lp = score(eff.dist, eff.value)
        except (RuntimeError, ValueError, TypeError) as err:
            raise SiteError(
                f"site {name!r}: cannot score value {eff.value!r} under {eff.dist!r}: {err}"
            ) from err
        return Site(name, "observe", eff.value, lp, dist=eff.dist)

    def factor(self, eff: Factor, name: str) -> Site:
        try:
            lw = float(eff.log_weight)
        except (TypeError, ValueError, RuntimeError):
            raise SiteError(
                f"site {name!r}: factor needs a number (a log-weight), got {eff.log_weight!r}"
            ) from None
        if math.isnan(lw) or lw == math.inf:
            raise SiteError(f"site {name!r}: factor log-weight is {lw}; it must be finite or -inf")
        return Site(name, "factor", lw, lw)

    def call(self, eff: Call, name: str) -> Site:
        try:
            result = eff.fn(*eff.args, **eff.kwargs)
        except Exception as err:
            err.add_note(f"raised in lmcascade call site {name!r}")
            raise
        return Site(name, "call", result)


def lm_site(name: str, dist: Any, run: LMRun, proposal_log_prob: float | None = None) -> Site:
    """The site record of a finished LM generation: ``log_prob`` under the site's distribution,
    proposal log-prob under what the tokens were drawn from (the constraint-masked one)."""
    q = run.log_q if proposal_log_prob is None else proposal_log_prob
    return Site(name, "sample", run.value, run.log_prob, q, tuple(run.tokens), dist)


class Engine:
    """Drives particles of a program; one batched model call per decoding step per model.

    ``seed`` seeds the token draws (one ``torch.Generator`` per device); ``stop_dead`` ends a
    particle as soon as its weight is zero; ``max_sites`` stops a runaway program.
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        seed: int | None = None,
        stop_dead: bool = True,
        max_sites: int = 10_000,
    ) -> None:
        self.policy = policy or Policy()
        self.seed = seed
        self.stop_dead = stop_dead
        self.max_sites = max_sites
        self.generators: dict[torch.device, torch.Generator] = {}
        self.want_entropy = False
        self.stats: dict[str, Any] = {"model_calls": 0, "tokens_generated": 0, "tokens_scored": 0}

    def generator(self, device: torch.device) -> torch.Generator:
        gen = self.generators.get(device)
        if gen is None:
            gen = self.generators[device] = torch.Generator(device=device)
            if self.seed is None:
                gen.seed()
            else:
                gen.manual_seed(self.seed)
        return gen

    # -- running ------------------------------------------------------------------------------

    def run(self, particles: Sequence[Particle]) -> None:
        """Runs every particle until it finishes or stops at a :class:`Branch`."""
        while True:
            for p in particles:
                self.advance(p)
            waiting = [p for p in particles if isinstance(p.waiting, Pending)]
            if not waiting:
                return
            self.step(waiting)

    def step(self, particles: Sequence[Particle]) -> None:
        """One decoding step for every LM run of ``particles``; finishes sites whose runs ended."""
        runs = [r for p in particles for r in p.waiting.runs]  # type: ignore[union-attr]
        for r in runs:
            if not r.done and r.model.device not in self.generators:
                self.generator(r.model.device)
        step_runs(runs, self.generators, self.stats, entropy=self.want_entropy)
        for p in particles:
            pending = p.waiting
            if all(r.done for r in pending.runs):  # type: ignore[union-attr]
                p.waiting = None
                p.resolved = pending.finish(pending.runs)  # type: ignore[union-attr]

    def advance(self, p: Particle) -> None:
        """Runs ``p``'s program until it waits on a model, branches, dies or returns."""
        if p.done or p.waiting is not None:
            return
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
                    return
                name = self._name(p, eff.name)
                if p._cursor < len(p.trace):
                    self._replay(p, eff, name)
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
                if len(p.trace) >= self.max_sites:
                    raise ProgramError(
                        f"program {p.program.name!r} reached {self.max_sites} sites at "
                        f"{name!r}; is a loop unbounded? Raise max_sites if this is intended"
                    )
                try:
                    out = self.policy.resolve(self, p, eff, name)
                except LMCascadeError as err:
                    raise at_site(name, err) from None
            if isinstance(out, Site):
                p._current = None
                self.record(p, out)
                if p.done:
                    return
            else:
                p.waiting = out
                return

    def _next_effect(self, p: Particle) -> Effect | None:
        """The program's next effect, or None once it has returned (recorded as done)."""
        try:
            eff, p._scope = send(p._gen, p._send, p._scope)
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
            last = p.trace.sites[-1].name if p._cursor else None
            where = f"after site {last!r}" if last else "before its first site"
            hint = (
                " Compose sub-programs with `yield from sub(...)`."
                if isinstance(eff, BoundProgram)
                else ""
            )
            raise BadYieldError(
                f"program {p.program.name!r} yielded {eff!r} ({type(eff).__name__}) {where}; "
                f"yield effects such as lc.sample, lc.observe, lc.factor, lc.condition, "
                f"lc.call or lc.gen.{hint}"
            )
        return eff

    def record(self, p: Particle, site: Site) -> None:
        """Appends a new site to ``p``'s trace and sends its value to the program next."""
        p.trace.add(site)
        p._cursor += 1
        p._send = site.value if site.kind in ("sample", "call") else None
        if self.stop_dead and p.trace.log_weight == -math.inf:
            p.dead = True
            p.trace.done = True
            p.close()

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
    def _replay(p: Particle, eff: Effect, name: str) -> None:
        site = p.trace.sites[p._cursor]
        diverged = site.name != name or site.kind != eff.kind
        if not diverged and is_lm(site.dist) and is_lm(getattr(eff, "dist", None)):
            diverged = site.dist.prompt != eff.dist.prompt  # type: ignore[attr-defined]
        if diverged:
            raise ReplayDivergenceError(
                f"program {p.program.name!r} diverged on replay at site #{p._cursor}: recorded "
                f"{site.kind} {site.name!r}, program now yields {eff.kind} {name!r}"
                + (" with a different prompt" if site.name == name else "")
                + "; a program must be deterministic given its site values (draw randomness "
                "with lc.sample, not random/numpy)"
            )
        p._cursor += 1
        p._send = site.value if site.kind in ("sample", "call") else None
