"""Exact log-probabilities of texts under LM distributions, batched over many texts.

``log P(value == text)`` sums every token path the sampler (:class:`~lmcascade.lm.run.LMRun`)
can take that spells the text with its tokens (``model.encode(text)``) and ends with that
text as its value — disjoint sets of paths:

* the text's tokens then eos, or the text's tokens reaching ``max_tokens`` exactly;
* the text's tokens then any continuation that ends the generation on a stop string whose
  first occurrence starts exactly where the text ends: one ending token (" Paris" for the
  stop " ", "\\n\\n" for "\\n") or several (a stop spanning tokens; a token ending in an
  incomplete UTF-8 character, which the detokeniser holds back until the character
  completes), a stop found at the length limit included;
* a prefix of the text's tokens, then a token that finishes the text and goes on ('."'
  after "Hello" for the text "Hello." and the stop '"'), then as above.

Ending tokens are found from token bytes: the tokens whose bytes start with a given prefix
form one range of the vocabulary sorted by bytes, so a path's candidates are a few ranges,
made into a mask on the model's device, and their mass is one masked ``logsumexp`` — never
a Python loop over thousands of tokens.  Continuations that are proper prefixes of a stop
string form a trie walked breadth-first: one batched teacher-forced pass scores every
request's text (and the distributions along it), then one pass per extra depth scores the
open continuations of every request together.  Decoding parameters are applied with
:func:`~lmcascade.lm.shaping.shape_rows`; a constraint must allow every token of a path (the
ending token and eos included) and, for endings by a stop or the length limit, be complete
after the last token, as ``LMRun._finish`` requires.

Limitations: other spellings of the text itself (paths whose tokens end inside the text
other than along ``encode(text)``) are not counted; stop detection is modelled on token
bytes, exact for tokenizers whose text is the concatenation of their tokens' bytes (ToyLM,
byte-level BPE: every registry model).  Without a constraint, a continuation holding a stop
back (an incomplete character after it) ends with the text whatever follows, so its mass
is added whole; with a constraint such continuations are walked token by token, keeping at
most ``MAX_OPEN`` (the most likely) per request and depth — ``stats["text_score_dropped"]``
counts any left out.  A text the tokenizer cannot encode raises ``TokenizationError``.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "b", "bb", "<eos>"], lambda ctx: [0.0] * 4)
>>> d = lc.LM(lm, "a", max_tokens=3, stop="b")
>>> reqs = [TextScore(d, ""), TextScore(d, "a")]
>>> score_texts(reqs)
>>> [round(math.exp(r.log_prob), 4) for r in reqs]  # "" ends on eos, "b" or "bb"
[0.75, 0.1875]
"""

from __future__ import annotations

import bisect
import math
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from lmcascade.constraints import Constraint
from lmcascade.lm.shaping import shape_rows
from lmcascade.models.base import LanguageModel

if TYPE_CHECKING:
    from lmcascade.distributions import LM

MAX_OPEN = 1024  # open continuations kept per request and depth (constrained walks only)

__all__ = ["MAX_OPEN", "TextScore", "score_texts", "text_log_prob"]


class TextScore:
    """One request: ``log_prob`` is filled with ``log P(dist generates exactly text)``."""

    __slots__ = ("dist", "text", "log_prob")

    def __init__(self, dist: LM, text: str) -> None:
        self.dist = dist
        self.text = text
        self.log_prob: float | None = None

    def __repr__(self) -> str:
        return f"TextScore({self.dist!r}, {self.text!r}, log_prob={self.log_prob})"


def text_log_prob(dist: LM, text: str, stats: dict | None = None) -> float:
    """``log P(value == text)`` under LM distribution ``dist`` (see :func:`score_texts`)."""
    req = TextScore(dist, text)
    score_texts([req], stats)
    return req.log_prob  # type: ignore[return-value]


# -- the vocabulary seen as bytes ------------------------------------------------------------


