"""Incremental detokenisation: a generation's text grows token by token.

>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, 0.0])
>>> d = Detokenizer(lm.tokenizer)
>>> d.push(0), d.push(1), d.text
('a', 'b', 'ab')
>>> mark = d.state(); _ = d.push(0); d.restore(mark); d.text
'ab'
"""

from __future__ import annotations

from lmcascade.models.base import Tokenizer


class Detokenizer:
    """Incremental decoding: text grows token by token without re-decoding whole sequences.

    Decodes a short window of recent tokens and emits only the new characters, holding back
    text while it ends in an incomplete multi-byte character.
    """

    __slots__ = ("tokenizer", "ids", "text", "_prefix", "_read")

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Adds a token and returns the characters it completed (possibly empty)."""
        self.ids.append(token_id)
        piece = getattr(self.tokenizer, "token_text", None)
        if piece is not None:  # concatenative tokenizers: a token's text never changes
            delta = piece(token_id)
            self.text += delta
            return delta
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        after = self.tokenizer.decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def state(self) -> tuple:
        """A snapshot for :meth:`restore` (the ids so far are kept by count)."""
        return (len(self.ids), self.text, self._prefix, self._read)

    def restore(self, state: tuple) -> None:
        """Goes back to a snapshot taken on this detokeniser (or the one it was copied from)."""
        n, self.text, self._prefix, self._read = state
        del self.ids[n:]

    def copy(self) -> Detokenizer:
        twin = Detokenizer(self.tokenizer)
        twin.ids = list(self.ids)
        twin.text = self.text
        twin._prefix, twin._read = self._prefix, self._read
        return twin
