"""Many inputs at once: ``lc.infer_many`` runs a program on every input of a dataset with
the model calls of all inputs batched together — in this process, or spread over Ray workers.

Each input gets its own ``lc.infer`` run, with the same method, options and seed a separate
call would get, so its result is the one ``lc.infer(program(**input), seed=seed)`` gives.
Locally (``backend="local"``, :mod:`lmcascade.inference.local_pool`) the runs take turns on
threads and every decoding step makes one batched model call for all inputs in flight; a
prompt prefix the inputs share (a system prompt) is computed once, by the model's prefix
cache.  With ``backend="ray"`` (:mod:`lmcascade.inference.ray_pool`) the inputs are spread
over Ray actors, each holding one replica of the program's models and running the local
pool on its share; this process hands out the inputs and gathers the results.

With ``out="results.jsonl"`` every finished input is appended to the file as one JSON line
as soon as it finishes (flushed to disk, by this process only); running again with the same
file skips the inputs already there, so a run that was stopped picks up where it was.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["yes", "no", "<eos>"], lambda ctx: [0.0, 0.5, 0.0])
>>> @lc.program
... def ask(question):
...     answer = yield lc.gen("answer", lm, question, max_tokens=2)
...     return answer
>>> runs = lc.infer_many(ask, ["yes", "no", "yesno"], method="forward", num_samples=8, seed=0)
>>> done = dict(runs)
>>> done["no"].values == lc.infer(ask("no"), method="forward", num_samples=8, seed=0).values
True
>>> runs.stats["inputs_done"], runs.stats["model_calls"] <= 3
(3, True)
>>> runs.summary()
'3 done, 0 failed'
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any

import numpy as np

from lmcascade.errors import LMCascadeError, OptionError, ProgramError
from lmcascade.inference.local_pool import Finished, LocalPool, rng_state, set_rng_state
from lmcascade.inference.progress import progress_bar
from lmcascade.program import BoundProgram, Program
from lmcascade.result import Result
from lmcascade.trace import jsonable, safe_repr

__all__ = ["ManyRun", "infer_many"]

STOPS = (KeyboardInterrupt, SystemExit)
"""Raised inside a run, these stop ``infer_many`` itself, as they stop ``lc.infer``."""

BACKENDS = ("local", "ray")

STAT_NAMES = (
    "inputs_done",
    "inputs_failed",
    "inputs_skipped",
    "inputs_retried",
    "workers_lost",
    "model_calls",
    "rows",
)


class ManyRun:
    """The iterator ``lc.infer_many`` returns: ``(input, Result)`` pairs as inputs finish.

    An input whose run raised yields ``(input, error)`` — the exception instance — unless
    ``on_error="raise"``.  ``stats`` counts ``inputs_done``, ``inputs_failed``,
    ``inputs_skipped`` (already in ``out``), ``inputs_retried`` and ``workers_lost`` (Ray:
    inputs run again because their worker died, and the workers that died), ``model_calls``
    (the batched calls actually made) and ``rows`` (contexts computed in them); :meth:`summary`
    says the same in words.  Use it as a context manager, or call :meth:`close`, to stop
    early: the runs in flight are cancelled (Ray: the workers are stopped).
    """

    def __init__(
        self,
        program: Program,
        inputs: Iterable[Any],
        *,
        method: str,
        seed: int | None,
        out: str | os.PathLike | None,
        concurrency: int,
        progress: bool,
        on_error: str,
        save_traces: bool,
        backend: str = "local",
        backend_options: dict | None = None,
        options: dict,
    ) -> None:
        self._pool: Any = None  # set last, once every check passed
        self._closed = False
        if isinstance(program, BoundProgram):
            raise ProgramError(
                f"infer_many takes the program itself, not a bound call: pass "
                f"{program.name!r}, not {program.name}(...); each input is bound to it"
            )
        if not isinstance(program, Program):
            raise ProgramError(
                f"infer_many needs an @lc.program (or a program from lc.load), got "
                f"{type(program).__name__}"
            )
        if isinstance(inputs, str | bytes | dict) or not isinstance(inputs, Iterable):
            raise OptionError(
                "inputs must be an iterable of inputs (a list of dicts of keyword arguments, "
                f"of tuples of positional ones, or of single values), got {type(inputs).__name__}"
            )
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise OptionError(f"concurrency must be a positive integer, got {concurrency!r}")
        if on_error not in ("record", "raise"):
            raise OptionError(f"on_error must be 'record' or 'raise', got {on_error!r}")
        if backend not in BACKENDS:
            raise OptionError(
                f"backend must be 'local' (this process) or 'ray' (Ray workers), got "
                f"{safe_repr(backend, 100)}"
            )
        for name, flag in (("progress", progress), ("save_traces", save_traces)):
            if not isinstance(flag, bool):
                raise OptionError(f"{name} must be True or False, got {safe_repr(flag, 100)}")
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63
        ):
            raise OptionError(f"seed must be a whole number from 0 to 2**63 - 1, got {seed!r}")
        from lmcascade.inference.base import method_class

        cls = method_class(method)  # a typo fails here, once, not on every input
        config = cls(**options).config
        self.program, self.method, self.options = program, cls.name, options
        # what out= files record and compare: the method's whole configuration, normalised
        # (case, synonyms, defaults named or not), without the bar
        self.config = {k: v for k, v in config.items() if k != "progress"}
        self.concurrency, self.on_error, self.save_traces = concurrency, on_error, save_traces
        self.backend = backend
        self.out = None if out is None else os.fspath(out)
        done = _read_done(self.out, self.method, seed, self.config) if self.out else None
        if seed is None:
            seed = done.seed if done and done.seed is not None else _fresh_seed()
        self.seed = seed
        self._skip = done.keys if done else Counter()
        self._inputs = iter(inputs)
        self._total = len(inputs) if hasattr(inputs, "__len__") else None  # type: ignore[arg-type]
        self._ready: list[Finished] = []  # finished, not yet handed out
        self._exhausted = False
        self._index = 0
        self.stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        work = partial(run_input, method=self.method, seed=self.seed, options=options)
        if backend == "ray":
            from lmcascade.inference.ray_pool import RayPool

            pool: Any = RayPool(program, work, concurrency, **(backend_options or {}))
        else:
            pool = LocalPool(work, concurrency)
        self._bar = progress_bar(f"infer_many {self.method}", progress, unit="input")
        self._bar.total = self._total
        self._pool = pool

    # -- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return self

    def __next__(self) -> tuple[Any, Any]:
        if self._closed:
            raise StopIteration
        mine = rng_state()  # the caller's random state, untouched by the runs
        try:
            while not self._ready:
                self._fill()
                self._ready.extend(self._pool.finished())
                if self._ready:
                    break
                if not self._pool.busy():
                    self.close()
                    raise StopIteration
                self._pool.advance()
                self._show()
            done = self._ready.pop(0)
            return done.item, self._finish(done)
        except BaseException:
            self.close()
            raise
        finally:
            set_rng_state(mine)

    def __enter__(self) -> ManyRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancels the runs in flight (their inputs are not written), waits for them to end,
        and closes the bar.  Iterating afterwards yields nothing."""
        if self._closed or self._pool is None:
            return
        self._closed = True
        mine = rng_state()
        try:
            self._show()  # stats as they stand, also when the run stopped on an error
            self._pool.close()
        finally:
            self._bar.close()
            set_rng_state(mine)  # the cancelled runs unwound their own seeding

    def __del__(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self.close()

    @property
    def workers(self) -> list[Any]:
        """The Ray actor handles of the workers alive now (``backend="ray"``; empty
        locally) — for Ray's own tools: ``ray.kill``, the dashboard, logs."""
        return list(getattr(self._pool, "actors", []))

    def summary(self) -> str:
        """The run so far in words: inputs done and failed, and (when any) retried after a
        worker died, workers lost, and inputs skipped because ``out`` had them."""
        s = self.stats
        parts = [f"{s['inputs_done']} done", f"{s['inputs_failed']} failed"]
        if s["inputs_retried"] or s["workers_lost"]:
            parts.append(
                f"{s['inputs_retried']} retried after {s['workers_lost']} worker"
                f"{'s' if s['workers_lost'] != 1 else ''} died"
            )
        if s["inputs_skipped"]:
            parts.append(f"{s['inputs_skipped']} skipped (already in {self.out})")
        return ", ".join(parts)

    # -- the rounds ----------------------------------------------------------------------------

    def _fill(self) -> None:
        """Hands inputs to the pool while it has room (or until the inputs are used up)."""
        while not self._exhausted and self._pool.room() > 0:
            try:
                item = next(self._inputs)
            except StopIteration:
                self._exhausted = True
                break
            index, self._index = self._index, self._index + 1
            key = input_key(item)
            if key is not None and self._skip[key] > 0:
                self._skip[key] -= 1
                self.stats["inputs_skipped"] += 1
                self._bar.update(1)
                continue
            try:
                bound = _bind(self.program, item)
            except LMCascadeError as err:
                self._ready.append(Finished(index, item, error=err))
                continue
            self._pool.start(index, item, bound)

    def _show(self) -> None:
        """Copies the pool's counters into ``stats``; a pool that has words for the bar
        (workers alive, inputs retried) shows them there."""
        for name, value in self._pool.stats.items():
            self.stats[name] = value
        status = getattr(self._pool, "status", None)
        if status is not None and not self._bar.disable:
            self._bar.set_postfix_str(status(), refresh=False)

    def _finish(self, done: Finished) -> Any:
        """Records a finished input (in ``stats`` and ``out``); its result or its error."""
        self._show()
        self._bar.update(1)
        if done.error is None:
            self.stats["inputs_done"] += 1
            self._write(done.item, done.result)
            return done.result
        self.stats["inputs_failed"] += 1
        if self.on_error == "raise" or isinstance(done.error, STOPS):
            raise done.error
        self._write(done.item, None, done.error)
        return done.error

    def _write(self, item: Any, result: Result | None, error: BaseException | None = None) -> None:
        if self.out is None:
            return
        line: dict[str, Any] = {
            "input": jsonable(item),
            "key": input_key(item),
            "method": self.method,
            "seed": self.seed,
            "options": jsonable(self.config),
        }
        if result is not None:
            data = result.to_dict()
            if not self.save_traces:
                data.pop("traces", None)
            line["result"] = data
        else:
            line["error"] = {"type": type(error).__name__, "message": safe_repr(str(error), 2000)}
        text = json.dumps(line, allow_nan=False) + "\n"
        try:
            with open(self.out, "a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise OptionError(f"out={self.out!r}: cannot write: {err.strerror or err}") from None


def infer_many(
    program: Program,
    inputs: Iterable[Any],
    method: str = "forward",
    seed: int | None = None,
    out: str | os.PathLike | None = None,
    *,
    concurrency: int = 64,
    progress: bool = True,
    on_error: str = "record",
    save_traces: bool = False,
    backend: str = "local",
    num_workers: int | None = None,
    address: str | None = None,
    max_retries: int | None = None,
    worker_options: dict | None = None,
    **options: Any,
) -> ManyRun:
    """Runs ``program`` on every input, batching model calls across inputs; yields
    ``(input, Result)`` pairs as inputs finish (in order of finishing).

    Each input is a dict of keyword arguments, a tuple of positional arguments, or a single
    value for a one-parameter program.  ``method``, ``seed`` and ``options`` are those of
    :func:`lc.infer <lmcascade.inference.base.infer>`, and every input's result is exactly
    what ``lc.infer(program(**input), method=method, seed=seed, **options)`` returns (the
    same seed for every input; a transformer's logits depend on the batch size in the last
    bits, so there a draw near a tie can differ from a separate run's).  Up to ``concurrency`` inputs run at once.  An input whose run raises
    yields ``(input, exception)`` and the others go on (``on_error="raise"`` stops instead).
    ``out`` names a JSON-lines file: each finished input is appended (its input, method,
    seed, options and result without traces unless ``save_traces``; or its error), and a
    rerun with the same file skips the inputs that have a result there — inputs that failed
    run again.  A progress bar shows in a terminal on runs over two seconds.

    ``backend="ray"`` spreads the inputs over ``num_workers`` Ray actors (default: one per
    GPU, else 2), each with its own replica of the program's models, loaded once; results
    are the same as ``"local"``'s for the same seed, and ``out`` is written by this process
    only.  Ray is started here on demand, or joined at ``address`` (``"auto"``, or
    ``"ray://head:10001"``).  A worker that dies has its inputs run again elsewhere, each at
    most ``max_retries`` times (default 2); ``worker_options`` are Ray actor options (``num_cpus``,
    ``num_gpus``, ``memory``, ``runtime_env``, ...).  Needs the ``ray`` extra; see
    :mod:`lmcascade.inference.ray_pool`.

    >>> import lmcascade as lc
    >>> from pyro.distributions import Bernoulli
    >>> @lc.program
    ... def coin(p):
    ...     x = yield lc.sample("x", Bernoulli(p))
    ...     return int(x)
    >>> for p, result in lc.infer_many(coin, [0.0, 1.0], method="enumerate"):
    ...     print(p, result.best())
    0.0 0
    1.0 1
    """
    return ManyRun(
        program,
        inputs,
        method=method,
        seed=seed,
        out=out,
        concurrency=concurrency,
        progress=progress,
        on_error=on_error,
        save_traces=save_traces,
        backend=backend,
        backend_options=_backend_options(
            backend, num_workers, address, max_retries, worker_options
        ),
        options=options,
    )


def _backend_options(
    backend: str,
    num_workers: int | None,
    address: str | None,
    max_retries: int | None,
    worker_options: dict | None,
) -> dict:
    """The Ray pool's settings, refused for the local backend (where they would do nothing)."""
    given = {
        "num_workers": num_workers,
        "address": address,
        "worker_options": worker_options,
        "max_retries": max_retries,
    }
    if backend != "ray":
        named = [k for k, v in given.items() if v is not None]
        if named:
            raise OptionError(
                f"{', '.join(named)} go{'es' if len(named) == 1 else ''} with backend='ray' "
                "(the local backend runs in this process)"
            )
        return {}
    return {
        "num_workers": num_workers,
        "address": address,
        "max_retries": 2 if max_retries is None else max_retries,
        "worker_options": worker_options,
    }


def run_input(bound: BoundProgram, *, method: str, seed: int, options: dict) -> Result:
    """What each input's run does: ``lc.infer`` of the bound program, without a bar of its
    own (``infer_many`` shows one, over the inputs)."""
    from lmcascade.inference.base import infer

    return infer(bound, method=method, seed=seed, progress=False, **options)


def _fresh_seed() -> int:
    return int(np.random.SeedSequence().generate_state(1)[0])


def _bind(program: Program, item: Any) -> BoundProgram:
    """``program`` bound to one input: a dict is keyword arguments, a tuple positional ones,
    anything else the one argument."""
    if isinstance(item, dict):
        if not all(isinstance(k, str) for k in item):
            raise ProgramError(
                f"input {safe_repr(item, 200)}: a dict input names keyword arguments, so its "
                "keys must be strings"
            )
        return program(**item)
    if isinstance(item, tuple):
        return program(*item)
    return program(item)


def input_key(item: Any) -> str | None:
    """A text naming an input exactly, by which ``out`` files are matched on a rerun: types
    are kept (a tuple is not a list, ``nan`` is not ``"nan"``), huge numbers and texts are
    digested; None for an input holding objects it cannot name faithfully (such inputs
    always run).

    >>> input_key(("x",)) != input_key(["x"]), input_key(float("nan")) != input_key("nan")
    (True, True)
    >>> input_key(object()) is None
    True
    """
    try:
        tagged = _tagged(item, 0)
    except _Unnamed:
        return None
    text = json.dumps(tagged, sort_keys=True, separators=(",", ":"))
    if len(text) > 512:
        return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
    return text


class _Unnamed(Exception):
    pass


def _tagged(value: Any, depth: int) -> Any:
    if depth > 100:
        raise _Unnamed
    if value is None or type(value) is bool or type(value) is str:
        return value
    if type(value) is int:
        if abs(value) < 10**4000:
            return ["int", str(value)]
        raw = value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True)
        return ["int", hashlib.sha256(raw).hexdigest()]
    if type(value) is float:
        return ["float", repr(value)]
    if type(value) in (list, tuple):
        return [type(value).__name__, [_tagged(v, depth + 1) for v in value]]
    if type(value) is dict and all(type(k) is str for k in value):
        return ["dict", {k: _tagged(v, depth + 1) for k, v in value.items()}]
    raise _Unnamed


class _Done:
    def __init__(self, seed: int | None, keys: Counter) -> None:
        self.seed, self.keys = seed, keys


def _read_done(path: str, method: str, seed: int | None, config: dict) -> _Done | None:
    """The inputs ``path`` already holds results for, after checking they were made the same
    way (lines that record only an error are not checked: those inputs run again).  A last
    line cut short (the run was killed while writing it) is removed; a whole last line that
    only lacks its newline gets one."""
    if os.path.isdir(path):
        raise OptionError(f"out={path!r} is a folder; give a file name such as results.jsonl")
    try:
        with open(path, "ab") as f:  # can we write it?  (creates it when missing)
            pass
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise OptionError(f"out={path!r}: cannot write: {err.strerror or err}") from None
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        try:
            json.loads(data[cut:].decode("utf-8"))
            data += b"\n"  # a whole line, saved without its newline
        except ValueError:
            data = data[:cut]  # a line cut short: drop it
        with open(path, "wb") as f:
            f.write(data)
    keys: Counter = Counter()
    found_seed = None
    want = jsonable(config)
    for number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw.decode("utf-8"))
            made = (line["method"], line["seed"], line.get("options"))
            key = line["key"]
        except (ValueError, KeyError, TypeError):
            raise OptionError(
                f"{path}, line {number}: not a result line written by infer_many; give a new "
                "out file or remove that line"
            ) from None
        if "result" not in line:
            continue
        if made[0] != method or (seed is not None and made[1] != seed) or made[2] != want:
            raise OptionError(
                f"{path}, line {number} holds a result of method {made[0]!r}, seed {made[1]}, "
                f"options {made[2]}; this run is method {method!r}, seed {seed}, options "
                f"{want}. Use another out file, or the same settings to resume"
            )
        found_seed = made[1]
        if key is not None:
            keys[key] += 1
    return _Done(found_seed, keys)
