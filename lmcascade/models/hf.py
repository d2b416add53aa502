"""TransformersLM: any Hugging Face causal language model, batched for populations.

One forward pass per decoding step serves every context waiting on the model, whatever their
lengths: cached keys/values of all rows sit on one left-padded time axis with an attention
mask and explicit position ids (:mod:`lmcascade.models.kv`).  A prompt shared by many
contexts is computed once; a prompt that extends something computed earlier (an earlier
site's context, say) only computes its new tokens.  Forking a context shares its cache row;
the next step gathers rows by index in one operation per layer.  Nothing is deep-copied.

Keys and values live in buffers with spare columns: a step that continues a batch writes its
new column into the buffer in place (transformers' cache layers are given a layer that
writes there instead of concatenating), so a long context does not copy its whole cache per
token.  :meth:`~TransformersLM.block_logprobs` feeds several tokens per context in one pass
(speculative decoding), and :meth:`~TransformersLM.crop` rolls a context back without
recomputing or copying anything.

>>> from lmcascade.models.hf import TransformersLM  # doctest: +SKIP
>>> lm = TransformersLM.from_pretrained("path/to/model")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmcascade.errors import ModelError
from lmcascade.models.base import Context, LanguageModel, Recipe, block_counts, check_crop
from lmcascade.models.kv import Extension, KVBatch, PrefixIndex, gather, stack_prefixes


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'") from err
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"device {device!r} cannot run a model; use 'auto', 'cpu' or 'cuda[:N]'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for but no CUDA GPU is available; use 'auto'")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 on CPU and bf16 on GPU unless told otherwise."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silences transformers' progress bars and info logs for a block, then restores them."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


class HFTokenizer:
    """A Hugging Face tokenizer seen through lmcascade's Tokenizer protocol.

    ``encode`` adds no special tokens (it tokenizes continuations); ``encode_prompt`` adds
    what the tokenizer adds at the start of a text (a BOS token, for models that use one).
    """

    def __init__(self, tok: Any, eos_id: int | None = None) -> None:
        self.hf = tok
        eos = eos_id if eos_id is not None else tok.eos_token_id
        if eos is None:
            raise ModelError("the tokenizer has no eos token; pass eos_id=... to TransformersLM")
        self.eos_id = int(eos)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_prompt(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=True))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(
            list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def __len__(self) -> int:
        return len(self.hf)


def _buffer_support(config: Any) -> tuple[int, bool]:
    """Layer count, and whether every cache layer is a plain growing one (so that the
    buffered cache, which writes into preallocated columns, can stand in for it)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        layers = DynamicCache(config=config).layers
    except (TypeError, ValueError, AttributeError, KeyError):
        return 0, False
    return len(layers), bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


@functools.cache
def _buffer_cache_type() -> type:
    """A transformers ``Cache`` whose layers write new keys/values into the buffers of a
    :class:`~lmcascade.models.kv.Extension` instead of concatenating them onto the past."""
    from transformers.cache_utils import Cache, DynamicLayer

    class BufferLayer(DynamicLayer):
        def __init__(self, grow: Extension, index: int) -> None:
            super().__init__()
            self.grow, self.index = grow, index
            past = grow.past_layer(index)
            if past is not None:
                self.keys, self.values = past
                self.device = past[0].device
                self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:
            self.device = key_states.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            self.keys, self.values = self.grow.write(self.index, key_states, value_states)
            self.is_initialized = True
            return self.keys, self.values

    class BufferCache(Cache):
        def __init__(self, grow: Extension, layers: int) -> None:
            super().__init__(layers=[BufferLayer(grow, i) for i in range(layers)])

    return BufferCache


@dataclass(frozen=True, slots=True)
class Place:
    """Where a context's cached tokens live: the first ``n`` real tokens of row ``row`` of
    ``batch`` (the row may hold more, after a crop; a step masks them out)."""

    batch: KVBatch
    row: int
    n: int


