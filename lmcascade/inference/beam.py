"""Beam search over a whole program, and stochastic beam search (Gumbel-top-k).

**Beam search** (``method="beam"``) keeps the ``beam_width`` best partial traces, ranked by
the trace's joint log-weight so far under the program's target: the log-probabilities of its
LM tokens (under each site's shaped distribution) and scalar choices, plus every observe,
factor and condition — never a site's potential, which only steers SMC (so width 1 is greedy
decoding whatever the potentials).  It runs on the engine's one loop, like every method: at
each decoding step the :class:`~lmcascade.samplers.TopK` sampler ranks every (beam, token)
pair of a model call together and gives the ``2 * beam_width`` best their children (forks of
the beam's model context, sharing the cache: rows are gathered by index in the next call,
never copied per beam); scalar choices branch on every value (as in enumeration); and the
:class:`BeamSchedule` keeps the best beams after each step — one batched model call per model
per step for all beams.  Finished traces are scored ``log_weight / length **
length_penalty`` (``length``: the tokens generated over all LM sites, eos included) and the
best ``beam_width`` are returned, best first.  The rules are Hugging Face's
(``generate(num_beams=W, do_sample=False)``, ``early_stopping=False``): per step the best
``2W`` candidates; a candidate that finished the program becomes a hypothesis only if it
ranks within the first ``W``; the best ``W`` unfinished ones go on; the search stops when
``W`` hypotheses are held and no running beam's score (at its current length) beats the
worst of them, or when nothing runs.

**Stochastic beam search** (``stochastic=True``; Kool, van Hoof and Welling 2019) draws
``beam_width`` distinct traces *without replacement* from the program's proposal: every node
of the tree of choices gets a perturbed value, a Gumbel at its log-probability, conditioned
top-down so that the largest value among a node's children equals the node's own; the
search keeps the ``beam_width`` nodes of largest value, which ends with the ``k`` leaves of
largest value (the Gumbel-top-k trick).  The proposal ``q`` is what the choices are drawn
from (each LM site's shaped, constraint-masked — for a power target, tempered — token
distribution, and each scalar choice's distribution); everything else is an importance weight
``w(y) = gamma(y) / q(y)``, ``gamma`` the program's unnormalised target (``p / q`` of
constrained or powered tokens, observes, factors, conditions).  A kept leaf ``y`` is included
with probability ``q_incl(y) = 1 - exp(-exp(phi_y - kappa))`` given ``kappa``, the largest
perturbed value among everything pruned (the ``(k+1)``-th largest leaf value;
``q_incl = 1`` when nothing was pruned), ``phi_y = log q(y)``.  So ``result.log_weights =
phi_y + log w(y) - log q_incl(y)``, ``result.expectation(f)`` (their exponentials times ``f``)
is unbiased for ``sum_y gamma(y) f(y) = Z * E_posterior[f]`` and ``exp(log_evidence)`` (their
sum) for ``Z``.  A leaf whose weight is zero (a failed condition or tool call) is one of the
``k`` samples: it stays in the result with weight zero (its value :data:`~lmcascade.REJECTED`),
and when every kept leaf has weight zero the estimate is 0 (``log_evidence = -inf``) — never
an error, which would bias the estimates of whoever catches it.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["yes", "no", "<eos>"], lambda ctx: [1.0, 0.0, -9.0] if not ctx else [-9, -9, 0])
>>> @lc.program
... def answer():
...     a = yield lc.gen("a", lm, "", max_tokens=2)
...     yield lc.factor("prefer_no", 0.0 if a == "no" else -2.0)
...     return a
>>> r = lc.infer(answer(), method="beam", beam_width=2, seed=0)
>>> r.values, [round(float(s), 3) for s in r.log_weights]
(['no', 'yes'], [-1.314, -2.314])
>>> s = lc.infer(answer(), method="beam", beam_width=2, stochastic=True, seed=0)
>>> sorted(s.values), round(s.expectation(lambda v: v == "no"), 4)
(['no', 'yes'], 0.2689)
"""