class _Vocab:
    """A model's tokens as bytes, sorted for prefix-range queries (built once per model)."""

    def __init__(self, model: LanguageModel) -> None:
        self.eos = model.eos_id
        self.size = model.vocab_size
        self.device = model.device
        self.concat = getattr(model.tokenizer, "token_text", None) is not None
        raw = model.token_bytes()
        pieces: list[bytes] = []
        for i in range(self.size):
            if i == self.eos:
                pieces.append(b"")
            elif raw[i] is not None:
                pieces.append(raw[i])
            elif self.concat:
                pieces.append(model.tokenizer.token_text(i).encode("utf-8"))
            else:  # special tokens decode to their literal text
                pieces.append(model.decode([i]).encode("utf-8"))
        self.pieces = pieces
        ids = sorted((i for i in range(self.size) if i != self.eos), key=pieces.__getitem__)
        self.keys = [pieces[i] for i in ids]
        self.n = len(ids)
        self.order = torch.tensor(ids, dtype=torch.long, device=self.device)
        self.by_piece: dict[bytes, list[int]] = {}
        for i in ids:
            self.by_piece.setdefault(pieces[i], []).append(i)
        # A token pushed after a character boundary emits its text unless that text is
        # empty or (detokenisers that hold text back) ends in U+FFFD.
        held = [
            i == self.eos or not p or (not self.concat and _decode(p).endswith("\ufffd"))
            for i, p in enumerate(pieces)
        ]
        self.held = torch.tensor(held, dtype=torch.bool, device=self.device)
        # Tokens of continuation bytes only: after held-back bytes they may complete a
        # character, so whether they emit depends on what is pending.
        self.no_lead = [
            i
            for i, p in enumerate(pieces)
            if p and not self.concat and i != self.eos and all(0x80 <= c < 0xC0 for c in p)
        ]

    def prefix_range(self, prefix: bytes) -> tuple[int, int]:
        """Positions in the sorted order of the tokens whose bytes start with ``prefix``."""
        lo = bisect.bisect_left(self.keys, prefix)
        head = prefix.rstrip(b"\xff")
        if not head:
            return lo, self.n
        upper = head[:-1] + bytes([head[-1] + 1])
        return lo, bisect.bisect_left(self.keys, upper, lo)

    def range_mask(self, rows: int, ranges: list[tuple[int, int, int]]) -> torch.Tensor:
        """``[rows, vocab]`` mask of the tokens in ranges ``(row, lo, hi)`` (eos never)."""
        out = torch.zeros(rows, self.size, dtype=torch.bool, device=self.device)
        ranges = [r for r in ranges if r[2] > r[1]]
        if not ranges:
            return out
        diff = torch.zeros(rows, self.n + 1, dtype=torch.int32, device=self.device)
        index = torch.tensor(ranges, dtype=torch.long, device=self.device)
        one = torch.ones(len(ranges), dtype=torch.int32, device=self.device)
        diff.index_put_((index[:, 0], index[:, 1]), one, accumulate=True)
        diff.index_put_((index[:, 0], index[:, 2]), -one, accumulate=True)
        out[:, self.order] = diff.cumsum(dim=1)[:, : self.n] > 0
        return out

    def emits(self, pending: bytes, piece: bytes) -> bool:
        """Whether the detokeniser emits text when ``piece`` follows held-back ``pending``."""
        if self.concat or not piece:
            return bool(piece)
        text = _decode(pending + piece)
        return bool(text) and not text.endswith("\ufffd")


_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vocab(model: LanguageModel) -> _Vocab:
    found = _VOCABS.get(model)
    if found is None:
        found = _VOCABS[model] = _Vocab(model)
    return found


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


# -- requests and open continuations ---------------------------------------------------------


class _Job:
    """A request being scored: its text's tokens and stop strings as bytes."""

    __slots__ = ("req", "dist", "model", "vocab", "ids", "stops", "forbidden", "tail", "good")

    def __init__(self, req: TextScore, vocab: _Vocab, ids: list[int]) -> None:
        dist = req.dist
        self.req = req
        self.dist = dist
        self.model = dist.model
        self.vocab = vocab
        self.ids = ids
        self.stops = [s.encode("utf-8") for s in dist.stop]
        # Continuations that would complete a stop string starting inside the text: its
        # first occurrence would then come before the text's end.
        text = req.text
        forbidden = {
            s[k:].encode("utf-8")
            for s in dist.stop
            for k in range(1, len(s))
            if k <= len(text) and text.endswith(s[:k])
        }
        self.forbidden = sorted(forbidden)
        self.tail = text[-dist.max_stop_len :] if dist.stop else ""
        self.good: list[float] = []  # log-probs of disjoint sets of paths with this value

    def complete(self, cstate: Any) -> bool:
        """Whether the constraint accepts a generation ending (by a stop or the length limit)
        in ``cstate``."""
        c = self.dist.constraint
        return c is None or _trivially_complete(c) or bool(c.complete(self.model, cstate))


