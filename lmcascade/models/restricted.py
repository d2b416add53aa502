"""A draft model whose output head covers only the most frequent tokens (FR-Spec).

A small draft model spends much of its step in the output head (a ``vocab x hidden``
matrix product).  :func:`restrict_head` keeps only the ``top`` most frequent tokens of a
corpus (ranked by how often the model's tokenizer produces them there): a transformers
model then computes logits for those tokens alone, and every other token gets
probability zero.  As a speculative draft this never changes the result — the target
verifies every token with its full vocabulary — only how often drafts are accepted.

>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "b", "c", "<eos>"], lambda ids: [0.0, 0.0, 0.0, 0.0])
>>> small = restrict_head(lm, top=2, corpus="aab")
>>> [round(p, 3) for p in small.next_logprobs([small.open([0])])[0].exp().tolist()]
[0.333, 0.333, 0.0, 0.333]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from lmcascade.errors import OptionError
from lmcascade.models.base import Context, LanguageModel


def frequent_tokens(
    model: LanguageModel, corpus: str | Sequence[str] | None, top: int
) -> list[int]:
    """The ``top`` token ids the model's tokenizer produces most often in ``corpus`` (ties:
    lower id first), always with eos.  Without a corpus, the lowest ids: byte-pair
    vocabularies number their tokens roughly by how early (how frequently) they merged.

    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["a", "b", "c", "<eos>"], lambda ids: [0.0] * 4)
    >>> frequent_tokens(lm, ["cc", "b"], 2)
    [1, 2, 3]
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise OptionError(f"top must be a whole number >= 1, got {top!r}")
    vocab = model.vocab_size
    if corpus is None:
        chosen = list(range(min(top, vocab)))
    else:
        texts = [corpus] if isinstance(corpus, str) else list(corpus)
        if not all(isinstance(t, str) for t in texts):
            raise OptionError("corpus must be a text or a list of texts")
        counts: Counter[int] = Counter()
        for text in texts:
            counts.update(model.encode(text))
        if not counts:
            raise OptionError("the corpus has no tokens: give some text to rank tokens by")
        ranked = sorted(counts, key=lambda t: (-counts[t], t))
        chosen = [t for t in ranked if 0 <= t < vocab][:top]
    return sorted(set(chosen) | {model.eos_id})


def restrict_head(
    model: LanguageModel,
    top: int = 8192,
    corpus: str | Sequence[str] | None = None,
    tokens: Sequence[int] | None = None,
) -> LanguageModel:
    """``model`` with its output limited to ``tokens`` (default: the ``top`` most frequent
    in ``corpus``, see :func:`frequent_tokens`), renormalised over them.  A transformers
    model computes only those rows of its head (sharing every weight with ``model``);
    another model is wrapped and masked.  Use it as a speculative ``draft=``.

    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["a", "b", "<eos>"], lambda ids: [0.0, 0.0, 0.0])
    >>> restrict_head(lm, tokens=[0]).name
    'toy[2 tokens]'
    """
    if tokens is None:
        ids = frequent_tokens(model, corpus, top)
    else:
        tokens = list(tokens)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise OptionError("tokens must be a list of token ids (whole numbers)")
        ids = sorted(set(tokens) | {model.eos_id})
        if any(not 0 <= t < model.vocab_size for t in ids):
            raise OptionError(f"tokens must be ids below the vocabulary size {model.vocab_size}")
    restricted = getattr(model, "restricted", None)
    if callable(restricted):
        return restricted(ids)
    return RestrictedLM(model, ids)


class RestrictedLM(LanguageModel):
    """Any model, its next-token distributions masked to ``ids`` and renormalised (the same
    contexts and cache as the model it wraps)."""

    def __init__(self, base: LanguageModel, ids: Sequence[int]) -> None:
        self.base = base
        self.tokenizer = base.tokenizer
        self.ids = list(ids)
        self.name = f"{base.name}[{len(self.ids)} tokens]"
        self.max_context = base.max_context
        self.min_prompt_tokens = base.min_prompt_tokens
        self.cache_bytes_per_token = base.cache_bytes_per_token
        self._mask = torch.full((base.vocab_size,), float("-inf"), device=base.device)
        self._mask[self.ids] = 0.0

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size

    @property
    def device(self) -> torch.device:
        return self.base.device

    def _restrict(self, logprobs: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logprobs + self._mask.to(logprobs.device), dim=-1)

    def open(self, prompt_ids: Sequence[int]) -> Context:
        return self.base.open(prompt_ids)

    def fork(self, context: Context) -> Context:
        return self.base.fork(context)

    def release(self, context: Context) -> None:
        self.base.release(context)

    def crop(self, context: Context, length: int) -> None:
        self.base.crop(context, length)

    def next_logprobs(self, contexts: Sequence[Context]) -> torch.Tensor:
        return self._restrict(self.base.next_logprobs(contexts))

    def path_logprobs(self, contexts: Sequence[Context], paths: Any) -> list[torch.Tensor]:
        return [self._restrict(r) for r in self.base.path_logprobs(contexts, paths)]

    def block_logprobs(self, contexts: Sequence[Context], counts: Any) -> list[torch.Tensor]:
        return [self._restrict(r) for r in self.base.block_logprobs(contexts, counts)]

    def token_bytes(self) -> list[bytes | None]:
        return self.base.token_bytes()

    def encode_prompt(self, text: str) -> list[int]:
        return self.base.encode_prompt(text)
