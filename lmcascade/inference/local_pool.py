"""The local backend of ``lc.infer_many``: inputs' runs on threads of this process, their model
calls batched together.

Each input's ``lc.infer`` runs on its own thread.  The runs take turns (one runs at a time:
the library is not made thread-safe by this, it is made to wait).  When a run asks a model
for next-token probabilities it parks; once every run in flight has parked or finished, the
requests to each model are made as **one** batched call — across inputs as well as across
particles — and every run resumes with its rows.  Each run's random state (torch's, numpy's
and Python's) is its own: it is saved when the run parks and put back when it resumes, so
how the runs interleave never changes what any of them draws.

:class:`LocalPool` is what ``lc.infer_many`` drives here, and what each Ray worker drives on
its share of the inputs (:mod:`lmcascade.inference.ray_pool`).

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["yes", "no", "<eos>"], lambda ctx: [0.0, 0.5, 0.0])
>>> @lc.program
... def ask(question):
...     return (yield lc.gen("answer", lm, question, max_tokens=2))
>>> pool = LocalPool(lambda bound: lc.infer(bound, method="forward", num_samples=4, seed=0), 8)
>>> for i, q in enumerate(["yes", "no"]):
...     pool.start(i, q, ask(q))
>>> done = []
>>> while pool.busy():
...     pool.advance()
...     done += pool.finished()
>>> sorted(f.item for f in done), pool.stats["model_calls"] <= 3
(['no', 'yes'], True)
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmcascade.models.base import BATCHER, block_counts
from lmcascade.program import BoundProgram
from lmcascade.result import Result

__all__ = ["Finished", "LocalPool", "batched_call", "rng_state", "set_rng_state"]


@dataclass
class Finished:
    """One input's outcome: its ``result``, or the ``error`` its run raised."""

    index: int
    item: Any
    result: Result | None = None
    error: BaseException | None = None


class _Cancelled(BaseException):
    """Raised inside a parked run when the whole ``infer_many`` is closed or interrupted."""


class _Turns:
    """What the runs share with the coordinator (not the coordinator itself, so that an
    unfinished ``ManyRun`` can be collected, and cancel its runs, once nothing holds it)."""

    def __init__(self) -> None:
        self.parked = threading.Semaphore(0)
        self.closed = False


class _Run(threading.Thread):
    """One input's ``lc.infer`` on its own thread, parking at every model call."""

    def __init__(self, turns: _Turns, index: int, item: Any, work: Any) -> None:
        super().__init__(name=f"lmcascade-input-{index}", daemon=True)
        self.turns, self.index, self.item, self.work = turns, index, item, work
        self.go = threading.Semaphore(0)
        self.request: tuple | None = None  # (model, name, fn, args, kwargs) while parked
        self.reply: tuple[bool, Any] | None = None  # (ok, value or exception)
        self.result: Result | None = None
        self.error: BaseException | None = None
        self.finished = False
        self._rng: tuple | None = None

    def run(self) -> None:
        self.go.acquire()
        BATCHER.set(self)
        try:
            if not self.turns.closed:
                self.result = self.work()
        except _Cancelled:
            pass
        except BaseException as err:  # noqa: BLE001 - recorded for this input; the rest go on
            self.error = err
        self.finished = True
        self.turns.parked.release()

    def submit(self, model: Any, name: str, fn: Any, args: tuple, kwargs: dict) -> Any:
        """Parks this run with a model call; returns the call's rows once the batch ran.
        A call from another thread that inherited the run's context (a tool with a timeout
        runs on its own thread) goes straight to the model."""
        if threading.current_thread() is not self:
            return fn(model, *args, **kwargs)
        if self.turns.closed:
            raise _Cancelled
        self._rng = rng_state()
        self.request, self.reply = (model, name, fn, args, kwargs), None
        self.turns.parked.release()
        self.go.acquire()
        if self.turns.closed:
            raise _Cancelled
        set_rng_state(self._rng)
        ok, value = self.reply  # type: ignore[misc]
        self.request = self.reply = None
        if not ok:
            raise value
        return value


def rng_state() -> tuple:
    """The global random state a run draws from: torch's (CPU), Python's and numpy's."""
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    random.setstate(state[1])
    np.random.set_state(state[2])


def _rows(request: tuple) -> int:
    """How many contexts a parked model call asks about."""
    args, kwargs = request[3], request[4]
    return len(kwargs["contexts"] if "contexts" in kwargs else args[0] if args else ())


