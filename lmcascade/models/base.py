"""The language-model protocol every model in lmcascade implements.

A model exposes a tokenizer and *batched* next-token log-probabilities: the engine hands it
many :class:`Context` handles at once and gets one ``[batch, vocab]`` tensor back, so a whole
population of particles costs one model call per decoding step.  Contexts are opaque handles
the engine can :meth:`~LanguageModel.fork` (after resampling) and
:meth:`~LanguageModel.release`; for models without a cache these are plain bookkeeping.

>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, 0.0])
>>> ctx = lm.open(lm.tokenizer.encode("ab"))
>>> lm.next_logprobs([ctx]).exp().tolist()  # doctest: +ELLIPSIS
[[0.333..., 0.333..., 0.333...]]
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from lmcascade.errors import ModelError


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids.  ``decode`` never includes the eos token in its text."""

    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class Context:
    """A handle to one token sequence (prompt, then generated tokens) owned by a model.

    ``ids`` is the full sequence; ``state`` is whatever the model keeps for it (a KV-cache row,
    nothing at all for a toy model).  Grow it with :meth:`append` or :meth:`extend`; fork,
    crop and release through the model, which knows what the state means.
    """

    __slots__ = ("ids", "state")

    def __init__(self, ids: Sequence[int], state: Any = None) -> None:
        self.ids: list[int] = list(ids)
        self.state = state

    def append(self, token_id: int) -> None:
        """Record one more token; the model processes it on its next call."""
        self.ids.append(token_id)

    def extend(self, token_ids: Sequence[int]) -> None:
        """Record several more tokens; the model processes them on its next call (all of them
        in one pass with :meth:`LanguageModel.block_logprobs`)."""
        self.ids.extend(int(t) for t in token_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Context(len={len(self.ids)})"


def block_counts(contexts: Sequence[Context], counts: int | Sequence[int]) -> list[int]:
    """``counts`` of :meth:`LanguageModel.block_logprobs` as one int per context, checked."""
    counts = [counts] * len(contexts) if isinstance(counts, int) else [int(m) for m in counts]
    if len(counts) != len(contexts):
        raise ModelError(f"{len(contexts)} contexts but {len(counts)} block counts")
    for ctx, m in zip(contexts, counts, strict=True):
        if not 0 <= m <= len(ctx.ids):
            raise ModelError(
                f"a block of {m} positions does not fit a context of {len(ctx.ids)} tokens"
            )
    return counts


def check_crop(context: Context, length: int) -> bool:
    """Whether cropping ``context`` to ``length`` ids removes any (negative is an error)."""
    if length < 0:
        raise ModelError(f"cannot crop a context to {length} tokens")
    return length < len(context.ids)


BATCHED_CALLS = ("next_logprobs", "path_logprobs", "block_logprobs")
"""The model methods that compute: while a :data:`BATCHER` is set, they are routed to it."""

BATCHER: ContextVar[Any] = ContextVar("lmcascade_model_batcher", default=None)
"""Where this thread's model calls go instead of the model: an object with
``submit(model, name, fn, args, kwargs)`` that returns what ``fn(model, *args, **kwargs)``
would.  ``lc.infer_many`` sets it in each input's run so that the calls of every run are
made together, as one batched call (see :mod:`lmcascade.inference.many`)."""


def routed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a model method named ``name``), sent to the thread's :data:`BATCHER` if set."""

    @functools.wraps(fn)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        batcher = BATCHER.get()
        if batcher is None:
            return fn(self, *args, **kwargs)
        return batcher.submit(self, name, fn, args, kwargs)

    method.routed = True  # type: ignore[attr-defined]
    return method


def _route(cls: type) -> None:
    for name in BATCHED_CALLS:
        fn = cls.__dict__.get(name)
        if fn is not None and not getattr(fn, "routed", False):
            setattr(cls, name, routed(name, fn))


