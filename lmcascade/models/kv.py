"""Batched key/value caches for a population of contexts, and a prefix index over them.

A :class:`KVBatch` holds the cached keys and values of several rows on one time axis: rows
of different lengths are left-padded, and padding may also sit between a row's tokens (after
a batched prefill of unequal suffixes); an attention mask marks the real columns and
explicit position ids keep every real token at its true position, so padding never changes a
result.  Batches are immutable: a model step produces a new batch, so any number of contexts
can point at (batch, row) pairs and share them — forking a context copies nothing.

:class:`PrefixIndex` is a trie over token ids whose nodes point at (batch, row, length)
places holding those tokens' keys and values, so a prompt that extends anything computed
before (the same prompt for many particles, or an earlier site's context) only computes its
new tokens.

>>> import torch
>>> k = torch.arange(2 * 1 * 3 * 1.).reshape(2, 1, 3, 1)
>>> b = KVBatch([(k, k.clone())], torch.tensor([[0, 1, 1], [1, 1, 1]]))
>>> b.rows, b.width, b.lengths.tolist()
(2, 3, [2, 3])
>>> b.prefix(0, 1)[0][0].flatten().tolist()   # the first real token of row 0
[1.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Layers = list[tuple[torch.Tensor, torch.Tensor]]


class KVBatch:
    """Per-layer keys/values ``[rows, heads, width, head_dim]`` plus a ``[rows, width]`` mask."""

    __slots__ = ("layers", "mask", "lengths")

    def __init__(self, layers: Layers, mask: torch.Tensor) -> None:
        self.layers = layers
        self.mask = mask
        self.lengths = mask.sum(dim=1)

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers)

    def select(self, index: torch.Tensor) -> KVBatch:
        """Rows ``index`` (repeats allowed) in one gather per layer."""
        layers = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.layers]
        return KVBatch(layers, self.mask.index_select(0, index))

    def left_pad(self, width: int) -> KVBatch:
        """The same rows on a wider time axis (masked columns added on the left)."""
        extra = width - self.width
        if extra <= 0:
            return self
        layers = []
        for k, v in self.layers:
            pad = k.new_zeros(k.shape[0], k.shape[1], extra, k.shape[3])
            layers.append((torch.cat([pad, k], dim=2), torch.cat([pad, v], dim=2)))
        mask = torch.cat([self.mask.new_zeros(self.rows, extra), self.mask], dim=1)
        return KVBatch(layers, mask)

    def prefix(self, row: int, length: int) -> Layers:
        """Keys/values of the first ``length`` real tokens of ``row``, compact (no padding)."""
        cols = torch.nonzero(self.mask[row]).flatten()[:length]
        return [(k[row : row + 1, :, cols], v[row : row + 1, :, cols]) for k, v in self.layers]


def concat(batches: Sequence[KVBatch]) -> KVBatch:
    """Stacks batches row-wise on a common (left-padded) time axis."""
    if len(batches) == 1:
        return batches[0]
    width = max(b.width for b in batches)
    padded = [b.left_pad(width) for b in batches]
    layers = [
        (torch.cat([b.layers[i][0] for b in padded]), torch.cat([b.layers[i][1] for b in padded]))
        for i in range(len(padded[0].layers))
    ]
    return KVBatch(layers, torch.cat([b.mask for b in padded]))


def gather(places: Sequence[tuple[KVBatch, int]]) -> KVBatch:
    """One batch whose row ``i`` is ``places[i]``: a single index-select per layer when all
    places share a batch, and no copy at all when they are exactly its rows in order."""
    first = places[0][0]
    if all(b is first for b, _ in places):
        rows = [r for _, r in places]
        if rows == list(range(first.rows)):
            return first
        return first.select(torch.tensor(rows, device=first.mask.device))
    groups: dict[int, tuple[KVBatch, list[int], list[int]]] = {}
    for i, (b, r) in enumerate(places):
        groups.setdefault(id(b), (b, [], []))
        groups[id(b)][1].append(r)
        groups[id(b)][2].append(i)
    parts, order = [], []
    for b, rows, positions in groups.values():
        parts.append(b.select(torch.tensor(rows, device=b.mask.device)))
        order.extend(positions)
    merged = concat(parts)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return merged.select(inverse.to(merged.mask.device))


def stack_prefixes(
    prefixes: Sequence[Layers | None], lengths: Sequence[int], device: torch.device
) -> KVBatch | None:
    """Left-pads compact prefixes into one batch (None when every prefix is empty)."""
    width = max(lengths, default=0)
    if width == 0:
        return None
    rows = []
    for layers, n in zip(prefixes, lengths, strict=True):
        if n == 0:
            rows.append(None)
        else:
            rows.append(KVBatch(layers, torch.ones(1, n, dtype=torch.long, device=device)))
    like = next(r for r in rows if r is not None)
    filled = []
    for r in rows:
        if r is None:
            empty = [
                (
                    k.new_zeros(1, k.shape[1], 0, k.shape[3]),
                    v.new_zeros(1, v.shape[1], 0, v.shape[3]),
                )
                for k, v in like.layers
            ]
            r = KVBatch(empty, torch.zeros(1, 0, dtype=torch.long, device=device))
        filled.append(r.left_pad(width))
    return concat(filled)


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
        """Records that ``batch[row]`` holds the keys/values of ``ids`` (and of every prefix)."""
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
