"""Values that note what they are compared with, so the graph knows which values to try.

A condition such as ``answer == expected`` only changes when the answer *is* the expected
text; shifted or empty texts never find that edge.  A :class:`Watched` text behaves exactly
like the text it wraps, but writes the texts it is compared with (``==``, ``!=``, ``in``,
``startswith``, ``endswith``, also after ``strip``, ``lower``, ``split``...) into a log; those
texts are then tried as the site's value.  Numbers are watched alike (:func:`watch`): an
equality notes the other number, an ordering notes the threshold and its neighbours ``t - 1``
and ``t + 1``.

>>> log = []
>>> answer = Watched(" Paris ", log)
>>> answer.strip().lower() == "paris", "Rome" in answer, answer.startswith(("A", "B"))
(True, False, False)
>>> log
['paris', 'Rome', 'A', 'B']
>>> numbers = []
>>> n = watch(7, numbers)
>>> n == 42, n > 10, n + 1, numbers
(False, False, 8, [42, 10, 9, 11])
"""

from __future__ import annotations

from typing import Any

MAX_LOGGED = 1000  # longer texts are not noted


class Watched(str):
    """A ``str`` that appends to ``log`` every text it is compared with."""

    log: list[str]

    def __new__(cls, text: str, log: list[str]) -> Watched:
        obj = super().__new__(cls, text)
        obj.log = log
        return obj

    def _note(self, other: Any) -> None:
        for text in other if isinstance(other, tuple) else (other,):
            if isinstance(text, str) and len(text) <= MAX_LOGGED:
                self.log.append(str(text))

    def _keep(self, result: Any) -> Any:
        if isinstance(result, str):
            return Watched(result, self.log)
        if isinstance(result, list | tuple):
            return type(result)(self._keep(r) for r in result)
        return result

    def __eq__(self, other: object) -> bool:
        self._note(other)
        return str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        self._note(other)
        return str.__ne__(self, other)

    __hash__ = str.__hash__

    def __contains__(self, part: object) -> bool:
        self._note(part)
        return str.__contains__(self, part)  # type: ignore[operator]

    def startswith(self, prefix: Any, *args: Any) -> bool:  # type: ignore[override]
        self._note(prefix)
        return str.startswith(self, prefix, *args)

    def endswith(self, suffix: Any, *args: Any) -> bool:  # type: ignore[override]
        self._note(suffix)
        return str.endswith(self, suffix, *args)


def _keeping(name: str) -> Any:
    method = getattr(str, name)

    def kept(self: Watched, *args: Any, **kwargs: Any) -> Any:
        return self._keep(method(self, *args, **kwargs))

    kept.__name__ = name
    return kept


for _name in (
    "strip lstrip rstrip lower upper casefold title capitalize removeprefix removesuffix "
    "replace split rsplit splitlines partition rpartition __getitem__"
).split():
    setattr(Watched, _name, _keeping(_name))


def _noting(name: str, ordering: bool) -> Any:
    def compare(self: Any, other: Any) -> Any:
        if isinstance(other, int | float) and not isinstance(other, bool):
            self.log.extend((other, other - 1, other + 1) if ordering else (other,))
        return getattr(self._base, name)(self, other)

    compare.__name__ = name
    return compare


class _WatchedNumber:
    """Adds the noting comparisons to a number type (its arithmetic gives plain numbers)."""

    _base: type
    log: list

    def __new__(cls, value: Any, log: list) -> Any:
        obj = cls._base.__new__(cls, value)  # type: ignore[call-overload]
        obj.log = log
        return obj

    def __hash__(self) -> int:
        return self._base.__hash__(self)


for _name in ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__"):
    setattr(_WatchedNumber, _name, _noting(_name, _name not in ("__eq__", "__ne__")))


class WatchedInt(_WatchedNumber, int):
    """An ``int`` that notes the numbers it is compared with."""

    _base = int


class WatchedFloat(_WatchedNumber, float):
    """A ``float`` that notes the numbers it is compared with."""

    _base = float


def watch(value: Any, log: list) -> Any:
    """``value`` as a watched text or number writing to ``log``; any other value as it is."""
    if isinstance(value, bool):
        return value
    for kind, watched in ((str, Watched), (int, WatchedInt), (float, WatchedFloat)):
        if isinstance(value, kind):
            return watched(value, log)
    return value
