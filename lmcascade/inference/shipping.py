"""Sending a program to another process (a Ray worker) and its results back, with models
travelling as how to make them rather than as their weights.

A program's closure holds its models.  :func:`pack_program` pickles the program (with
cloudpickle, so functions and lambdas of the user's own modules travel by value) and takes
every model it meets out of the pickle: in its place goes a number, and beside the pickle
goes the model's *slot* — its :class:`~lmcascade.models.base.Recipe` (a registry name or a
folder, loaded again over there, once) or, for a model without one (a ToyLM), the model
itself.  The other side makes each model once (:class:`Unpacked`), and a result it sends
back (:func:`dumps`) names those models by the same numbers, so that here (:func:`loads`)
they are this process's own models again: a result never drags weights through the wire.

>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "<eos>"], lambda ids: [0.0, 0.0])
>>> parcel = pack_program({"model": lm, "prompt": "hi"})
>>> parcel.names, len(parcel.slots)
(['toy'], 1)
>>> there = Unpacked(parcel)
>>> there.value["model"] is lm, isinstance(there.value["model"], ToyLM)
(False, True)
>>> back = loads(dumps([there.value["model"]], there.models), parcel.models)
>>> back[0] is lm
True
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from lmcascade.models.base import LanguageModel

__all__ = ["Parcel", "Unpacked", "dumps", "loads", "model_bytes", "pack_program"]


def _cloudpickle() -> Any:
    from ray import cloudpickle  # Ray's own copy: the backend that ships programs needs Ray

    return cloudpickle


@dataclass
class Parcel:
    """A packed program: ``payload`` (the pickle), ``slots`` (one per model it holds: a
    pickled recipe or model), the models' ``names`` and estimated ``sizes`` in bytes, and
    ``models`` — the models themselves, kept on this side only (not sent)."""

    payload: bytes
    slots: list[bytes]
    names: list[str]
    sizes: list[int]
    models: list[Any] = field(default_factory=list, repr=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["models"] = []  # the other side makes its own
        return state

    @property
    def total_bytes(self) -> int:
        """The estimated memory all the models take together (shared weights counted once)."""
        return sum(self.sizes)


def pack_program(value: Any, program: Any = None) -> Parcel:
    """``value`` (a program, with whatever travels with it) packed for another process;
    ``program``'s module, when it is the user's own, travels by value."""
    models: list[Any] = []
    with _by_value(program):
        payload = _dumps(value, models, grow=True)
        slots = []
        while len(slots) < len(models):  # a recipe may name further models (a twin's base)
            model = models[len(slots)]
            slot = ("recipe", model.recipe) if model.recipe is not None else ("value", model)
            slots.append(_dumps(slot, models, grow=True, skip=model))
    names = [str(getattr(m, "name", type(m).__name__)) for m in models]
    sizes = _sizes(models, slots)
    return Parcel(payload, slots, names, sizes, models)


class Unpacked:
    """The other side of :func:`pack_program`: ``value`` as it was packed, with each model
    made once (``models``, in the parcel's order)."""

    def __init__(self, parcel: Parcel) -> None:
        self._slots = parcel.slots
        self._made: dict[int, Any] = {}
        self.value = self._load(parcel.payload)
        self.models = [self._model(i) for i in range(len(parcel.slots))]

    def _model(self, index: int) -> Any:
        if index not in self._made:
            kind, what = self._load(self._slots[index])
            self._made[index] = what.make() if kind == "recipe" else what
        return self._made[index]

    def _load(self, data: bytes) -> Any:
        unpickler = pickle.Unpickler(io.BytesIO(data))
        unpickler.persistent_load = self._model  # type: ignore[assignment]
        return unpickler.load()


def dumps(value: Any, models: list[Any]) -> bytes:
    """``value`` pickled with each of ``models`` it holds named by its index (a model not
    among them travels whole)."""
    return _dumps(value, list(models), grow=False)


def loads(data: bytes, models: list[Any]) -> Any:
    """What :func:`dumps` packed, with its models named by index replaced by ``models``."""
    unpickler = pickle.Unpickler(io.BytesIO(data))
    unpickler.persistent_load = models.__getitem__  # type: ignore[assignment]
    return unpickler.load()


def model_bytes(model: Any) -> int:
    """The memory a model's weights take (parameters and buffers), 0 for one without
    torch modules (a ToyLM)."""
    return sum(nbytes for _, nbytes in _storages(model))


def _storages(model: Any) -> Iterator[tuple[int, int]]:
    module = getattr(model, "hf", None)
    if module is None or not hasattr(module, "parameters"):
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        yield tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()


def _sizes(models: list[Any], slots: list[bytes]) -> list[int]:
    """Each model's estimated memory: its weights (a storage two models share is counted
    for the first), or the size of its pickle when it has none."""
    seen: set[int] = set()
    sizes = []
    for model, slot in zip(models, slots, strict=True):
        total, weighed = 0, False
        for pointer, nbytes in _storages(model):
            weighed = True
            if pointer not in seen:
                seen.add(pointer)
                total += nbytes
        sizes.append(total if weighed else len(slot))
    return sizes


def _dumps(value: Any, models: list[Any], *, grow: bool, skip: Any = None) -> bytes:
    cloudpickle = _cloudpickle()

    class Packer(cloudpickle.CloudPickler):
        def persistent_id(self, obj: Any) -> int | None:
            if not isinstance(obj, LanguageModel) or obj is skip:
                return None
            for index, model in enumerate(models):
                if model is obj:
                    return index
            if not grow:
                return None
            models.append(obj)
            return len(models) - 1

    buffer = io.BytesIO()
    Packer(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


_LIBRARY_ROOTS = {
    os.path.realpath(p)
    for key in ("stdlib", "platstdlib", "purelib", "platlib")
    if (p := sysconfig.get_paths().get(key))
}


def in_library(path: str) -> bool:
    """Whether ``path`` lies in Python's own folders or installed packages' (not the user's
    code, which a worker may not be able to import)."""
    real = os.path.realpath(path)
    return any(real == root or real.startswith(root + os.sep) for root in _LIBRARY_ROOTS)


def _user_module(name: str | None) -> Any:
    """The module ``name`` when it is the user's own code (not installed, not lmcascade):
    such a module may not be importable on a worker, so its functions travel by value."""
    if not name or name == "__main__" or name.split(".")[0] == "lmcascade":
        return None
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if module is None or path is None:
        return None
    return None if in_library(path) else module


@contextmanager
def _by_value(program: Any) -> Iterator[None]:
    """Pickles the user's own module behind ``program`` (its function's) by value while
    packing."""
    cloudpickle = _cloudpickle()
    module = _user_module(getattr(getattr(program, "fn", None), "__module__", None))
    if module is not None:
        try:
            cloudpickle.register_pickle_by_value(module)
        except ValueError:
            module = None
    try:
        yield
    finally:
        if module is not None:
            cloudpickle.unregister_pickle_by_value(module)
