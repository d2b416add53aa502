"""Where LlamaCppLM's contexts live: llama.cpp contexts ("lanes") of sequences ("slots").

A lane is one ``llama_context`` with a unified KV cache and up to :data:`MAX_SEQUENCES`
sequences.  A :class:`Slot` is one sequence of a lane: the tokens whose keys and values it
holds, from position 0.  A context's state is a :class:`Handle`: its first ``n`` ids are those
of a slot.  Several handles may share a slot (forks); a sequence copy inside a lane adds the
copy's id to the same cells, so sharing a prefix never duplicates keys and values.

A population larger than one lane's sequences spreads over more lanes (one decode per lane per
step); lanes are made on demand and each grows its cells when a step does not fit, within the
model's memory cap.

>>> slot = Slot(lane=None, seq=3)
>>> handle = Handle(slot, 0)
>>> handle.n, slot.refs
(0, 1)
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from lmcascade.errors import ModelError

MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ: sequences one context can hold
KV_TYPES = {"f16": 1, "f32": 0, "q8_0": 8}  # ggml type ids of the KV cache


class Slot:
    """One sequence of a lane: the tokens whose keys/values it holds (positions 0..), and how
    many handles use it (none while it is parked for prefix reuse)."""

    __slots__ = ("lane", "seq", "ids", "refs", "epoch")

    def __init__(self, lane: Lane | None, seq: int) -> None:
        self.lane = lane
        self.seq = seq
        self.ids: list[int] = []
        self.refs = 0
        self.epoch = lane.epoch if lane is not None else 0

    @property
    def live(self) -> bool:
        """Whether the slot still holds its tokens (not dropped, its lane not rebuilt)."""
        return self.lane is not None and self.epoch == self.lane.epoch


class Handle:
    """A context's state: its first ``n`` ids are cached in ``slot``.  Making one counts a
    user of the slot; when it is dropped (the context released, cropped to nothing, given a
    slot of its own, or garbage-collected) the slot is queued on its model, which parks it
    once no handle uses it."""

    __slots__ = ("slot", "n")

    def __init__(self, slot: Slot, n: int) -> None:
        self.slot = slot
        self.n = n
        slot.refs += 1

    def __del__(self) -> None:
        lane = self.slot.lane
        if lane is not None:
            lane.owner._dropped.append(self.slot)  # settled under the model's lock


class NoRoom(Exception):
    """llama_decode found no cells for a batch in ``lane``."""

    def __init__(self, lane: Lane) -> None:
        super().__init__("no room")
        self.lane = lane


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the longest common prefix of ``a`` and ``b``, at most ``limit``."""
    n = min(len(a), len(b), limit)
    if n <= 0 or a[0] != b[0]:
        return 0
    if list(a[:n]) == list(b[:n]):
        return n
    lo, hi = 1, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if list(a[:mid]) == list(b[:mid]):
            lo = mid
        else:
            hi = mid
    return lo


class PrefixIndex:
    """The slots of a moment, sorted by their tokens: the longest cached prefix of a token
    sequence is shared with one of its two neighbours in that order (two comparisons per
    look-up instead of one per slot)."""

    def __init__(self, slots: Iterable[Slot]) -> None:
        rows = sorted(((tuple(s.ids), n, s) for n, s in enumerate(slots) if s.ids), key=_first2)
        self.keys = [r[0] for r in rows]
        self.slots = [r[2] for r in rows]

    def longest(self, ids: Sequence[int], limit: int) -> list[tuple[Slot, int]]:
        """Up to two (slot, shared length) candidates, longest first, each sharing at least
        one token (and at most ``limit``) with ``ids``."""
        at = bisect.bisect_left(self.keys, tuple(ids))
        found = []
        for j in (at - 1, at):
            if 0 <= j < len(self.keys):
                k = common_prefix(self.keys[j], ids, limit)
                if k > 0:
                    found.append((self.slots[j], k))
        return sorted(found, key=lambda f: -f[1])


def _first2(row: tuple) -> tuple:
    return row[:2]


