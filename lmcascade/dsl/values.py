"""What ``.lmc`` values are, in the words of the DSL, and the error for a wrong one.

>>> [kind_of(v) for v in (None, True, 3, 2.5, "hi", [1])]
['none', 'true/false', 'a whole number', 'a number', 'text', 'a list']
"""

from __future__ import annotations


def kind_of(value: object) -> str:
    """What a value is, in the words of the DSL (for messages)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


class Mismatch(TypeError):
    """A value of the wrong kind for an operation; the message says which kinds it takes.

    >>> str(Mismatch("split needs text to split, got a list"))
    'split needs text to split, got a list'
    """
