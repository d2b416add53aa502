"""Batched key/value caches for a population of contexts, and a prefix index over them.

A :class:`KVBatch` holds the cached keys and values of several rows on one time axis: rows
of different lengths are left-padded, and padding may also sit between a row's tokens (after
a batched step of unequal blocks, or a rollback); an attention mask marks the real columns and
explicit position ids keep every real token at its true position, so padding never changes a
result.  Batches never change once made: a model step produces a new batch, so any number of
contexts can point at (batch, row) places and share them — forking a context copies nothing.

A batch's keys and values are views of the first ``width`` columns of per-layer buffers with
spare capacity (a :class:`KVStore`).  The store's ``tip`` is the first column no batch has
claimed: a step that extends a batch whose width is the tip writes its new columns there, in
place, and claims them, so decoding does not copy the whole cache every step.  Views made
earlier read only their own columns and stay valid.  A second extension of the same batch (a
fork stepping separately), a gather that reorders rows, or a full buffer makes a new store
with headroom instead.

:class:`PrefixIndex` is a trie over token ids whose nodes point at (batch, row) places holding
those tokens' keys and values, so a prompt that extends anything computed before (the same
prompt for many particles, or an earlier site's context) only computes its new tokens.

>>> import torch
>>> k = torch.arange(2 * 1 * 3 * 1.).reshape(2, 1, 3, 1)
>>> b = KVBatch([(k, k.clone())], torch.tensor([[0, 1, 1], [1, 1, 1]]))
>>> b.rows, b.width, b.counts
(2, 3, [2, 3])
>>> b.prefix(0, 1)[0][0].flatten().tolist()   # the first real token of row 0
[1.0]
>>> g = gather([(b, 1, 2), (b, 0, 2)], room=1)   # reorder, and keep row 1's first 2 tokens
>>> g.mask.tolist(), g.counts, g.store.capacity >= 4
([[1, 1, 0], [0, 1, 1]], [2, 2], True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Layers = list[tuple[torch.Tensor, torch.Tensor]]


def capacity_for(width: int) -> int:
    """Columns to allocate for ``width`` needed ones: 50% headroom, at least 64 columns."""
    return width + max(64, width // 2)


class KVStore:
    """Per-layer key/value buffers ``[rows, heads, capacity, head_dim]``; columns below ``tip``
    belong to batches already made.  Buffers are allocated on first write when a step starts
    from nothing (their shapes come from the model)."""

    __slots__ = ("buffers", "tip", "size")

    def __init__(self, buffers: list[tuple[torch.Tensor, torch.Tensor]], tip: int, size: int):
        self.buffers = buffers
        self.tip = tip
        self.size = size  # capacity, known before any buffer exists

    @classmethod
    def like(cls, layers: Layers, rows: int, width: int) -> KVStore:
        """An empty store shaped like ``layers`` for ``rows`` rows and at least ``width``
        columns (plus headroom); nothing claimed yet."""
        cap = capacity_for(width)
        buffers = [
            (
                k.new_empty(rows, k.shape[1], cap, k.shape[3]),
                v.new_empty(rows, v.shape[1], cap, v.shape[3]),
            )
            for k, v in layers
        ]
        return cls(buffers, 0, cap)

    @property
    def capacity(self) -> int:
        return self.size

    def view(self, width: int) -> Layers:
        """The first ``width`` columns of every layer (views, no copy)."""
        return [(k[:, :, :width], v[:, :, :width]) for k, v in self.buffers]

    def claim(self, width: int, extra: int) -> bool:
        """Takes columns ``width .. width + extra`` if they are the free tip and fit."""
        if self.tip != width or width + extra > self.size or not self.buffers:
            return False
        self.tip = width + extra
        return True

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.buffers)


class KVBatch:
    """Per-layer keys/values ``[rows, heads, width, head_dim]``, a ``[rows, width]`` mask,
    and ``counts``: the real (unmasked) columns of each row, kept on the host so that nothing
    has to be read back from the device to know them.  ``store`` is the buffer the layers are
    views of, when they are (and the batch may then grow in place)."""

    __slots__ = ("layers", "mask", "counts", "store")

    def __init__(
        self,
        layers: Layers,
        mask: torch.Tensor,
        counts: list[int] | None = None,
        store: KVStore | None = None,
    ) -> None:
        self.layers = layers
        self.mask = mask
        self.counts = [int(c) for c in mask.sum(dim=1).tolist()] if counts is None else counts
        self.store = store

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    @property
    def dense(self) -> bool:
        """No padding anywhere: every column of every row is real."""
        width = self.width
        return all(c == width for c in self.counts)

    def nbytes(self) -> int:
        if self.store is not None and self.store.buffers:
            return self.store.nbytes()
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers)

    def prefix(self, row: int, length: int) -> Layers:
        """Keys/values of the first ``length`` real tokens of ``row``, compact (no padding)."""
        cols = torch.nonzero(self.mask[row]).flatten()[:length]
        return [(k[row : row + 1, :, cols], v[row : row + 1, :, cols]) for k, v in self.layers]


def keep_first(mask: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """``mask`` with each row's real columns after its first ``counts[r]`` masked out."""
    limit = torch.tensor(counts, device=mask.device).unsqueeze(1)
    return mask * (mask.cumsum(dim=1) <= limit).to(mask.dtype)