from __future__ import annotations

import copy
import math
import sys
from typing import Any

import torch

from lmcascade.distributions import is_lm, score, support
from lmcascade.engine import Engine, Particle, Schedule
from lmcascade.errors import AllWeightsZeroError, NotEnumerableError, OptionError
from lmcascade.inference.base import InferenceMethod, register
from lmcascade.inference.enumerate import Bounded
from lmcascade.policy import Policy
from lmcascade.program import BoundProgram
from lmcascade.requests import Pending, generation
from lmcascade.result import Result
from lmcascade.samplers import GumbelTopK, TopK
from lmcascade.samplers.topk import Node, truncated_gumbel
from lmcascade.trace import Site, error_text, safe_repr

__all__ = [
    "Beam",
    "BeamEngine",
    "BeamPolicy",
    "BeamSchedule",
    "GumbelSchedule",
    "inclusion_log_prob",
    "target_log_weight",
]

LENGTH_PENALTY_RANGE = 100.0
"""``length_penalty`` must lie within ``[-100, 100]``: far beyond any useful value (Hugging
Face's default is 1; useful ones lie within a few units of 0), and ``length **
length_penalty`` stays within a float's range up to about 1,200 generated tokens (at 1000 it
leaves it from 3 tokens on, and the scores would rank nothing).  Past that range a score is
still a finite float (:meth:`BeamSchedule.final_score`)."""


def generated_tokens(p: Particle) -> int:
    """The tokens ``p`` has generated over all its LM sites (finished or in progress)."""
    n = sum(len(s.token_ids) for s in p.trace.sites if s.kind == "sample" and is_lm(s.dist))
    if p.waiting is not None:
        n += sum(len(r.tokens) for r in p.waiting.runs)
    return n


def target_log_weight(p: Particle) -> float:
    """``p``'s log-weight under the program's target: :attr:`Particle.log_weight` without the
    twist of a site in progress (a potential steers SMC only; beam search ranks by the target).

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["a", "<eos>"], lambda ctx: [0.0, 0.0])
    >>> @lc.program
    ... def steered():
    ...     return (yield lc.gen("x", lm, "", max_tokens=2, potential=lambda text: 5.0))
    >>> p = Particle(steered())
    >>> _ = Engine().advance(p)
    >>> p.log_weight, target_log_weight(p)
    (5.0, 0.0)
    """
    lw = p.trace.log_weight + p.log_offset
    if p.waiting is not None:
        for r in p.waiting.runs:
            if r.log_prob == -math.inf:
                return -math.inf
            lw += r.log_prob - r.log_q
    return lw


def capped(dist: Any, max_tokens: int | None) -> Any:
    """``dist`` with at most ``max_tokens`` tokens (its ``min_tokens`` lowered to fit)."""
    if max_tokens is None or dist.max_tokens <= max_tokens:
        return dist
    out = copy.copy(dist)
    out.max_tokens = max_tokens
    out.min_tokens = min(dist.min_tokens, max_tokens)
    return out


