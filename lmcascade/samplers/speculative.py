"""Speculative sampling: a cheap draft proposes a block of tokens, the target verifies them in
one forward pass, and every token that comes out is an exact draw from the target.

The rule (Leviathan et al. 2023; Chen et al. 2023): the draft proposes ``x_1..x_k`` from its
distributions ``Q_1..Q_k``; the target's distributions ``P_1..P_{k+1}`` at those positions come
from one :meth:`~lmcascade.models.base.LanguageModel.block_logprobs` pass.  Token ``x_i`` is
accepted with probability ``min(1, P_i(x_i) / Q_i(x_i))``; at the first rejection the token is
drawn from ``norm(max(0, P_i - Q_i))`` and the block ends; when all ``k`` are accepted a bonus
token is drawn from ``P_{k+1}``.  Each emitted token is then distributed exactly as ``P`` at its
position.  ``P`` and ``Q`` are both the site's *proposal* distributions after its
temperature, top-k, top-p, ``min_tokens`` (and power target): temperature 0 makes both one-hot,
so the output is the target's greedy decoding token for token.  A draft without
probabilities (prompt lookup) is the case ``Q`` = one-hot.  With ``num_drafts`` > 1 each run
gets several independent drafts, verified together by recursive rejection
(:func:`~lmcascade.samplers.drafts.accept`), each in its own fork of the run's context; a
list of drafts is a chain, each drafted by the next (:class:`~lmcascade.samplers.drafts.DraftChain`).

Rejected draft tokens are rolled back by cropping the target's context (its cache is kept,
nothing is recomputed), and the accepted ones are handed to the run as already in its
context.  Runs whose site the rule cannot serve exactly this way (a constraint, an LM
potential) get an ordinary ancestral draw in the same step.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [1.0, 0.0, -1.0 + 0.3 * len(ctx)])
>>> @lc.program
... def text():
...     return (yield lc.gen("t", lm, "a", max_tokens=6))
>>> r = lc.infer(text(), method="speculative", draft=lm, num_samples=50, seed=0)
>>> r.stats["acceptance_rate"]   # a draft identical to the target is always accepted
1.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lmcascade.errors import OptionError
from lmcascade.lm.run import LMRun
from lmcascade.lm.shaping import proposal_rows, shape_rows
from lmcascade.models.base import Context, LanguageModel
from lmcascade.samplers.ancestral import Ancestral
from lmcascade.samplers.base import Choice, Rows, TokenSampler, seeded_generator
from lmcascade.samplers.drafts import (
    MAX_LOOKAHEAD,
    Draft,
    Drafter,
    PromptLookup,
    Want,
    accept,
    as_drafter,
    check_confidence,
    check_lookahead,
)

MAX_DRAFTS = 16

__all__ = ["MAX_LOOKAHEAD", "PromptLookup", "Speculative", "SpeculativeStats"]


@dataclass
class SpeculativeStats:
    """Counters of a speculative sampler (merged into a result's ``stats``)."""

    target_calls: int = 0  # target passes that verified drafts (with the next-token rows)
    drafted: int = 0  # draft tokens proposed
    tested: int = 0  # positions the target tested a draft token at
    accepted: int = 0  # draft tokens accepted
    emitted: int = 0  # tokens emitted by speculative blocks (accepted + correction/bonus)
    blocks: int = 0
    lookaheads: list[int] = field(default_factory=list)
    draft_calls: list[int] = field(default_factory=list)  # per level of the drafter

    def as_dict(self) -> dict[str, Any]:
        alpha = self.accepted / self.tested if self.tested else math.nan
        k = sum(self.lookaheads) / len(self.lookaheads) if self.lookaheads else math.nan
        predicted = (
            math.nan
            if math.isnan(alpha) or math.isnan(k)
            else (k + 1.0 if alpha == 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha))
        )
        out = {
            "verify_calls": self.target_calls,
            "draft_calls": sum(self.draft_calls),
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "acceptance_rate": alpha,
            "block_efficiency": self.emitted / self.blocks if self.blocks else math.nan,
            "predicted_block_efficiency": predicted,
            "mean_lookahead": k,
        }
        if len(self.draft_calls) > 1:
            out["draft_calls_by_level"] = list(self.draft_calls)
        return out