class SharedPrefixes:
    """The fresh prompts of one lane's decode, fed in sorted order, computing the tokens they
    start with alike once: such a token carries the sequence id of every prompt sharing it
    (its cell then belongs to all of them, as after a sequence copy).

    ``at[p]`` is the entry computed at position ``p`` by a prompt that agrees with the last one
    fed on every token up to ``p`` (None where there is none).  A prompt joins entries only
    below the first position whose logits it wants, so each logits row stays one prompt's
    (a joined entry may want logits for the prompt that made it).  Sorted order (by cached
    length, then tokens) puts prompts that agree longest next to each other, so comparing
    each with the one before finds every shared token.  Only prompts of the same cached length share: llama.cpp
    accepts a token of several sequences only when they hold the same positions.
    """

    def __init__(self) -> None:
        self.last: Sequence[int] = ()
        self.start = 0  # the cached length of the prompts fed since ``last`` was reset
        self.at: list[list | None] = []

    def feed(
        self,
        entries: list,
        ids: Sequence[int],
        seq: int,
        start: int,
        first_out: int,
        token: Callable[[Any], int] = int,
    ) -> int:
        """Appends to ``entries`` the ``[token, position, seqs, wants_logits]`` entries that
        sequence ``seq`` needs for ``ids[start:]`` (logits from ``first_out`` on; ``token``
        checks an id), joining entries already there where it can; returns how many tokens
        it joined."""
        if start != self.start:  # llama.cpp couples sequences that share a token only
            self.last, self.start = (), start  # when they hold the same positions before it
        agree = common_prefix(self.last, ids, first_out)
        at = self.at
        del at[len(ids) :]
        at.extend([None] * (len(ids) - len(at)))
        for pos in range(agree, start):  # cached by this prompt: nothing to share onwards
            at[pos] = None
        joined = 0
        for pos in range(start, len(ids)):
            entry = at[pos] if pos < agree else None
            if entry is not None:
                entry[2].append(seq)
                joined += 1
                continue
            entry = [token(ids[pos]), pos, [seq], pos >= first_out]
            entries.append(entry)
            at[pos] = entry
        self.last = ids
        return joined


def context_params(model: Any, cells: int) -> Any:
    """llama.cpp context parameters for ``model`` (a LlamaCppLM's settings) and ``cells``
    KV cells: the one place they are set (the benchmark's bare loop uses them too)."""
    o, L = model, model._l
    cp = L.llama_context_default_params()
    cp.n_ctx = cells
    cp.n_batch = cp.n_ubatch = o.batch_tokens  # (the model keeps cells >= batch_tokens)
    cp.n_seq_max = MAX_SEQUENCES
    cp.n_outputs_max = max(o.batch_tokens, MAX_SEQUENCES)  # llama.cpp asserts on fewer
    cp.n_threads = cp.n_threads_batch = o.threads
    cp.kv_unified = True
    cp.type_k = cp.type_v = KV_TYPES[o.kv_type]
    if o.flash_attention is not None:
        cp.flash_attn_type = int(bool(o.flash_attention))
    cp.no_perf = True
    return cp