class BeamPolicy(Policy):
    """Resolves sites for beam search: an LM site becomes a generation (its ``max_tokens``
    capped at ``max_tokens``); a scalar choice branches on every value of non-zero
    probability.  Deterministic beam records a value with proposal log-prob 0 (the weight is
    the joint probability); stochastic beam (``gen`` given) records the choice's own
    log-prob as its proposal (it is drawn from the prior) and gives each alternative its
    perturbed value (a :class:`~lmcascade.samplers.topk.Node`; see :class:`BeamEngine`).

    >>> BeamPolicy(max_tokens=8).max_tokens
    8
    """

    def __init__(self, max_tokens: int | None = None, gen: torch.Generator | None = None) -> None:
        self.max_tokens = max_tokens
        self.gen = gen
        self.current: Particle | None = None  # the particle being advanced
        self.nodes: dict[int, Node] = {}  # id(alternative site) -> its node

    def sample(self, eff: Any, name: str) -> Site | Pending | list[Site]:
        dist = eff.dist
        if is_lm(dist):
            return generation(name, capped(dist, self.max_tokens))
        if not getattr(dist, "has_enumerate_support", False) or tuple(dist.batch_shape) != ():
            raise NotEnumerableError(
                f"site {name!r}: {type(dist).__name__} has no finite support to branch on; beam "
                "search handles LM sites and scalar Categorical/Bernoulli-like choices — use "
                "'smc' or 'importance' for a program with continuous choices"
            )
        found = [(v, lp) for v in support(dist) if (lp := score(dist, v)) > -math.inf]
        if self.gen is None:
            return [Site(name, "sample", v, lp, 0.0, dist=dist) for v, lp in found]
        sites = [Site(name, "sample", v, lp, lp, dist=dist) for v, lp in found]
        if not sites or self.current is None:
            return sites
        node = self.current.tag
        phis = torch.tensor([node.phi + lp for _, lp in found], dtype=torch.float64)
        keys = truncated_gumbel(phis[None], torch.tensor([node.key]), self.gen)[0].tolist()
        made = [Node(float(f), k) for f, k in zip(phis.tolist(), keys, strict=True)]
        self.current.tag = made[0]  # the particle itself takes the first alternative
        for site, child in zip(sites[1:], made[1:], strict=True):
            self.nodes[id(site)] = child
        return sites


class BeamEngine(Engine):
    """The engine with three additions for beam search.  Before advancing a particle it tells
    the policy which particle it is (stochastic: a scalar choice's alternatives need the
    parent's node), and a particle branched off on an alternative takes that alternative's
    node.  Deterministic: a particle waiting on a site gives its runs its target log-weight
    before the site as ``run.tag``, so that :class:`~lmcascade.samplers.TopK` ranks the
    children of all beams together.  After a step, the particles whose runs the sampler left
    without a child (cut by rank, not by weight) go into ``pruned``, for the schedule to drop.

    >>> BeamEngine(BeamPolicy(), TopK(2)).pruned
    []
    """

    def __init__(
        self, policy: BeamPolicy, sampler: TopK | GumbelTopK, seed: int | None = None
    ) -> None:
        super().__init__(policy, sampler=sampler, seed=seed)
        self.pruned: list[Particle] = []

    def advance(self, p: Particle) -> list[Particle]:
        policy = self.policy
        assert isinstance(policy, BeamPolicy)
        if p.resolved is not None and id(p.resolved) in policy.nodes:
            p.tag = policy.nodes.pop(id(p.resolved))
        policy.current = p
        born = super().advance(p)
        if policy.gen is None and p.waiting is not None:
            before = p.trace.log_weight + p.log_offset
            for run in p.waiting.runs:
                run.tag = before
        return born

    def step(self, particles):
        runs_of = [(p, list(p.waiting.runs)) for p in particles if p.waiting is not None]
        cut = self.sampler.pruned  # type: ignore[attr-defined]
        cut.clear()
        born = super().step(particles)
        if cut:
            gone = {id(r) for r in cut}
            cut.clear()
            self.pruned.extend(p for p, runs in runs_of if any(id(r) in gone for r in runs))
        return born

    def drop_pruned(self, particles: list[Particle]) -> list[Particle]:
        """``particles`` without the ones the last step cut by rank (released)."""
        if not self.pruned:
            return particles
        gone = {id(p) for p in self.pruned}
        for p in self.pruned:
            p.release()
        self.pruned.clear()
        return [p for p in particles if id(p) not in gone]


