"""Arithmetic sampling (Vilnis et al. 2023): token draws driven by one code per particle.

A population of ``N`` particles gets the codes ``c_j = (j / N + u) mod 1`` from one shared
uniform ``u`` (:func:`codes`).  Each particle keeps its code in its ``tag`` (a :class:`Code`,
handed to every LM run it starts as ``run.tag``), and at every decoding step the code picks
the token whose interval of the cumulative distribution of ``q`` (the run's proposal, the
vocabulary in its fixed order) contains it — the inverse-CDF draw of ancestral sampling with
the code in place of a fresh uniform — and is then rescaled to ``[0, 1)`` inside that interval
to drive the next token.  Codes that are close take the same first tokens and part later;
codes ``1/N`` apart sit in different places of the cumulative distribution of whole texts, so
the ``N`` samples rarely repeat, yet every one of them is an exact draw (see :class:`Code`).

Weights are those of ancestral sampling: each token adds ``log p - log q`` (the token *is* a
draw from ``q``), so constraints, temperature, top-k/top-p and importance weights keep their
meaning.  Runs under a Python predicate constraint are drawn by adaptive weighted rejection
(:mod:`lmcascade.samplers.awrs`) from the engine's generator, as ancestral sampling does; their
code is left as it was, which keeps it uniform and independent of that draw.  A run without a
:class:`Code` tag gets a fresh uniform: an ordinary ancestral draw.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> from lmcascade.lm import LMRun
>>> from lmcascade.lm.step import step_runs
>>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, 0.0])   # a third each
>>> runs = [LMRun(lc.LM(lm, "", max_tokens=1)) for _ in range(3)]
>>> for run, c in zip(runs, [0.1, 0.5, 0.9]):
...     run.tag = Code(c)
>>> _ = step_runs(runs, {}, sampler=Arithmetic())
>>> [r.value for r in runs]   # the codes fall in the thirds of the cumulative distribution
['a', 'b', '']
"""

from __future__ import annotations

import math

import torch

from lmcascade.samplers.awrs import awrs_rows, by_rejection
from lmcascade.samplers.base import Draws, Rows, TokenSampler

KEEP_MARGIN = 3
"""Bits of a rescaled code dropped below the float64 precision it can be trusted to."""


class Code:
    """A particle's arithmetic code: a number in ``[0, 1)``, uniform given the particle's past.

    **Why every token is an exact draw.**  Suppose that before a step the code ``C`` is uniform
    on ``[0, 1)`` given everything the particle has done so far.  The step takes the token ``T``
    whose interval ``[F(t-1), F(t))`` of the cumulative distribution of ``q`` holds ``C``, so
    ``P(T = t | past) = q(t)``: a draw from ``q``.  Given ``T = t`` the code is uniform on that
    interval, so ``C' = (C - F(t-1)) / q(t)`` is uniform on ``[0, 1)`` again, given the past and
    ``T``.  By induction every token of every site is a draw from its ``q`` given what came
    before — marginally the particle is an ancestral sample — as long as the first code is
    uniform, which ``(j / N + u) mod 1`` is for every ``j`` when ``u`` is.  Scalar choices are
    drawn from their own distributions with independent randomness, which leaves the code
    uniform given them, so the code goes on into the next LM site unchanged.

    **Precision.**  A float64 code holds 53 bits, and the rescaling by ``1 / q(t)`` spends
    ``log2(1 / q(t))`` of them: after a few dozen tokens nothing would be left.  So after each
    rescaling only the ``k`` high bits of ``C'`` that float64 still resolves are kept
    (``k = 53 - log2(1 / q(t)) - 3``, from 0 to 50) and the bits below are replaced by a fresh
    uniform ``V`` from the engine's seeded generator: ``C'' = (floor(C' 2^k) + V) / 2^k``.  If
    ``C'`` is uniform given the past, its ``k`` high bits are uniform on ``2^k`` values, ``V``
    is independent of everything, so ``C''`` is uniform given the past again (``k`` may depend
    on ``t``: the argument holds for each ``t``).  The code thus always carries full precision.
    The refreshed low bits are the particle's own, not shared; that costs no diversity,
    because two codes of the population that still share a prefix of probability ``P`` differ
    by at least ``1 / (N P)`` after rescaling — far above the refreshed bits for any ``N``
    below about ``2^40``.

    >>> Code(0.25)
    Code(0.25)
    """

    __slots__ = ("value",)

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def __repr__(self) -> str:
        return f"Code({self.value!r})"


