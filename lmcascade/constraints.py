"""Token-level constraints on LM sites: masks computed once per model, on its device.

A constraint restricts which tokens an LM site may generate; the text must satisfy it.  It
acts as a hard condition on the site: the site's probability is the model's ``p(text)`` when
the text satisfies the constraint and 0 otherwise, so inference targets the *global*
conditional ``p(text | constraint)``.  Samplers draw from the locally masked distribution and
multiply the weight by the allowed probability mass at every step — masking without that
correction would sample a different, biased distribution.

A constraint is a small state machine over tokens: ``start`` gives the initial state,
``mask(model, state)`` the allowed tokens (cached per model and state), ``advance`` the next
state.  eos is always allowed.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["ab", "cd", "e", " ", "<eos>"], lambda ctx: [0.0] * 5)
>>> forbid("e").mask(lm, None).tolist()
[True, True, False, True, True]
>>> c = max_word_length(2)
>>> state = c.advance(lm, c.start(lm), 0)      # "ab": the current word has 2 letters
>>> c.mask(lm, state).tolist()                  # only a space (or eos) may follow
[False, False, False, True, True]
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch

from lmcascade.errors import SiteError


class Constraint:
    """Base class: a stateless vocabulary mask (subclasses override :meth:`allowed`)."""

    def __init__(self) -> None:
        self._masks: dict[tuple[int, Any], torch.Tensor] = {}
        self._texts: dict[int, list[str]] = {}

    def token_texts(self, model) -> list[str]:
        """Each token's text (cached per model)."""
        key = id(model)
        if key not in self._texts:
            self._texts[key] = [model.decode([i]) for i in range(model.vocab_size)]
        return self._texts[key]

    def start(self, model) -> Any:
        return None

    def advance(self, model, state: Any, token_id: int) -> Any:
        return state

    def allowed(self, text: str, state: Any) -> bool:
        raise NotImplementedError

    def mask(self, model, state: Any) -> torch.Tensor:
        """Boolean mask over the vocabulary on the model's device (eos always allowed)."""
        key = (id(model), state)
        cached = self._masks.get(key)
        if cached is None:
            texts = self.token_texts(model)
            allowed = [self.allowed(t, state) for t in texts]
            allowed[model.eos_id] = True
            cached = torch.tensor(allowed, dtype=torch.bool, device=model.device)
            self._masks[key] = cached
        return cached

    def check(self, model, token_ids: Iterable[int]) -> bool:
        """Whether a token path respects the constraint."""
        state = self.start(model)
        for tok in token_ids:
            if not bool(self.mask(model, state)[tok]):
                return False
            state = self.advance(model, state, tok)
        return True


class Forbid(Constraint):
    """No generated token may contain any of ``substrings``."""

    def __init__(self, substrings: Iterable[str]) -> None:
        super().__init__()
        self.substrings = tuple(substrings)

    def allowed(self, text: str, state: Any) -> bool:
        return not any(s in text for s in self.substrings)

    def __repr__(self) -> str:
        return f"forbid({', '.join(map(repr, self.substrings))})"


class Allow(Constraint):
    """Only tokens whose text is in ``texts`` may be generated."""

    def __init__(self, texts: Iterable[str]) -> None:
        super().__init__()
        self.texts = frozenset(texts)

    def allowed(self, text: str, state: Any) -> bool:
        return text in self.texts

    def __repr__(self) -> str:
        return f"allow({sorted(self.texts)!r})"


class MaxWordLength(Constraint):
    """No word (a run of non-space characters) longer than ``n``; the state is the length of
    the word in progress."""

    def __init__(self, n: int) -> None:
        super().__init__()
        if not isinstance(n, int) or n < 1:
            raise SiteError(f"max_word_length needs a positive integer, got {n!r}")
        self.n = n

    def start(self, model) -> int:
        return 0

    def advance(self, model, state: int, token_id: int) -> int:
        if token_id == model.eos_id:
            return state
        runs = re.split(r"\s", self.token_texts(model)[token_id])
        return state + len(runs[0]) if len(runs) == 1 else len(runs[-1])

    def allowed(self, text: str, state: int) -> bool:
        runs = re.split(r"\s", text)
        return state + len(runs[0]) <= self.n and all(len(r) <= self.n for r in runs[1:])

    def __repr__(self) -> str:
        return f"max_word_length({self.n})"


def forbid(*substrings: str) -> Forbid:
    """Tokens containing any of ``substrings`` (characters or longer) are never generated.

    >>> forbid("e", "E")
    forbid('e', 'E')
    """
    if not substrings or any(not isinstance(s, str) or not s for s in substrings):
        raise SiteError("forbid needs one or more non-empty strings")
    return Forbid(substrings)


def allow(texts: Iterable[str]) -> Allow:
    """Only tokens whose text is one of ``texts`` are generated.

    >>> allow(["yes", "no"])
    allow(['no', 'yes'])
    """
    return Allow(texts)


def max_word_length(n: int) -> MaxWordLength:
    """No word longer than ``n`` characters.

    >>> max_word_length(5)
    max_word_length(5)
    """
    return MaxWordLength(n)