class BeamSchedule(Bounded):
    """Deterministic beam search between decoding steps (Hugging Face's rules; module
    docstring), ranking by :func:`target_log_weight`.  ``hypotheses`` holds ``(score,
    particle)`` of the finished traces kept, best first; particles dropped — by rank, by the
    sampler (:attr:`BeamEngine.pruned`) or dead — are released (their model contexts go back
    at once).

    >>> BeamSchedule(4, 1.0).hypotheses
    []
    """

    def __init__(self, width: int, length_penalty: float) -> None:
        super().__init__(limit=sys.maxsize)  # counts and releases the dead
        self.width = width
        self.length_penalty = length_penalty
        self.hypotheses: list[tuple[float, Particle]] = []
        self.stopped = False

    def final_score(self, p: Particle) -> float:
        """``log_weight / length ** length_penalty`` (length: generated tokens, at least 1;
        ``log_weight``: the target's, see :func:`target_log_weight`), computed as
        ``log_weight * exp(-length_penalty * log(length))`` and kept finite (a score beyond
        the range of a float is the largest float of its sign; one that underflows is 0).

        >>> BeamSchedule(2, 1.0).final_score(Particle(None))
        0.0
        """
        lw = target_log_weight(p)
        if lw == 0 or not math.isfinite(lw):
            return lw
        x = -self.length_penalty * math.log(max(generated_tokens(p), 1))
        log_size = math.log(abs(lw)) + x
        big = sys.float_info.max
        if log_size >= math.log(big):
            return math.copysign(big, lw)
        out = lw * math.exp(x) if abs(x) < 700 else math.copysign(math.exp(log_size), lw)
        return math.copysign(big, lw) if math.isinf(out) else out

    def select(self, engine, particles, waiting):
        running = self.absorb(particles)
        return running, running

    def after_step(self, engine, particles):
        return self.prune(engine.drop_pruned(particles))

    def absorb(self, candidates: list[Particle]) -> list[Particle]:
        """Takes one step's candidates: keeps hypotheses, returns the beams that go on."""
        alive = self.prune(candidates)
        w = self.width
        ranked = sorted(alive, key=lambda p: -target_log_weight(p))  # stable: earlier first
        running: list[Particle] = []
        for rank, p in enumerate(ranked):
            if self.stopped or rank >= 2 * w:
                p.release()
            elif p.done:
                if rank < w:
                    self.hypotheses.append((self.final_score(p), p))
                else:
                    p.release()
            elif len(running) < w:
                running.append(p)
            else:
                p.release()
        self.hypotheses.sort(key=lambda sp: -sp[0])
        for _, p in self.hypotheses[w:]:
            p.release()
        del self.hypotheses[w:]
        if running and len(self.hypotheses) == w:
            worst = self.hypotheses[-1][0]
            if not any(self.final_score(p) > worst for p in running):
                self.stopped = True  # no running beam can improve (HF's heuristic)
                for p in running:
                    p.release()
                running = []
        return running


def inclusion_log_prob(phi: float, kappa: float) -> float:
    """``log(1 - exp(-exp(phi - kappa)))``: the log-probability that a leaf of log-prob
    ``phi`` is among the kept ``k`` given the threshold ``kappa`` (0 when ``kappa`` is
    ``-inf``: nothing was pruned).

    >>> inclusion_log_prob(-1.0, float("-inf")), round(inclusion_log_prob(0.0, 0.0), 4)
    (0.0, -0.4587)
    """
    if kappa == -math.inf:
        return 0.0
    x = phi - kappa
    if x > 50:
        return 0.0
    return math.log(-math.expm1(-math.exp(x)))