def codes(n: int, u: float) -> list[Code]:
    """The ``n`` codes ``(j / n + u) mod 1`` of one population, from one shared uniform ``u``.

    >>> [c.value for c in codes(4, 0.1)]
    [0.1, 0.35, 0.6, 0.85]
    """
    out = []
    for j in range(n):
        c = math.fmod(j / n + u, 1.0)
        out.append(Code(c if c < 1.0 else 0.0))
    return out


def decode(
    logprobs: torch.Tensor, code: torch.Tensor, fresh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of normalised ``logprobs`` chosen by ``code`` (one number in
    ``[0, 1)`` per row), and each row's next code: the code rescaled inside the chosen token's
    interval, its unresolved low bits replaced by ``fresh`` (uniforms, one per row).  Float64,
    on the rows' device; a token of probability zero is never chosen.

    >>> lp = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    >>> tok, nxt = decode(lp, torch.tensor([0.625], dtype=torch.float64),
    ...                   torch.zeros(1, dtype=torch.float64))
    >>> tok.tolist(), [round(c, 6) for c in nxt.tolist()]
    ([1], [0.5])
    """
    probs = logprobs.to(torch.float64).exp()
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    target = code.to(torch.float64)[:, None] * total
    # strictly below the total mass, so the chosen token always has room in the distribution
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    idx = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[1] - 1)
    hi = cdf.gather(1, idx)
    lo = torch.where(idx > 0, cdf.gather(1, (idx - 1).clamp_(min=0)), torch.zeros_like(hi))
    width = (hi - lo).clamp_(min=torch.finfo(torch.float64).tiny)
    rescaled = ((target - lo) / width).clamp_(0.0, 1.0).squeeze(1)
    spent = torch.log2(total / width).squeeze(1)
    keep = (53 - KEEP_MARGIN - torch.ceil(spent)).clamp_(0, 50)
    scale = torch.exp2(keep)
    nxt = (torch.floor(rescaled * scale).clamp_(max=scale - 1) + fresh) / scale
    nxt = nxt.clamp_(max=1.0 - 2.0**-53)
    return idx.squeeze(1), nxt


class Arithmetic(TokenSampler):
    """Each run's token chosen by its particle's :class:`Code` (``run.tag``), which is then
    rescaled for the next token; all runs of a model in one batched operation on its device.
    Weights as ancestral sampling (``log p - log q`` per token).

    A code belongs to one particle: a method that clones particles (resampling) must give each
    clone its own copy, or the shared code would advance once per copy.

    >>> Arithmetic().full_masks   # predicate constraints go to rejection, not to masks
    False
    """

    def choose(self, rows: Rows) -> Draws:
        device = rows.q.device
        n = len(rows.runs)
        fresh = torch.rand(n, generator=rows.generator, device=device, dtype=torch.float64)
        tagged = [isinstance(r.tag, Code) for r in rows.runs]
        if all(tagged):
            given = torch.tensor([r.tag.value for r in rows.runs], dtype=torch.float64)
            code = given.to(device)
        else:  # untagged runs: a fresh uniform, i.e. an ordinary ancestral draw
            own = torch.rand(n, generator=rows.generator, device=device, dtype=torch.float64)
            given = torch.tensor(
                [r.tag.value if t else math.nan for r, t in zip(rows.runs, tagged, strict=True)],
                dtype=torch.float64,
            ).to(device)
            code = torch.where(torch.isnan(given), own, given)
        tokens, nxt = decode(rows.q, code, fresh)
        chosen_p = rows.p.gather(1, tokens[:, None]).squeeze(1)
        chosen_q = rows.q.gather(1, tokens[:, None]).squeeze(1)
        if rows.blocked is not None:
            chosen_p = torch.where(rows.blocked, float("-inf"), chosen_p)
        back = torch.stack(
            [
                tokens.to(torch.float64),
                chosen_p.to(torch.float64),
                chosen_q.to(torch.float64),
                nxt,
            ]
        )
        ids, lps, lqs, codes_after = back.cpu().tolist()
        rejection = {i for i, r in enumerate(rows.runs) if by_rejection(r)}
        if rejection:
            for i, (tok, lp, lq) in awrs_rows(rows, sorted(rejection)).items():
                ids[i], lps[i], lqs[i] = tok, lp, lq
        for i, run in enumerate(rows.runs):
            if tagged[i] and i not in rejection:
                run.tag.value = codes_after[i]
        return Draws([int(t) for t in ids], lps, lqs)
