"""The Ray backend of ``lc.infer_many``: the inputs spread over Ray actors, one replica of
the program's models in each, every actor batching its share across inputs as the local
backend does.

This process (the driver) packs the program once (:mod:`lmcascade.inference.shipping`:
models travel as their registry name or folder and are loaded once per actor), starts
``num_workers`` actors and waits until every one has loaded its models — a model too large
for a worker stops the run here, before any input runs.  Then it hands out inputs, keeping
each actor's queue full (twice its ``concurrency``), and gathers results as they finish;
only the driver writes the ``out`` file.  Each actor runs a
:class:`~lmcascade.inference.local_pool.LocalPool` on a thread of its own, so an actor's
inputs share one batched model call per decoding step.

Faults: an actor that dies (killed, out of memory, its node lost) has its unfinished inputs
handed to the others — each input at most ``max_retries`` times, then it is recorded as a
:class:`~lmcascade.errors.WorkerLostError` — and is replaced by a new actor.  An input whose
program raises is recorded with its error, as locally.

>>> import ray  # doctest: +SKIP
>>> ray.init(num_cpus=2)  # doctest: +SKIP
>>> runs = lc.infer_many(ask, questions, backend="ray", num_workers=2, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from lmcascade.errors import (
    InferenceError,
    LMCascadeError,
    ModelTooLargeError,
    OptionError,
    ProgramError,
    RemoteError,
    WorkerLostError,
)
from lmcascade.inference.local_pool import Finished, LocalPool
from lmcascade.inference.shipping import (
    Parcel,
    Unpacked,
    dumps,
    in_library,
    loads,
    pack_program,
)
from lmcascade.memory import available_memory, size
from lmcascade.trace import Trace, safe_repr

__all__ = ["RayPool", "Worker"]

DEFAULT_WORKERS = 2
"""Workers when ``num_workers`` is not given and the cluster has no GPU."""

POLL_SECONDS = 0.5
"""How long an actor holds a call open waiting for a result before answering empty."""

QUEUE_FACTOR = 2
"""Inputs handed to an actor at once, as a multiple of its ``concurrency``: enough that it
never waits for the driver to top it up."""

ROOM_WAIT_SECONDS = 10.0
"""How long after this process stopped workers to wait for Ray to free their resources
before saying there is no room for new ones."""

_LAST_CLOSE = [-math.inf]  # when this process last stopped workers (time.monotonic)

MEMORY_HEADROOM = 1.5
"""Memory reserved per worker, as a multiple of the weights: activations, caches, Python."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise OptionError(
            "backend='ray' needs Ray: pip install 'lmcascade[ray]' (or pip install ray)"
        ) from None
    return ray


# -- the actor ---------------------------------------------------------------------------------