class GumbelSchedule(Schedule):
    """Stochastic beam search between decoding steps: a particle's ``tag`` is its node of the
    Gumbel process; after a step the particles the sampler left without a child are dropped
    (their nodes ranked below the ``k`` it kept) and each child takes the node the sampler
    made for its token; before the next step the ``k`` nodes of largest perturbed value are
    kept (finished leaves included) and the largest value pruned is folded into ``kappa``.

    >>> GumbelSchedule(3).kappa
    -inf
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.kept: list[Particle] = []  # finished leaves among the k
        self.kappa = -math.inf

    def after_step(self, engine, particles):
        particles = engine.drop_pruned(particles)
        parents = []
        for p in particles:
            node = p.tag
            if not node.children:
                continue
            parents.append(node)
            if p.waiting is not None and p.waiting.runs:
                tokens = p.waiting.runs[0].tokens
            else:
                tokens = p.resolved.token_ids if p.resolved is not None else ()
            child = node.children.get(tokens[-1]) if tokens else None
            if child is not None:
                p.tag = child
                if p.waiting is not None:
                    for run in p.waiting.runs:
                        run.tag = child
        for node in parents:
            node.children = {}
        return particles

    def select(self, engine, particles, waiting):
        running = self.absorb(particles)
        return running, running

    def absorb(self, particles: list[Particle]) -> list[Particle]:
        """Keeps the ``k`` nodes of largest value; returns the unfinished ones."""
        frontier = sorted(self.kept + particles, key=lambda p: -p.tag.key)
        for p in frontier[self.k :]:
            self.kappa = max(self.kappa, p.tag.key)
            p.release()
        keep = frontier[: self.k]
        self.kept = [p for p in keep if p.done]
        return [p for p in keep if not p.done]


def gumbel(gen: torch.Generator) -> float:
    """One standard Gumbel draw."""
    return -math.log(float(torch.empty((), dtype=torch.float64).exponential_(generator=gen)))


@register
class Beam(InferenceMethod):
    """Beam search (``stochastic=False``) or stochastic beam search (``stochastic=True``) over
    a program with finite choices; see the module docstring and ``docs/beam.md``.

    Options: ``beam_width`` (W, the beams kept; stochastic: the number of samples);
    ``length_penalty`` (deterministic only: a finished trace scores
    ``log_weight / length ** length_penalty``, from -100 to 100; 0, the default, ranks by the
    joint log-weight itself — Hugging Face's default is 1.0); ``max_tokens`` (caps every LM site's
    ``max_tokens`` for the search: a generation cut there ends as if the site had that
    limit, and is scored as such); ``stochastic``.

    >>> Beam(beam_width=3).config["length_penalty"]
    0.0
    """

    name = "beam"
    options = {"beam_width": 4, "length_penalty": 0.0, "max_tokens": None, "stochastic": False}

    def check_options(self) -> None:
        w = self.population("beam_width")
        lp = self.config["length_penalty"]
        bound = LENGTH_PENALTY_RANGE
        if (
            isinstance(lp, bool)
            or not isinstance(lp, int | float)
            or not math.isfinite(lp)
            or abs(lp) > bound
        ):
            raise OptionError(
                f"method 'beam': option length_penalty must be a number from {-bound:g} to "
                f"{bound:g} (0 ranks by the joint log-weight; Hugging Face's default is 1.0; "
                f"useful values lie within a few units of 0), got {safe_repr(lp, 100)}"
            )
        if self.config["max_tokens"] is not None:
            self.positive_int("max_tokens")
        if not isinstance(self.config["stochastic"], bool):
            raise OptionError(
                "method 'beam': option stochastic must be True or False, got "
                f"{safe_repr(self.config['stochastic'], 100)}"
            )
        if self.config["stochastic"] and lp != 0:
            raise OptionError(
                "method 'beam': option length_penalty applies to deterministic beam search "
                "only; stochastic beam samples by probability — leave length_penalty at 0"
            )
        # what a step really holds: the candidates (2W; stochastic: k) and the W finished
        # traces or kept leaves — per model called in the step, plus scalar branches
        at_once = (3 if not self.config["stochastic"] else 2) * w
        self.check_fits(
            at_once,
            lambda need: (
                f"beam_width={w:,} holds up to {at_once:,} particles at a time (the "
                f"candidates of a step and the finished traces), about {need}"
            ),
            "use a narrower beam",
        )

    def run(self, bound: BoundProgram, seed: int) -> Result:
        if self.config["stochastic"]:
            return self.run_stochastic(bound, seed)
        w = self.config["beam_width"]
        engine = BeamEngine(BeamPolicy(self.config["max_tokens"]), TopK(2 * w), seed)
        schedule = BeamSchedule(w, float(self.config["length_penalty"]))
        with self.ticking(schedule, status=lambda ps: f"{len(ps)} beams") as ticking:
            last = engine.run([Particle(bound)], ticking)
        schedule.absorb(last)
        if not schedule.hypotheses:
            raise no_beam_finished(schedule.dead_sample, w)
        stats = dict(engine.stats)
        stats.update(
            num_traces=len(schedule.hypotheses),
            zero_weight_traces=schedule.dead,
            joint_log_weights=[p.log_weight for _, p in schedule.hypotheses],
        )
        return Result(
            [p.trace for _, p in schedule.hypotheses],
            [s for s, _ in schedule.hypotheses],
            stats=stats,
        )

    def run_stochastic(self, bound: BoundProgram, seed: int) -> Result:
        k = self.config["beam_width"]
        sampler = GumbelTopK(k)
        policy = BeamPolicy(self.config["max_tokens"])
        engine = BeamEngine(policy, sampler, seed)
        # one stream for every perturbation on the CPU (the token draws' own, for a CPU model):
        # two generators seeded alike would repeat each other's noise
        gen = policy.gen = engine.generator(torch.device("cpu"))
        schedule = GumbelSchedule(k)
        root = Particle(bound)
        root.tag = Node(0.0, gumbel(gen))
        with self.ticking(schedule, status=lambda ps: f"{len(ps)} beams") as ticking:
            last = engine.run([root], ticking)
        schedule.absorb(last)
        kappa = max(schedule.kappa, sampler.kappa)
        # every kept leaf is one of the k samples, those of weight zero included (their
        # values are REJECTED): leaving them out would bias the estimates
        leaves = sorted(schedule.kept, key=lambda p: -p.tag.key)
        own = [-math.inf if p.dead else p.trace.log_weight for p in leaves]
        log_incl = [inclusion_log_prob(p.tag.phi, kappa) for p in leaves]
        log_weights = [
            p.tag.phi + lw - li if lw > -math.inf else -math.inf
            for p, lw, li in zip(leaves, own, log_incl, strict=True)
        ]
        stats = dict(engine.stats)
        zero = sum(lw == -math.inf for lw in own)
        stats.update(
            num_traces=len(leaves),
            zero_weight_traces=zero,
            threshold=kappa,
            inclusion_log_probs=log_incl,
            perturbed=[p.tag.key for p in leaves],
        )
        if zero == len(leaves):
            log_z = -math.inf
        else:
            log_z = torch.logsumexp(torch.tensor(log_weights, dtype=torch.float64), 0).item()
        return Result(
            [p.trace for p in leaves],
            log_weights,
            log_evidence=log_z,
            stats=stats,
            estimator="horvitz-thompson",
        )


def no_beam_finished(dead: list[Particle], width: int) -> AllWeightsZeroError:
    """Deterministic beam search ended without a finished trace of non-zero weight: every
    beam it kept died.  Says at which sites, and that a wider beam (or an exhaustive or
    sampling method) may find what the narrow one pruned.

    >>> "beam_width=2" in str(no_beam_finished([], 2))
    True
    """
    killers: dict[str, int] = {}
    failed: dict[str, BaseException] = {}
    for p in dead:
        site = next((s for s in p.trace.sites if s.log_weight == -math.inf), None)
        if site is not None:
            killers[site.name] = killers.get(site.name, 0) + 1
            if site.error is not None:
                failed.setdefault(site.name, site.error)
    named = ", ".join(f"{n!r} ({c}x)" for n, c in sorted(killers.items(), key=lambda kv: -kv[1]))
    tool = ""
    if failed:
        name, err = next(iter(failed.items()))
        tool = f" (tool call {name!r} failed, e.g. {error_text(err)})"
    return AllWeightsZeroError(
        f"beam search (beam_width={width}): every beam it kept ended with weight zero "
        f"(zeroed at site {named or 'unknown'}){tool}, so no finished trace remains. The "
        f"search keeps only the {width} best partial traces at each step, so traces of "
        "non-zero weight may have been pruned before their condition was checked — widen "
        "beam_width, or use method='enumerate' (exhaustive) or 'smc'. err.traces holds "
        "the beams that died",
        tuple(p.trace for p in dead),
    )
