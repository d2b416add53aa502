"""Priority sampling (Grubisic et al. 2024): deterministic, unique samples, most confident first.

A *branch* is a prefix of decisions — the tokens of LM sites and the values of enumerable
scalar choices, in the order the program makes them — ending in an alternative that was not
taken.  Its *priority* is the log-probability of its decisions: the sum of ``log p`` of each
token under its site's distribution (temperature, top-k/top-p and ``min_tokens`` applied;
constraints allow or forbid, they do not renormalise) and of each scalar choice under its
distribution.  Observes, factors and conditions do not enter the priority.

The first sample completes the empty prefix greedily: it *is* greedy decoding (the most
probable allowed token at every step, the most probable value at every scalar choice, the
first on a tie).  Each completion pushes the alternatives it passes — at every step, up to
``branching`` of the most probable other allowed tokens (values), each with priority
``log p(prefix) + log p(alternative)`` — into a priority queue; each further sample pops the
branch of highest priority (the earliest pushed on a tie) and completes it greedily.

**What it guarantees.**  Samples are distinct traces (every branch ends in a decision no
earlier sample took after the same prefix); the run is deterministic (the seed plays no part
in the choices); the popped priorities are non-increasing — every branch pushed while
completing a branch of priority ``pi`` has priority at most ``pi``, and ``pi`` was the best
in the queue.  The samples' *own* probabilities need not be ordered (a confident prefix can end
in an unlikely suffix).  Every sample's probability is at most its branch's priority.  With
``branching=None`` (every allowed alternative) and ``num_samples`` at least the number of
traces, the samples are every trace of the program; with more, the run stops when the queue
runs out (``stats["exhausted"]`` is then True).

**Weights.**  Each trace's weight is its joint probability under the program (choices,
observes, factors and conditions: the trace's ``log_weight``, as in exact enumeration), so
``distribution()`` renormalises the program's posterior over the traces found, and
``log_evidence`` — the log of the sum of their joint probabilities — is a **lower bound** on
log Z (equal to it once every trace is found).  A trace a condition kills is still a sample,
with weight zero.

**Cost and batching.**  The definition is sequential — sample ``i + 1`` is the best branch of
the queue left by sample ``i`` — and so is this implementation: one completion at a time, one
model call per token it generates.  A forced prefix costs one model call per LM site (its
tokens, with the log-probabilities recorded when they were first found, are fed as one
block).  The queue keeps only branches that can still be popped: at most
``num_samples - i`` after sample ``i``.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [1.0, 0.0, 0.5 if ctx else -9.0])
>>> @lc.program
... def word():
...     return (yield lc.gen("w", lm, "", max_tokens=2))
>>> r = lc.infer(word(), method="priority", num_samples=4)
>>> r.values
['aa', 'ba', 'a', 'ab']
>>> [round(p, 3) for p in r.stats["priorities"]]   # non-increasing
[0.0, -1.313, -1.494, -1.994]
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lmcascade.distributions import is_lm, score, support
from lmcascade.engine import Engine, Particle
from lmcascade.errors import NotEnumerableError, OptionError, ReplayDivergenceError
from lmcascade.inference.base import InferenceMethod, register, zero_weight_error
from lmcascade.policy import Policy
from lmcascade.program import BoundProgram
from lmcascade.requests import Pending, generation
from lmcascade.result import Result
from lmcascade.samplers.base import Choice, Rows, TokenSampler
from lmcascade.trace import Site, safe_repr

Decision = tuple[str, int, float]
"""One decision: the site's name, the token id (LM site) or the index in the support (scalar
choice), and its log-probability."""


class Frontier:
    """The priority queue of branches, best first, holding at most ``room`` of them (the
    pops left: a branch with ``room`` better ones ahead can never be popped, so it is dropped).

    >>> f = Frontier(room=2)
    >>> f.push(-1.0, ("x",)); f.push(-0.5, ("y",)); f.push(-2.0, ("z",))
    >>> f.pop()
    (-0.5, ('y',))
    >>> len(f), f.room
    (1, 1)
    """

    def __init__(self, room: int) -> None:
        self.room = room
        self._items: list[tuple[float, int, Any]] = []
        self._count = 0

    def __len__(self) -> int:
        return len(self._items)

    def push(self, priority: float, branch: Any) -> None:
        """Adds a branch (ties: the earlier pushed stays ahead)."""
        key = (-priority, self._count)
        if len(self._items) >= self.room and (not self._items or key > self._items[-1][:2]):
            return
        bisect.insort(self._items, (-priority, self._count, branch))
        self._count += 1
        del self._items[self.room :]

    def pop(self) -> tuple[float, Any]:
        """The best branch and its priority; one pop less remains."""
        neg, _, branch = self._items.pop(0)
        self.room -= 1
        del self._items[max(self.room, 0) :]
        return -neg, branch


@dataclass
class Path:
    """One completion in progress: the decisions it must replay (``forced``, from its branch),
    those taken so far, their log-probability, and the forced tokens of the LM site in progress
    (fed as a block at the site's first step).

    >>> path = Path((("c", 1, -0.5), ("w", 3, -0.1), ("w", 0, -2.0)))
    >>> path.take("c"), path.take("w")
    ([('c', 1, -0.5)], [('w', 3, -0.1), ('w', 0, -2.0)])
    """

    forced: tuple[Decision, ...]
    cursor: int = 0
    taken: list[Decision] = field(default_factory=list)
    log_prob: float = 0.0
    site: str = ""
    block: list[Decision] = field(default_factory=list)

    def take(self, name: str) -> list[Decision]:
        """The forced decisions of site ``name`` (consecutive in ``forced``); an error if the
        program yields another site where the branch recorded ``name``."""
        out = []
        while self.cursor < len(self.forced) and self.forced[self.cursor][0] == name:
            out.append(self.forced[self.cursor])
            self.cursor += 1
        if not out and self.cursor < len(self.forced):
            raise ReplayDivergenceError(
                f"priority sampling replays site {self.forced[self.cursor][0]!r} next, but the "
                f"program now yields {name!r}; a program must be deterministic given its "
                "choices (draw randomness with lc.sample)"
            )
        return out

    def record(self, decision: Decision) -> None:
        self.taken.append(decision)
        self.log_prob += decision[2]


def alternatives(scores: list[tuple[int, float]], chosen: int, k: int) -> list[tuple[int, float]]:
    """The ``k`` most probable ``(index, log p)`` other than ``chosen`` (ties: lower index).

    >>> alternatives([(0, -1.0), (1, -0.5), (2, -0.5), (3, -math.inf)], 1, 2)
    [(2, -0.5), (0, -1.0)]
    """
    others = [(i, lp) for i, lp in scores if i != chosen and lp > -math.inf]
    return sorted(others, key=lambda il: (-il[1], il[0]))[:k]


class PriorityPolicy(Policy):
    """Scalar choices of the current :class:`Path`: its forced value, else the most probable
    one (its alternatives pushed into the frontier); LM sites get their forced tokens ready
    for :class:`PrioritySampler`.

    >>> from pyro.distributions import Bernoulli
    >>> import lmcascade as lc
    >>> policy = PriorityPolicy(Frontier(room=3), branching=None)
    >>> policy.sample(lc.sample("x", Bernoulli(0.8)), "x").value   # the most probable
    1.0
    >>> priority, branch = policy.frontier.pop()                     # the other one, queued
    >>> branch[0][:2], round(priority, 4)
    (('x', 0), -1.6094)
    """

    def __init__(self, frontier: Frontier, branching: int | None) -> None:
        self.frontier = frontier
        self.branching = branching
        self.path = Path(())

    def sample(self, eff: Any, name: str) -> Site | Pending:
        dist, path = eff.dist, self.path
        if is_lm(dist):
            path.site, path.block = name, path.take(name)
            return generation(name, dist)
        if not getattr(dist, "has_enumerate_support", False) or tuple(dist.batch_shape) != ():
            raise NotEnumerableError(
                f"site {name!r}: priority sampling branches on every choice, but "
                f"{type(dist).__name__} has no finite support to enumerate (it handles LM "
                "sites and scalar Categorical/Bernoulli-like choices); use a sampling method "
                "such as 'forward' or 'smc'"
            )
        values = support(dist)
        scores = [(i, score(dist, v)) for i, v in enumerate(values)]
        forced = path.take(name)
        if forced:
            index = forced[0][1]
        else:
            index = max(scores, key=lambda il: (il[1], -il[0]))[0]
            room = self.frontier.room
            k = room if self.branching is None else min(self.branching, room)
            for i, lp in alternatives(scores, index, k):
                self.frontier.push(path.log_prob + lp, (*path.taken, (name, i, lp)))
        lp = scores[index][1]
        path.record((name, index, lp))
        return Site(name, "sample", values[index], lp, 0.0, dist=dist)


class PrioritySampler(TokenSampler):
    """Each run's forced tokens (a block, at its site's first step), else its most probable
    allowed token, pushing the next most probable allowed ones as branches.  Every token is
    weighed by its probability (``log q = 0``), as greedy decoding is.

    >>> PrioritySampler(Frontier(room=4), branching=2).full_masks
    True
    """

    full_masks = True  # predicate constraints too: the choices must be allowed tokens

    def __init__(self, frontier: Frontier, branching: int | None) -> None:
        self.frontier = frontier
        self.branching = branching

    def choose(self, rows: Rows) -> list[list[Choice]]:
        q = rows.q
        if rows.blocked is not None:
            q = q.masked_fill(rows.blocked[:, None], float("-inf"))
        greedy = q.argmax(dim=-1)
        room = self.frontier.room
        k = min(room if self.branching is None else self.branching, q.shape[-1] - 1, room)
        chosen_p = rows.p.gather(1, greedy[:, None]).squeeze(1)
        if rows.blocked is not None:
            chosen_p = torch.where(rows.blocked, float("-inf"), chosen_p)
        parts = [greedy.to(torch.float64)[:, None], chosen_p.to(torch.float64)[:, None]]
        if k > 0:
            others = q.scatter(1, greedy[:, None], float("-inf"))
            top = others.topk(k, dim=-1)
            alt_p = rows.p.gather(1, top.indices).masked_fill(top.values == -math.inf, -math.inf)
            parts += [top.indices.to(torch.float64), alt_p.to(torch.float64)]
        back = torch.cat(parts, dim=1).cpu().tolist()
        out = []
        for run, row in zip(rows.runs, back, strict=True):
            path: Path = run.tag
            if path.block:
                # the replayed tokens all at once (an LM potential steers one token a step)
                block = path.block[:] if run.expert is None else path.block[:1]
                del path.block[: len(block)]
                for d in block:
                    path.record(d)
                out.append(
                    [Choice([d[1] for d in block], [d[2] for d in block], [0.0] * len(block))]
                )
                continue
            tok, lp = int(row[0]), row[1]
            if k > 0:
                scores = list(zip((int(t) for t in row[2 : 2 + k]), row[2 + k :], strict=True))
                for t, alt_lp in alternatives(scores, tok, k):
                    self.frontier.push(
                        path.log_prob + alt_lp, (*path.taken, (path.site, t, alt_lp))
                    )
            path.record((path.site, tok, lp))
            out.append([Choice([tok], [lp], [0.0])])
        return out


@register
class Priority(InferenceMethod):
    """``num_samples`` distinct traces, most confident first; the first is greedy decoding.

    Options: ``num_samples`` (default 8) and ``branching`` — how many alternatives of each
    decision enter the queue: ``None`` (the default) every allowed one, so the samples are the
    best-first order over all prefixes (the queue never holds more than the samples still to
    take, so this costs one ``topk`` per step); an integer ``k`` keeps only the ``k`` most
    probable alternatives of each decision — less host work per step and samples that branch
    off at more different places, but lower-ranked alternatives are never tried, so the order is
    no longer best-first over every prefix and the whole support may be out of reach.

    >>> Priority(num_samples=3).config["branching"] is None
    True
    """

    name = "priority"
    options = {"num_samples": 8, "branching": None}

    def check_options(self) -> None:
        self.population("num_samples")
        b = self.config["branching"]
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
            raise OptionError(
                f"method {self.name!r}: option branching must be None (every allowed "
                f"alternative) or a positive integer, got {safe_repr(b, 100)}"
            )

    def run(self, bound: BoundProgram, seed: int) -> Result:
        n, branching = self.config["num_samples"], self.config["branching"]
        frontier = Frontier(room=n - 1)
        policy = PriorityPolicy(frontier, branching)
        engine = Engine(policy, sampler=PrioritySampler(frontier, branching), seed=seed)
        particles: list[Particle] = []
        priorities: list[float] = []
        branch: tuple[Decision, ...] = ()
        priority = 0.0
        with self.ticking(status=lambda _: f"{len(particles)}/{n} samples") as schedule:
            while True:
                path = policy.path = Path(branch)
                particle = Particle(bound)
                particle.tag = path
                engine.run([particle], schedule)
                if path.cursor < len(path.forced):
                    raise ReplayDivergenceError(
                        f"program {bound.name!r} ended before its recorded choice at site "
                        f"{path.forced[path.cursor][0]!r} on replay; a program must be "
                        "deterministic given its choices (draw randomness with lc.sample)"
                    )
                particles.append(particle)
                priorities.append(priority)
                if len(particles) == n or not len(frontier):
                    break
                priority, branch = frontier.pop()
        log_weights = [p.trace.log_weight for p in particles]
        if all(lw == -math.inf for lw in log_weights):
            raise zero_weight_error(particles, "priority sampling")
        stats = dict(engine.stats)
        stats.update(
            num_samples=len(particles),
            num_zero_weight=sum(lw == -math.inf for lw in log_weights),
            priorities=priorities,
            exhausted=len(particles) < n,
        )
        log_z = torch.logsumexp(torch.tensor(log_weights, dtype=torch.float64), 0).item()
        return Result([p.trace for p in particles], log_weights, log_evidence=log_z, stats=stats)
