"""Values to try in place of a recorded one, to see what a different value would change.

Realistic values come first (what other runs drew at the same site, the texts the program
compared the value with — see :mod:`~lmcascade.flowgraph.watch` — and the support of a finite
distribution), then synthetic ones of the same type: for a text, the same shape with each
letter and digit shifted, the empty text and a long text; for a number, ``x + 1``, ``0`` and
``-10x - 1``; for containers and dataclasses (a ``Generation``), every item or field shifted.  Each candidate differs from the value.

>>> variants("42")
['53', '', '4242424242424242']
>>> variants("", seen=["Paris", ""], compared=["yes"])
['Paris', 'yes', '1', '11111111']
>>> variants(3, support=[0, 1, 2, 3])
[0, 1, 4, -31]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import torch

from lmcascade.flowgraph.fingerprint import fingerprint
from lmcascade.models.base import LanguageModel

REALISTIC = 2  # values taken from other runs, and from a distribution's support
COMPARED = 4  # texts the value was compared with
COMPLETE = 4  # values of a finite support, when it is the whole support


class Probe:
    """A stand-in for a value that has no natural variant (an object a tool returned)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<lmcascade graph probe>"


def variants(
    value: Any,
    seen: Iterable[Any] = (),
    support: Iterable[Any] = (),
    compared: Iterable[Any] = (),
    complete: bool = False,
) -> list[Any]:
    """Values different from ``value`` to try in its place: up to two of ``seen`` (other runs'
    values), up to four of ``compared`` (texts it was compared with), up to two of
    ``support`` (as the same type as ``value``: a tensor stays a tensor), then synthetic ones
    of the same type.  With ``complete`` (``support`` is the whole support), only values of
    the support are tried, up to four of them: the program can receive no other.

    >>> import torch
    >>> variants(torch.tensor(1.0), support=[0.0, 1.0], complete=True)
    [tensor(0.)]
    """
    out: list[Any] = []
    keys = {value_key(value)}
    support = [_like(value, v) for v in support]
    allowed = {value_key(v) for v in support} if complete else None

    def add(candidates: Iterable[Any], most: int | None = None) -> None:
        added = 0
        for v in candidates:
            if most is not None and added == most:
                return
            k = value_key(v)
            if k not in keys and (allowed is None or k in allowed):
                keys.add(k)
                out.append(v)
                added += 1

    add(seen, REALISTIC)
    add(compared, COMPARED)
    add(support, COMPLETE if complete else REALISTIC)
    if not complete:
        add(synthetic(value))
    return out


def _like(value: Any, v: Any) -> Any:
    """``v`` (a number from a distribution's support) as the type of ``value``."""
    try:
        if isinstance(value, torch.Tensor):
            return torch.tensor(v, dtype=value.dtype, device=value.device)
        if isinstance(value, bool | int | float) and isinstance(v, bool | int | float):
            return type(value)(v)
    except Exception:  # not convertible: as it is
        pass
    return v


def value_key(v: Any) -> str:
    """A value's identity as a candidate: two values with the same key are tried once."""
    return repr(fingerprint(v))  # repr: fingerprints may hold unhashable parts


def synthetic(value: Any) -> list[Any]:
    """Values of the same type as ``value`` that differ from it (possibly none: a model).

    >>> synthetic(True), synthetic(2.5), synthetic({"a": "x1"})
    ([False], [3.5, 0.0, -26.0], [{'a': 'y2'}])
    """
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, 0, -10 * value - 1]
    if isinstance(value, float):
        return [value + 1.0, 0.0, -10.0 * value - 1.0] if math.isfinite(value) else [0.0]
    if isinstance(value, str):
        return [_shift(value), "", (value or "1") * 8]
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool:
            return [~value]
        return [value + 1, torch.zeros_like(value), -10 * value - 1]
    if isinstance(value, list | tuple):
        items = [_first(v) for v in value] if value else [Probe()]
        return [type(value)(items) if type(value) in (list, tuple) else items]
    if isinstance(value, dict):
        return [{k: _first(v) for k, v in value.items()} if value else {"?": Probe()}]
    if value is None:
        return ["1"]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        try:
            fields = {f.name: _first(getattr(value, f.name)) for f in dataclasses.fields(value)}
            return [dataclasses.replace(value, **fields)]
        except Exception:  # fields it will not take back: a stand-in
            return [Probe()]
    if isinstance(value, LanguageModel | Probe):
        return []
    return [Probe()]


def _first(value: Any) -> Any:
    found = synthetic(value)
    return found[0] if found else value


def _shift(text: str) -> str:
    """The same shape: each ASCII letter and digit replaced by the next one (z by a, 9 by 0);
    a text without any gets ``1`` appended."""
    out = []
    for ch in text:
        if ch.isascii() and ch.isdigit():
            out.append(str((int(ch) + 1) % 10))
        elif ch.isascii() and ch.isalpha():
            base = ord("a") if ch.islower() else ord("A")
            out.append(chr(base + (ord(ch) - base + 1) % 26))
        else:
            out.append(ch)
    shifted = "".join(out)
    return shifted if shifted != text else text + "1"