def _trivially_complete(c: Any) -> bool:
    return getattr(type(c), "complete", None) is Constraint.complete


class _Open:
    """A path that has not ended the generation and can still end with the text as value:
    the text's first ``base`` tokens, then ``cont``.  While ``need`` is not empty the next
    token must start with those bytes (the rest of the text: a token that ends the text and
    goes on, as ``.\\n`` after ``Hi`` for the text ``Hi.``); ``xb`` are the bytes after the
    text's end."""

    __slots__ = ("job", "base", "need", "cont", "xb", "pending", "lp", "cstate", "decided")

    def __init__(self, job, base, need, cont, xb, pending, lp, cstate, decided) -> None:
        self.job: _Job = job
        self.base: int = base
        self.need: bytes = need
        self.cont: list[int] = cont
        self.xb: bytes = xb
        self.pending: bytes = pending  # bytes the detokeniser holds back
        self.lp: float = lp  # log-prob of the path so far
        self.cstate: Any = cstate
        self.decided: bool = decided  # ``xb`` starts with a stop string (held back)

    @property
    def n_tokens(self) -> int:
        return self.base + len(self.cont)

    def child(self, token: int, xb: bytes, pending: bytes, lp: float, cstate, decided) -> _Open:
        return _Open(
            self.job, self.base, b"", self.cont + [token], xb, pending, lp, cstate, decided
        )


class _Plan:
    """The tokens that matter after an open path: byte-prefix ranges of tokens that start a
    stop string at the text's end (``plus``) minus those completing one that starts inside
    the text (``minus``), single tokens to look at one by one (``watch``: proper prefixes of
    a stop, and held-back stops a longer stop may still overtake), and whether eos ends with
    the text."""

    __slots__ = ("plus", "minus", "watch", "eos")

    def __init__(self, s: _Open, constrained: bool) -> None:
        job, vocab, x, need = s.job, s.job.vocab, s.xb, s.need
        self.plus: list[tuple[int, int]] = []
        self.minus: list[tuple[int, int]] = []
        self.watch: list[tuple[int, str, bytes]] = []  # (token, kind, bytes after the text)
        self.eos = not need and (not x or s.decided)
        overtaken: set[int] = set()
        if s.decided:
            self.plus.append((0, vocab.n))
        else:
            for stop in job.stops:
                if len(stop) > len(x) and stop.startswith(x):
                    self.plus.append(vocab.prefix_range(need + stop[len(x) :]))
        for f in job.forbidden:
            if len(f) > len(x) and f.startswith(x):
                self.minus.append(vocab.prefix_range(need + f[len(x) :]))
                if not constrained:  # a held-back stop a longer one may still overtake
                    rest = f[len(x) :]
                    for k in range(1, len(rest)):
                        for t in vocab.by_piece.get(need + rest[:k], ()):
                            if t not in overtaken:
                                overtaken.add(t)
                                self.watch.append((t, "held", x + rest[:k]))
        self.plus = [r for r in self.plus if r[1] > r[0]]
        if s.decided:
            return
        seen: set[int] = set()
        for stop in job.stops:  # proper prefixes of a stop string: the walk goes on
            if len(stop) <= len(x) or not stop.startswith(x):
                continue
            rest = stop[len(x) :]
            for k in range(1 if need else 0, len(rest)):
                for t in vocab.by_piece.get(need + rest[:k], ()):
                    if t not in seen:
                        seen.add(t)
                        self.watch.append((t, "prefix", x + rest[:k]))

    def empty(self) -> bool:
        return not (self.plus or self.watch or self.eos)


def _count(stats: dict | None, model: LanguageModel, paths: Sequence[Sequence[int]]) -> None:
    if stats is None:
        return
    for key, n in model.pop_counters().items():
        stats[key] = stats.get(key, 0) + n
    stats["model_calls"] = stats.get("model_calls", 0) + 1
    stats["tokens_scored"] = stats.get("tokens_scored", 0) + sum(map(len, paths))


def _prepare(req: TextScore) -> _Job | None:
    """The request's job, or None after setting ``log_prob`` when the text is impossible."""
    dist, text = req.dist, req.text
    model = dist.model
    req.log_prob = -math.inf
    if any(s in text for s in dist.stop):
        return None  # a value is cut before its first stop string
    ids = list(model.encode(text))
    if len(ids) > dist.max_tokens or model.eos_id in ids or model.decode(ids) != text:
        return None
    return _Job(req, _vocab(model), ids)


