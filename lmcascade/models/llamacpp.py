"""LlamaCppLM: a GGUF model run by llama.cpp, batched for populations on the CPU.

One ``llama_decode`` per engine step serves every context waiting on the model.  Each context
lives in a llama.cpp *sequence* (a slot): the KV cache is unified, so a sequence copy adds the
copy's id to the same cells instead of copying keys and values.  That makes the protocol
cheap:

* **fork** shares the slot (nothing is called); the first of the sharers to advance past the
  shared tokens gets a slot of its own by a sequence copy of what it keeps;
* **crop** lowers the context's cached length; the cells past it are removed from the slot
  (``llama_memory_seq_rm``) when the context next advances, and only if no one else uses them;
* **release** parks the slot: its tokens stay cached for a later prompt that starts with them
  (a prompt shared by many contexts, or an earlier site's context) until the slot or its cells
  are needed;
* a fresh prompt copies the longest cached prefix of any slot and computes only the rest;
  identical fresh prompts in one step are computed once and share a slot.

Logits are requested only for the positions that need them and read back once per decode;
sampling, masks and constraints stay in lmcascade, on the host.  When the cells run out, parked
slots are dropped first; then the cache is rebuilt twice as large (up to ``max_cache_gb``) and
the contexts are computed again, so a step never fails for want of room below that cap.

>>> from lmcascade.models.llamacpp import LlamaCppLM                # doctest: +SKIP
>>> lm = LlamaCppLM("model.gguf")                                  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmcascade.errors import ModelError
from lmcascade.models.base import Context, LanguageModel, block_counts, check_crop
from lmcascade.models.llama_lanes import (
    KV_TYPES,
    MAX_SEQUENCES,
    Handle,
    Lane,
    NoRoom,
    PrefixIndex,
    SharedPrefixes,
    Slot,
)

SCRATCH_BYTES = 128 << 20
"""The largest logits buffer a model keeps between steps (see ``LlamaCppLM._scratch``)."""


def llama_cpp_module() -> Any:
    """``llama_cpp`` (llama-cpp-python), with its log output silenced; a ModelError naming the
    extra when it is not installed."""
    try:
        import llama_cpp
    except ImportError as err:
        raise ModelError(
            "the llama.cpp backend needs llama-cpp-python: pip install 'lmcascade[llamacpp]' "
            "(it compiles llama.cpp from source; see docs/models.md)"
        ) from err
    except Exception as err:  # installed, but its shared library does not load
        raise ModelError(
            f"llama-cpp-python is installed but does not load ({type(err).__name__}: {err}); "
            "reinstall it (see docs/models.md) or use backend='transformers'"
        ) from err
    _silence(llama_cpp)
    return llama_cpp


@functools.cache
def _silence(llama_cpp: Any) -> None:
    """Routes llama.cpp's log lines into a short buffer instead of stderr (kept for errors)."""
    logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL)

    def keep(level: int, text: bytes, user_data: Any) -> None:
        if level in (3, 4, 5):  # warnings, errors and their continued lines: the tail
            # explains a failed load (ggml's levels: 1 debug, 2 info, 3 warn, 4 error, 5 cont)
            _LOG_TAIL.append(text.decode("utf-8", "replace").strip())
            del _LOG_TAIL[:-8]

    callback = llama_cpp.llama_log_callback(keep)
    _CALLBACKS.append(callback)  # a ctypes callback must outlive its registration
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()


_CALLBACKS: list[Any] = []
_LOG_TAIL: list[str] = []


def is_available() -> bool:
    """Whether llama-cpp-python is installed and loads.

    >>> isinstance(is_available(), bool)
    True
    """
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return False
    try:
        llama_cpp_module()
    except ModelError:
        return False
    return True


