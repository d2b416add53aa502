"""Tools with a time limit: ``lc.call(name, lc.tool(fn, timeout=5.0), *args)``.

A tool that raises — or, wrapped with :func:`tool`, takes longer than its ``timeout`` —
gives its call site weight zero and ends that trace; the run goes on (see
:data:`lmcascade.policy.ON_TOOL_ERROR`).  The limit belongs to the wrapped function rather
than to ``lc.call``, whose keyword arguments are the tool's own.

A Python thread cannot be stopped from outside, so a timed-out call is *abandoned*, not
killed: it goes on in a background (daemon) thread until it returns, and its result or
exception is dropped.  It keeps whatever it holds (memory, a connection, a lock) meanwhile,
and a process exiting does not wait for it.  A tool that can hang forever or must really
be stopped should run its work in a subprocess with its own timeout
(``subprocess.run(..., timeout=...)``), which the operating system can kill.

>>> import time
>>> slow = tool(time.sleep, timeout=0.01)
>>> slow(0.0) is None
True
>>> slow(1.0)
Traceback (most recent call last):
...
TimeoutError: time.sleep did not return within 0.01 s (abandoned: it goes on in a background thread)
"""

from __future__ import annotations

import contextvars
import functools
import math
import threading
from collections.abc import Callable
from typing import Any

from lmcascade.errors import SiteError


class Tool:
    """A callable that runs ``fn`` with a time limit (see :func:`tool`)."""

    def __init__(self, fn: Callable[..., Any], timeout: float | None) -> None:
        self.fn = fn
        self.timeout = timeout
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.timeout is None:
            return self.fn(*args, **kwargs)
        box: dict[str, Any] = {}
        done = threading.Event()
        context = contextvars.copy_context()

        def work() -> None:
            try:
                box["value"] = context.run(self.fn, *args, **kwargs)
            except BaseException as err:  # SystemExit, KeyboardInterrupt: re-raised below
                box["error"] = err
            finally:
                done.set()

        threading.Thread(target=work, name=f"lmcascade tool {self.name}", daemon=True).start()
        if not done.wait(self.timeout):
            raise TimeoutError(
                f"{self.name} did not return within {self.timeout:g} s (abandoned: it goes on "
                "in a background thread)"
            )
        if "error" in box:
            raise box["error"]
        return box["value"]

    @property
    def name(self) -> str:
        """The wrapped function's name, for messages."""
        module = getattr(self.fn, "__module__", None)
        name = getattr(self.fn, "__qualname__", None) or type(self.fn).__name__
        return f"{module}.{name}" if module and module != "builtins" else name

    def __repr__(self) -> str:
        return f"lc.tool({self.name}, timeout={self.timeout!r})"


def tool(fn: Callable[..., Any] | None = None, *, timeout: float | None = None) -> Any:
    """``fn`` wrapped so that a call taking more than ``timeout`` seconds raises
    ``TimeoutError`` (a tool error: the call site gets weight zero).  Use it inline,
    ``lc.call("calc", lc.tool(calc, timeout=5.0), expr)``, or as a decorator,
    ``@lc.tool(timeout=5.0)``.  ``timeout=None`` runs ``fn`` as it is.  A timed-out call
    is abandoned in a background thread (see :mod:`lmcascade.toolcall`).

    >>> import lmcascade as lc
    >>> @lc.tool(timeout=2.0)
    ... def double(x):
    ...     return 2 * x
    >>> double(21), double.timeout
    (42, 2.0)
    """
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout < math.inf
    ):
        raise SiteError(f"lc.tool: timeout must be a positive number of seconds, got {timeout!r}")
    if fn is None:
        return functools.partial(tool, timeout=timeout)
    if not callable(fn):
        raise SiteError(f"lc.tool needs a callable, got {type(fn).__name__}")
    return Tool(fn, timeout)