class Lane:
    """One llama.cpp context: a unified KV cache of ``cells`` cells and its sequences."""

    def __init__(self, owner: Any, cells: int) -> None:
        self.owner = owner  # the LlamaCppLM (its llama_cpp module, model and settings)
        self.ctx = None
        self.batch = None
        self.epoch = 0
        self.full_in: set[int] | None = None  # the busy set this lane was found full for
        self.open(cells)

    def open(self, cells: int) -> None:
        """(Re)creates the context with at least ``cells`` cells; every slot starts empty.
        The new context is made before the old one is freed, so a failure (or Ctrl-C) leaves
        the lane as it was."""
        o, L = self.owner, self.owner._l
        cp = context_params(o, cells)
        ctx = L.llama_init_from_model(o._model, cp)
        if not ctx:
            raise ModelError(
                f"llama.cpp could not make a context of {cells} cells for {o.name!r} (about "
                f"{cells * o.cache_bytes_per_token / 2**30:.3g} GB); lower n_ctx or max_cache_gb"
            )
        batch = L.llama_batch_init(o.batch_tokens, 0, MAX_SEQUENCES)  # a token may be shared
        self.close()
        self.ctx, self.batch = ctx, batch
        self.cells = int(L.llama_n_ctx(ctx))  # llama.cpp rounds the size up
        self.batch_size = min(o.batch_tokens, int(L.llama_n_batch(ctx)))  # and may cap this
        self.mem = L.llama_get_memory(ctx)
        self.reset()

    def reset(self) -> None:
        """Every sequence free; slots made before are no longer live."""
        self.epoch += 1
        self.free = list(range(MAX_SEQUENCES - 1, -1, -1))
        self.slots: dict[int, Slot] = {}  # seq id -> slot in use (live or parked)
        self.parked: OrderedDict[int, Slot] = OrderedDict()  # refs == 0, oldest first

    def clear(self) -> None:
        """Forgets every cached token (the cells stay reserved)."""
        self.owner._l.llama_memory_clear(self.mem, True)
        self.reset()

    def close(self) -> None:
        L = self.owner._l
        if self.batch is not None:
            L.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None

    # -- sequences ------------------------------------------------------------------------------

    def park(self, slot: Slot) -> None:
        """``slot`` has no users: keep its tokens for a later prompt that starts with them.

        Parked tokens are kept to an eighth of the cells (the oldest go first): every decode
        spans all the cells in use (without flash attention it attends over them, masked or
        not; with it, it still builds their mask), so a cache full of parked sequences would
        slow every step of the live ones."""
        if slot.live and slot.seq in self.slots:
            slot.refs = 0
            self.parked[slot.seq] = slot
            held = sum(len(s.ids) for s in self.parked.values())
            while len(self.parked) > 1 and held > self.cells // 8:
                oldest = next(iter(self.parked.values()))
                held -= len(oldest.ids)
                self.drop(oldest)

    def drop(self, slot: Slot) -> None:
        """Frees a slot's sequence (its cells go when no other sequence holds them)."""
        self.owner._l.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
        self.slots.pop(slot.seq, None)
        self.parked.pop(slot.seq, None)
        slot.epoch = -1
        self.free.append(slot.seq)

    def has_room(self, busy: set[int], keep: Slot | None = None) -> bool:
        """Whether a sequence can be had without touching the slots in ``busy`` (ids) or
        ``keep``.

        Within one step ``busy`` only grows, so a lane found full stays full: it is
        remembered (``full_in``, keyed by the step's busy set) instead of scanned again."""
        if self.free:
            return True
        if self.full_in is busy:
            return False
        if any(id(s) not in busy and s is not keep for s in self.slots.values()):
            return True
        if keep is None or id(keep) in busy:
            self.full_in = busy
        return False

    def new_slot(self, busy: set[int], keep: Slot | None = None) -> Slot:
        """A free sequence: a free id, else the oldest parked slot's, else (at worst) that of
        a live slot outside ``busy`` (and not ``keep``), whose contexts are computed again
        when next used."""
        if not self.free:
            spare = (s for s in self.parked.values() if id(s) not in busy and s is not keep)
            parked = next(spare, None)
            if parked is not None:
                self.drop(parked)
            else:
                idle = (s for s in self.slots.values() if id(s) not in busy and s is not keep)
                self.drop(next(idle))
                self.owner._count("evicted_sequences")
        slot = Slot(self, self.free.pop())
        self.slots[slot.seq] = slot
        return slot

    def copy(self, src: Slot, n: int, busy: set[int]) -> Slot:
        """A new slot holding the first ``n`` tokens of ``src`` (same lane; the cells are
        shared, not duplicated)."""
        dst = self.new_slot(busy, keep=src)
        if n:
            self.owner._l.llama_memory_seq_cp(self.mem, src.seq, dst.seq, 0, n)
        dst.ids = src.ids[:n]
        return dst

    def truncate(self, slot: Slot, n: int) -> None:
        """Removes the slot's cells from position ``n`` on."""
        if len(slot.ids) > n:
            self.owner._l.llama_memory_seq_rm(self.mem, slot.seq, n, -1)
            del slot.ids[n:]

    # -- decoding -------------------------------------------------------------------------------

    def decode(self, entries: list, out: np.ndarray, row: int) -> int:
        """Decodes ``[token, position, seqs, wants_logits]`` entries (``seqs``: the sequence
        ids the token's cell belongs to) in batches of at most ``batch_tokens``, writing the
        wanted logits into ``out`` from ``row`` on; returns the next free row.  Raises
        :class:`NoRoom` when the cells run out."""
        L, batch, vocab = self.owner._l, self.batch, self.owner.vocab_size
        size = self.batch_size
        for lo in range(0, len(entries), size):
            chunk = entries[lo : lo + size]
            batch.n_tokens = len(chunk)
            for j, (tok, pos, seqs, want) in enumerate(chunk):
                batch.token[j] = tok
                batch.pos[j] = pos
                batch.n_seq_id[j] = len(seqs)
                to = batch.seq_id[j]
                for k, seq in enumerate(seqs):
                    to[k] = seq
                batch.logits[j] = want
            status = L.llama_decode(self.ctx, batch)
            if status == 1:
                raise NoRoom(self)
            if status != 0:
                raise ModelError(f"llama_decode failed with status {status} on {self.owner.name!r}")
            n = sum(1 for e in chunk if e[3])
            if n:
                ptr = L.llama_get_logits(self.ctx)
                out[row : row + n] = np.ctypeslib.as_array(ptr, shape=(n, vocab))
                row += n
        return row