def physical_cores() -> int:
    """Cores this process may run on, counting each physical core once (hyperthreads share
    one); llama.cpp is fastest with one thread per physical core.

    >>> physical_cores() >= 1
    True
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return max(1, (os.cpu_count() or 2) // 2)
    groups = set()
    for cpu in cpus:
        path = f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
        try:
            with open(path) as fh:
                groups.add(fh.read().strip())
        except OSError:
            groups.add(str(cpu))
    return max(1, len(groups))


class NativeModel:
    """A loaded llama.cpp model, freed when the last object using it (the LlamaCppLM, its
    tokenizer) is gone, or when closed; a closed one refuses use with a ModelError."""

    def __init__(self, llama_cpp: Any, path: Path, name: str) -> None:
        self._l, self.name, self.ptr = llama_cpp, name, None
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        del _LOG_TAIL[:]
        ptr = llama_cpp.llama_model_load_from_file(os.fsencode(path), params)
        if not ptr:
            why = "; ".join(_LOG_TAIL[-3:]) or "llama.cpp refused it"
            raise ModelError(f"llama.cpp cannot load {str(path)!r}: {why}")
        self.ptr = ptr
        self._vocab = llama_cpp.llama_model_get_vocab(ptr)

    def model(self) -> Any:
        if self.ptr is None:
            raise ModelError(f"model {self.name!r} was closed; load it again to use it")
        return self.ptr

    def vocab(self) -> Any:
        self.model()
        return self._vocab

    def free(self) -> None:
        if self.ptr is not None:
            self._l.llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class LlamaCppTokenizer:
    """llama.cpp's own tokenizer for the GGUF, seen through lmcascade's Tokenizer protocol.

    ``encode`` adds no BOS/EOS but reads special tokens written in the text (as a Hugging Face
    tokenizer does); ``encode_prompt`` also adds what the model puts at the start of a text.
    It keeps the native model alive (a tokenizer may outlive its LlamaCppLM).

    >>> from lmcascade.models.llamacpp import LlamaCppLM           # doctest: +SKIP
    >>> LlamaCppLM("model.gguf").tokenizer.encode("Hello")          # doctest: +SKIP
    [19556]
    """

    def __init__(self, llama_cpp: Any, native: NativeModel) -> None:
        self._l = llama_cpp
        self._native = native
        vocab = native.vocab()
        self.size = size = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.eos_id = int(llama_cpp.llama_vocab_eos(vocab))
        if not 0 <= self.eos_id < size:
            self.eos_id = int(llama_cpp.llama_vocab_eot(vocab))
        if not 0 <= self.eos_id < size:
            raise ModelError("the GGUF's vocabulary has no end-of-sequence token")

    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        room = len(data) + 8
        for _ in range(2):
            buf = (self._l.llama_token * room)()
            vocab = self._native.vocab()
            n = self._l.llama_tokenize(vocab, data, len(data), buf, room, add_special, True)
            if n >= 0:
                return list(buf[:n])
            room = -n  # too small: llama.cpp says how many it needs
        raise ModelError(f"llama.cpp could not tokenize a text of {len(data)} bytes")

    def encode(self, text: str) -> list[int]:
        return self._tokenize(text, False)

    def encode_prompt(self, text: str) -> list[int]:
        return self._tokenize(text, True)

    def decode(self, ids: Sequence[int]) -> str:
        try:
            ids = [int(t) for t in ids]
        except (TypeError, ValueError) as err:
            raise ModelError(f"token ids must be whole numbers: {err}") from None
        if not ids:
            return ""
        bad = [t for t in ids if not 0 <= t < self.size]
        if bad:
            raise ModelError(f"token id {bad[0]} is outside the vocabulary of {self.size}")
        tokens = (self._l.llama_token * len(ids))(*ids)
        room = 16 * len(ids) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(room)
            vocab = self._native.vocab()
            n = self._l.llama_detokenize(vocab, tokens, len(ids), buf, room, False, True)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            room = -n
        raise ModelError("llama.cpp could not detokenize")  # pragma: no cover

    def piece(self, token: int) -> bytes:
        """The bytes token ``token`` adds to a text (special tokens: none)."""
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self.size:
            raise ModelError(f"token id {token!r} is outside the vocabulary of {self.size}")
        buf = ctypes.create_string_buffer(256)
        n = self._l.llama_token_to_piece(self._native.vocab(), token, buf, 256, 0, False)
        return buf.raw[: max(n, 0)]

    def __len__(self) -> int:
        return self.size


class LlamaCppLM(LanguageModel):
    """A GGUF model on llama.cpp implementing the batched :class:`LanguageModel` protocol.

    ``path`` is a GGUF file (``lc.models.load(name, backend="llamacpp")`` finds a registered
    model's).  ``threads`` defaults to the physical cores; ``kv_type`` is the cache's element
    type (``"f16"``, llama.cpp's default; ``"f32"`` for results within float rounding of
    transformers; ``"q8_0"``); ``flash_attention`` defaults to None, llama.cpp's own choice
    (on where its device supports it, as on CPUs: attention then skips the cells a token may not
    see, which matters when many sequences share one cache); True or False force it.  The cache
    starts at ``n_ctx`` cells and grows as the population needs, up to ``max_cache_gb``;
    ``batch_tokens`` is the most tokens one decode takes (longer steps are split).
    """

    min_prompt_tokens = 1

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        name: str | None = None,
        threads: int | None = None,
        n_ctx: int = 4096,
        max_cache_gb: float = 4.0,
        batch_tokens: int = 512,
        kv_type: str = "f16",
        flash_attention: bool | None = None,
    ) -> None:
        self._lanes: list[Lane] = []
        self._l = llama_cpp_module()
        path = Path(os.fspath(path))
        if not path.is_file():
            raise ModelError(f"no GGUF file at {str(path)!r}")
        if not isinstance(kv_type, str) or kv_type not in KV_TYPES:
            raise ModelError(f"unknown kv_type {kv_type!r}; use one of {', '.join(KV_TYPES)}")
        for key, value, top in (
            ("n_ctx", n_ctx, 1 << 24),
            ("batch_tokens", batch_tokens, 1 << 16),
            ("threads", 1 if threads is None else threads, 1024),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise ModelError(f"{key} must be a whole number from 1 to {top}, got {value!r}")
        if (
            isinstance(max_cache_gb, bool)
            or not isinstance(max_cache_gb, (int, float))
            or not 0 < max_cache_gb < 1 << 20
        ):
            raise ModelError(f"max_cache_gb must be a positive number of GB, got {max_cache_gb!r}")
        if flash_attention not in (None, True, False):
            raise ModelError(
                f"flash_attention must be True, False or None, got {flash_attention!r}"
            )
        self.path = path
        self.name = name or path.stem
        self.threads = threads or physical_cores()
        self.kv_type = kv_type
        self.flash_attention = flash_attention
        self.batch_tokens = batch_tokens
        self.counters: dict[str, int] = {}
        self._lock = threading.RLock()
        self._dropped: deque[Slot] = deque()  # slots of handles gone since the last call
        self._buffer: np.ndarray | None = None  # logits scratch (see _scratch)
        self._native = NativeModel(self._l, path, self.name)
        self.tokenizer = LlamaCppTokenizer(self._l, self._native)
        self._vocab = self.tokenizer.size
        self._train_ctx = int(self._l.llama_model_n_ctx_train(self._model))
        self.n_ctx = max(n_ctx, batch_tokens)  # llama.cpp caps a decode's tokens at the cells
        budget = int(max_cache_gb * 2**30) // max(1, self.cache_bytes_per_token)
        if budget < self.n_ctx:
            raise ModelError(
                f"max_cache_gb={max_cache_gb} holds {budget} tokens of {self.name!r}, fewer than "
                f"one cache of n_ctx={self.n_ctx}; raise max_cache_gb or lower n_ctx"
            )
        self.max_cells = budget
        self._lanes = [Lane(self, self.n_ctx)]

    @property
    def _model(self) -> Any:
        return self._native.model()

    @property
    def _vocab_ptr(self) -> Any:
        return self._native.vocab()

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Frees the llama.cpp contexts and model now (later use raises a ModelError)."""
        with self._lock:
            for lane in self._lanes:
                lane.close()
            self._lanes = []
            self._buffer = None
            native = getattr(self, "_native", None)
            if native is not None:
                native.free()

    def __del__(self) -> None:
        try:
            for lane in self._lanes:  # the model itself goes with the last user of it
                lane.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self) -> dict:
        raise TypeError(
            "a LlamaCppLM holds a native llama.cpp model and cannot be pickled; load it with "
            "lc.models.load (whose recipe travels instead)"
        )

    # -- protocol -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def max_context(self) -> int | None:  # type: ignore[override]
        """The longest context the model was trained for."""
        return self._train_ctx or None

    @functools.cached_property
    def cache_bytes_per_token(self) -> int:  # type: ignore[override]
        """Bytes of keys and values one cached token holds."""
        L = self._l
        layers = int(L.llama_model_n_layer(self._model))
        heads = max(1, int(L.llama_model_n_head(self._model)))
        kv_heads = int(L.llama_model_n_head_kv(self._model)) or heads
        head_dim = int(L.llama_model_n_embd(self._model)) // heads
        width = {"f16": 2, "f32": 4, "q8_0": 1}[self.kv_type]
        return 2 * layers * kv_heads * head_dim * width

    def encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode_prompt(text)

    def chat(self, user: str, *, system: str | None = None) -> str:
        """A prompt in the model's chat format (the GGUF's template, rendered as transformers
        renders it), ending where the assistant's reply begins; ``user`` unchanged when the
        GGUF has no template."""
        template = self._chat_template
        if not template:
            return user
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}
        ]
        piece = self.tokenizer.piece
        return template.render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=piece(int(self._l.llama_vocab_bos(self._vocab_ptr)))
            if int(self._l.llama_vocab_bos(self._vocab_ptr)) >= 0
            else "",
            eos_token=self.decode([self.eos_id]),
        )

    @functools.cached_property
    def _chat_template(self) -> Any:
        raw = self._l.llama_model_chat_template(self._model, None)
        if not raw:
            return None
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(raw.decode("utf-8", "replace"))

    def token_bytes(self) -> list[bytes | None]:
        """Each token's bytes (None for control and end-of-generation tokens)."""
        L, v = self._l, self._vocab_ptr
        out: list[bytes | None] = []
        for i in range(self._vocab):
            special = (
                i == self.eos_id or L.llama_vocab_is_control(v, i) or L.llama_vocab_is_eog(v, i)
            )
            out.append(None if special else self.tokenizer.piece(i))
        return out

    def pop_counters(self) -> dict[str, int]:
        out, self.counters = self.counters, {}
        return out

    def fork(self, context: Context) -> Context:
        """A new context sharing this one's slot (nothing is copied until one advances)."""
        with self._lock:
            self._settle()
            handle = self._handle(context)
            if handle is None:
                return Context(context.ids)
            return Context(context.ids, Handle(handle.slot, handle.n))

    def release(self, context: Context) -> None:
        """Drops the context; a slot no context uses any more is parked for prefix reuse."""
        with self._lock:
            context.state = None  # its handle is dropped: the slot is queued
            self._settle()

    def crop(self, context: Context, length: int) -> None:
        """Keeps the first ``length`` ids; the cells past them leave the slot lazily."""
        if not check_crop(context, length):
            return
        with self._lock:
            context.ids = context.ids[:length]
            handle = self._handle(context)
            if handle is not None and length == 0:
                context.state = handle = None
                self._settle()
            elif handle is not None and handle.n > length:
                handle.n = length

    def clear_cache(self) -> None:
        """Forgets every cached token (the memory stays reserved); contexts still open are
        computed again when next used."""
        with self._lock:
            for lane in self._lanes:
                lane.clear()

    def next_logprobs(self, contexts: Sequence[Context]) -> torch.Tensor:
        with self._lock:  # the rows live in the model's scratch buffer until normalised
            return torch.log_softmax(torch.from_numpy(self._run(contexts, [1] * len(contexts))), -1)

    def block_logprobs(
        self, contexts: Sequence[Context], counts: int | Sequence[int]
    ) -> list[torch.Tensor]:
        """The last ``counts[i]`` positions of every context in one decode (see
        :meth:`LanguageModel.block_logprobs`)."""
        counts = block_counts(contexts, counts)
        with self._lock:
            rows = torch.log_softmax(torch.from_numpy(self._run(contexts, counts)), -1)
        return list(rows.split(list(counts)))

    def path_logprobs(
        self, contexts: Sequence[Context], paths: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """Teacher forcing in one decode: each context is forked, extended by its path and
        scored; the contexts themselves are not changed."""
        with self._lock:
            forks = [self.fork(ctx) for ctx in contexts]
            try:
                for fork, path in zip(forks, paths, strict=True):
                    fork.extend(list(path[:-1]))
                out = self.block_logprobs(forks, [len(p) for p in paths])
            finally:
                for fork in forks:
                    self.release(fork)
        return out

    # -- slots ----------------------------------------------------------------------------------

    def _handle(self, context: Context) -> Handle | None:
        """The context's live handle (None when fresh, its slot was dropped, or it belongs to
        another model)."""
        h = context.state
        if isinstance(h, Handle) and h.slot.live and h.slot.lane.owner is self:
            return h
        return None

    def _settle(self) -> None:
        """Counts the handles dropped since the last call out of their slots; a slot no
        handle uses is parked (its tokens kept for prefix reuse until the room is needed)."""
        while self._dropped:
            slot = self._dropped.popleft()
            slot.refs -= 1
            if slot.refs <= 0:
                slot.lane.park(slot)

    @property
    def cached_cells(self) -> int:
        """KV cells reserved by every lane together."""
        return sum(lane.cells for lane in self._lanes)

    def _place(
        self,
        ids: Sequence[int],
        limit: int,
        busy: set[int],
        source: tuple[Slot, int] | None = None,
        index: PrefixIndex | None = None,
    ) -> tuple[Slot, int]:
        """A new slot for ``ids`` and how many of its first tokens it already holds.

        With ``source`` (a slot and a length) the slot is a copy of that prefix in the same
        lane; otherwise, or when that lane has no sequence to spare, a copy of the longest
        cached prefix (at most ``limit`` tokens) that ``index`` finds in a lane with room, or
        an empty slot in any lane with room (a new lane when none has).
        """
        if source is not None and source[0].lane.has_room(busy, keep=source[0]):
            slot, n = source
            return slot.lane.copy(slot, n, busy), n
        if index is not None:
            for src, k in index.longest(ids, limit):
                if src.live and src.lane.has_room(busy, keep=src):
                    return src.lane.copy(src, k, busy), k
        lane = next((la for la in self._lanes if la.free), None)
        lane = lane or next((la for la in self._lanes if la.has_room(busy)), None)
        return (lane or self._new_lane()).new_slot(busy), 0

    def _new_lane(self) -> Lane:
        if self.cached_cells + self.n_ctx > self.max_cells:
            raise ModelError(
                f"{self.name!r} holds {len(self._lanes) * MAX_SEQUENCES} sequences in "
                f"{self.cached_cells} cached tokens and needs more; raise max_cache_gb (now "
                f"{self.max_cells * self.cache_bytes_per_token / 2**30:.3g} GB) or use fewer "
                "particles"
            )
        lane = Lane(self, self.n_ctx)
        self._lanes.append(lane)
        self._count("lanes_opened")
        return lane

    # -- steps ----------------------------------------------------------------------------------

    def _run(self, contexts: Sequence[Context], counts: Sequence[int]) -> np.ndarray:
        """Logits of the last ``counts[i]`` positions of each context, context after context
        (``[sum(counts), vocab]``), after which every context (with a count) has all its ids
        cached.  The array may be the model's scratch buffer: valid until the next step."""
        with self._lock:
            if not self._lanes:
                self._native.model()  # closed: a ModelError saying so
            self._settle()
            for ctx in contexts:
                if not ctx.ids:
                    raise ModelError("a context needs at least one token; give the LM a prompt")
                if self.max_context and len(ctx.ids) > self.max_context:
                    raise ModelError(
                        f"a context of {len(ctx.ids)} tokens is longer than {self.name!r} "
                        f"holds ({self.max_context}); shorten the prompt or max_tokens"
                    )
            while True:
                try:
                    return self._step(contexts, counts)
                except NoRoom as full:
                    self._make_room(full.lane, contexts)

    def _make_room(self, lane: Lane, contexts: Sequence[Context]) -> None:
        """Drops the lane's parked slots; when it has none, rebuilds it twice as large."""
        if lane.parked:
            for slot in list(lane.parked.values()):
                lane.drop(slot)
            self._count("room_dropped_parked")
            return
        busy = {id(h.slot) for ctx in contexts if (h := self._handle(ctx)) is not None}
        idle = [slot for slot in lane.slots.values() if id(slot) not in busy]
        if idle:  # contexts not in this step (perhaps abandoned): computed again if used
            for slot in idle:
                lane.drop(slot)
            self._count("evicted_sequences", len(idle))
            return
        grow = min(lane.cells, self.max_cells - self.cached_cells)
        if grow <= 0:
            need = sum(len(ctx.ids) for ctx in contexts)
            raise ModelError(
                f"{self.name!r} needs more than {self.cached_cells} cached tokens "
                f"({self.cached_cells * self.cache_bytes_per_token / 2**30:.3g} GB) for a step "
                f"of {len(contexts)} contexts ({need} tokens in all); raise max_cache_gb, or "
                "use fewer or shorter sequences"
            )
        lane.open(lane.cells + grow)
        self._count("cache_rebuilds")

    def _scratch(self, rows: int) -> np.ndarray:
        """``rows`` rows of logits, in a buffer kept from step to step (up to
        :data:`SCRATCH_BYTES`): a fresh buffer of that size costs more in page faults than
        the copy into it."""
        buf = self._buffer
        if buf is None or len(buf) < rows:
            buf = np.empty((rows, self._vocab), np.float32)
            if buf.nbytes <= SCRATCH_BYTES:
                self._buffer = buf
        return buf[:rows]

    def _step(self, contexts: Sequence[Context], counts: Sequence[int]) -> np.ndarray:
        # 1. plan: which slot each context computes into, and from which position.  An entry
        #    serves ``members`` (identical fresh prompts share one) and keeps ``m`` logit rows.
        plan: list[tuple[list[int], Slot, int, int]] = []  # (members, slot, start, m)
        fresh: dict[tuple[int, ...], list[int]] = {}
        sharers: dict[int, list[int]] = {}  # id(slot) -> advancing context indices
        busy: set[int] = set()  # ids of the slots this step uses
        for i, (ctx, m) in enumerate(zip(contexts, counts, strict=True)):
            if m == 0:
                continue
            h = self._handle(ctx)
            if h is None:
                fresh.setdefault(tuple(ctx.ids), []).append(i)
            else:
                sharers.setdefault(id(h.slot), []).append(i)
                busy.add(id(h.slot))
        for members in sharers.values():
            slot = contexts[members[0]].state.slot
            owner = members[0] if slot.refs == len(members) else None
            for i in members:
                if i == owner:
                    continue
                ids = contexts[i].ids
                start = min(contexts[i].state.n, len(ids) - counts[i])
                new, start = self._place(ids, len(ids) - counts[i], busy, (slot, start))
                busy.add(id(new))
                contexts[i].state = Handle(new, start)
                plan.append(([i], new, start, counts[i]))
            if owner is not None:  # the last user computes in place, past what it keeps
                h = contexts[owner].state
                start = min(h.n, len(contexts[owner].ids) - counts[owner])
                slot.lane.truncate(slot, start)
                h.n = start
                plan.append(([owner], slot, start, counts[owner]))
        index = (
            PrefixIndex(s for lane in self._lanes for s in lane.slots.values()) if fresh else None
        )
        reused = 0
        for key, members in fresh.items():
            keep = max(counts[i] for i in members)
            slot, k = self._place(key, len(key) - keep, busy, index=index)
            busy.add(id(slot))
            for i in members:
                contexts[i].state = Handle(slot, k)
            plan.append((members, slot, k, keep))
            reused += k
        # 2. per lane, one batch of every new token; logits where a context needs them.
        #    Contexts in order within a lane (so that the rows usually come out in the order
        #    asked), then fresh prompts in sorted order, computing the tokens they share once.
        fresh_ids = {i for members in fresh.values() for i in members}
        lane_at = {id(lane): n for n, lane in enumerate(self._lanes)}

        def order(entry: tuple) -> tuple:
            members, slot = entry[0], entry[1]
            if members[0] in fresh_ids:  # by cached length, then tokens (SharedPrefixes)
                return (lane_at[id(slot.lane)], 1, entry[2], tuple(contexts[members[0]].ids))
            return (lane_at[id(slot.lane)], 0, members[0], ())

        plan.sort(key=order)
        try:
            return self._compute(contexts, counts, plan, fresh_ids, reused)
        except BaseException:  # no room (retried), a bad token, an error, Ctrl-C: back to what
            for members, slot, _, _ in plan:  # each slot recorded
                if not slot.live:
                    continue
                if members[0] in fresh_ids:  # fresh again, so a retry plans (and shares) anew
                    for i in members:
                        contexts[i].state = None
                    slot.lane.drop(slot)
                else:
                    self._l.llama_memory_seq_rm(slot.lane.mem, slot.seq, len(slot.ids), -1)
            raise

    def _compute(
        self,
        contexts: Sequence[Context],
        counts: Sequence[int],
        plan: list[tuple[list[int], Slot, int, int]],
        fresh_ids: set[int],
        reused: int,
    ) -> np.ndarray:
        """Decodes the planned entries (per lane, one batch of every new token, fresh
        prompts sharing their common tokens) and records what each slot then holds; the
        logits in context order."""
        logits = self._scratch(sum(m for *_, m in plan))
        tally = {
            "prefill_tokens": 0,
            "decode_tokens": 0,
            "shared_prompt_tokens": 0,
            "reused_prompt_tokens": reused,
        }
        by_lane: dict[int, tuple[Lane, list, SharedPrefixes]] = {}
        for members, slot, start, m in plan:
            ids = contexts[members[0]].ids
            first_out = len(ids) - m
            _, entries, sharing = by_lane.setdefault(
                id(slot.lane), (slot.lane, [], SharedPrefixes())
            )
            if members[0] in fresh_ids:
                joined = sharing.feed(entries, ids, slot.seq, start, first_out, self._token)
                tally["prefill_tokens"] += len(ids) - start - joined
                tally["shared_prompt_tokens"] += joined
            else:
                for pos in range(start, len(ids)):
                    entries.append((self._token(ids[pos]), pos, (slot.seq,), pos >= first_out))
                tally["decode_tokens"] += len(ids) - start
        row = 0
        for lane, entries, _ in by_lane.values():
            row = lane.decode(entries, logits, row)
            self._count("forward_passes")
        if not np.isfinite(np.add.reduce(logits, axis=None)):  # NaN or inf anywhere: a NaN in
            # shared cells would reach every sequence
            for lane, *_ in by_lane.values():
                lane.clear()
        for key, n in tally.items():
            if n:
                self._count(key, n)
        # 3. record what each slot now holds; the rows in context order
        offsets = np.cumsum([0, *counts]).tolist()
        moves = []  # (first row out, first row in logits, rows)
        row = 0
        for members, slot, _, m in plan:
            ids = contexts[members[0]].ids
            slot.ids.extend(ids[len(slot.ids) :])
            for i in members:
                moves.append((offsets[i], row + m - counts[i], counts[i]))
                contexts[i].state.n = len(ids)
            row += m
        if len(logits) == offsets[-1] and all(dst == src for dst, src, _ in moves):
            return logits
        out = np.empty((offsets[-1], self._vocab), np.float32)
        for dst, src, k in moves:
            out[dst : dst + k] = logits[src : src + k]
        return out

    def _token(self, tok: Any) -> int:
        """``tok`` checked as a token id of this vocabulary."""
        try:
            if 0 <= tok < self._vocab and int(tok) == tok:
                return int(tok)
        except TypeError:
            pass
        raise ModelError(
            f"token id {tok!r} in a context is outside the vocabulary of {self.name!r} "
            f"(0 to {self._vocab - 1})"
        )

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def __repr__(self) -> str:
        return f"LlamaCppLM({self.name!r}, threads={self.threads}, vocab={self._vocab})"