class Worker:
    """One Ray actor: the program with its own replica of the models, and a local pool
    running the inputs it is given.  The driver talks to it only through :meth:`exchange`."""

    def __init__(self, parcel: Parcel, concurrency: int) -> None:
        self.models: list[Any] = []
        self.init_error: BaseException | None = None
        try:  # a failure is kept, not raised: Ray would keep only its text, losing its type
            self._make(parcel, concurrency)
        except Exception as err:  # noqa: BLE001 - raised by ready() and exchange()
            self.init_error = err

    def _make(self, parcel: Parcel, concurrency: int) -> None:
        _check_memory(parcel)
        try:
            unpacked = Unpacked(parcel)
        except MemoryError as err:
            raise ModelTooLargeError(_too_large(parcel, "this worker's memory")) from err
        except Exception as err:
            if type(err).__name__ == "OutOfMemoryError":  # torch's, on a GPU
                raise ModelTooLargeError(_too_large(parcel, "this worker's GPU")) from err
            raise
        self.program, work = unpacked.value
        self.models = unpacked.models
        self.pool = LocalPool(work, concurrency)
        self.inbox: deque = deque()
        self.outbox: list[tuple[int, bool, bytes]] = []
        self.cond = threading.Condition()
        self.failure: BaseException | None = None
        threading.Thread(target=self._loop, name="lmcascade-worker", daemon=True).start()

    def ready(self) -> dict:
        """Where this worker runs: its process, devices and threads."""
        import torch

        if self.init_error is not None:
            raise self.init_error
        devices = sorted({str(getattr(m, "device", "cpu")) for m in self.models}) or ["cpu"]
        return {"pid": os.getpid(), "devices": devices, "threads": torch.get_num_threads()}

    def exchange(self, items: list[tuple[int, bytes]], timeout: float) -> tuple[list, dict]:
        """Takes new ``(index, packed input)`` pairs; returns the results finished since the
        last call (waiting up to ``timeout`` seconds for one) and the pool's counters."""
        if self.init_error is not None:
            raise self.init_error
        with self.cond:
            self.inbox.extend(items)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.outbox or self.failure is not None, timeout)
            if self.failure is not None:
                raise self.failure
            out, self.outbox = self.outbox, []
        return out, dict(self.pool.stats)

    def _loop(self) -> None:
        from lmcascade.inference.many import _bind

        pool = self.pool
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: self.inbox or pool.busy())
                    take = [self.inbox.popleft() for _ in range(min(pool.room(), len(self.inbox)))]
                for index, packed in take:
                    try:
                        item = loads(packed, self.models)
                    except Exception as err:  # noqa: BLE001 - this input's error alone
                        self._send(Finished(index, None, error=_cannot_receive("input", err)))
                        continue
                    try:
                        bound = _bind(self.program, item)
                    except LMCascadeError as err:
                        self._send(Finished(index, item, error=err))
                        continue
                    pool.start(index, item, bound)
                for done in pool.finished():
                    self._send(done)
                if pool.busy():
                    pool.advance()
        except BaseException as err:  # noqa: BLE001 - a bug of ours: the next exchange raises it
            with self.cond:
                self.failure = err
                self.cond.notify_all()

    def _send(self, done: Finished) -> None:
        """Queues a finished input for the driver, its result or error pickled here."""
        ok, error = done.error is None, done.error
        if ok:
            try:
                data = dumps(done.result, self.models)
            except Exception:  # noqa: BLE001 - tried again without what its sites hold
                try:
                    data = dumps(_plain(done.result), self.models)
                except Exception as err:  # noqa: BLE001 - recorded as this input's error
                    ok, error = (
                        False,
                        RemoteError(
                            f"its result cannot be sent back from the Ray worker "
                            f"({type(err).__name__}: {safe_repr(str(err), 300)}); return plain "
                            "values (text, numbers, lists, dicts) from the program"
                        ),
                    )
        if not ok:
            try:
                data = dumps(error, self.models)
                loads(data, self.models)  # it must come back whole on the other side too
            except Exception:  # noqa: BLE001 - sent as its type and message instead
                data = dumps(RemoteError(f"{type(error).__name__}: {error}"), [])
        with self.cond:
            self.outbox.append((done.index, ok, data))
            self.cond.notify_all()


def _check_memory(parcel: Parcel) -> None:
    """Refuses, before loading anything, models that cannot fit in this machine's memory."""
    need = parcel.total_bytes
    free = available_memory("cpu")
    if need and free is not None and need > free:
        raise ModelTooLargeError(_too_large(parcel, f"the {size(free)} free on its machine"))


def _too_large(parcel: Parcel, where: str) -> str:
    models = ", ".join(
        f"{name} ({size(nbytes)})" for name, nbytes in zip(parcel.names, parcel.sizes, strict=True)
    )
    return (
        f"the program's models — {models} — do not fit in {where}: give the workers more "
        "memory (worker_options={'memory': ...} or bigger nodes), use fewer workers per "
        "machine, or a smaller model or dtype"
    )


# -- the driver --------------------------------------------------------------------------------


@dataclass
class _Seat:
    """One actor as the driver sees it: the inputs it holds and its call in flight."""

    actor: Any
    assigned: dict[int, bytes] = field(default_factory=dict)  # index -> packed input
    call: Any = None  # the ObjectRef of its exchange in flight
    stats: dict[str, int] = field(default_factory=dict)
    suspect: bool = False  # running only inputs that were on a worker when it died


