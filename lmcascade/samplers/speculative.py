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
probabilities (prompt lookup) is the case ``Q`` = one-hot.

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
from lmcascade.samplers.ancestral import Ancestral, draw
from lmcascade.samplers.base import Choice, Rows, TokenSampler, seeded_generator

MAX_LOOKAHEAD = 32


class PromptLookup:
    """A draft without a model: the tokens that followed the latest earlier occurrence of the
    last ``ngram`` tokens (longest match first, down to one token) in the prompt and the text
    so far.  Free drafts for input-grounded tasks (copying, editing, quoting).

    >>> PromptLookup().propose([5, 6, 7, 8, 5, 6], 3)
    [7, 8, 5]
    >>> PromptLookup().propose([1, 2, 3], 2)
    []
    """

    name = "prompt_lookup"

    def __init__(self, ngram: int = 3) -> None:
        self.ngram = ngram

    def propose(self, ids: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens continuing ``ids`` from its own history (none if no match)."""
        for n in range(min(self.ngram, len(ids) - 1), 0, -1):
            tail = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start : start + n] == tail:
                    return ids[start + n : start + n + k]
        return []


@dataclass
class _Lane:
    """A run's speculative state: its draft context and its current lookahead."""

    ctx: Context | None
    lookahead: int


@dataclass
class SpeculativeStats:
    """Counters of a speculative sampler (merged into a result's ``stats``)."""

    target_calls: int = 0  # target passes that verified drafts (with the next-token rows)
    draft_calls: int = 0
    drafted: int = 0  # draft tokens proposed
    tested: int = 0  # draft tokens the target tested (up to the first rejection)
    accepted: int = 0  # draft tokens accepted
    emitted: int = 0  # tokens emitted by speculative blocks (accepted + correction/bonus)
    blocks: int = 0
    lookaheads: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        alpha = self.accepted / self.tested if self.tested else math.nan
        k = sum(self.lookaheads) / len(self.lookaheads) if self.lookaheads else math.nan
        predicted = (
            math.nan
            if math.isnan(alpha) or math.isnan(k)
            else (k + 1.0 if alpha == 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha))
        )
        return {
            "verify_calls": self.target_calls,
            "draft_calls": self.draft_calls,
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "acceptance_rate": alpha,
            "block_efficiency": self.emitted / self.blocks if self.blocks else math.nan,
            "predicted_block_efficiency": predicted,
            "mean_lookahead": k,
        }