class Extension:
    """One model step adding ``extra`` columns to ``past`` (or starting from nothing).

    In place at the store's free tip when ``past`` has one with room; otherwise into a new
    store with headroom, the past columns copied in on each layer's first write.  The model's
    cache layers call :meth:`write`; :meth:`batch` wraps the result.
    """

    def __init__(self, past: KVBatch | None, extra: int) -> None:
        self.past = past
        self.start = past.width if past is not None else 0
        self.end = self.start + extra
        if past is not None and past.store is not None and past.store.claim(self.start, extra):
            self.store = past.store
            self.fresh = False
        else:
            self.store = KVStore([], self.end, capacity_for(self.end))
            self.fresh = True

    def past_layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.past.layers[i] if self.past is not None and self.start else None

    def write(self, i: int, keys: torch.Tensor, values: torch.Tensor):
        """Stores layer ``i``'s new columns; returns its keys/values up to the new width."""
        if self.fresh:
            if i != len(self.store.buffers):
                raise RuntimeError("cache layers must be written in order")
            rows, cap = keys.shape[0], self.store.size
            kbuf = keys.new_empty(rows, keys.shape[1], cap, keys.shape[3])
            vbuf = values.new_empty(rows, values.shape[1], cap, values.shape[3])
            past = self.past_layer(i)
            if past is not None:
                kbuf[:, :, : self.start].copy_(past[0])
                vbuf[:, :, : self.start].copy_(past[1])
            self.store.buffers.append((kbuf, vbuf))
        kbuf, vbuf = self.store.buffers[i]
        kbuf[:, :, self.start : self.end].copy_(keys)
        vbuf[:, :, self.start : self.end].copy_(values)
        return kbuf[:, :, : self.end], vbuf[:, :, : self.end]

    def zero_new(self, real: torch.Tensor) -> None:
        """Zeroes the new columns that are padding (``real`` is ``[rows, extra]``), so that
        padding keys/values are never NaN."""
        pad = ~real.bool()[:, None, :, None]
        for kbuf, vbuf in self.store.buffers:
            kbuf[:, :, self.start : self.end].masked_fill_(pad, 0)
            vbuf[:, :, self.start : self.end].masked_fill_(pad, 0)

    def batch(self, mask: torch.Tensor, counts: list[int]) -> KVBatch:
        return KVBatch(self.store.view(self.end), mask, counts, self.store)


def gather(places: Sequence[tuple[KVBatch, int, int]], room: int = 0) -> KVBatch:
    """One batch whose row ``i`` holds the first ``n`` real tokens of ``places[i] = (batch,
    row, n)``, with room for ``room`` more columns.

    No copy at all when the places are exactly one batch's rows in order (tokens past ``n``
    are only masked out); otherwise one gather per layer into a new store with headroom.
    When rollbacks have left many columns masked in every row, the rows are compacted.
    """
    first = places[0][0]
    counts = [n for _, _, n in places]
    cut = any(n < b.counts[r] for b, r, n in places)
    if all(b is first for b, _, _ in places) and [r for _, r, _ in places] == list(
        range(first.rows)
    ):
        if not cut:
            return first
        kept = KVBatch(first.layers, keep_first(first.mask, counts), counts, first.store)
        return _maybe_compact(kept, room)
    groups: dict[int, tuple[KVBatch, list[int], list[int]]] = {}
    for i, (b, r, _) in enumerate(places):
        groups.setdefault(id(b), (b, [], []))
        groups[id(b)][1].append(r)
        groups[id(b)][2].append(i)
    width = max(b.width for b, _, _ in groups.values())
    rows = len(places)
    device = first.mask.device
    store = KVStore.like(first.layers, rows, width + room)
    store.tip = width
    mask = first.mask.new_zeros(rows, width)
    for b, src, dst in groups.values():
        off = width - b.width
        src_t = torch.tensor(src, device=device)
        whole = len(groups) == 1  # then dst is 0..rows-1 in order
        dst_t = None if whole else torch.tensor(dst, device=device)
        for (kbuf, vbuf), (k, v) in zip(store.buffers, b.layers, strict=True):
            for buf, x in ((kbuf, k), (vbuf, v)):
                if whole:
                    torch.index_select(x, 0, src_t, out=buf[:, :, off:width])
                else:
                    buf[:, :, off:width].index_copy_(0, dst_t, x.index_select(0, src_t))
                    if off:
                        buf[:, :, :off].index_fill_(0, dst_t, 0)
        if whole:
            mask[:, off:] = b.mask.index_select(0, src_t)
        else:
            mask[dst_t, off:] = b.mask.index_select(0, src_t)
    if cut:
        mask = keep_first(mask, counts)
    return _maybe_compact(KVBatch(store.view(width), mask, counts, store), room)


