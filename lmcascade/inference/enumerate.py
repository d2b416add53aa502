"""Exact inference by enumerating every trace of a program with finite choices.

LM sites over a small model are expanded token by token (every token with non-zero
probability after temperature, top-k and top-p), batched across all open branches; scalar
choices use the distribution's ``enumerate_support``.  Each complete trace is weighted by its
joint probability (including observes, factors and conditions), so the normalised weights are
the exact posterior and ``log_evidence`` is the exact log Z.  This is the oracle every other
method is tested against.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> inf = float("inf")
>>> lm = ToyLM(["yes", "no", "<eos>"],
...            lambda ctx: [0.0, 0.0, -inf] if len(ctx) == 0 else [-inf, -inf, 0.0])
>>> @lc.program
... def answer():
...     a = yield lc.gen("a", lm, "", max_tokens=2)
...     yield lc.factor("prefer_yes", 0.0 if a == "yes" else -1.0)
...     return a
>>> r = lc.infer(answer(), method="enumerate")
>>> {k: round(v, 4) for k, v in r.distribution().items()}
{'yes': 0.7311, 'no': 0.2689}
"""

from __future__ import annotations

import math

import torch

from lmcascade.distributions import is_lm, score, support
from lmcascade.engine import Branch, Engine, Particle, Policy
from lmcascade.errors import NotEnumerableError, TooManyTracesError
from lmcascade.inference.base import InferenceMethod, register, zero_weight_error
from lmcascade.lm.run import LMRun
from lmcascade.lm.step import constraint_masks, run_logprobs
from lmcascade.program import BoundProgram
from lmcascade.result import Result
from lmcascade.trace import Site


class BranchPolicy(Policy):
    """Leaves every new sample site open for the enumerator to fill with all its values."""

    def sample(self, engine, particle, eff, name):
        return Branch(name, eff)


def expand_lm(dists: list, limit: int, stats: dict) -> list[list[LMRun]]:
    """Every finished generation of each LM distribution, with its log-probability.

    All open branches advance together: one batched model call per model per token depth.
    """
    done: list[list[LMRun]] = [[] for _ in dists]
    frontier = [(i, LMRun(d)) for i, d in enumerate(dists)]
    while frontier:
        groups: dict[int, list[tuple[int, LMRun]]] = {}
        for item in frontier:
            groups.setdefault(id(item[1].model), []).append(item)
        frontier = []
        for items in groups.values():
            runs = [run for _, run in items]
            model = runs[0].model
            proc = run_logprobs(runs, stats)
            mask = constraint_masks(runs, proc)
            if mask is not None:  # a constraint is a condition: disallowed tokens are pruned
                proc = proc.masked_fill(~mask, float("-inf"))
            proc = proc.cpu()
            for (i, run), row in zip(items, proc, strict=True):
                for tok in torch.nonzero(row > -math.inf).flatten().tolist():
                    child = run.branch(model.fork(run.ctx))
                    child.feed(tok, float(row[tok]))
                    if child.done:
                        done[i].append(child)
                    else:
                        frontier.append((i, child))
                run.release()
        if sum(map(len, done)) + len(frontier) > limit:
            raise TooManyTracesError(
                f"enumerating LM site(s) exceeds max_traces={limit} generations; shorten "
                "max_tokens, shrink the vocabulary, or raise max_traces"
            )
    return done


def branch_sites(branch: Branch, lm_runs: list[LMRun] | None) -> list[Site]:
    """One site per value of an open sample site (values of probability zero left out)."""
    dist = branch.effect.dist  # type: ignore[attr-defined]
    if lm_runs is not None:
        return [
            Site(branch.name, "sample", r.value, r.log_prob, 0.0, tuple(r.tokens), dist)
            for r in lm_runs
            if r.log_prob > -math.inf
        ]
    if not getattr(dist, "has_enumerate_support", False) or tuple(dist.batch_shape) != ():
        raise NotEnumerableError(
            f"site {branch.name!r}: {type(dist).__name__} has no finite support to enumerate "
            "(enumerate handles LM sites and scalar Categorical/Bernoulli-like choices); use "
            "a sampling method such as 'importance'"
        )
    sites = []
    for value in support(dist):
        lp = score(dist, value)
        if lp > -math.inf:
            sites.append(Site(branch.name, "sample", value, lp, 0.0, dist=dist))
    return sites


@register
class Enumerate(InferenceMethod):
    """The exact posterior of a program whose random choices are all finite."""

    name = "enumerate"
    options = {"max_traces": 100_000}

    def check_options(self) -> None:
        self.positive_int("max_traces")

    def run(self, bound: BoundProgram, seed: int) -> Result:
        limit = self.config["max_traces"]
        engine = Engine(BranchPolicy(), seed=seed)
        frontier = [Particle(bound)]
        complete: list[Particle] = []
        dead: list[Particle] = []
        while frontier:
            engine.run(frontier)
            open_ = [p for p in frontier if not p.done]
            for p in frontier:
                if p.done:
                    (dead if p.dead else complete).append(p)
            lm_open = [p for p in open_ if is_lm(p.waiting.effect.dist)]  # type: ignore[union-attr]
            expansions = dict(
                zip(
                    map(id, lm_open),
                    expand_lm([p.waiting.effect.dist for p in lm_open], limit, engine.stats),  # type: ignore[union-attr]
                    strict=True,
                )
            )
            frontier = []
            for p in open_:
                branch = p.waiting
                assert isinstance(branch, Branch)
                for site in branch_sites(branch, expansions.get(id(p))):
                    child = Particle(bound, p.trace.copy())
                    child.trace.add(site)
                    frontier.append(child)
                p.close()
                if len(complete) + len(frontier) > limit:
                    raise TooManyTracesError(
                        f"enumeration exceeds max_traces={limit} traces at site "
                        f"{branch.name!r}; raise max_traces or shrink the program's choices"
                    )
        if not complete:
            raise zero_weight_error(dead, "enumeration")
        log_weights = [p.trace.log_weight for p in complete]
        stats = dict(engine.stats)
        stats.update(num_traces=len(complete), zero_weight_traces=len(dead))
        log_z = torch.logsumexp(torch.tensor(log_weights, dtype=torch.float64), 0).item()
        return Result([p.trace for p in complete], log_weights, log_evidence=log_z, stats=stats)