class Speculative(TokenSampler):
    """Speculative sampling with ``draft`` (a model sharing the target's vocabulary, or
    ``"prompt_lookup"``), ``lookahead`` tokens per block, grown by one after a block accepted
    whole and shrunk by one after a rejection when ``adaptive``.

    >>> Speculative("prompt_lookup", lookahead=4).lookahead
    4
    """

    def __init__(self, draft: Any, lookahead: int = 4, adaptive: bool = True) -> None:
        if isinstance(draft, str):
            if draft != "prompt_lookup":
                raise OptionError(
                    f"draft must be a model sharing the target's vocabulary or "
                    f"'prompt_lookup', got {draft!r}"
                )
            draft = PromptLookup()
        elif not isinstance(draft, LanguageModel):
            raise OptionError(
                "draft must be a model sharing the target's vocabulary (ToyLM, TransformersLM"
                f"...) or 'prompt_lookup', got {type(draft).__name__}"
            )
        if not isinstance(lookahead, int) or isinstance(lookahead, bool):
            raise OptionError(f"lookahead must be a whole number, got {lookahead!r}")
        if not 1 <= lookahead <= MAX_LOOKAHEAD:
            raise OptionError(f"lookahead must be from 1 to {MAX_LOOKAHEAD}, got {lookahead}")
        if not isinstance(adaptive, bool):
            raise OptionError(f"adaptive must be True or False, got {adaptive!r}")
        self.drafter = draft
        self.lookahead = lookahead
        self.adaptive = adaptive
        self.counters = SpeculativeStats()
        self.seed: int | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._proposals: dict[int, tuple[list[int], torch.Tensor | None]] = {}
        self._lanes: dict[int, tuple[LMRun, _Lane]] = {}
        self._fallback = Ancestral()
        self._checked: set[int] = set()

    # -- which runs, and their draft state --------------------------------------------------

    def serves(self, run: LMRun) -> bool:
        """Whether ``run``'s site can be sampled speculatively: no constraint, no LM
        potential (both change the distribution token by token in ways a block must follow)."""
        return run.dist.constraint is None and run.expert is None

    def _check_vocabulary(self, model: LanguageModel) -> None:
        from lmcascade.policy import same_vocabulary

        if isinstance(self.drafter, PromptLookup) or id(model) in self._checked:
            return
        if not same_vocabulary(self.drafter, model):
            raise OptionError(
                f"the draft model {self.drafter.name!r} does not share the vocabulary of the "
                f"target {model.name!r}; speculative sampling needs the same tokenizer "
                "(or draft='prompt_lookup')"
            )
        self._checked.add(id(model))

    def _lane(self, run: LMRun) -> _Lane:
        found = self._lanes.get(id(run))
        if found is not None and found[0] is run:
            return found[1]
        lane = _Lane(None, self.lookahead)
        self._lanes[id(run)] = (run, lane)
        return lane

    def _sync(self, run: LMRun, lane: _Lane) -> Context:
        """The draft context holding exactly the run's prompt and tokens."""
        ids = list(run.dist.prompt_ids) + run.tokens
        draft: LanguageModel = self.drafter
        if lane.ctx is None:
            lane.ctx = draft.open(ids)
            return lane.ctx
        have = lane.ctx.ids
        same = 0
        for a, b in zip(have, ids, strict=False):
            if a != b:
                break
            same += 1
        if same < len(have):
            draft.crop(lane.ctx, same)
        lane.ctx.extend(ids[same:])
        return lane.ctx

    def _forget_finished(self) -> None:
        for key, (run, lane) in list(self._lanes.items()):
            if run.done:
                if lane.ctx is not None and not isinstance(self.drafter, PromptLookup):
                    self.drafter.release(lane.ctx)
                del self._lanes[key]

    # -- one step ----------------------------------------------------------------------------

    def draft(self, runs: list[LMRun]) -> dict[LMRun, list[int]]:
        """Drafts a block for every run it serves (batched draft-model calls); the engine
        scores them in the same target pass as the runs' next-token distributions."""
        self._forget_finished()
        self._proposals: dict[int, tuple[list[int], torch.Tensor | None]] = {}
        todo = []
        for run in runs:
            if not self.serves(run):
                continue
            left = run.dist.max_tokens - len(run.tokens) - 1  # room for the bonus token
            if left < 1:
                continue
            self._check_vocabulary(run.model)
            lane = self._lane(run)
            todo.append((run, lane, min(lane.lookahead, left)))
        if not todo:
            return {}
        drafts, q_rows = self._propose(todo)
        out = {}
        for (run, _, _), d, q in zip(todo, drafts, q_rows, strict=True):
            if d:
                out[run] = d
                self._proposals[id(run)] = (d, q)
        return out

    def choose(self, rows: Rows) -> list[list[Choice]]:
        base = self._fallback.choose(rows)
        out = [
            [Choice([t], [lp], [lq])]
            for t, lp, lq in zip(base.tokens, base.log_ps, base.log_qs, strict=True)
        ]
        proposals = getattr(self, "_proposals", {})
        if rows.drafted is None:
            return out
        self.counters.target_calls += 1  # this target pass verified drafts
        for i, run in enumerate(rows.runs):
            found = proposals.get(id(run))
            block = rows.drafted[i]
            if found is None or block is None:
                continue
            if run in rows.empty:  # nothing allowed here: drop the draft, keep the stand-in
                run.model.crop(run.ctx, len(run.dist.prompt_ids) + len(run.tokens))
                continue
            out[i] = [self._verify(run, i, found[0], found[1], block, rows)]
        return out

    def _propose(self, todo) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """Each run's drafted tokens and the draft's proposal rows for them (None: one-hot)."""
        if isinstance(self.drafter, PromptLookup):
            drafts = []
            for run, _, k in todo:
                drafts.append(self.drafter.propose(list(run.dist.prompt_ids) + run.tokens, k))
            return drafts, [None] * len(todo)
        draft: LanguageModel = self.drafter
        gen = self._generator(draft.device)
        ctxs = [self._sync(run, lane) for run, lane, _ in todo]
        drafts: list[list[int]] = [[] for _ in todo]
        q_rows: list[list[torch.Tensor]] = [[] for _ in todo]
        for step in range(max(k for *_, k in todo)):
            active = [j for j, (_, _, k) in enumerate(todo) if step < k]
            if not active:  # every draft ended early (its model allowed nothing)
                break
            raw = draft.next_logprobs([ctxs[j] for j in active])
            self.counters.draft_calls += 1
            dists = [todo[j][0].dist for j in active]
            positions = [len(todo[j][0].tokens) + step for j in active]
            q = proposal_rows(shape_rows(raw, dists, positions, draft.eos_id), dists)
            nothing = torch.isnan(q).any(dim=-1).tolist()  # the draft allows no token here
            q = torch.nan_to_num(q, nan=0.0)
            tokens = draw(q, gen).tolist()
            for row, j in enumerate(active):
                if nothing[row]:
                    todo[j] = (todo[j][0], todo[j][1], step)  # the draft ends here
                    continue
                drafts[j].append(int(tokens[row]))
                q_rows[j].append(q[row])
                ctxs[j].append(int(tokens[row]))
        return drafts, [torch.stack(r) if r else None for r in q_rows]

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:  # not the engine's stream: the draft's own draws
            seed = None if self.seed is None else self.seed + 1
            gen = self._generators[device] = seeded_generator(device, seed)
        return gen

    def _verify(
        self, run: LMRun, i: int, d: list[int], q_rows: torch.Tensor | None, block, rows: Rows
    ) -> Choice:
        """Accepts or corrects the draft ``d`` of row ``i`` against the target's rows."""
        model = run.model
        n = len(d)
        dists = [run.dist] * n
        positions = [len(run.tokens) + 1 + m for m in range(n)]
        p_more = shape_rows(block.to(rows.p.device), dists, positions, model.eos_id)
        nothing = torch.isnan(p_more).any(dim=-1).tolist()
        bonus = True
        if any(nothing):
            # The site allows no token after draft token j + 1.  Every drafted token up to
            # there is still tested (cutting a draft by what it drew would bias it); if all
            # pass, no bonus: the next step meets the dead end and gives weight zero.
            cut = nothing.index(True)
            n, bonus = cut + 1, False
            d, p_more, block = d[:n], p_more[:cut], block[:cut]
            q_rows = None if q_rows is None else q_rows[:n]
        p_rows = torch.cat([rows.p[i : i + 1], p_more])  # the site's log-density, n + 1 rows
        big_p = torch.cat([rows.q[i : i + 1], proposal_rows(p_more, dists)]).to(torch.float64)
        if q_rows is None:  # a draft without probabilities: Q is one-hot
            big_q = torch.full_like(big_p[:n], -math.inf)
            big_q[torch.arange(n), torch.tensor(d, device=big_q.device)] = 0.0
        else:
            big_q = q_rows.to(big_p.device, torch.float64)
        tokens, accepted = self._accept(d, big_p, big_q, rows.generator, bonus)
        index = torch.tensor(tokens, device=p_rows.device)
        where = torch.arange(len(tokens), device=p_rows.device)
        raw = torch.cat([block.new_full((1, block.shape[-1]), math.nan), block])
        raw = raw.to(p_rows.device)
        picked = torch.stack(
            [p_rows[where, index].to(torch.float64), big_p[where, index], raw[where, index]]
        )
        lps, lqs, model_lps = picked.to(torch.float64).cpu().tolist()
        model.crop(run.ctx, len(run.dist.prompt_ids) + len(run.tokens) + accepted)
        c = self.counters
        c.drafted += n
        c.tested += min(accepted + 1, n)
        c.accepted += accepted
        c.emitted += len(tokens)
        c.blocks += 1
        c.lookaheads.append(n)
        lane = self._lane(run)
        if self.adaptive:
            if accepted == n:
                lane.lookahead = min(lane.lookahead + 1, MAX_LOOKAHEAD)
            else:
                lane.lookahead = max(lane.lookahead - 1, 1)
        return Choice(tokens, lps, lqs, in_context=accepted, model_log_ps=model_lps)

    @staticmethod
    def _accept(
        draft: list[int],
        big_p: torch.Tensor,
        big_q: torch.Tensor,
        gen: torch.Generator,
        bonus: bool = True,
    ) -> tuple[list[int], int]:
        """The emitted tokens of one block and how many drafted tokens were accepted (no
        bonus token when the position after the draft allows nothing)."""
        n = len(draft)
        index = torch.tensor(draft, device=big_p.device)
        p_at = big_p[torch.arange(n), index].exp()
        q_at = big_q[torch.arange(n), index].exp()
        u = torch.rand(n, generator=gen, device=gen.device, dtype=torch.float64).to(big_p.device)
        ok = (u * q_at < p_at).tolist()  # u < min(1, p/q), without dividing by zero
        accepted = next((m for m, good in enumerate(ok) if not good), n)
        tokens = list(draft[:accepted])
        if accepted < n:  # the residual norm(max(0, P - Q)) at the first rejection
            residual = (big_p[accepted].exp() - big_q[accepted].exp()).clamp_min(0.0)
            if float(residual.sum()) <= 0:  # P == Q here: the rejection had probability 0
                residual = big_p[accepted].exp()
            tokens.append(int(draw(residual.log()[None], gen)[0]))
        elif bonus:
            tokens.append(int(draw(big_p[n][None], gen)[0]))  # the bonus token
        return tokens, accepted
