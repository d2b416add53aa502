"""Many inputs at once: ``lc.infer_many`` runs a program on every input of a dataset with
the model calls of all inputs batched together.

Each input gets its own ``lc.infer`` run, with the same method, options and seed a separate
call would get, so its result is the one ``lc.infer(program(**input), seed=seed)`` gives.
The runs take turns on worker threads (one runs at a time: the library is not made
thread-safe by this, it is made to wait).  When a run asks a model for next-token
probabilities it parks; once every run in flight has parked or finished, the requests to
each model are made as **one** batched call — across inputs as well as across particles —
and every run resumes with its rows.  A prompt prefix the inputs share (a system prompt) is
computed once, by the model's prefix cache.  Each run's random state (torch's, numpy's and
Python's, and its own token generators) is its own: it is saved when the run parks and put
back when it resumes, so how the runs interleave never changes what any of them draws.

With ``out="results.jsonl"`` every finished input is appended to the file as one JSON line
as soon as it finishes (flushed to disk); running again with the same file skips the inputs
already there, so a run that was stopped picks up where it was.

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
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from lmcascade.errors import LMCascadeError, OptionError, ProgramError
from lmcascade.inference.progress import progress_bar
from lmcascade.models.base import BATCHER, block_counts
from lmcascade.program import BoundProgram, Program
from lmcascade.result import Result
from lmcascade.trace import jsonable, safe_repr

__all__ = ["ManyRun", "infer_many"]


class _Cancelled(BaseException):
    """Raised inside a parked run when the whole ``infer_many`` is closed or interrupted."""


STOPS = (KeyboardInterrupt, SystemExit)
"""Raised inside a run, these stop ``infer_many`` itself, as they stop ``lc.infer``."""


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
        self._rng = _rng_state()
        self.request, self.reply = (model, name, fn, args, kwargs), None
        self.turns.parked.release()
        self.go.acquire()
        if self.turns.closed:
            raise _Cancelled
        _set_rng_state(self._rng)
        ok, value = self.reply  # type: ignore[misc]
        self.request = self.reply = None
        if not ok:
            raise value
        return value


def _rng_state() -> tuple:
    """The global random state a run draws from: torch's (CPU), Python's and numpy's."""
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _set_rng_state(state: tuple) -> None:
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


class ManyRun:
    """The iterator ``lc.infer_many`` returns: ``(input, Result)`` pairs as inputs finish.

    An input whose run raised yields ``(input, error)`` — the exception instance — unless
    ``on_error="raise"``.  ``stats`` counts ``inputs_done``, ``inputs_failed``,
    ``inputs_skipped`` (already in ``out``), ``model_calls`` (the batched calls actually
    made) and ``rows`` (contexts computed in them).  Use it as a context manager, or call
    :meth:`close`, to stop early: the runs in flight are cancelled.
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
        options: dict,
    ) -> None:
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
        self.out = None if out is None else os.fspath(out)
        done = _read_done(self.out, self.method, seed, self.config) if self.out else None
        if seed is None:
            seed = done.seed if done and done.seed is not None else _fresh_seed()
        self.seed = seed
        self._skip = done.keys if done else Counter()
        self._inputs = iter(inputs)
        self._total = len(inputs) if hasattr(inputs, "__len__") else None  # type: ignore[arg-type]
        self._runs: list[_Run] = []
        self._ready: list[_Run] = []  # finished, not yet handed out
        self._turns = _Turns()
        self._exhausted = False
        self._index = 0
        self.stats: dict[str, int] = dict.fromkeys(
            ("inputs_done", "inputs_failed", "inputs_skipped", "model_calls", "rows"), 0
        )
        self._bar = progress_bar(f"infer_many {self.method}", progress, unit="input")
        self._bar.total = self._total

    # -- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return self

    def __next__(self) -> tuple[Any, Any]:
        if self._turns.closed:
            raise StopIteration
        mine = _rng_state()  # the caller's random state, untouched by the runs
        try:
            while not self._ready:
                self._fill()
                if self._ready:
                    break
                if not self._runs:
                    self.close()
                    raise StopIteration
                self._round()
            run = self._ready.pop(0)
            return run.item, self._finish(run)
        except BaseException:
            self.close()
            raise
        finally:
            _set_rng_state(mine)

    def __enter__(self) -> ManyRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancels the runs in flight (their inputs are not written), waits for their
        threads to end, and closes the bar.  Iterating afterwards yields nothing."""
        if self._turns.closed:
            return
        mine = _rng_state()
        self._turns.closed = True
        for run in self._runs:
            if not run.finished:
                run.go.release()
        for run in self._runs:
            run.join(timeout=10.0)
        self._runs.clear()
        self._bar.close()
        _set_rng_state(mine)  # the cancelled runs unwound their own seeding

    def __del__(self) -> None:
        if hasattr(self, "_bar"):
            self.close()

    # -- the rounds ----------------------------------------------------------------------------

    def _fill(self) -> None:
        """Starts runs until ``concurrency`` are in flight (or the inputs are used up)."""
        while not self._exhausted and len(self._runs) < self.concurrency:
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
                run = _Run(self._turns, index, item, None)
                run.error, run.finished = err, True
                self._ready.append(run)
                continue
            run = _Run(self._turns, index, item, self._work(bound))
            run.start()
            self._resume(run)
            self._runs.append(run)

    def _resume(self, run: _Run) -> None:
        """Lets ``run`` go until it parks on a model call or finishes."""
        run.go.release()
        self._turns.parked.acquire()

    def _round(self) -> None:
        """One batched call per (model, method) for every parked run; finished runs leave."""
        for run in [r for r in self._runs if r.finished]:
            self._runs.remove(run)
            self._ready.append(run)
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

    def _finish(self, run: _Run) -> Any:
        """Records a finished input (in ``stats`` and ``out``); its result or its error."""
        self._bar.update(1)
        if run.error is None:
            self.stats["inputs_done"] += 1
            self._write(run.item, run.result)
            return run.result
        self.stats["inputs_failed"] += 1
        if self.on_error == "raise" or isinstance(run.error, STOPS):
            raise run.error
        self._write(run.item, None, run.error)
        return run.error

    def _work(self, bound: BoundProgram) -> Any:
        """What a run does: ``lc.infer`` of its input (one bar, over the inputs, instead of
        one per run)."""
        from lmcascade.inference.base import infer

        method, seed, options = self.method, self.seed, self.options

        def work() -> Result:
            return infer(bound, method=method, seed=seed, progress=False, **options)

        return work

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
        options=options,
    )


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
