"""Beam search over a whole program, and stochastic beam search (Gumbel-top-k).

**Beam search** (``method="beam"``) keeps the ``beam_width`` best partial traces, ranked by
the trace's joint log-weight so far: the log-probabilities of its LM tokens (under each
site's shaped distribution) and scalar choices, plus every observe, factor and condition.  It
runs on the engine's one loop, like every method: the :class:`~lmcascade.samplers.TopK`
sampler gives each beam its ``2 * beam_width`` best next tokens as children (forks of its
model context, sharing the cache: rows are gathered by index in the next call, never copied
per beam), scalar choices branch on every value (as in enumeration), and the
:class:`BeamSchedule` keeps the best beams after each decoding step — one batched model call
per model per step for all beams.  Finished traces are scored ``log_weight / length **
length_penalty`` (``length``: the tokens generated over all LM sites, eos included) and the
best ``beam_width`` are returned, best first.  The rules are Hugging Face's
(``generate(num_beams=W, do_sample=False)``, ``early_stopping=False``): per step the best
``2W`` candidates; a candidate that finished the program becomes a hypothesis only if it
ranks within the first ``W``; the best ``W`` unfinished ones go on; the search stops when
``W`` hypotheses are held and no running beam's score (at its current length) beats the
worst of them, or when nothing runs.

**Stochastic beam search** (``stochastic=True``; Kool, van Hoof and Welling 2019) draws
``beam_width`` distinct traces *without replacement* from the program's prior: every node
of the tree of choices gets a perturbed value, a Gumbel at its log-probability, conditioned
top-down so that the largest value among a node's children equals the node's own; the
search keeps the ``beam_width`` nodes of largest value, which ends with the ``k`` leaves of
largest value (the Gumbel-top-k trick).  The prior is what the choices are drawn from (each
LM site's shaped, constraint-masked distribution ``q``, and each scalar choice's
distribution); everything else — ``p / q`` of constrained tokens, observes, factors,
conditions — is an importance weight ``w(y)``.  A kept leaf ``y`` is included with
probability ``q_incl(y) = 1 - exp(-exp(phi_y - kappa))`` given ``kappa``, the largest
perturbed value among everything pruned (the ``(k+1)``-th largest leaf value; ``q_incl = 1``
when nothing was pruned), so ``result.log_weights = log p(y) + log w(y) - log q_incl(y)`` and
``result.expectation(f)`` (their exponentials times ``f``) is unbiased for ``E_prior[w f]``
— for a program without weights, ``E_p[f]``; ``exp(log_evidence)`` (their sum) is unbiased
for ``Z``.  A leaf whose weight is zero (a failed condition) is a sample too: it holds its
place among the ``k`` and is left out of the result (``stats["zero_weight_traces"]``).

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
from lmcascade.errors import NotEnumerableError, OptionError
from lmcascade.inference.base import InferenceMethod, register, zero_weight_error
from lmcascade.inference.enumerate import Bounded
from lmcascade.policy import Policy
from lmcascade.program import BoundProgram
from lmcascade.requests import Pending, generation
from lmcascade.result import Result
from lmcascade.samplers import GumbelTopK, TopK
from lmcascade.samplers.topk import Node, truncated_gumbel
from lmcascade.trace import Site, safe_repr

__all__ = ["Beam", "BeamPolicy", "BeamSchedule", "GumbelSchedule", "inclusion_log_prob"]


def generated_tokens(p: Particle) -> int:
    """The tokens ``p`` has generated over all its LM sites (finished or in progress)."""
    n = sum(len(s.token_ids) for s in p.trace.sites if s.kind == "sample" and is_lm(s.dist))
    if p.waiting is not None:
        n += sum(len(r.tokens) for r in p.waiting.runs)
    return n


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
    perturbed value (a :class:`~lmcascade.samplers.topk.Node`; see :class:`TaggingEngine`).

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


class TaggingEngine(Engine):
    """The engine with one addition for stochastic beam: before advancing a particle it tells
    the policy which particle it is (a scalar choice's alternatives need the parent's node),
    and a particle branched off on an alternative takes that alternative's node."""

    def advance(self, p: Particle) -> list[Particle]:
        policy = self.policy
        if isinstance(policy, BeamPolicy):
            if p.resolved is not None and id(p.resolved) in policy.nodes:
                p.tag = policy.nodes.pop(id(p.resolved))
            policy.current = p
        return super().advance(p)


