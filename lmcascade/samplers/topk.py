"""Beam samplers: the best children of all the runs of a call together (:class:`TopK`), or
those of largest Gumbel-perturbed value, each conditioned on its parent's (:class:`GumbelTopK`,
stochastic beam).

Both rank every (run, token) pair of one model call together and keep the ``k`` best
*overall* — a step creates at most ``k`` children however many runs there are, as Hugging
Face's beam search keeps ``2 * num_beams`` candidates per step, not per beam.  The first child
of a run continues on the run itself, further ones on forks of its context (their caches are
shared, never copied).  A run that has allowed tokens but none among the ``k`` best gets no
child: it is listed in ``pruned`` (so that the beam schedule drops its particle rather than
count it as a trace of weight zero), and the feed phase ends it.  Which children survive
beyond that is the beam schedule's business (:mod:`lmcascade.inference.beam`).

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
from typing import TYPE_CHECKING

import torch

from lmcascade.samplers.base import Choice, Rows, TokenSampler

if TYPE_CHECKING:
    from lmcascade.lm.run import LMRun


def allowed_p(rows: Rows) -> torch.Tensor:
    """``p`` where ``q`` allows the token (and the row is not blocked), ``-inf`` elsewhere."""
    p = rows.p.masked_fill(torch.isneginf(rows.q), float("-inf"))
    if rows.blocked is not None:
        p = p.masked_fill(rows.blocked[:, None], float("-inf"))
    return p


def run_score(run: LMRun) -> float:
    """A run's particle's log-weight under the target so far: ``run.tag`` (a number: the
    particle's weight before this site; 0 when the run has no such tag) plus what the run
    adds, ``log_prob - log_q`` of its tokens.  A potential's twist is left out: beam search
    ranks by the program's target, never by what only steers SMC.

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> from lmcascade.lm import LMRun
    >>> run = LMRun(lc.LM(ToyLM(["a", "<eos>"], lambda ctx: [0.0, 0.0]), "", max_tokens=2))
    >>> run.tag = -1.5
    >>> run_score(run)
    -1.5
    """
    base = run.tag if isinstance(run.tag, int | float) and not isinstance(run.tag, bool) else 0.0
    if run.log_prob == -math.inf:
        return -math.inf
    return float(base) + run.log_prob - run.log_q


def best_overall(scores: torch.Tensor, k: int) -> tuple[list[float], list[int], list[int]]:
    """The ``k`` largest finite entries of ``scores`` (``[runs, vocab]``) over the whole
    tensor, best first: their values, rows and columns (fewer when fewer are finite).

    >>> best_overall(torch.tensor([[0.0, -1.0], [-0.5, float("-inf")]]), 5)
    ([0.0, -0.5, -1.0], [0, 1, 0], [0, 0, 1])
    """
    flat = scores.reshape(-1)
    values, index = torch.topk(flat, min(k, flat.numel()))
    values = values.to(torch.float64).cpu().tolist()
    index = index.cpu().tolist()
    vocab = scores.shape[-1]
    kept = [(v, i) for v, i in zip(values, index, strict=True) if v > -math.inf]
    return [v for v, _ in kept], [i // vocab for _, i in kept], [i % vocab for _, i in kept]


class TopK(TokenSampler):
    """The ``k`` best (run, token) pairs of the call, ranked by the run's particle's
    log-weight so far plus the token's log-probability (:func:`run_score`; Hugging Face's
    ``beam_score + log p``), as children, with ``log_q`` 0: a child's weight is the
    probability of its path, as in enumeration.  So at most ``k`` children exist per call in
    all; a run left without any is put in ``pruned`` (cleared by whoever reads it).  Ties
    go as ``torch.topk`` leaves them.

    >>> TopK(3).k
    3
    """

    full_masks = True  # predicate constraints too: a child must be an allowed token

    def __init__(self, k: int) -> None:
        self.k = k
        self.pruned: list[LMRun] = []

    def choose(self, rows: Rows) -> list[list[Choice]]:
        p = allowed_p(rows)
        p = p.to(torch.float32 if p.device.type == "mps" else torch.float64)
        base = torch.tensor([run_score(r) for r in rows.runs], dtype=p.dtype, device=p.device)
        _, row_of, token_of = best_overall(base[:, None] + p, self.k)
        picked = gather(p, row_of, token_of)
        out: list[list[Choice]] = [[] for _ in rows.runs]
        for i, t, lp in zip(row_of, token_of, picked, strict=True):
            out[i].append(Choice([t], [lp], [0.0]))
        note_pruned(self.pruned, rows.runs, out, torch.isfinite(p).any(dim=-1))
        return out


def gather(table: torch.Tensor, rows: list[int], cols: list[int]) -> list[float]:
    """``table[rows[j], cols[j]]`` for every ``j``, as Python floats (one transfer)."""
    if not rows:
        return []
    index = torch.tensor([rows, cols], dtype=torch.long, device=table.device)
    return table[index[0], index[1]].to(torch.float64).cpu().tolist()


def note_pruned(
    pruned: list[LMRun], runs: list[LMRun], out: list[list[Choice]], possible: torch.Tensor
) -> None:
    """Adds to ``pruned`` the runs that had an allowed token but got no child."""
    flags = possible.cpu().tolist()
    pruned.extend(r for r, c, ok in zip(runs, out, flags, strict=True) if ok and not c)


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
    """Stochastic beam search's token step: every allowed child of every run gets a perturbed
    value (a Gumbel at ``phi + log q(token)`` truncated so that the children's largest equals
    the parent's ``key``; the parent is the run's ``tag``, a :class:`Node`), and the ``k``
    children of largest value among all the runs of the call are returned, with
    ``log_q = log q(token)`` (the choices are drawn from ``q``, so the weight keeps ``p / q``).
    Their nodes go into their parents' ``children`` by token; the largest value *not* kept
    (the ``k + 1``-th of the call) is folded into ``kappa``, the threshold of the inclusion
    probabilities.  A run left without a child is put in ``pruned`` (cleared by whoever reads
    it).

    >>> GumbelTopK(4).kappa
    -inf
    """

    full_masks = True

    def __init__(self, k: int) -> None:
        self.k = k
        self.kappa = -math.inf
        self.pruned: list[LMRun] = []

    def choose(self, rows: Rows) -> list[list[Choice]]:
        q = rows.q.masked_fill(torch.isneginf(allowed_p(rows)), float("-inf"))
        dtype = torch.float32 if q.device.type == "mps" else torch.float64
        nodes: list[Node] = [run.tag for run in rows.runs]
        phi = torch.tensor([n.phi for n in nodes], dtype=dtype, device=q.device)
        top = torch.tensor([n.key for n in nodes], dtype=dtype, device=q.device)
        keys = truncated_gumbel(phi[:, None] + q.to(dtype), top, rows.generator)
        values, row_of, token_of = best_overall(keys, self.k + 1)
        if len(values) > self.k:  # the best child left out: pruned here
            self.kappa = max(self.kappa, values[self.k])
            values, row_of, token_of = values[: self.k], row_of[: self.k], token_of[: self.k]
        lq = gather(q, row_of, token_of)
        lp = gather(rows.p, row_of, token_of)
        out: list[list[Choice]] = [[] for _ in rows.runs]
        for j, (i, tok) in enumerate(zip(row_of, token_of, strict=True)):
            node = nodes[i]
            node.children[tok] = Node(node.phi + lq[j], values[j])
            out[i].append(Choice([tok], [lp[j]], [lq[j]]))
        note_pruned(self.pruned, rows.runs, out, torch.isfinite(keys).any(dim=-1))
        return out