class TransformersLM(LanguageModel):
    """A Hugging Face causal LM implementing the batched :class:`LanguageModel` protocol.

    ``model`` is a loaded ``PreTrainedModel`` (or use :meth:`from_pretrained` with a local
    folder); ``device="auto"`` picks CUDA when present; ``dtype`` defaults to fp32 on CPU and
    bf16 on GPU.  ``memory_budget_gb`` caps the estimated memory of one batched step on CPU:
    bigger steps are split (as CUDA out-of-memory errors are), and ``counters["oom_splits"]``
    says how often.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str | None = None,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype | None = None,
        eos_id: int | None = None,
        memory_budget_gb: float | None = None,
        prefix_cache_gb: float = 1.0,
    ) -> None:
        self.device_ = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device_)
        self.hf = model.to(device=self.device_, dtype=self.dtype).eval()
        self.config = model.config
        self.tokenizer = HFTokenizer(tokenizer, eos_id)
        self.name = name or getattr(model.config, "name_or_path", None) or type(model).__name__
        self._vocab = int(model.get_output_embeddings().weight.shape[0])
        self.memory_budget = None if memory_budget_gb is None else memory_budget_gb * 2**30
        self.prefix_index = PrefixIndex(max_bytes=int(prefix_cache_gb * 2**30))
        self.counters: dict[str, int] = {}
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in params else None
        self._layer_count, self._buffered = _buffer_support(self.config)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> TransformersLM:
        """Loads a model and tokenizer from a local folder (no network is used)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not os.path.isdir(path):
            raise ModelError(f"no model folder at {str(path)!r}")
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        return cls(model, tok, name=kwargs.pop("name", os.path.basename(str(path))), **kwargs)

    def restricted(self, token_ids: Sequence[int]) -> TransformersLM:
        """A twin whose output head computes only ``token_ids`` (every other token gets
        probability zero): the FR-Spec draft head.  It shares every weight with this model
        but keeps its own caches; see :func:`lmcascade.models.restricted.restrict_head`."""
        ids = sorted({int(t) for t in token_ids})
        head = self.full_head if self.full_head is not None else self.hf.get_output_embeddings()
        if self.head_ids is not None:  # restricting a twin: within what it already computes
            ids = sorted(set(ids) & set(self.head_ids.tolist()))
        small = torch.nn.Linear(
            head.weight.shape[1],
            len(ids),
            bias=getattr(head, "bias", None) is not None,
            device=head.weight.device,
            dtype=head.weight.dtype,
        ).requires_grad_(False)
        index = torch.tensor(ids, device=head.weight.device)
        small.weight.copy_(head.weight.detach().index_select(0, index))
        if small.bias is not None:
            small.bias.copy_(head.bias.detach().index_select(0, index))
        module = copy.copy(self.hf)  # the same submodules, its own table of them
        module._modules = dict(self.hf._modules)
        module.set_output_embeddings(small)
        twin = copy.copy(self)
        twin.hf = module
        twin.head_ids = index.to(self.device_)
        twin.full_head = head
        twin.name = f"{self.name}[{len(ids)} tokens]"
        twin.prefix_index = PrefixIndex(max_bytes=self.prefix_index.max_bytes)
        twin.counters = {}
        # made in another process from its base (which travels by its own recipe)
        twin.recipe = Recipe(TransformersLM.restricted, (self, ids)) if self.recipe else None
        return twin

    def chat(self, user: str, *, system: str | None = None) -> str:
        """A prompt in the model's chat format, ending where the assistant's reply begins.

        Models without a chat template get ``user`` back unchanged.
        """
        hf = self.tokenizer.hf
        if not getattr(hf, "chat_template", None):
            return user
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}
        ]
        return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # -- protocol -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab

    min_prompt_tokens = 1  # a transformer needs a token to condition on
    head_ids: torch.Tensor | None = None  # the tokens a restricted head computes (None: all)
    full_head: Any = None  # a restricted twin's original output head

    @functools.cached_property
    def cache_bytes_per_token(self) -> int:
        """Bytes of keys and values one token of one context holds (0 where unknown)."""
        cfg = self.config
        try:
            heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            layers = cfg.num_hidden_layers
        except (AttributeError, TypeError, ZeroDivisionError):
            return 0
        return 2 * layers * heads * head_dim * torch.finfo(self.dtype).bits // 8

    @property
    def max_context(self) -> int | None:  # type: ignore[override]
        """The longest context the model was trained for (its position limit)."""
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(self.config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def device(self) -> torch.device:
        return self.device_

    def encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode_prompt(text)

    def release(self, context: Context) -> None:
        """Offers the context's cache to later prompts that extend it, then drops the handle."""
        place = context.state
        if isinstance(place, Place) and place.n > 0:
            self.prefix_index.insert(context.ids[: place.n], place.batch, place.row)
        context.state = None

    def token_bytes(self) -> list[bytes | None]:
        """Token bytes; byte-level BPE vocabularies (GPT-2 style) are mapped back exactly."""
        hf = self.tokenizer.hf
        special = set(hf.all_special_ids) | {self.eos_id}
        pieces = hf.convert_ids_to_tokens(list(range(self._vocab)))
        table = _byte_decoder()
        byte_level = all(p is None or all(c in table for c in p) for p in pieces[:2000])
        # Other tokenizers (SentencePiece) drop a token's leading space when it is decoded
        # alone: decode it after an anchor token and keep what the token added.
        anchor = next(i for i in range(self._vocab) if i not in special)
        base = self.tokenizer.decode([anchor])
        out: list[bytes | None] = []
        for i, piece in enumerate(pieces):
            if i in special or piece is None:
                out.append(None)
            elif byte_level and all(c in table for c in piece):
                out.append(bytes(table[c] for c in piece))
            else:
                out.append(self.tokenizer.decode([anchor, i])[len(base) :].encode("utf-8"))
        return out

    def pop_counters(self) -> dict[str, int]:
        out, self.counters = self.counters, {}
        return out

    def next_logprobs(self, contexts: Sequence[Context]) -> torch.Tensor:
        out = torch.empty(len(contexts), self._vocab, device=self.device_, dtype=torch.float32)
        for index, logits in self._run(contexts, [1] * len(contexts)):
            out[index] = logits[:, -1]
        return torch.log_softmax(out, dim=-1)

    def block_logprobs(
        self, contexts: Sequence[Context], counts: int | Sequence[int]
    ) -> list[torch.Tensor]:
        """The last ``counts[i]`` positions of every context in one forward pass (see
        :meth:`LanguageModel.block_logprobs`).

        Each context reuses its own cache (or, fresh, the prefix index) and feeds only the
        tokens it needs; blocks of different lengths are right-aligned, padding masked.
        Afterwards every context's cache holds all its ids, so the next :meth:`next_logprobs`
        after an :meth:`~Context.append` is a one-token step.
        """
        counts = block_counts(contexts, counts)
        out = [torch.empty(0, self._vocab, device=self.device_) for _ in contexts]
        for index, logits in self._run(contexts, counts):
            logprobs = torch.log_softmax(logits, dim=-1)
            width = logprobs.shape[1]
            for r, i in enumerate(index):
                out[i] = logprobs[r, width - counts[i] :]
        return out

    def crop(self, context: Context, length: int) -> None:
        """Keeps the first ``length`` ids.  Nothing is recomputed or copied: the context's
        place keeps pointing at the same (shared) cache row with fewer tokens, and the next
        step masks the dropped columns out.  Forks sharing the row are unaffected."""
        if not check_crop(context, length):
            return
        context.ids = context.ids[:length]
        place = context.state
        if isinstance(place, Place) and place.n > length:
            context.state = Place(place.batch, place.row, length) if length else None

    # -- steps ----------------------------------------------------------------------------------

    def _run(
        self, contexts: Sequence[Context], counts: Sequence[int]
    ) -> list[tuple[list[int], torch.Tensor]]:
        """Logits of the last ``counts[i]`` positions of every context, in at most two forward
        passes: contexts with a cache row continue it; the others are prefilled (identical
        ones once, reusing the prefix index).  Returns ``(indices, logits)`` groups: row ``r``
        of ``logits`` (``[rows, k, vocab]``) belongs to ``contexts[indices[r]]``, whose
        positions are its last ``counts[indices[r]]`` ones."""
        advance: list[int] = []
        prefill: list[int] = []
        starts: dict[int, int] = {}
        for i, (ctx, m) in enumerate(zip(contexts, counts, strict=True)):
            if m == 0:
                continue
            if not ctx.ids:
                raise ModelError("a context needs at least one token; give the LM a prompt")
            place = ctx.state
            start = min(place.n, len(ctx.ids) - m) if isinstance(place, Place) else 0
            if start > 0:
                starts[i] = start
                advance.append(i)
            else:
                prefill.append(i)
        groups = []
        with torch.inference_mode():
            if prefill:
                items = [(contexts[i], counts[i], 0) for i in prefill]
                groups.append((prefill, self._split_on_oom(self._prefill, items)))
            if advance:
                items = [(contexts[i], counts[i], starts[i]) for i in advance]
                groups.append((advance, self._split_on_oom(self._advance, items)))
        return groups

    def _split_on_oom(self, step, items: list) -> torch.Tensor:
        try:
            return step(items)
        except torch.OutOfMemoryError as err:
            if len(items) == 1:
                raise ModelError(
                    f"model {self.name!r} ran out of memory on a single sequence of "
                    f"{len(items[0][0].ids)} tokens; use a smaller model, dtype='bf16', or "
                    "shorter prompts"
                ) from err
            if self.device_.type == "cuda":
                torch.cuda.empty_cache()
            self._count("oom_splits")
            half = len(items) // 2
            parts = [self._split_on_oom(step, items[:half]), self._split_on_oom(step, items[half:])]
            width = max(p.shape[1] for p in parts)  # right-aligned: pad on the left
            parts = [torch.nn.functional.pad(p, (0, 0, width - p.shape[1], 0)) for p in parts]
            return torch.cat(parts)

    def _check_budget(self, rows: int, width: int) -> None:
        if self.memory_budget is None or rows == 1:
            return
        if 2 * rows * width * self.cache_bytes_per_token > self.memory_budget:
            raise torch.OutOfMemoryError("step over memory_budget_gb")

    def _advance(self, items: list[tuple[Context, int, int]]) -> torch.Tensor:
        """Continues each context's own cache row: feeds ``ids[start:]`` (right-aligned,
        ragged blocks left-padded) on top of its first ``start`` cached tokens."""
        places = [(ctx.state.batch, ctx.state.row, start) for ctx, _, start in items]
        sizes = [len(ctx.ids) - start for ctx, _, start in items]
        width = max(sizes)
        past = gather(places, room=width)
        self._check_budget(len(items), past.width + width)
        if width == 1:
            ids = torch.tensor([[ctx.ids[-1]] for ctx, _, _ in items], device=self.device_)
            positions = torch.tensor([[start] for _, _, start in items], device=self.device_)
        else:
            eos, rows, pos = self.tokenizer.eos_id, [], []
            for (ctx, _, start), size in zip(items, sizes, strict=True):
                rows.append([eos] * (width - size) + ctx.ids[start:])
                pos.append([0] * (width - size) + list(range(start, start + size)))
            ids = torch.tensor(rows, device=self.device_)
            positions = torch.tensor(pos, device=self.device_)
        real = None
        if any(s < width for s in sizes):
            real = torch.tensor([[0] * (width - s) + [1] * s for s in sizes], device=self.device_)
        new = real if real is not None else past.mask.new_ones(len(items), width)
        mask = torch.cat([past.mask, new], dim=1)
        counts = [len(ctx.ids) for ctx, _, _ in items]
        keep = max(m for _, m, _ in items)
        logits, batch = self._forward(ids, mask, positions, past, counts, real, keep=keep)
        for row, (ctx, _, _) in enumerate(items):
            ctx.state = Place(batch, row, len(ctx.ids))
        self._count("decode_tokens", sum(sizes))
        return logits

    def _prefill(self, items: list[tuple[Context, int, int]]) -> torch.Tensor:
        groups: dict[tuple[int, ...], list[tuple[Context, int]]] = {}
        for ctx, m, _ in items:
            groups.setdefault(tuple(ctx.ids), []).append((ctx, m))
        keys = list(groups)
        keep = [max(m for _, m in groups[key]) for key in keys]
        owns = [
            next((c.state for c, _ in groups[key] if isinstance(c.state, Place)), None)
            for key in keys
        ]
        logits, batch = self._extend(keys, keep, owns)
        row_of: dict[int, int] = {}
        for r, key in enumerate(keys):
            for ctx, _ in groups[key]:
                ctx.state = Place(batch, r, len(key))
                row_of[id(ctx)] = r
        index = torch.tensor([row_of[id(ctx)] for ctx, _, _ in items], device=self.device_)
        return logits.index_select(0, index)

    def _extend(
        self, keys: list[tuple[int, ...]], keep: list[int], owns: list[Any] | None = None
    ) -> tuple[torch.Tensor, KVBatch]:
        """Computes rows ``keys`` (reusing cached prefixes) in one forward pass.

        Returns the logits of each row's last ``max(keep)`` positions (row ``r``'s last
        ``keep[r]`` are meaningful) and the new cache batch, whose rows are offered to the
        prefix index.
        """
        places: list[tuple[KVBatch, int, int] | None] = []
        reused: list[int] = []
        for r, key in enumerate(keys):
            limit = len(key) - keep[r]  # those positions' logits must be computed
            k, place = self.prefix_index.longest(key[:limit])
            own = owns[r] if owns else None
            if isinstance(own, Place) and min(own.n, limit) > k:
                k, place = min(own.n, limit), (own.batch, own.row)
            places.append((place[0], place[1], k) if k else None)
            reused.append(k)
        self._check_budget(len(keys), max(len(k) for k in keys))
        suffix_len = [len(key) - k for key, k in zip(keys, reused, strict=True)]
        width = max(suffix_len)
        past = stack_prefixes(places, width, self.device_)
        ids = torch.full((len(keys), width), self.tokenizer.eos_id, dtype=torch.long)
        smask = torch.zeros(len(keys), width, dtype=torch.long)
        positions = torch.zeros(len(keys), width, dtype=torch.long)
        for r, (key, k, s) in enumerate(zip(keys, reused, suffix_len, strict=True)):
            ids[r, width - s :] = torch.tensor(key[k:])
            smask[r, width - s :] = 1
            positions[r, width - s :] = torch.arange(k, k + s)
        ids, smask, positions = (t.to(self.device_) for t in (ids, smask, positions))
        mask = smask if past is None else torch.cat([past.mask, smask], dim=1)
        real = smask if any(s < width for s in suffix_len) else None
        counts = [len(key) for key in keys]
        logits, batch = self._forward(ids, mask, positions, past, counts, real, keep=max(keep))
        for r, key in enumerate(keys):
            self.prefix_index.insert(key, batch, r)
        self._count("prefill_tokens", sum(suffix_len))
        self._count("reused_prompt_tokens", sum(reused))
        return logits, batch

    def path_logprobs(
        self, contexts: Sequence[Context], paths: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """Teacher forcing in one batched pass: row ``j`` of result ``i`` is the next-token
        distribution after ``contexts[i]`` followed by ``paths[i][:j]``.  The contexts are
        not changed (their caches and the prefix index are read)."""
        if any(not ctx.ids for ctx in contexts):
            raise ModelError("a context needs at least one token; give the LM a prompt")
        keys = [
            tuple(ctx.ids) + tuple(path[:-1]) for ctx, path in zip(contexts, paths, strict=True)
        ]
        keep = [len(path) for path in paths]
        with torch.inference_mode():
            logits, _ = self._extend(keys, keep, [ctx.state for ctx in contexts])
            logprobs = torch.log_softmax(logits, dim=-1)
        width = logits.shape[1]
        return [logprobs[r, width - n :] for r, n in enumerate(keep)]

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        past: KVBatch | None,
        counts: list[int],
        real: torch.Tensor | None,
        keep: int = 1,
    ) -> tuple[torch.Tensor, KVBatch]:
        """One forward pass of ``ids`` on top of ``past``; returns the logits of the last
        ``keep`` positions and the batch of all rows' keys/values (``counts`` real tokens
        each; ``real`` marks the new columns that are not padding, None when all are)."""
        kwargs: dict[str, Any] = {}
        if self._buffered:
            grow = Extension(past, ids.shape[1])
            cache: Any = _buffer_cache_type()(grow, self._layer_count)
        else:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.config)
            if past is not None:
                for layer, (k, v) in zip(cache.layers, past.layers, strict=True):
                    layer.lazy_initialization(k, v)
                    layer.keys, layer.values = k, v
        kwargs[self._cache_kw] = cache
        if self._keep_kw:
            kwargs[self._keep_kw] = keep
        # Without padding the mask is plain causal: leaving it out lets attention take its
        # fast causal path instead of materialising a mask.
        dense = real is None and (past is None or past.dense)
        out = self.hf(
            input_ids=ids,
            attention_mask=None if dense else mask,
            position_ids=positions,
            use_cache=True,
            **kwargs,
        )
        self._count("forward_passes")
        logits = out.logits[:, -keep:, :].float()
        if self.head_ids is not None:  # a restricted head: the other tokens are impossible
            full = logits.new_full((*logits.shape[:-1], self._vocab), float("-inf"))
            logits = full.index_copy_(-1, self.head_ids, logits)
        if self._buffered:
            if real is not None:  # padding keys/values zeroed: never NaN
                grow.zero_new(real)
            return logits, grow.batch(mask, counts)
        new = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        layers = [(layer.keys, layer.values) for layer in new.layers]
        if not dense:
            keep_real = mask.bool()[:, None, :, None]
            layers = [
                (k.masked_fill(~keep_real, 0), v.masked_fill(~keep_real, 0)) for k, v in layers
            ]
        return logits, KVBatch(layers, mask, counts)

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def __repr__(self) -> str:
        return (
            f"TransformersLM({self.name!r}, device={str(self.device_)!r}, "
            f"dtype={str(self.dtype).removeprefix('torch.')}, vocab={self._vocab})"
        )