class BeamSchedule(Bounded):
    """Deterministic beam search between decoding steps (Hugging Face's rules; module
    docstring).  ``hypotheses`` holds ``(score, particle)`` of the finished traces kept, best
    first; particles dropped are released (their model contexts go back at once).

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
        """``log_weight / length ** length_penalty`` (length: generated tokens, at least 1)."""
        return p.log_weight / max(generated_tokens(p), 1) ** self.length_penalty

    def select(self, engine, particles, waiting):
        running = self.absorb(particles)
        return running, running

    def absorb(self, candidates: list[Particle]) -> list[Particle]:
        """Takes one step's candidates: keeps hypotheses, returns the beams that go on."""
        alive = self.prune(candidates)
        w = self.width
        ranked = sorted(alive, key=lambda p: -p.log_weight)  # stable: earlier first on a tie
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
    Gumbel process; after a step each child takes the node the sampler made for its token;
    before the next one the ``k`` nodes of largest perturbed value are kept (finished leaves
    included) and the largest value pruned is folded into ``kappa``.

    >>> GumbelSchedule(3).kappa
    -inf
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.kept: list[Particle] = []  # finished leaves among the k
        self.kappa = -math.inf

    def after_step(self, engine, particles):
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
    ``log_weight / length ** length_penalty``; 0, the default, ranks by the joint log-weight
    itself — Hugging Face's default is 1.0); ``max_tokens`` (caps every LM site's
    ``max_tokens`` for the search: a generation cut there ends as if the site had that
    limit, and is scored as such); ``stochastic``.

    >>> Beam(beam_width=3).config["length_penalty"]
    0.0
    """

    name = "beam"
    options = {"beam_width": 4, "length_penalty": 0.0, "max_tokens": None, "stochastic": False}

    def check_options(self) -> None:
        self.population("beam_width")
        lp = self.config["length_penalty"]
        if isinstance(lp, bool) or not isinstance(lp, int | float) or not math.isfinite(lp):
            raise OptionError(
                f"method 'beam': option length_penalty must be a finite number (0 ranks by the "
                f"joint log-weight; Hugging Face's default is 1.0), got {safe_repr(lp, 100)}"
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

    def run(self, bound: BoundProgram, seed: int) -> Result:
        if self.config["stochastic"]:
            return self.run_stochastic(bound, seed)
        w = self.config["beam_width"]
        engine = Engine(BeamPolicy(self.config["max_tokens"]), sampler=TopK(2 * w), seed=seed)
        schedule = BeamSchedule(w, float(self.config["length_penalty"]))
        with self.ticking(schedule, status=lambda ps: f"{len(ps)} beams") as ticking:
            last = engine.run([Particle(bound)], ticking)
        schedule.absorb(last)
        if not schedule.hypotheses:
            raise zero_weight_error(schedule.dead_sample, "beam search (every beam it kept)")
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
        engine = TaggingEngine(policy, sampler=sampler, seed=seed)
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
        leaves = sorted(schedule.kept, key=lambda p: -p.tag.key)
        live = [p for p in leaves if not p.dead and p.trace.log_weight > -math.inf]
        if not live:
            raise zero_weight_error(leaves, "stochastic beam search")
        log_incl = [inclusion_log_prob(p.tag.phi, kappa) for p in live]
        log_weights = [
            p.tag.phi + p.trace.log_weight - li for p, li in zip(live, log_incl, strict=True)
        ]
        stats = dict(engine.stats)
        stats.update(
            num_traces=len(live),
            zero_weight_traces=len(leaves) - len(live),
            threshold=kappa,
            inclusion_log_probs=log_incl,
            perturbed=[p.tag.key for p in live],
        )
        log_z = torch.logsumexp(torch.tensor(log_weights, dtype=torch.float64), 0).item()
        return Result(
            [p.trace for p in live],
            log_weights,
            log_evidence=log_z,
            stats=stats,
            estimator="horvitz-thompson",
        )