def _maybe_compact(batch: KVBatch, room: int) -> KVBatch:
    """``batch``, or when many of its columns are masked in every row (after rollbacks), a
    copy with each row's real tokens packed to the right of a narrower time axis."""
    width, used = batch.width, max(batch.counts)
    if width - used < max(32, width // 4):
        return batch
    return compact(batch, room)


def compact(batch: KVBatch, room: int = 0) -> KVBatch:
    """A copy of ``batch`` on a time axis of ``max(counts)`` columns: every row's real tokens,
    in order, right-aligned (positions are explicit, so nothing else changes)."""
    rows, width, used = batch.rows, batch.width, max(batch.counts)
    device = batch.mask.device
    real = batch.mask.bool()
    counts = torch.tensor(batch.counts, device=device).unsqueeze(1)
    target = torch.where(real, batch.mask.cumsum(dim=1) - 1 + used - counts, used)
    source = torch.zeros(rows, used + 1, dtype=torch.long, device=device)  # last: discarded
    source.scatter_(1, target, torch.arange(width, device=device).expand(rows, width))
    source = source[:, :used]
    mask = (torch.arange(used, device=device) >= used - counts).to(batch.mask.dtype)
    store = KVStore.like(batch.layers, rows, used + room)
    store.tip = used
    pad = ~mask.bool()[:, None, :, None]
    for (kbuf, vbuf), (k, v) in zip(store.buffers, batch.layers, strict=True):
        for buf, x in ((kbuf, k), (vbuf, v)):
            index = source[:, None, :, None].expand(rows, x.shape[1], used, x.shape[3])
            out = buf[:, :, :used]
            torch.gather(x, 2, index, out=out)
            out.masked_fill_(pad, 0)
    return KVBatch(store.view(used), mask, list(batch.counts), store)


def stack_prefixes(
    places: Sequence[tuple[KVBatch, int, int] | None], room: int, device: torch.device
) -> KVBatch | None:
    """Left-aligns the first ``n`` tokens of each ``(batch, row, n)`` place, compacted (no
    padding between them), into one batch with room for ``room`` more columns (None when
    every place is empty)."""
    lengths = [p[2] if p is not None else 0 for p in places]
    width = max(lengths, default=0)
    if width == 0:
        return None
    like = next(p[0] for p in places if p is not None and p[2])
    store = KVStore.like(like.layers, len(places), width + room)
    store.tip = width
    mask = torch.zeros(len(places), width, dtype=torch.long, device=device)
    for r, (place, n) in enumerate(zip(places, lengths, strict=True)):
        mask[r, width - n :] = 1
        src = place[0].prefix(place[1], n) if n else None
        for i, (kbuf, vbuf) in enumerate(store.buffers):
            if n < width:
                kbuf[r, :, : width - n].zero_()
                vbuf[r, :, : width - n].zero_()
            if src is not None:
                kbuf[r, :, width - n : width].copy_(src[i][0][0])
                vbuf[r, :, width - n : width].copy_(src[i][1][0])
    return KVBatch(store.view(width), mask, lengths, store)


@dataclass
class _Node:
    children: dict
    place: tuple[KVBatch, int] | None = None


class PrefixIndex:
    """A trie of token ids -> a (batch, row) holding their keys/values.

    Bounded by ``max_bytes`` of distinct batches it keeps alive (and ``max_nodes`` trie
    nodes): past either, it forgets everything and starts again, which costs recomputation,
    never correctness.
    """

    def __init__(self, max_bytes: int = 1 << 30, max_nodes: int = 500_000) -> None:
        self.max_bytes = max_bytes
        self.max_nodes = max_nodes
        self.clear()

    def clear(self) -> None:
        self.root = _Node({})
        self.nodes = 0
        self.held: dict[int, int] = {}

    @property
    def bytes_held(self) -> int:
        return sum(self.held.values())

    def insert(self, ids: Sequence[int], batch: KVBatch, row: int) -> None:
        """Records that ``batch[row]`` holds the keys/values of ``ids`` (and of every prefix)
        as its first ``len(ids)`` real tokens."""
        if len(ids) > self.max_nodes:
            return  # a key longer than the whole index may hold is not recorded
        if id(batch) not in self.held:
            size = batch.nbytes()
            if size > self.max_bytes:
                return
            if self.bytes_held + size > self.max_bytes:
                self.clear()
            self.held[id(batch)] = size
        if self.nodes + len(ids) > self.max_nodes:
            self.clear()
            self.held[id(batch)] = batch.nbytes()
        node = self.root
        for tok in ids:
            child = node.children.get(tok)
            if child is None:
                child = node.children[tok] = _Node({})
                self.nodes += 1
            child.place = (batch, row)
            node = child

    def longest(self, ids: Sequence[int]) -> tuple[int, tuple[KVBatch, int] | None]:
        """The longest recorded prefix of ``ids``: its length and where it is held."""
        node, depth, best = self.root, 0, (0, None)
        for tok in ids:
            node = node.children.get(tok)
            if node is None:
                break
            depth += 1
            if node.place is not None:
                best = (depth, node.place)
        return best
