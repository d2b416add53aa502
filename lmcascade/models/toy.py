"""ToyLM: a language model defined by a Python function, small enough to enumerate exactly.

Every inference method is tested against exact enumeration on ToyLM programs.

>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["yes", "no", "<eos>"], lambda ctx: [1.0, 0.0, 0.0] if not ctx else [0.0, 0.0, 5.0])
>>> lm.tokenizer.encode("yesno")
[0, 1]
>>> lm.tokenizer.decode([0, 2])
'yes'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lmcascade.errors import ModelError, TokenizationError, VocabularyError
from lmcascade.models.base import Context, LanguageModel

NextLogprobs = Callable[[tuple[int, ...]], Sequence[float] | torch.Tensor]


class ToyTokenizer:
    """Greedy longest-match tokenizer over a list of token strings (eos never matches text)."""

    def __init__(self, vocab: Sequence[str], eos: str) -> None:
        self.vocab = list(vocab)
        self.eos_id = self.vocab.index(eos)
        self._ids = {tok: i for i, tok in enumerate(self.vocab) if i != self.eos_id}
        self._max_len = max(len(t) for t in self._ids) if self._ids else 0

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, longest vocabulary match first at every position."""
        ids: list[int] = []
        pos = 0
        while pos < len(text):
            for length in range(min(self._max_len, len(text) - pos), 0, -1):
                tid = self._ids.get(text[pos : pos + length])
                if tid is not None:
                    ids.append(tid)
                    pos += length
                    break
            else:
                raise TokenizationError(
                    f"cannot tokenise {text!r}: no token of the vocabulary matches at character "
                    f"{pos} ({text[pos : pos + 10]!r}); add such a token to the ToyLM vocab or change "
                    "the text"
                )
        return ids

    def token_text(self, token_id: int) -> str:
        """The text of one token (this tokenizer is concatenative; eos has no text)."""
        return "" if token_id == self.eos_id else self.vocab[token_id]

    def decode(self, ids: Sequence[int]) -> str:
        """Concatenated token strings, eos left out."""
        return "".join(self.vocab[i] for i in ids if i != self.eos_id)

    def __len__(self) -> int:
        return len(self.vocab)


class ToyLM(LanguageModel):
    """A model whose next-token scores come from ``next_logprobs(context_ids)``.

    ``vocab`` lists the token strings and must contain ``eos``; ``next_logprobs`` receives the
    tuple of token ids so far (prompt, then generated) and returns unnormalised log-weights over
    the vocabulary (``-inf`` forbids a token); the model normalises them.

    >>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, 0.0], name="uniform")
    >>> lm
    ToyLM('uniform', vocab=3)
    """

    def __init__(
        self,
        vocab: Sequence[str],
        next_logprobs: NextLogprobs,
        eos: str = "<eos>",
        *,
        name: str = "toy",
    ) -> None:
        vocab = list(vocab)
        if not vocab:
            raise VocabularyError("ToyLM vocab is empty; give a list of token strings with eos")
        if eos not in vocab:
            raise VocabularyError(
                f"ToyLM vocab has no eos token {eos!r}; add it to the vocab or pass eos=..."
            )
        bad = [t for t in vocab if not isinstance(t, str) or t == ""]
        if bad:
            raise VocabularyError(f"ToyLM vocab entries must be non-empty strings, got {bad[:3]!r}")
        seen: set[str] = set()
        dupes = [t for t in vocab if t in seen or seen.add(t)]
        if dupes:
            raise VocabularyError(f"ToyLM vocab has duplicate tokens {dupes[:3]!r}; remove them")
        if not callable(next_logprobs):
            raise ModelError("ToyLM next_logprobs must be a function of the context token ids")
        self.vocab = vocab
        self.tokenizer = ToyTokenizer(vocab, eos)
        self.name = name
        self._fn = next_logprobs

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def next_logprobs(self, contexts: Sequence[Context]) -> torch.Tensor:
        if not contexts:
            return torch.empty(0, self.vocab_size, dtype=torch.float64)
        keys = [tuple(ctx.ids) for ctx in contexts]
        raw = [self._fn(key) for key in keys]
        try:
            if all(isinstance(r, torch.Tensor) for r in raw):
                table = torch.stack([r.to(torch.float64).reshape(-1) for r in raw])
            else:
                table = torch.tensor([list(map(float, r)) for r in raw], dtype=torch.float64)
        except (RuntimeError, ValueError, TypeError):
            table = None
        if table is None or table.shape[1] != self.vocab_size:
            bad = next(
                (k, r)
                for k, r in zip(keys, raw, strict=True)
                if torch.as_tensor(r).numel() != self.vocab_size
            )
            raise ModelError(
                f"ToyLM {self.name!r}: next_logprobs({bad[0]}) must return {self.vocab_size} "
                f"numbers, got {torch.as_tensor(bad[1]).numel()}"
            )
        bad_rows = torch.isnan(table).any(dim=1) | torch.isneginf(table).all(dim=1)
        if bool(bad_rows.any()):
            key = keys[int(bad_rows.nonzero()[0, 0])]
            raise ModelError(
                f"ToyLM {self.name!r}: next_logprobs({key}) returned NaN or forbids every "
                "token; return finite scores (-inf forbids a token) and allow at least one"
            )
        return torch.log_softmax(table, dim=-1)

    def __repr__(self) -> str:
        return f"ToyLM({self.name!r}, vocab={self.vocab_size})"