def _split_call(name: str, args: tuple, kwargs: dict) -> tuple[list, list | None]:
    """A model call's contexts and per-context extra argument (paths, block counts)."""
    params = dict(zip(("contexts", "extra"), args, strict=False))
    contexts = list(kwargs.get("contexts", params.get("contexts", ())))
    if name == "next_logprobs":
        return contexts, None
    extra = kwargs.get("paths" if name == "path_logprobs" else "counts", params.get("extra"))
    if name == "block_logprobs":
        return contexts, block_counts(contexts, extra)
    return contexts, list(extra)


def batched_call(requests: list[tuple]) -> list[tuple[bool, Any]]:
    """Makes the same model call of several runs as one call; each run's rows, in order.

    ``requests`` share a model and a method name.  If the joint call fails, each request is
    made on its own, so only the run whose input caused the failure gets the error."""
    model, name, fn = requests[0][:3]
    if len(requests) == 1:
        return [_one(requests[0])]
    parts = [_split_call(name, r[3], r[4]) for r in requests]
    contexts = [c for cs, _ in parts for c in cs]
    try:
        with torch.inference_mode():
            if name == "next_logprobs":
                out = fn(model, contexts)
            else:
                out = fn(model, contexts, [e for _, es in parts for e in es])  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - retried one by one to find whose input failed
        return [_one(r) for r in requests]
    replies, start = [], 0
    for cs, _ in parts:
        replies.append((True, out[start : start + len(cs)]))
        start += len(cs)
    return replies


def _one(request: tuple) -> tuple[bool, Any]:
    model, _, fn, args, kwargs = request
    try:
        with torch.inference_mode():
            return True, fn(model, *args, **kwargs)
    except Exception as err:  # noqa: BLE001 - handed to the run that asked
        return False, err


class LocalPool:
    """Runs inputs on threads of this process, at most ``concurrency`` at once, making the
    model calls of all of them as one batched call per model per round.

    ``work(bound)`` is what a run does with its bound program (``lc.infer`` of it).  Drive
    it with :meth:`start` while :meth:`room` allows, :meth:`advance` while :meth:`busy`, and
    collect :meth:`finished`; :meth:`close` cancels the runs in flight.  ``stats`` counts
    ``model_calls`` (the batched calls made) and ``rows`` (contexts computed in them).
    """

    def __init__(self, work: Callable[[BoundProgram], Result], concurrency: int) -> None:
        self.work, self.concurrency = work, concurrency
        self.stats = {"model_calls": 0, "rows": 0}
        self._turns = _Turns()
        self._runs: list[_Run] = []
        self._done: list[Finished] = []

    def room(self) -> int:
        """How many more inputs may start now."""
        return max(0, self.concurrency - len(self._runs))

    def busy(self) -> bool:
        """Whether any run is in flight or finished but not yet collected."""
        return bool(self._runs or self._done)

    def start(self, index: int, item: Any, bound: BoundProgram) -> None:
        """Starts ``item``'s run and lets it go until it parks on a model call or finishes."""
        work = self.work
        run = _Run(self._turns, index, item, lambda: work(bound))
        run.start()
        self._resume(run)
        self._runs.append(run)

    def finished(self) -> list[Finished]:
        """The inputs that finished since the last call."""
        for run in [r for r in self._runs if r.finished]:
            self._runs.remove(run)
            self._done.append(Finished(run.index, run.item, run.result, run.error))
        done, self._done = self._done, []
        return done

    def advance(self) -> None:
        """One round: one batched call per (model, method) for every parked run."""
        parked = [r for r in self._runs if r.request is not None and r.reply is None]
        groups: dict[tuple[int, str], list[_Run]] = {}
        for run in parked:
            model, name = run.request[:2]  # type: ignore[index]
            groups.setdefault((id(model), name), []).append(run)
        for group in groups.values():
            replies = batched_call([r.request for r in group])  # type: ignore[misc]
            self.stats["model_calls"] += 1
            self.stats["rows"] += sum(_rows(r.request) for r in group)  # type: ignore[arg-type]
            for run, reply in zip(group, replies, strict=True):
                run.reply = reply
        for run in parked:
            self._resume(run)

    def close(self) -> None:
        """Cancels the runs in flight and waits for their threads to end."""
        if self._turns.closed:
            return
        self._turns.closed = True
        for run in self._runs:
            if not run.finished:
                run.go.release()
        for run in self._runs:
            run.join(timeout=10.0)
        self._runs.clear()

    def _resume(self, run: _Run) -> None:
        run.go.release()
        self._turns.parked.acquire()
