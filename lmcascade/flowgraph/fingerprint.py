"""What an effect was given, in a form two executions can compare input by input.

:func:`inputs` flattens an effect to one entry per input — ``dist.prompt``, ``args[0]``,
``ok``... — each a :func:`fingerprint`: plain, comparable data that is equal exactly when the
input is (texts and numbers as themselves, tensors by dtype, shape and values, functions by
their code and the values they close over, models by identity).

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "<eos>"], lambda ctx: [0.0, 0.0])
>>> got = inputs(lc.gen("x", lm, "Q: hi", max_tokens=2))
>>> got["dist.prompt"], got["dist.max_tokens"]
('Q: hi', 2)
>>> inputs(lc.call("t", len, "ab", key=1))["args[0]"], inputs(lc.condition("c", 1 < 2))
('ab', {'ok': ('bool', True)})
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any

import torch

from lmcascade.distributions import LM, is_lm
from lmcascade.models.base import LanguageModel

LM_INPUTS = tuple(
    p for p in inspect.signature(LM.__init__).parameters if p not in ("self", "model")
)
"""The attributes of an :class:`~lmcascade.LM` compared one by one (and its model, by identity)."""

MAX_DEPTH = 6  # nesting looked into; deeper parts compare by type only
MAX_ITEMS = 1000  # items of a container looked at (its length is always compared)


def fingerprint(x: Any, depth: int = 0) -> Any:
    """Comparable plain data that is equal for equal inputs (and stable across executions).

    >>> fingerprint("a"), fingerprint(1.5), fingerprint(True)
    ('a', ('float', '1.5'), ('bool', True))
    >>> fingerprint(torch.tensor([1, 2]))
    ('tensor', 'torch.int64', (2,), ('1', '2'))
    >>> def suffix(x):
    ...     return lambda t: t + x
    >>> fingerprint(suffix("a")) == fingerprint(suffix("a")), fingerprint(suffix("b")) == fingerprint(suffix("a"))
    (True, False)
    """
    if x is None or isinstance(x, str | bytes) or type(x) is int:
        return x
    if isinstance(x, bool):
        return ("bool", x)
    if isinstance(x, float):
        return ("float", repr(x))  # repr: NaN equals NaN
    if depth > MAX_DEPTH:
        return ("deep", type(x).__qualname__)
    if isinstance(x, torch.Tensor):
        flat = x.detach().cpu().reshape(-1)
        values = tuple(repr(v) for v in flat[:MAX_ITEMS].tolist())  # repr: NaN equals NaN
        return ("tensor", str(x.dtype), tuple(x.shape), values)
    if isinstance(x, LanguageModel | torch.nn.Module):
        return ("model", id(x))
    if is_lm(x):
        return (
            "LM",
            id(x.model),
            *(fingerprint(getattr(x, a, None), depth + 1) for a in LM_INPUTS),
        )
    if isinstance(x, list | tuple):
        items = tuple(fingerprint(v, depth + 1) for v in x[:MAX_ITEMS])
        return (type(x).__qualname__, len(x), items)
    if isinstance(x, dict):
        pairs = list(x.items())[:MAX_ITEMS]
        items = tuple((fingerprint(k, depth + 1), fingerprint(v, depth + 1)) for k, v in pairs)
        return ("dict", len(x), items)
    if isinstance(x, set | frozenset):
        return ("set", len(x), tuple(sorted(repr(fingerprint(v, depth + 1)) for v in x)))
    if isinstance(x, types.FunctionType):
        cells = tuple(_cell(c, depth) for c in x.__closure__ or ())
        return ("function", x.__code__, cells, fingerprint(x.__defaults__, depth + 1))
    if isinstance(x, types.MethodType):
        return ("method", fingerprint(x.__func__, depth + 1), fingerprint(x.__self__, depth + 1))
    if type(x).__repr__ is object.__repr__ and hasattr(x, "__dict__"):
        return ("object", type(x).__qualname__, fingerprint(vars(x), depth + 1))
    try:
        return ("object", type(x).__qualname__, repr(x))
    except Exception:
        return ("object", type(x).__qualname__, id(x))


def _cell(cell: Any, depth: int) -> Any:
    try:
        return fingerprint(cell.cell_contents, depth + 1)
    except ValueError:  # an empty cell (a variable not assigned yet)
        return ("empty",)


def inputs(eff: Any) -> dict[str, Any]:
    """The fingerprint of each input of effect ``eff``, by path: its fields but the name, an
    LM's decoding parameters one by one, a distribution's parameters, and the items of
    ``args``/``kwargs``-like tuples and dicts."""
    out: dict[str, Any] = {}
    if not dataclasses.is_dataclass(eff):
        out["effect"] = fingerprint(eff)
        return out
    for f in dataclasses.fields(eff):
        if f.name != "name":
            _flatten(f.name, getattr(eff, f.name), out)
    return out


def _flatten(path: str, value: Any, out: dict[str, Any]) -> None:
    if is_lm(value):
        out[f"{path}.model"] = ("model", id(value.model))
        for attr in LM_INPUTS:
            out[f"{path}.{attr}"] = fingerprint(getattr(value, attr, None))
    elif isinstance(value, torch.distributions.Distribution):
        out[path] = ("distribution", type(value).__qualname__)
        for param in sorted(getattr(value, "arg_constraints", {})):
            if param in vars(value):  # given or already computed (lazy properties are not)
                out[f"{path}.{param}"] = fingerprint(vars(value)[param])
    elif isinstance(value, tuple) and value:
        for i, item in enumerate(value[:MAX_ITEMS]):
            out[f"{path}[{i}]"] = fingerprint(item)
        out[f"{path}#"] = len(value)
    elif isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        for key, item in list(value.items())[:MAX_ITEMS]:
            out[f"{path}[{key!r}]"] = fingerprint(item)
        out[f"{path}#"] = len(value)
    else:
        out[path] = fingerprint(value)