# -- the passes ------------------------------------------------------------------------------


def score_texts(requests: Sequence[TextScore], stats: dict | None = None) -> None:
    """Fills ``log_prob`` of every request: ``log P(value == text)`` under its LM
    distribution, summed over every way the generation can end with that text (see the
    module's docstring).  One teacher-forced pass per model scores all the texts; each
    further pass scores, for all requests at once, the paths still open (stop strings
    spanning several tokens).  ``stats`` gets ``model_calls``, ``tokens_scored`` and the
    models' counters added."""
    jobs = [job for req in requests if (job := _prepare(req)) is not None]
    groups: dict[int, list[_Job]] = {}
    for job in jobs:
        groups.setdefault(id(job.model), []).append(job)
    frontier = [_text_pass(group, stats) for group in groups.values()]
    while frontier:
        nxt = []
        for states, rows in frontier:
            children = _expand(states, rows, stats)
            if children:
                nxt.append((children, _rows(children, stats)))
        frontier = nxt
    for job in jobs:
        job.req.log_prob = _logsumexp(job.good)


def _text_pass(jobs: list[_Job], stats: dict | None) -> tuple[list[_Open], torch.Tensor]:
    """Scores every job's text tokens, and the distributions along them, in one pass;
    returns the open paths: after the whole text, and after each shorter prefix of its
    tokens where a token can finish the text and go on (a text filling ``max_tokens`` is
    counted here)."""
    model = jobs[0].model
    eos = model.eos_id
    paths = [j.ids + [eos] if len(j.ids) < j.dist.max_tokens else list(j.ids) for j in jobs]
    contexts = [model.open(j.dist.prompt_ids) for j in jobs]
    rows = model.path_logprobs(contexts, paths)
    for ctx in contexts:
        model.release(ctx)
    _count(stats, model, paths)
    dists = [j.dist for j, p in zip(jobs, paths, strict=True) for _ in p]
    positions = [i for p in paths for i in range(len(p))]
    shaped = shape_rows(torch.cat(list(rows)), dists, positions, eos)
    device = shaped.device
    starts = [0]
    for p in paths:
        starts.append(starts[-1] + len(p))
    token_rows = [starts[i] + k for i, j in enumerate(jobs) for k in range(len(j.ids))]
    tokens = [t for j in jobs for t in j.ids]
    chosen = shaped[
        torch.tensor(token_rows, dtype=torch.long, device=device),
        torch.tensor(tokens, dtype=torch.long, device=device),
    ].to(torch.float64)
    # Constraint states along each text; a token its mask forbids has probability zero.
    cstates: list[list[Any]] = []
    masked, mask_rows = [], []
    flat = 0
    for j in jobs:
        c = j.dist.constraint
        state = c.start(model) if c is not None else None
        states = [state]
        for tok in j.ids:
            if c is not None:
                masked.append(flat)
                mask_rows.append(c.mask(model, state))
                state = c.advance(model, state, tok)
            states.append(state)
            flat += 1
        cstates.append(states)
    if masked:
        index = torch.tensor(masked, dtype=torch.long, device=device)
        ok = torch.stack(mask_rows).gather(1, torch.tensor(tokens, device=device)[index, None])
        chosen = chosen.clone()
        chosen[index] = chosen[index].masked_fill(~ok.squeeze(1), -math.inf)
    values = chosen.cpu().tolist()
    roots: list[_Open] = []
    root_rows: list[int] = []
    offset = 0
    for i, j in enumerate(jobs):
        lps = [0.0]
        for v in values[offset : offset + len(j.ids)]:
            lps.append(lps[-1] + v)
        offset += len(j.ids)
        if len(j.ids) == j.dist.max_tokens and lps[-1] > -math.inf:
            if j.complete(cstates[i][-1]):
                j.good.append(lps[-1])  # the text's tokens reach the length limit
        pieces = [j.vocab.pieces[t] for t in j.ids]
        cuts, pendings = [0], [b""]  # bytes so far, and what the detokeniser holds back
        for piece in pieces:
            cuts.append(cuts[-1] + len(piece))
            before = pendings[-1]
            pendings.append(b"" if j.vocab.emits(before, piece) else before + piece)
        text_bytes = b"".join(pieces)
        ends = list(range(len(j.ids))) if text_bytes == j.req.text.encode("utf-8") else []
        if len(j.ids) < j.dist.max_tokens:
            ends.append(len(j.ids))
        constrained = j.dist.constraint is not None
        for k in ends:
            if not lps[k] > -math.inf:
                continue
            need = text_bytes[cuts[k] :]
            s = _Open(j, k, need, [], b"", pendings[k], lps[k], cstates[i][k], False)
            if not need or not _Plan(s, constrained).empty():
                roots.append(s)
                root_rows.append(starts[i] + k)
    return roots, shaped[torch.tensor(root_rows, dtype=torch.long, device=device)]