class RayPool:
    """The driver's side of the Ray backend (what :class:`~lmcascade.inference.many.ManyRun`
    drives, as it drives a :class:`LocalPool`)."""

    def __init__(
        self,
        program: Any,
        work: Any,
        concurrency: int,
        *,
        num_workers: int | None = None,
        address: str | None = None,
        max_retries: int = 2,
        worker_options: dict | None = None,
    ) -> None:
        _check_settings(num_workers, address, max_retries, worker_options)
        ray = self.ray = _ray()
        _connect(ray, address)
        self.concurrency, self.max_retries = concurrency, max_retries
        try:
            self.parcel = pack_program((program, work), program)
        except Exception as err:  # noqa: BLE001 - whatever pickling raises
            raise _cannot_send(f"program {program.name!r}", err) from None
        self.num_workers, self.options = _actor_options(
            ray, num_workers, self.parcel, dict(worker_options or {})
        )
        self._parcel_ref = ray.put(self.parcel)
        self._class = ray.remote(Worker)
        self.stats = {"model_calls": 0, "rows": 0, "inputs_retried": 0, "workers_lost": 0}
        self._pending: deque[tuple[int, bytes]] = deque()  # (index, packed input)
        self._items: dict[int, Any] = {}  # the inputs out there, by index
        self._done: list[Finished] = []
        self._suspects: deque[list[tuple[int, bytes]]] = deque()  # groups, run apart
        self._attempts: dict[int, int] = {}
        self._retired = {"model_calls": 0, "rows": 0}  # counts of workers that died
        self._started = 0
        self._max_starts = self.num_workers * (max_retries + 2) + 2 * (
            math.ceil(math.log2(QUEUE_FACTOR * concurrency)) + max_retries + 2
        )
        self._dead = False  # every worker died and no more may start
        self._closed = False
        self.seats: list[_Seat] = []
        try:
            self.seats = [self._seat() for _ in range(self.num_workers)]
            self.info = ray.get([s.actor.ready.remote() for s in self.seats])
        except (ValueError, TypeError) as err:  # Ray refused an actor option
            self.close()
            raise OptionError(f"worker_options: {safe_repr(str(err), 300)}") from None
        except BaseException as err:
            self.close()
            raise _unwrapped(ray, err) from None

    @property
    def actors(self) -> list[Any]:
        """The Ray actor handles of the workers alive now (none once closed)."""
        return [] if self._closed else [s.actor for s in self.seats]

    # -- what ManyRun calls --------------------------------------------------------------------

    def room(self) -> int:
        if self._dead:
            return 1  # so that start() hears of any input still to come, and says so
        held = self._held() + sum(len(g) for g in self._suspects)
        return max(0, QUEUE_FACTOR * self.concurrency * len(self.seats) - held)

    def busy(self) -> bool:
        return bool(
            self._pending or self._suspects or self._done or any(s.assigned for s in self.seats)
        )

    def start(self, index: int, item: Any, bound: Any) -> None:
        if self._dead:
            raise self._all_died()
        try:  # packed here, once: an input that cannot travel fails alone, now
            packed = dumps(item, self.parcel.models)
        except Exception as err:  # noqa: BLE001 - whatever pickling raises, for this input
            self._done.append(
                Finished(index, item, error=_cannot_send(f"input {safe_repr(item, 200)}", err))
            )
            return
        self._items[index] = item
        self._pending.append((index, packed))

    def finished(self) -> list[Finished]:
        done, self._done = self._done, []
        return done

    def advance(self) -> None:
        """Hands out waiting inputs, then waits for at least one worker to answer."""
        self._dispatch()
        calls = [s.call for s in self.seats if s.call is not None]
        if not calls:
            return
        self.ray.wait(calls, num_returns=1)
        ready, _ = self.ray.wait(calls, num_returns=len(calls), timeout=0)
        answered = set(ready)
        for seat in list(self.seats):
            if seat.call is not None and seat.call in answered:
                self._answer(seat)
        self._count()

    def status(self) -> str:
        """Words for the progress bar."""
        text = f"{len(self.seats)}/{self.num_workers} workers"
        if self.stats["inputs_retried"]:
            text += f", {self.stats['inputs_retried']} retried"
        return text

    def close(self) -> None:
        """Stops every worker (their unfinished inputs are not written)."""
        if self._closed:
            return
        self._closed = True
        for seat in self.seats:
            try:
                self.ray.kill(seat.actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        _LAST_CLOSE[0] = time.monotonic()

    # -- the rounds ----------------------------------------------------------------------------

    def _seat(self) -> _Seat:
        self._started += 1
        actor = self._class.options(**self.options).remote(self._parcel_ref, self.concurrency)
        return _Seat(actor)

    def _held(self) -> int:
        """Inputs waiting in line or on workers (not counting suspects)."""
        return len(self._pending) + sum(len(s.assigned) for s in self.seats if not s.suspect)

    def _dispatch(self) -> None:
        """Gives every idle worker (no call in flight) new inputs and a call to answer: a
        group of suspects to an empty worker, alone; else an even share of the line (so the
        first worker asked does not take everything), at most a full queue."""
        for seat in self.seats:
            if seat.call is not None:
                continue
            if seat.suspect:  # still running its suspects: only asked for news
                self._give(seat, [])
            elif self._suspects and not seat.assigned:
                self._give(seat, self._suspects.popleft(), suspect=True)
        open_seats = [s for s in self.seats if not s.suspect]
        if not open_seats:
            return
        cap = min(QUEUE_FACTOR * self.concurrency, -(-self._held() // len(open_seats)))
        for seat in sorted(open_seats, key=lambda s: len(s.assigned)):
            if seat.call is not None:
                continue
            give = []
            while self._pending and len(seat.assigned) + len(give) < cap:
                give.append(self._pending.popleft())
            if give or seat.assigned:
                self._give(seat, give)

    def _give(self, seat: _Seat, items: list[tuple[int, bytes]], suspect: bool = False) -> None:
        seat.suspect = seat.suspect or suspect
        seat.assigned.update(items)
        seat.call = seat.actor.exchange.remote(items, POLL_SECONDS)

    def _answer(self, seat: _Seat) -> None:
        """Takes a worker's answer: its finished inputs, or its death."""
        ray = self.ray
        call, seat.call = seat.call, None
        try:
            out, stats = ray.get(call)
        except ray.exceptions.RayActorError as err:
            self._lost(seat, err)
            return
        except ray.exceptions.RayTaskError as err:
            raise _unwrapped(ray, err) from None
        seat.stats = stats
        for index, ok, data in out:
            seat.assigned.pop(index)
            item = self._items.pop(index)
            try:
                value = loads(data, self.parcel.models)
            except Exception as err:  # noqa: BLE001 - this input's error alone
                ok, value = False, _cannot_receive("result", err)
            self._done.append(Finished(index, item, value if ok else None, None if ok else value))
        if not seat.assigned:
            seat.suspect = False  # its suspects all finished: it takes any inputs again

    def _lost(self, seat: _Seat, err: BaseException) -> None:
        """A worker died, and a new one takes its seat.  Which of its inputs killed it
        cannot be told (one that crashes its worker never reports having started), so they
        are run again as *suspects*, apart from other inputs: a group that kills its worker
        again is split in two, and only an input that kills a worker running it alone is
        charged a try — past ``max_retries`` it is recorded as lost.  Inputs that only
        shared a worker with it are never charged."""
        self.stats["workers_lost"] += 1
        for name in self._retired:
            self._retired[name] += seat.stats.get(name, 0)
        self.seats.remove(seat)
        lost = sorted(seat.assigned.items())
        if getattr(err, "actor_init_failed", False):
            raise _unwrapped(self.ray, err) from None
        if seat.suspect and len(lost) == 1:
            index = lost[0][0]
            tries = self._attempts[index] = self._attempts.get(index, 0) + 1
            if tries > self.max_retries:
                lost = []
                self._done.append(self._lost_input(index, tries))
        if seat.suspect and len(lost) > 1:
            half = (len(lost) + 1) // 2
            self._suspects.extend([lost[:half], lost[half:]])
        elif lost:
            self._suspects.append(lost)
        self.stats["inputs_retried"] += len(lost)
        if self._started < self._max_starts:
            self.seats.append(self._seat())
        elif not self.seats:
            self._dead = True
            if self._suspects or self._pending:
                raise self._all_died()

    def _lost_input(self, index: int, tries: int) -> Finished:
        item = self._items.pop(index)
        return Finished(
            index,
            item,
            error=WorkerLostError(
                f"input {safe_repr(item, 200)}: its Ray worker died {tries} times while "
                f"running it alone (max_retries={self.max_retries}); the input is the likely "
                "cause (memory? a crash in native code?) — the worker logs say more"
            ),
        )

    def _all_died(self) -> InferenceError:
        return InferenceError(
            f"every Ray worker died ({self.stats['workers_lost']} in all, the most one run "
            f"replaces); the inputs not yet finished did not run. Rerun with the same out= "
            "file to resume where it stopped"
        )

    def _count(self) -> None:
        for name in self._retired:
            self.stats[name] = self._retired[name] + sum(s.stats.get(name, 0) for s in self.seats)


def _plain(result: Any) -> Any:
    """``result`` without what its sites hold beyond their numbers and values — their
    distribution objects, and tool errors as their type and message — for a result that
    does not pickle as it is."""
    plain = copy.copy(result)
    plain.traces = []
    for trace in result.traces:
        copied = Trace()
        copied.sites = [
            dataclasses.replace(
                site,
                dist=None,
                error=None
                if site.error is None
                else RemoteError(f"{type(site.error).__name__}: {site.error}"),
            )
            for site in trace.sites
        ]
        copied._index = dict(trace._index)
        copied.log_weight, copied.log_joint = trace.log_weight, trace.log_joint
        copied.value, copied.done = trace.value, trace.done
        plain.traces.append(copied)
    return plain


def _cannot_receive(what: str, err: BaseException) -> RemoteError:
    return RemoteError(
        f"the {what} was pickled but cannot be unpickled on the other side "
        f"({type(err).__name__}: {safe_repr(str(err), 300)}); an exception class whose "
        "__init__ takes other arguments than its message does this: use plain values"
    )


def _cannot_send(what: str, err: BaseException) -> ProgramError:
    return ProgramError(
        f"{what} cannot be sent to a Ray worker: {type(err).__name__}: "
        f"{safe_repr(str(err), 300)}. Everything a program holds (its closure, its "
        "options) and every input must pickle: make locks, open files and connections "
        "inside the program, or give a model a recipe (see docs/models.md)"
    )


def _check_settings(num_workers: Any, address: Any, max_retries: Any, worker_options: Any) -> None:
    if num_workers is not None and (
        not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1
    ):
        raise OptionError(f"num_workers must be a whole number of at least 1, got {num_workers!r}")
    if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
        raise OptionError(f"max_retries must be a whole number of at least 0, got {max_retries!r}")
    if address is not None and (not isinstance(address, str) or not address.strip()):
        raise OptionError(
            f"address must name a Ray cluster ('auto', 'ray://head:10001') or be None for a "
            f"local Ray, got {safe_repr(address, 100)}"
        )
    if worker_options is not None and not isinstance(worker_options, dict):
        raise OptionError(
            "worker_options must be a dict of Ray actor options (num_cpus, num_gpus, memory, "
            f"runtime_env, ...), got {type(worker_options).__name__}"
        )
    runtime = (worker_options or {}).get("runtime_env")
    if runtime is not None and (
        not isinstance(runtime, dict) or not isinstance(runtime.get("env_vars", {}), dict)
    ):
        raise OptionError(
            "worker_options runtime_env must be a dict (its env_vars a dict of texts), got "
            f"{safe_repr(runtime, 100)}"
        )


def _connect(ray: Any, address: str | None) -> None:
    """Joins the Ray this process already has, the cluster at ``address``, or starts a
    local one (it stays up for later calls, as Ray's own libraries leave it)."""
    if ray.is_initialized():
        if address not in (None, "auto"):
            raise OptionError(
                f"address={address!r}, but this process is already connected to a Ray "
                f"({safe_repr(ray.get_runtime_context().gcs_address, 100)}), which it keeps: "
                "call ray.shutdown() first to join another, or leave address out"
            )
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    except (ConnectionError, ValueError, RuntimeError) as err:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray"
        raise OptionError(f"cannot start or join {where}: {safe_repr(str(err), 300)}") from None


def _actor_options(
    ray: Any, num_workers: int | None, parcel: Parcel, options: dict
) -> tuple[int, dict]:
    """How many workers, and each one's Ray options: CPUs shared out, a GPU each when the
    cluster has them, the models' memory reserved — refused now when it cannot fit."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    resources = [n.get("Resources", {}) for n in nodes]
    gpus = sum(r.get("GPU", 0) for r in resources)
    count = num_workers or (int(gpus) if gpus >= 1 else DEFAULT_WORKERS)
    if "num_gpus" not in options and gpus > 0:
        options["num_gpus"] = min(1.0, gpus / count)
    if "num_cpus" not in options:
        cpus = sum(r.get("CPU", 0) for r in resources)
        most = max((r.get("CPU", 0) for r in resources), default=1)
        options["num_cpus"] = max(1, min(int(most), int(cpus // count)))
    need = parcel.total_bytes
    if need:
        options.setdefault("memory", int(need * MEMORY_HEADROOM))
        _check_fit(count, need, options["memory"], [r.get("memory", 0) for r in resources], parcel)
    paths = _user_paths()
    runtime = dict(options.get("runtime_env") or {})
    env = dict(runtime.get("env_vars") or {})
    if paths and "PYTHONPATH" not in env:  # the driver's own code folders, importable there
        env["PYTHONPATH"] = os.pathsep.join(paths)
        runtime["env_vars"] = env
        options["runtime_env"] = runtime
    options.setdefault("max_concurrency", 2)
    _check_room(ray, count, options, resources)
    return count, options


def _free_resources(totals: list[dict]) -> list[dict]:
    """Each node's resources free now (Ray's per-node view; the totals where this Ray
    version does not offer it)."""
    try:
        from ray._private.state import available_resources_per_node

        return list(available_resources_per_node().values())
    except Exception:  # noqa: BLE001 - an older or newer Ray: the totals are the best guess
        return totals


def _check_room(ray: Any, count: int, options: dict, totals: list[dict]) -> None:
    """Refuses, now, workers that Ray could not place (it would wait for room forever):
    more than the free CPUs, GPUs, memory and custom resources of the nodes hold."""
    want = {"CPU": options.get("num_cpus"), "GPU": options.get("num_gpus", 0)}
    want.update(options.get("resources") or {})
    want["memory"] = options.get("memory", 0)
    for name, amount in want.items():
        if amount is not None and (
            not isinstance(amount, int | float) or isinstance(amount, bool) or amount < 0
        ):
            raise OptionError(
                f"worker_options: {name} must be a number of at least 0, got {amount!r}"
            )
    want = {k: v for k, v in want.items() if v}
    deadline = _LAST_CLOSE[0] + ROOM_WAIT_SECONDS  # only just after workers were stopped
    while True:
        free = _free_resources(totals)
        fit = sum(min(int(node.get(k, 0) // v) for k, v in want.items()) for node in free)
        if fit >= count:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)  # workers just stopped (ray.kill) free their resources a moment later
    absent = [k for k in want if not sum(n.get(k, 0) for n in totals)]
    if absent:
        raise OptionError(
            f"the Ray cluster has no {' and no '.join(absent)} at all, and each worker asks "
            f"for {', '.join(str(want[k]) + ' ' + k for k in absent)}: drop it from "
            "worker_options, or join a cluster that has it (address=...)"
        )
    ask = ", ".join(f"{size(v) if k == 'memory' else v} {k}" for k, v in want.items())
    has = ", ".join(
        f"{size(sum(n.get(k, 0) for n in free)) if k == 'memory' else sum(n.get(k, 0) for n in free)}"
        f" {k}"
        for k in want
    )
    raise OptionError(
        f"Ray has room for {fit} of the {count} workers asked for: each needs {ask}, and the "
        f"cluster has {has} free (a ManyRun still open, or other Ray work, holds the rest). "
        f"{f'Use num_workers={fit}, a' if fit else 'A'}sk less per worker (worker_options), "
        "or close what holds them"
    )


def _check_fit(count: int, need: int, each: Any, nodes: list[float], parcel: Parcel) -> None:
    if not isinstance(each, int | float) or isinstance(each, bool) or each <= 0:
        raise OptionError(f"worker_options memory must be a number of bytes, got {each!r}")
    if each < need:
        raise ModelTooLargeError(_too_large(parcel, f"worker_options memory={size(each)}"))
    if not nodes or max(nodes) < each:
        largest = size(max(nodes, default=0))
        raise ModelTooLargeError(
            _too_large(parcel, f"any Ray node (the largest offers {largest} to workers)")
        )
    fit = sum(int(m // each) for m in nodes)
    if fit < count:
        raise ModelTooLargeError(
            f"{count} workers of {size(each)} each (the program's models: "
            f"{', '.join(parcel.names)}) do not fit in the cluster's memory; use "
            f"num_workers={fit} or fewer, or add memory"
        )


def _user_paths() -> list[str]:
    """The driver's import folders that are not Python's or installed packages' (the
    current directory, a tests folder): workers on this machine can import from them."""
    paths = (os.path.realpath(entry or os.getcwd()) for entry in sys.path)
    return list(dict.fromkeys(p for p in paths if os.path.isdir(p) and not in_library(p)))


def _unwrapped(ray: Any, err: BaseException) -> BaseException:
    """The lmcascade error inside a Ray error (a worker that failed to start), else a clear
    error of ours saying what Ray said."""
    cause = err
    for _ in range(5):  # Ray's wrapper (even one posing as the cause's class) holds the cause
        inner = getattr(cause, "cause", None) or cause.__cause__
        if isinstance(cause, LMCascadeError) and not isinstance(inner, LMCascadeError):
            return cause
        if inner is None or inner is cause:
            break
        cause = inner
    if isinstance(err, KeyboardInterrupt | SystemExit):
        return err
    if isinstance(cause, ray.exceptions.RayTaskError):
        try:
            cause = cause.as_instanceof_cause()
        except Exception:  # noqa: BLE001
            pass
    return InferenceError(f"a Ray worker failed: {safe_repr(str(cause), 1500)}")
