"""Where speculative drafts come from, and the exact test that keeps or corrects them.

A *drafter* proposes a block of tokens continuing a text, each with the distribution it was
drawn from (``None`` for a drafter without probabilities, whose tokens count as one-hot):

- :class:`PromptLookup` — the tokens that followed an earlier occurrence of the text's last
  few tokens (free drafts for copying and editing);
- :class:`ModelDraft` — ancestral draws from a smaller model sharing the target's vocabulary;
- :class:`DraftChain` — a model whose own tokens are drafted by a cheaper drafter and
  verified by it with the same exact test (cascade speculative drafting, each level exact).

:func:`accept` is that test: Leviathan et al.'s rule for one draft, and the recursive
rejection scheme for several (each candidate in turn against the running residual), so the
tokens it emits are exact draws from the target rows whatever the drafts were.

>>> from lmcascade.models import ToyLM
>>> small = ToyLM(["a", "b", "<eos>"], lambda ids: [1.0, 0.0, -3.0])
>>> mid = ToyLM(["a", "b", "<eos>"], lambda ids: [0.5, 0.0, -3.0])
>>> chain = as_drafter([mid, small], lookahead=3)
>>> chain.name, chain.models() == [mid, small]
('toy -> toy', True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmcascade.errors import OptionError
from lmcascade.lm.shaping import proposal_rows, shape_rows
from lmcascade.models.base import Context, LanguageModel
from lmcascade.samplers.ancestral import draw

MAX_LOOKAHEAD = 32

Generators = Callable[[torch.device], torch.Generator]
"""Gives the random stream to draw with on a device."""

Draft = tuple[list[int], "torch.Tensor | None"]
"""Drafted tokens and the log-probability rows they were drawn from (``[len, vocab]``), or
None when the drafter has no probabilities (one-hot)."""


@dataclass
class Want:
    """One draft to make: ``lane`` names whose draft state it continues (a run and which of
    its drafts), ``ids`` the text so far (prompt and tokens), ``dist`` the site whose
    temperature, top-k, top-p and ``min_tokens`` shape the draft, ``position`` how many
    tokens the site has generated, ``k`` how many tokens at most."""

    lane: tuple[int, int]
    ids: list[int]
    dist: Any
    position: int
    k: int


def accept(
    candidates: Sequence[Draft],
    targets: Sequence[torch.Tensor],
    gen: torch.Generator,
    bonus: bool = True,
) -> tuple[list[int], int, int, int]:
    """The exact test of drafted ``candidates`` against the target.

    ``targets[c]`` holds the target's log-probability rows along candidate ``c``: row ``m``
    is the distribution of the token after its first ``m`` tokens (``len + 1`` rows; a NaN
    row: the target allows nothing there).  At each position the candidates that agree with
    what was emitted so far are tested in turn: candidate token ``x`` drawn from ``Q`` is
    accepted with probability ``min(1, r(x) / Q(x))``, where ``r`` starts as the target row
    and becomes ``norm(max(0, r - Q))`` after each rejection; when all are rejected a token
    is drawn from the last ``r`` and the block ends.  When no candidate reaches a position,
    a bonus token is drawn there from the target (unless ``bonus`` is False).  With
    independent candidates every emitted token is an exact draw from the target.

    Returns the emitted tokens, how many of them are accepted draft tokens, a candidate that
    holds those (whose target rows belong to the emitted tokens), and how many positions
    were tested.

    >>> rows = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64))
    >>> g = torch.Generator().manual_seed(0)
    >>> tokens, accepted, which, tested = accept([([1], rows[:1])], [rows], g)
    >>> len(tokens), accepted, which, tested
    (2, 1, 0, 1)
    """
    n = len(candidates)
    device = targets[0].device
    qs = [None if q is None else q.to(device, torch.float64) for _, q in candidates]
    dead, p_at, q_at = [], [], []
    for c, (tokens, _) in enumerate(candidates):
        rows = targets[c]
        dead.append(torch.isnan(rows).any(dim=-1).tolist())
        where = torch.arange(len(tokens), device=device)
        index = torch.tensor(tokens, dtype=torch.long, device=device)
        p_at.append(rows[where, index].exp().tolist())
        q_at.append([1.0] * len(tokens) if qs[c] is None else qs[c][where, index].exp().tolist())
    uniforms = iter(
        torch.rand(
            sum(len(t) for t, _ in candidates) + 1, generator=gen, device=gen.device
        ).tolist()
    )
    alive = list(range(n))
    out: list[int] = []
    tested = 0
    while True:
        m = len(out)
        first = alive[0]
        if dead[first][m]:  # the target allows nothing here: the block ends
            return out, m, first, tested
        row = targets[first][m]
        tries = [c for c in alive if len(candidates[c][0]) > m]
        if not tries:
            if bonus:
                out.append(int(draw(row[None], gen)[0]))
            return out, m, first, tested
        tested += 1
        residual: torch.Tensor | None = None  # None: still the target row itself
        taken = None
        for c in tries:
            x = candidates[c][0][m]
            px = p_at[c][m] if residual is None else float(residual[x])
            if next(uniforms) * q_at[c][m] < px:  # u < min(1, r(x) / Q(x)), never dividing
                taken = x
                break
            base = row.exp() if residual is None else residual
            if qs[c] is None:
                rest = base.clone()
                rest[x] = 0.0
            else:
                rest = (base - qs[c][m].exp()).clamp_min(0.0)
            total = float(rest.sum())
            residual = rest / total if total > 0 else base  # r == Q: rejection had prob. 0
        if taken is None:
            assert residual is not None
            out.append(int(draw(residual.log()[None], gen)[0]))
            return out, m, tries[0], tested
        out.append(taken)
        alive = [c for c in alive if len(candidates[c][0]) > m and candidates[c][0][m] == taken]


class Drafter:
    """Base class: proposes drafts for a batch of :class:`Want`; keeps per-lane state (a
    draft model's context) between steps."""

    name = "drafter"

    def __init__(self) -> None:
        self.calls = 0  # model calls made while drafting

    def propose(self, wants: Sequence[Want], generator: Generators) -> list[Draft]:
        raise NotImplementedError

    def models(self) -> list[LanguageModel]:
        """The models it drafts with (each must share the target's vocabulary)."""
        return []

    def retain(self, lanes: set[tuple[int, int]]) -> None:
        """Drops the state of every lane not in ``lanes``."""

    def all_calls(self) -> list[int]:
        """Model calls made by each level, this one first."""
        return [self.calls]


class PromptLookup(Drafter):
    """A draft without a model: the tokens that followed the latest earlier occurrence of the
    last ``ngram`` tokens (longest match first, down to one token) in the prompt and the text
    so far.  Several drafts come from several occurrences with different continuations.

    >>> PromptLookup().lookup([5, 6, 7, 8, 5, 6], 3)
    [7, 8, 5]
    >>> PromptLookup().lookup([1, 2, 3], 2)
    []
    >>> PromptLookup().lookup_many([1, 2, 1, 3, 1], 2, 3)
    [[3, 1], [2, 1]]
    """

    name = "prompt_lookup"

    def __init__(self, ngram: int = 3) -> None:
        super().__init__()
        if not isinstance(ngram, int) or isinstance(ngram, bool) or ngram < 1:
            raise OptionError(f"prompt lookup's ngram must be a whole number >= 1, got {ngram!r}")
        self.ngram = ngram

    def lookup(self, ids: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens continuing ``ids`` from its own history (none if no match)."""
        found = self.lookup_many(ids, k, 1)
        return found[0] if found else []

    def lookup_many(self, ids: Sequence[int], k: int, count: int) -> list[list[int]]:
        """Up to ``count`` different continuations of ``ids``, most specific match first."""
        ids = list(ids)
        out: list[list[int]] = []
        for n in range(min(self.ngram, len(ids) - 1), 0, -1):
            tail = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start : start + n] == tail:
                    block = ids[start + n : start + n + k]
                    if block and block not in out:
                        out.append(block)
                        if len(out) == count:
                            return out
        return out

    def propose(self, wants: Sequence[Want], generator: Generators) -> list[Draft]:
        count: dict[int, int] = {}
        for w in wants:  # lane j of a run takes its j-th different continuation
            count[w.lane[0]] = max(count.get(w.lane[0], 0), w.lane[1] + 1)
        found: dict[int, list[list[int]]] = {}
        out: list[Draft] = []
        for w in wants:
            run = w.lane[0]
            if run not in found:
                found[run] = self.lookup_many(w.ids, w.k, count[run])
            blocks = found[run]
            out.append((blocks[w.lane[1]][: w.k] if w.lane[1] < len(blocks) else [], None))
        return out


class _Lanes:
    """A model's draft contexts, one per lane, each kept in step with the lane's text by
    cropping to the common prefix and extending (a new lane of a run forks the run's first
    lane, so their shared prefix is not recomputed)."""

    def __init__(self, model: LanguageModel) -> None:
        self.model = model
        self.contexts: dict[tuple[int, int], Context] = {}

    def sync(self, lane: tuple[int, int], ids: Sequence[int]) -> Context:
        ctx = self.contexts.get(lane)
        if ctx is None:
            first = self.contexts.get((lane[0], 0))
            if first is None:
                ctx = self.contexts[lane] = self.model.open(list(ids))
                return ctx
            ctx = self.contexts[lane] = self.model.fork(first)
        have = ctx.ids
        same = 0
        for a, b in zip(have, ids, strict=False):
            if a != b:
                break
            same += 1
        if same < len(have):
            self.model.crop(ctx, same)
        ctx.extend(list(ids[same:]))
        return ctx

    def retain(self, lanes: set[tuple[int, int]]) -> None:
        for lane in [lane for lane in self.contexts if lane not in lanes]:
            self.model.release(self.contexts.pop(lane))


def _draft_rows(raw: torch.Tensor, wants: Sequence[Want], positions: Sequence[int], eos: int):
    """A draft model's raw rows shaped like the sites (their proposal distributions)."""
    dists = [w.dist for w in wants]
    return proposal_rows(shape_rows(raw, dists, list(positions), eos), dists)


class ModelDraft(Drafter):
    """Ancestral drafts from ``model`` (which must share the target's vocabulary), shaped by
    each site's temperature, top-k and top-p; a draft ends early where the model allows
    nothing, or after a token it gave less than ``confidence``.

    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["a", "b", "<eos>"], lambda ids: [0.0, -50.0, -50.0])
    >>> import lmcascade as lc
    >>> want = Want((0, 0), lm.encode("a"), lc.LM(lm, "a", max_tokens=9), 0, 3)
    >>> tokens, rows = ModelDraft(lm).propose([want], lambda device: torch.Generator().manual_seed(0))[0]
    >>> lm.decode(tokens), tuple(rows.shape)
    ('aaa', (3, 3))
    """

    def __init__(self, model: LanguageModel, confidence: float | None = None) -> None:
        super().__init__()
        self.model = model
        self.name = model.name
        self.confidence = confidence
        self.lanes = _Lanes(model)

    def models(self) -> list[LanguageModel]:
        return [self.model]

    def retain(self, lanes: set[tuple[int, int]]) -> None:
        self.lanes.retain(lanes)

    def propose(self, wants: Sequence[Want], generator: Generators) -> list[Draft]:
        gen = generator(self.model.device)
        ctxs = [self.lanes.sync(w.lane, w.ids) for w in wants]
        limits = [w.k for w in wants]
        tokens: list[list[int]] = [[] for _ in wants]
        rows: list[list[torch.Tensor]] = [[] for _ in wants]
        for step in range(max(limits, default=0)):
            active = [j for j, k in enumerate(limits) if step < k]
            if not active:
                break
            raw = self.model.next_logprobs([ctxs[j] for j in active])
            self.calls += 1
            positions = [wants[j].position + step for j in active]
            q = _draft_rows(raw, [wants[j] for j in active], positions, self.model.eos_id)
            nothing = torch.isnan(q).any(dim=-1).tolist()
            q = torch.nan_to_num(q, nan=0.0)
            drawn = draw(q, gen)
            picked = q.gather(1, drawn[:, None])[:, 0].exp().tolist()
            for row, j in enumerate(active):
                if nothing[row]:  # the draft model allows nothing here: the draft ends
                    limits[j] = step
                    continue
                token = int(drawn[row])
                tokens[j].append(token)
                rows[j].append(q[row])
                ctxs[j].append(token)
                if self.confidence is not None and picked[row] < self.confidence:
                    limits[j] = step + 1
        return [(t, torch.stack(r) if r else None) for t, r in zip(tokens, rows, strict=True)]


class DraftChain(Drafter):
    """Cascade speculative drafting: ``model``'s tokens, drafted ``lookahead`` at a time by
    the cheaper ``sub`` drafter and verified by ``model`` in one pass with :func:`accept` —
    so each token is an exact draw from ``model`` (shaped like the site), with its row.

    >>> from lmcascade.models import ToyLM
    >>> import lmcascade as lc
    >>> lm = ToyLM(["a", "b", "<eos>"], lambda ids: [0.0, -50.0, -50.0])
    >>> chain = DraftChain(lm, PromptLookup(), lookahead=2)
    >>> want = Want((0, 0), lm.encode("aaa"), lc.LM(lm, "aaa", max_tokens=9), 0, 4)
    >>> tokens, rows = chain.propose([want], lambda device: torch.Generator().manual_seed(0))[0]
    >>> lm.decode(tokens), chain.calls
    ('aaaa', 2)
    """

    accept = staticmethod(accept)  # the exact test (a class attribute, for tests to swap)

    def __init__(
        self,
        model: LanguageModel,
        sub: Drafter,
        lookahead: int = 4,
        confidence: float | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.sub = sub
        self.lookahead = lookahead
        self.confidence = confidence
        self.name = f"{model.name} -> {sub.name}"
        self.lanes = _Lanes(model)

    def models(self) -> list[LanguageModel]:
        return [self.model, *self.sub.models()]

    def retain(self, lanes: set[tuple[int, int]]) -> None:
        self.lanes.retain(lanes)
        self.sub.retain(lanes)

    def all_calls(self) -> list[int]:
        return [self.calls, *self.sub.all_calls()]

    def propose(self, wants: Sequence[Want], generator: Generators) -> list[Draft]:
        gen = generator(self.model.device)
        out: list[list[int]] = [[] for _ in wants]
        rows: list[list[torch.Tensor]] = [[] for _ in wants]
        ended = [w.k <= 0 for w in wants]
        eos = self.model.eos_id
        while True:
            active = [j for j, w in enumerate(wants) if not ended[j] and len(out[j]) < w.k]
            if not active:
                break
            subs = [
                Want(
                    wants[j].lane,
                    [*wants[j].ids, *out[j]],
                    wants[j].dist,
                    wants[j].position + len(out[j]),
                    min(self.lookahead, wants[j].k - len(out[j])),
                )
                for j in active
            ]
            drafts = self.sub.propose(subs, generator)
            ctxs = []
            for w, (tokens, _) in zip(subs, drafts, strict=True):
                ctx = self.lanes.sync(w.lane, w.ids)
                ctx.extend(tokens)
                ctxs.append(ctx)
            blocks = self.model.block_logprobs(ctxs, [len(t) + 1 for t, _ in drafts])
            self.calls += 1
            for j, w, draft, ctx, block in zip(active, subs, drafts, ctxs, blocks, strict=True):
                positions = [w.position + m for m in range(len(block))]
                target = _draft_rows(block, [w] * len(block), positions, eos).to(torch.float64)
                tokens, accepted, _, _ = self.accept([draft], [target], gen)
                self.model.crop(ctx, len(w.ids) + accepted)
                taken = tokens[: wants[j].k - len(out[j])]
                for m, token in enumerate(taken):
                    out[j].append(token)
                    rows[j].append(target[m])
                    low = self.confidence is not None and target[m, token].exp() < self.confidence
                    if low:
                        ended[j] = True
                        break
                if len(tokens) < accepted + 1:  # the model allows nothing next: it ends here
                    ended[j] = True
        return [(t, torch.stack(r) if r else None) for t, r in zip(out, rows, strict=True)]


def as_drafter(draft: Any, lookahead: int = 4, confidence: float | None = None) -> Drafter:
    """The drafter a ``draft=`` option names: ``"prompt_lookup"``, a model (sharing the
    target's vocabulary), a :class:`Drafter`, or a list of those from the most to the least
    expensive — a chain in which each model is drafted by the rest.

    >>> as_drafter("prompt_lookup").name
    'prompt_lookup'
    """
    if isinstance(draft, Drafter):
        return draft
    if isinstance(draft, str):
        if draft != "prompt_lookup":
            raise OptionError(
                f"draft must be a model sharing the target's vocabulary or 'prompt_lookup', "
                f"got {draft!r}"
            )
        return PromptLookup()
    if isinstance(draft, LanguageModel):
        return ModelDraft(draft, confidence)
    if isinstance(draft, (list, tuple)):
        if not draft:
            raise OptionError("draft=[]: a chain of drafts needs at least one")
        if any(isinstance(d, (list, tuple)) for d in draft):
            raise OptionError(
                "a chain of drafts is one flat list, most expensive first: draft=[mid, small] "
                "or [mid, small, 'prompt_lookup'], not nested lists"
            )
        *models, last = draft
        out = as_drafter(last, lookahead, confidence)
        for model in reversed(models):
            if not isinstance(model, LanguageModel):
                raise OptionError(
                    "in a chain of drafts every draft but the last must be a model (the last "
                    f"may be 'prompt_lookup'), got {type(model).__name__}"
                )
            out = DraftChain(model, out, lookahead, confidence)
        return out
    raise OptionError(
        "draft must be a model sharing the target's vocabulary (ToyLM, TransformersLM...), "
        f"'prompt_lookup', or a list of those (a chain), got {type(draft).__name__}"
    )


def check_lookahead(lookahead: Any) -> int:
    """``lookahead`` checked: a whole number from 1 to :data:`MAX_LOOKAHEAD`."""
    if not isinstance(lookahead, int) or isinstance(lookahead, bool):
        raise OptionError(f"lookahead must be a whole number, got {lookahead!r}")
    if not 1 <= lookahead <= MAX_LOOKAHEAD:
        raise OptionError(f"lookahead must be from 1 to {MAX_LOOKAHEAD}, got {lookahead}")
    return lookahead


def check_confidence(confidence: Any) -> float | None:
    """``confidence`` checked: None or a probability in (0, 1)."""
    if confidence is None:
        return None
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
        raise OptionError(f"confidence must be a probability or None, got {confidence!r}")
    if not 0.0 < confidence < 1.0 or math.isnan(confidence):
        raise OptionError(f"confidence must be between 0 and 1, got {confidence!r}")
    return float(confidence)
