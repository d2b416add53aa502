"""Beam samplers: each run's best children (:class:`TopK`), or its best children by a
Gumbel-perturbed value conditioned on the parent's (:class:`GumbelTopK`, stochastic beam).

Both give a run several children, as :class:`~lmcascade.samplers.AllChildren` does; the feed
phase continues the extra children on forks of the run's context (their caches are shared,
never copied).  Which children survive is the beam schedule's business
(:mod:`lmcascade.inference.beam`).

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> from lmcascade.lm import LMRun
>>> from lmcascade.lm.step import step_runs
>>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [1.0, 0.0, -5.0])
>>> run = LMRun(lc.LM(lm, "", max_tokens=1))
>>> extra = step_runs([run], {}, sampler=TopK(2))
>>> [run.value] + [r.value for r in extra[run]]
['a', 'b']
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lmcascade.samplers.base import Choice, Rows, TokenSampler


def allowed_p(rows: Rows) -> torch.Tensor:
    """``p`` where ``q`` allows the token (and the row is not blocked), ``-inf`` elsewhere."""
    p = rows.p.masked_fill(torch.isneginf(rows.q), float("-inf"))
    if rows.blocked is not None:
        p = p.masked_fill(rows.blocked[:, None], float("-inf"))
    return p


class TopK(TokenSampler):
    """Every run's ``k`` most probable allowed tokens (by the site's distribution ``p``) as
    children, with ``log_q`` 0: a child's weight is the probability of its path, as in
    enumeration.  Ties go to the lower token id only as far as ``torch.topk`` keeps them.

    >>> TopK(3).k
    3
    """

    full_masks = True  # predicate constraints too: a child must be an allowed token

    def __init__(self, k: int) -> None:
        self.k = k

    def choose(self, rows: Rows) -> list[list[Choice]]:
        p = allowed_p(rows)
        values, index = torch.topk(p, min(self.k, p.shape[-1]), dim=-1)
        values = values.to(torch.float64).cpu().tolist()
        index = index.cpu().tolist()
        return [
            [Choice([t], [lp], [0.0]) for t, lp in zip(ids, lps, strict=True) if lp > -math.inf]
            for ids, lps in zip(index, values, strict=True)
        ]


@dataclass
class Node:
    """A node of the Gumbel process (a particle's state in stochastic beam search): ``phi``,
    the log-probability of its prefix under what the choices are drawn from, and ``key``, its
    perturbed value (a Gumbel with location ``phi``; the largest perturbed value among the
    leaves below it).  ``children`` maps a token to the child node the sampler made.

    >>> Node(0.0, 1.5).children
    {}
    """

    phi: float
    key: float
    children: dict[int, Node] = field(default_factory=dict)


def truncated_gumbel(phi: torch.Tensor, top: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gumbels with locations ``phi`` (last dimension: siblings), conditioned on their maximum
    being ``top`` (one per row): the children's perturbed values given the parent's (Kool,
    van Hoof and Welling 2019, appendix B, in its numerically stable form).  Entries with
    ``phi = -inf`` stay ``-inf``.

    >>> g = torch.Generator().manual_seed(0)
    >>> out = truncated_gumbel(torch.tensor([[-1.0, -0.5, float("-inf")]]), torch.tensor([2.0]), g)
    >>> float(out.max()), bool(out[0, 2] == float("-inf"))
    (2.0, True)
    """
    noise = torch.empty(phi.shape, dtype=phi.dtype, device=phi.device).exponential_(generator=gen)
    g = phi - noise.log()
    finite = torch.isfinite(g)
    z = g.max(dim=-1, keepdim=True).values
    a = torch.where(finite, g - z, torch.full_like(g, -1.0))  # <= 0 where it matters
    log1mexp = torch.where(a > -0.6931, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))
    t = top.to(phi.dtype).reshape(-1, 1).expand_as(g)
    v = t - g + log1mexp
    out = t - torch.relu(v) - torch.log1p(torch.exp(-v.abs()))
    return torch.where(finite, out, torch.full_like(g, float("-inf")))


class GumbelTopK(TokenSampler):
    """Stochastic beam search's token step: every allowed child of a run gets a perturbed
    value (a Gumbel at ``phi + log q(token)`` truncated so that the children's largest equals
    the parent's ``key``; the parent is the run's ``tag``, a :class:`Node`) and the run's ``k``
    children with the largest values are returned, with ``log_q = log q(token)`` (the choices
    are drawn from ``q``, so the weight keeps ``p / q``).  The children's nodes go into the
    parent's ``children`` by token; the largest value among the children *not* returned is
    folded into ``kappa`` (the threshold of the inclusion probabilities).

    >>> GumbelTopK(4).kappa
    -inf
    """

    full_masks = True

    def __init__(self, k: int) -> None:
        self.k = k
        self.kappa = -math.inf

    def choose(self, rows: Rows) -> list[list[Choice]]:
        q = rows.q.masked_fill(torch.isneginf(allowed_p(rows)), float("-inf"))
        dtype = torch.float32 if q.device.type == "mps" else torch.float64
        nodes: list[Node] = [run.tag for run in rows.runs]
        phi = torch.tensor([n.phi for n in nodes], dtype=dtype, device=q.device)
        top = torch.tensor([n.key for n in nodes], dtype=dtype, device=q.device)
        keys = truncated_gumbel(phi[:, None] + q.to(dtype), top, rows.generator)
        width = min(self.k + 1, q.shape[-1])
        values, index = torch.topk(keys, width, dim=-1)
        lq = q.to(torch.float64).gather(1, index).cpu().tolist()
        lp = rows.p.to(torch.float64).gather(1, index).cpu().tolist()
        values, index = values.to(torch.float64).cpu().tolist(), index.cpu().tolist()
        out = []
        for i, node in enumerate(nodes):
            choices = []
            for j in range(width):
                key = values[i][j]
                if key == -math.inf:
                    break
                if j == self.k:  # the best child left out: pruned here
                    self.kappa = max(self.kappa, key)
                    break
                tok = index[i][j]
                node.children[tok] = Node(node.phi + lq[i][j], key)
                choices.append(Choice([tok], [lp[i][j]], [lq[i][j]]))
            out.append(choices)
        return out