@dataclass(frozen=True)
class Recipe:
    """How another process makes a model again: ``fn(*args, **kwargs)``.  A model loaded by
    name or folder carries one (:func:`lmcascade.models.load` sets it), so it travels to a
    Ray worker as these few words rather than its weights; ``args`` may hold other models
    (a restricted head's base).

    >>> from lmcascade.models import ToyLM
    >>> Recipe(ToyLM, (["a", "<eos>"], lambda ids: [0.0, 0.0])).make()
    ToyLM('toy', vocab=2)
    """

    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def make(self) -> Any:
        """The model, made anew."""
        return self.fn(*self.args, **self.kwargs)


class LanguageModel(ABC):
    """Base class of every model: a tokenizer plus batched next-token log-probabilities.

    Subclasses implement :meth:`next_logprobs`; models with a cache also override
    :meth:`open`, :meth:`fork`, :meth:`release`, :meth:`crop` and
    :meth:`block_logprobs`.  ``recipe`` says how another process makes the same model
    (None: it is sent by value, as a ToyLM is).
    """

    name: str = "model"
    tokenizer: Tokenizer
    max_context: int | None = None  # tokens a context may hold (prompt and generation); None: any
    min_prompt_tokens: int = 0  # a model that needs a token to condition on says 1
    cache_bytes_per_token: int = 0  # a cached model's memory per context token (0: none)
    recipe: Recipe | None = None  # how another process makes this model again

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _route(cls)  # every model's compute methods can be batched across runs

    @property
    def eos_id(self) -> int:
        """Id of the end-of-sequence token."""
        return self.tokenizer.eos_id

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of rows of the output distribution."""

    @property
    def device(self) -> torch.device:
        """Where the model's tensors (and the sampling that reads them) live."""
        return torch.device("cpu")

    def open(self, prompt_ids: Sequence[int]) -> Context:
        """Start a context from prompt token ids."""
        return Context(prompt_ids)

    def fork(self, context: Context) -> Context:
        """A new, independent handle continuing from the same tokens (state shared, not copied)."""
        return Context(context.ids, context.state)

    def release(self, context: Context) -> None:
        """The engine no longer needs ``context``; free what it holds."""
        context.state = None

    @abstractmethod
    def next_logprobs(self, contexts: Sequence[Context]) -> torch.Tensor:
        """Normalised next-token log-probabilities, shape ``[len(contexts), vocab_size]``."""

    def path_logprobs(
        self, contexts: Sequence[Context], paths: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """Teacher forcing: row ``j`` of result ``i`` is the next-token distribution after
        ``contexts[i]`` followed by ``paths[i][:j]`` (shape ``[len(paths[i]), vocab]``).

        This default steps position by position, batched across paths; models that can score
        a whole path in one pass (transformers) override it.
        """
        forks = [Context(ctx.ids) for ctx in contexts]
        rows: list[list[torch.Tensor]] = [[] for _ in paths]
        for j in range(max((len(p) for p in paths), default=0)):
            active = [i for i, p in enumerate(paths) if j < len(p)]
            out = self.next_logprobs([forks[i] for i in active])
            for i, row in zip(active, out, strict=True):
                rows[i].append(row)
                forks[i].append(paths[i][j])
        return [torch.stack(r) if r else torch.empty(0, self.vocab_size) for r in rows]

    def block_logprobs(
        self, contexts: Sequence[Context], counts: int | Sequence[int]
    ) -> list[torch.Tensor]:
        """Next-token log-probabilities at each of the last ``counts[i]`` positions of
        ``contexts[i]`` (an int means the same count for every context).

        Result ``i`` has shape ``[counts[i], vocab_size]``: with ``L = len(contexts[i])`` and
        ``m = counts[i]``, row ``j`` is the distribution of the token after
        ``ids[: L - m + j + 1]``, so the last row is what :meth:`next_logprobs` gives.  Any
        ``0 <= m <= L`` is allowed, whatever the model has processed before: after
        :meth:`Context.extend` with ``k`` drafted tokens, ``m = k`` scores the tokens after
        each draft and ``m = k + 1`` the draft's first token too.  The contexts are then
        ready for one-token steps.

        This default steps position by position, batched across contexts; models with a cache
        (transformers) do it in one forward pass.

        >>> from lmcascade.models import ToyLM
        >>> lm = ToyLM(["a", "b", "<eos>"], lambda ids: [float(len(ids)), 0.0, 0.0])
        >>> ctx = lm.open(lm.encode("ab"))
        >>> ctx.extend(lm.encode("ba"))              # ids: a b b a
        >>> rows = lm.block_logprobs([ctx], 3)[0]    # after "ab", "abb", "abba"
        >>> rows.shape
        torch.Size([3, 3])
        >>> bool(torch.equal(rows[-1], lm.next_logprobs([ctx])[0]))
        True
        >>> lm.crop(ctx, 3)                          # roll back to "abb"
        >>> bool(torch.equal(lm.next_logprobs([ctx])[0], rows[1]))
        True
        """
        counts = block_counts(contexts, counts)
        forks = [
            Context(ctx.ids[: len(ctx.ids) - m + 1])
            for ctx, m in zip(contexts, counts, strict=True)
        ]
        rows: list[list[torch.Tensor]] = [[] for _ in contexts]
        for j in range(max(counts, default=0)):
            active = [i for i, m in enumerate(counts) if j < m]
            out = self.next_logprobs([forks[i] for i in active])
            for i, row in zip(active, out, strict=True):
                rows[i].append(row)
                if j + 1 < counts[i]:
                    forks[i].append(contexts[i].ids[len(contexts[i].ids) - counts[i] + j + 1])
        return [torch.stack(r) if r else torch.empty(0, self.vocab_size) for r in rows]

    def crop(self, context: Context, length: int) -> None:
        """Roll ``context`` back to its first ``length`` ids (a no-op when it has no more).

        Nothing is recomputed: the next call continues from the shorter sequence exactly as a
        fresh context with those ids would.  Forks of the context are unaffected.  This
        default truncates the ids and drops the model state (models with a cache keep the
        part of it that is still valid).
        """
        if check_crop(context, length):
            context.ids = context.ids[:length]
            context.state = None

    def token_bytes(self) -> list[bytes | None]:
        """Each token's bytes as it appears in text (None for special tokens such as eos);
        used to compile regular-expression constraints against the vocabulary."""
        out: list[bytes | None] = []
        for i in range(self.vocab_size):
            out.append(None if i == self.eos_id else self.decode([i]).encode("utf-8"))
        return out

    def pop_counters(self) -> dict[str, int]:
        """Model-specific counts since the last call (prefill tokens, forward passes...)."""
        return {}

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt (models that start texts with a BOS token add it here)."""
        return self.tokenizer.encode(text)

    def check_fits(self, prompt_tokens: int, more_tokens: int) -> None:
        """Raises :class:`ModelError` unless a prompt of ``prompt_tokens`` followed by up to
        ``more_tokens`` generated or scored tokens fits this model's context.

        >>> from lmcascade.models import ToyLM
        >>> ToyLM(["a", "<eos>"], lambda ctx: [0.0, 0.0]).check_fits(0, 10**6)
        """
        if prompt_tokens < self.min_prompt_tokens:
            raise ModelError(
                f"model {self.name!r} needs a prompt of at least {self.min_prompt_tokens} "
                f"token(s), got {prompt_tokens}; give the LM a non-empty prompt"
            )
        limit = self.max_context
        if limit is not None and prompt_tokens + more_tokens > limit:
            if prompt_tokens >= limit:
                raise ModelError(
                    f"the prompt has {prompt_tokens} tokens but model {self.name!r} holds "
                    f"{limit}; shorten the prompt"
                )
            raise ModelError(
                f"the prompt has {prompt_tokens} tokens and up to {more_tokens} more may follow, "
                f"but model {self.name!r} holds {limit} tokens; lower max_tokens to at most "
                f"{limit - prompt_tokens} or shorten the prompt"
            )

    def encode(self, text: str) -> list[int]:
        """Shorthand for ``self.tokenizer.encode``."""
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Shorthand for ``self.tokenizer.decode``."""
        return self.tokenizer.decode(ids)


_route(LanguageModel)  # its default path and block methods too