class Speculative(TokenSampler):
    """Speculative sampling with ``draft``: a model sharing the target's vocabulary,
    ``"prompt_lookup"``, a :class:`~lmcascade.samplers.drafts.Drafter`, or a list of those
    from the most to the least expensive (a chain: each drafted by the next, every level
    exact).  ``lookahead`` tokens per block, grown by one after a block accepted whole and
    shrunk by one after a rejection when ``adaptive``; a model's draft also ends after a
    token it gave less than ``confidence``.  ``num_drafts`` independent drafts per run are
    verified together by recursive rejection.  Runs it cannot serve (a constrained site, an
    LM potential) are drawn by ``fallback`` (ancestral by default).

    The predicted block efficiency ``(1 - alpha^(k+1)) / (1 - alpha)`` in the stats is
    Leviathan et al.'s for one draft; several drafts do better than it.

    >>> Speculative("prompt_lookup", lookahead=4).lookahead
    4
    """

    accept = staticmethod(accept)  # the exact test (a class attribute, for tests to swap)

    def __init__(
        self,
        draft: Any,
        lookahead: int = 4,
        adaptive: bool = True,
        fallback: TokenSampler | None = None,
        num_drafts: int = 1,
        confidence: float | None = None,
    ) -> None:
        self.lookahead = check_lookahead(lookahead)
        if not isinstance(adaptive, bool):
            raise OptionError(f"adaptive must be True or False, got {adaptive!r}")
        if not isinstance(num_drafts, int) or isinstance(num_drafts, bool):
            raise OptionError(f"num_drafts must be a whole number, got {num_drafts!r}")
        if not 1 <= num_drafts <= MAX_DRAFTS:
            raise OptionError(f"num_drafts must be from 1 to {MAX_DRAFTS}, got {num_drafts}")
        self.drafter: Drafter = as_drafter(draft, self.lookahead, check_confidence(confidence))
        self.adaptive = adaptive
        self.num_drafts = num_drafts
        self.counters = SpeculativeStats()
        self.seed: int | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._proposals: dict[int, list[Draft]] = {}
        self._lookaheads: dict[int, int] = {}
        self._fallback = Ancestral() if fallback is None else fallback
        self.full_masks = self._fallback.full_masks  # the masks its fallback draws with
        self._checked: set[int] = set()

    # -- which runs ------------------------------------------------------------------------

    def serves(self, run: LMRun) -> bool:
        """Whether ``run``'s site can be sampled speculatively: no constraint, no LM
        potential (both change the distribution token by token in ways a block must follow)."""
        return run.dist.constraint is None and run.expert is None

    def _check_vocabulary(self, model: LanguageModel) -> None:
        from lmcascade.policy import same_vocabulary

        if id(model) in self._checked:
            return
        for draft in self.drafter.models():
            if not same_vocabulary(draft, model):
                raise OptionError(
                    f"the draft model {draft.name!r} does not share the vocabulary of the "
                    f"target {model.name!r}; speculative sampling needs the same tokenizer "
                    "(or draft='prompt_lookup')"
                )
        self._checked.add(id(model))

    # -- one step ----------------------------------------------------------------------------

    def draft(self, runs: list[LMRun]) -> dict[LMRun, list[list[int]]]:
        """Drafts blocks for every run it serves (batched draft-model calls); the engine
        scores them in the same target pass as the runs' next-token distributions."""
        self._proposals = {}
        wants, owners = [], []
        for run in runs:
            if not self.serves(run):
                continue
            left = run.dist.max_tokens - len(run.tokens) - 1  # room for the bonus token
            if left < 1:
                continue
            self._check_vocabulary(run.model)
            k = min(self._lookaheads.get(id(run), self.lookahead), left)
            ids = [*run.dist.prompt_ids, *run.tokens]
            for j in range(self.num_drafts):
                wants.append(Want((id(run), j), ids, run.dist, len(run.tokens), k))
                owners.append(run)
        live = {w.lane for w in wants}
        self.drafter.retain(live)
        self._lookaheads = {key: k for key, k in self._lookaheads.items() if (key, 0) in live}
        if not wants:
            return {}
        before = self.drafter.all_calls()
        drafts = self.drafter.propose(wants, self._generator)
        after = self.drafter.all_calls()
        spent = [b - a for a, b in zip(before, after, strict=True)]
        c = self.counters
        c.draft_calls = [
            x + y for x, y in zip(c.draft_calls or [0] * len(spent), spent, strict=True)
        ]
        out: dict[LMRun, list[list[int]]] = {}
        for run, (tokens, q) in zip(owners, drafts, strict=True):
            if tokens:
                out.setdefault(run, []).append(tokens)
                self._proposals.setdefault(id(run), []).append((tokens, q))
        return out

    def choose(self, rows: Rows) -> list[list[Choice]]:
        base = self._fallback.choose(rows)
        if not isinstance(base, list):  # one token per run, as columns
            base = [
                [Choice([t], [lp], [lq])]
                for t, lp, lq in zip(base.tokens, base.log_ps, base.log_qs, strict=True)
            ]
        if rows.drafted is None:
            return base
        self.counters.target_calls += 1  # this target pass verified drafts
        todo = []
        for i, run in enumerate(rows.runs):
            found = self._proposals.get(id(run))
            scored = rows.drafted[i]
            if found is None or scored is None:
                continue
            if run in rows.empty:  # nothing allowed here: drop the drafts, keep the stand-in
                self._keep(run, run.ctx, [ctx for ctx, _ in scored], 0)
                continue
            todo.append((i, run, found, scored))
        if not todo:
            return base
        # every drafted row of every run shaped in one call (the site's density and proposal)
        dists, positions, blocks = [], [], []
        for _, run, _, scored in todo:
            for _, block in scored:
                dists += [run.dist] * len(block)
                positions += [len(run.tokens) + 1 + m for m in range(len(block))]
                blocks.append(block)
        flat = torch.cat(blocks).to(rows.p.device)
        density = shape_rows(flat, dists, positions, rows.runs[0].model.eos_id)
        sizes = [len(b) for b in blocks]
        proposals = proposal_rows(density, dists)
        shaped = iter(zip(density.split(sizes), proposals.split(sizes), strict=True))
        for i, run, found, scored in todo:
            mine = [next(shaped) for _ in scored]
            base[i] = [self._verify(run, i, found, scored, mine, rows)]
        return base

    def _keep(self, run: LMRun, chosen: Context, scored: list[Context], accepted: int) -> None:
        """Makes ``chosen`` the run's context, cropped to what it took; drops the others."""
        model = run.model
        for ctx in scored:
            if ctx is not chosen:
                model.crop(ctx, 0)  # a rejected fork: nothing in it is worth keeping
                model.release(ctx)
        run.ctx = chosen
        model.crop(chosen, len(run.dist.prompt_ids) + len(run.tokens) + accepted)

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:  # not the engine's stream: the drafts' own draws
            seed = None if self.seed is None else self.seed + 1
            gen = self._generators[device] = seeded_generator(device, seed)
        return gen

    def _verify(
        self,
        run: LMRun,
        i: int,
        candidates: list[Draft],
        scored: list[tuple[Context, torch.Tensor]],
        shaped: list[tuple[torch.Tensor, torch.Tensor]],
        rows: Rows,
    ) -> Choice:
        """Accepts or corrects the drafts of row ``i`` against the target's rows (``shaped``:
        each draft's rows as the site's density and as its proposal)."""
        densities, targets, raws = [], [], []
        for (_, block), (more, proposal) in zip(scored, shaped, strict=True):
            densities.append(torch.cat([rows.p[i : i + 1], more]))
            targets.append(torch.cat([rows.q[i : i + 1], proposal]).to(torch.float64))
            raws.append(torch.cat([block.new_full((1, block.shape[-1]), math.nan), block]))
        tokens, accepted, which, tested = self.accept(candidates, targets, rows.generator)
        index = torch.tensor(tokens, device=rows.p.device)
        where = torch.arange(len(tokens), device=rows.p.device)
        picked = torch.stack(
            [
                densities[which][where, index].to(torch.float64),
                targets[which][where, index],
                raws[which][where, index].to(torch.float64),
            ]
        )
        lps, lqs, model_lps = picked.cpu().tolist()
        self._keep(run, scored[which][0], [ctx for ctx, _ in scored], accepted)
        n = max(len(t) for t, _ in candidates)
        c = self.counters
        c.drafted += sum(len(t) for t, _ in candidates)
        c.tested += tested
        c.accepted += accepted
        c.emitted += len(tokens)
        c.blocks += 1
        c.lookaheads.append(n)
        if self.adaptive:
            k = self._lookaheads.get(id(run), self.lookahead)
            full = accepted == len(candidates[which][0])
            self._lookaheads[id(run)] = min(k + 1, MAX_LOOKAHEAD) if full else max(k - 1, 1)
        return Choice(tokens, lps, lqs, in_context=accepted, model_log_ps=model_lps)
