"""Running a replay with a time limit, so that one that never ends costs a bounded time.

A replay gives the program values it may never receive in a real run: with ``x == ""``,
``while len(s) < 10: s += x`` never ends, and neither does ``while n != 0: n -= 2`` with an
odd ``n``.  :class:`Limiter` runs each replay in a worker thread and waits for it at most
``seconds``; one that is still running is given up (:data:`TIMED_OUT`) and interrupted — a
:class:`GaveUp` exception is raised inside it at its next Python instruction (CPython; code
stuck inside a C call is interrupted when the call returns).  A program that catches
``BaseException`` and goes on is interrupted again at each later replay.  The worker runs in a
copy of the caller's context variables.

>>> limiter = Limiter()
>>> limiter(lambda: 1 + 1, seconds=5.0)
2
>>> def forever():
...     while True:
...         pass
>>> limiter(forever, seconds=0.05) is TIMED_OUT
True
"""

from __future__ import annotations

import contextvars
import ctypes
import threading
from collections.abc import Callable
from typing import Any

TIMED_OUT = object()
"""What :class:`Limiter` returns for a call that ran past its time."""


class GaveUp(BaseException):
    """Raised inside a replay that ran past its time (a ``BaseException``, so that the
    program's own ``except Exception`` does not catch it)."""


class Limiter:
    """Calls a function in a worker thread with a time limit; keeps interrupting the workers
    it gave up on until they end."""

    def __init__(self) -> None:
        self.abandoned: list[threading.Thread] = []

    def __call__(self, fn: Callable[[], Any], seconds: float) -> Any:
        """``fn()``'s result (or its exception, raised here), or :data:`TIMED_OUT` when it
        has not returned after ``seconds``."""
        self._interrupt_abandoned()
        box: list[tuple[bool, Any]] = []
        context = contextvars.copy_context()

        def work() -> None:
            try:
                box.append((True, context.run(fn)))
            except GaveUp:
                pass
            except BaseException as err:  # handed to the caller
                box.append((False, err))

        worker = threading.Thread(target=work, name="lmcascade-graph-replay", daemon=True)
        worker.start()
        worker.join(min(max(seconds, 0.0), threading.TIMEOUT_MAX))
        if worker.is_alive():
            _interrupt(worker)
            self.abandoned.append(worker)
            return TIMED_OUT
        if not box:  # interrupted by a stray GaveUp: not evidence either
            return TIMED_OUT
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def _interrupt_abandoned(self) -> None:
        alive = [worker for worker in self.abandoned if worker.is_alive()]
        for worker in alive:
            _interrupt(worker)
        self.abandoned = alive


def _interrupt(worker: threading.Thread) -> None:
    """Raises :class:`GaveUp` in ``worker`` at its next Python instruction (where the
    interpreter allows it: CPython)."""
    set_async = getattr(getattr(ctypes, "pythonapi", None), "PyThreadState_SetAsyncExc", None)
    if set_async is None or worker.ident is None or not worker.is_alive():
        return
    set_async(ctypes.c_ulong(worker.ident), ctypes.py_object(GaveUp))