def _rows(states: list[_Open], stats: dict | None) -> torch.Tensor:
    """The distributions the open paths draw their next token from (one pass)."""
    model = states[0].job.model
    eos = model.eos_id
    contexts = [model.open(s.job.dist.prompt_ids + s.job.ids[: s.base] + s.cont) for s in states]
    paths = [[eos] for _ in states]
    rows = model.path_logprobs(contexts, paths)
    for ctx in contexts:
        model.release(ctx)
    _count(stats, model, paths)
    return shape_rows(
        torch.cat(list(rows)), [s.job.dist for s in states], [s.n_tokens for s in states], eos
    )


CHUNK = 256  # open paths classified together (bounds the [paths, vocab] work tensors)


def _expand(states: list[_Open], rows: torch.Tensor, stats: dict | None) -> list[_Open]:
    """Adds to each job the mass of the next tokens that end its generation with its text,
    and returns the paths that stay open (all of one model), at most ``MAX_OPEN`` a job."""
    children: list[_Open] = []
    for a in range(0, len(states), CHUNK):
        children += _expand_chunk(states[a : a + CHUNK], rows[a : a + CHUNK])
    return _limit(children, stats)


def _expand_chunk(states: list[_Open], rows: torch.Tensor) -> list[_Open]:
    job0 = states[0].job
    vocab, model, eos = job0.vocab, job0.model, job0.vocab.eos
    device = rows.device
    n = len(states)
    constrained = [s.job.dist.constraint is not None for s in states]
    plans = [_Plan(s, constrained[i]) for i, s in enumerate(states)]
    plus = [(i, lo, hi) for i, p in enumerate(plans) for lo, hi in p.plus]
    minus = [(i, lo, hi) for i, p in enumerate(plans) for lo, hi in p.minus]
    starts_stop = vocab.range_mask(n, plus)
    if minus:
        starts_stop &= ~vocab.range_mask(n, minus)
    emits = (~vocab.held).expand(n, -1)
    fixes = [i for i, s in enumerate(states) if s.pending and vocab.no_lead]
    if fixes:  # tokens of continuation bytes may complete a held-back character
        emits = emits.clone()
        ids = torch.tensor(vocab.no_lead, dtype=torch.long, device=device)
        for i in fixes:
            p = states[i].pending
            flags = [vocab.emits(p, vocab.pieces[t]) for t in vocab.no_lead]
            emits[i, ids] = torch.tensor(flags, dtype=torch.bool, device=device)
    at_max = torch.tensor(
        [s.n_tokens + 1 >= s.job.dist.max_tokens for s in states], dtype=torch.bool, device=device
    )[:, None]
    cmask = None
    if any(constrained):
        ones = torch.ones(vocab.size, dtype=torch.bool, device=device)
        cmask = torch.stack(
            [
                s.job.dist.constraint.mask(model, s.cstate) if constrained[i] else ones
                for i, s in enumerate(states)
            ]
        )
    # Ends with the text: a stop found now, or held back when the length limit ends it ...
    good = starts_stop & (emits | at_max)
    # ... or a stop held back before the limit: the value is the text whatever follows.
    held = starts_stop & ~emits & ~at_max
    if cmask is not None:
        good &= cmask
        held &= cmask
    for i, s in enumerate(states):
        c = s.job.dist.constraint
        if c is not None and not _trivially_complete(c) and plans[i].plus:
            ends = torch.nonzero(good[i]).flatten().tolist()
            keep = [t for t in ends if s.job.complete(c.advance(model, s.cstate, t))]
            if len(keep) < len(ends):  # the constraint must be complete after the stop
                good[i] = False
                if keep:
                    good[i, torch.tensor(keep, dtype=torch.long, device=device)] = True
    # eos ends with the text when nothing follows the text, or a stop is held back.
    eos_ok = torch.tensor([p.eos for p in plans], dtype=torch.bool, device=device)
    if cmask is not None:
        eos_ok &= cmask[:, eos]
    good[:, eos] = eos_ok
    pairs = [(i, t, kind, xb) for i, p in enumerate(plans) for t, kind, xb in p.watch]
    free = [i for i, c in enumerate(constrained) if not c]
    if free:
        # Unconstrained, a held-back stop has all the mass of what follows (1), unless a
        # longer stop starting inside the text may still complete (those are walked on).
        settled = held.clone()
        watched = [(i, t) for i, t, kind, _ in pairs if kind == "held"]
        if watched:
            index = torch.tensor(watched, dtype=torch.long, device=device)
            settled[index[:, 0], index[:, 1]] = False
        rows_free = torch.tensor(free, dtype=torch.long, device=device)
        good[rows_free] |= settled[rows_free]
    for i, s in enumerate(states):
        if constrained[i]:  # constrained, held-back stops are walked token by token
            cut = len(s.need)
            for t in torch.nonzero(held[i]).flatten().tolist():
                pairs.append((i, t, "held", s.xb + vocab.pieces[t][cut:]))
    neg_inf = torch.tensor(-math.inf, dtype=torch.float64, device=device)
    parts = [torch.logsumexp(torch.where(good, rows.to(torch.float64), neg_inf), dim=1)]
    if pairs:
        index = torch.tensor([(i, t) for i, t, _, _ in pairs], dtype=torch.long, device=device)
        allowed = cmask[index[:, 0], index[:, 1]] if cmask is not None else None
        parts.append(rows[index[:, 0], index[:, 1]].to(torch.float64))
        parts.append(held[index[:, 0], index[:, 1]].to(torch.float64))
        if allowed is not None:
            parts.append(allowed.to(torch.float64))
    values = torch.cat(parts).cpu().tolist()
    for i, s in enumerate(states):
        if values[i] > -math.inf:
            s.job.good.append(s.lp + values[i])
    m = len(pairs)
    picked, is_held = values[n : n + m], values[n + m : n + 2 * m]
    allowed_flags = values[n + 2 * m :] if cmask is not None else [1.0] * m
    children: list[_Open] = []
    for k, (i, t, kind, xb) in enumerate(pairs):
        s = states[i]
        lp = s.lp + picked[k]
        if not lp > -math.inf or not allowed_flags[k]:
            continue
        job = s.job
        c = job.dist.constraint
        cstate = c.advance(model, s.cstate, t) if c is not None else None
        piece = vocab.pieces[t]
        if kind == "held":
            if is_held[k]:
                children.append(s.child(t, xb, s.pending + piece, lp, cstate, True))
            continue
        if any(xb.startswith(stop) for stop in job.stops):
            continue  # counted with the tokens that start a stop string
        if any(xb.startswith(f) for f in job.forbidden):
            continue  # a stop starting inside the text completes: another value
        if s.n_tokens + 1 >= job.dist.max_tokens:
            if not xb and job.complete(cstate):
                job.good.append(lp)  # nothing after the text, and the length limit ends it
            continue
        emitted = vocab.emits(s.pending, piece)
        if emitted and any(stop in job.tail + _decode(xb) for stop in job.dist.stop):
            continue  # a stop found after the text's end: another value
        pending = b"" if emitted else s.pending + piece
        children.append(s.child(t, xb, pending, lp, cstate, False))
    return children


def _limit(children: list[_Open], stats: dict | None) -> list[_Open]:
    """At most ``MAX_OPEN`` open paths per job (the most likely)."""
    per_job: dict[int, list[_Open]] = {}
    for c in children:
        per_job.setdefault(id(c.job), []).append(c)
    if all(len(v) <= MAX_OPEN for v in per_job.values()):
        return children
    out: list[_Open] = []
    for group in per_job.values():
        if len(group) > MAX_OPEN:
            group.sort(key=lambda c: -c.lp)
            if stats is not None:
                dropped = len(group) - MAX_OPEN
                stats["text_score_dropped"] = stats.get("text_score_dropped", 0) + dropped
            group = group[:MAX_OPEN]
        out += group
    return out


def _logsumexp(values: Sequence[float]) -> float:
    finite = [v for v in values if v > -math.inf]
    if not finite:
        return -math.inf
    m = max(finite)
    return m + math.log(math.fsum(math.exp(v - m) for v in finite))
