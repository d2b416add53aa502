"""Re-executing a program with chosen site values, recording what each effect was given.

:func:`execute` drives a program's generator by hand: every value a site returns comes from a
lookup (a recorded trace, with one value changed, say), so no model runs and no tool is
called.  Each effect is recorded as a :class:`Step` with its inputs' fingerprints
(:func:`~lmcascade.flowgraph.fingerprint.inputs`) and the source line that yielded it.  The
execution ends when the program returns or raises, when a site needs a value the lookup does
not have, or at ``limit`` effects (:data:`MAX_SITES`).

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "<eos>"], lambda ctx: [0.0, 0.0])
>>> @lc.program
... def two():
...     x = yield lc.gen("x", lm, "Q")
...     y = yield lc.call("upper", str.upper, x)
...     return y
>>> run = execute(lambda: iter(two()), {"x": "ab", "upper": "AB"}.get)
>>> run.outcome, list(run.steps), run.steps["upper"].inputs["args[0]"], run.value
('returned', ['x', 'upper'], 'ab', 'AB')
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lmcascade.flowgraph.fingerprint import fingerprint, inputs
from lmcascade.program import Effect, send

NO_VALUE_KINDS = ("observe", "factor", "condition")
"""Kinds whose sites send the program nothing back; every other site returns its value."""

MISSING = object()
"""What a lookup returns for a site it has no value for: the execution stops there."""

STOP = object()
"""What a lookup returns for a site where the recorded run failed: the execution stops there."""

MAX_SITES = 1_000
"""The most sites one sampled run or replay reaches (the engine allows 10,000): a run that
gets there ends with an error, noted on the graph, and the graph is drawn from its prefix and
the other runs."""

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Step:
    """One effect as an execution reached it: its site name and kind, the effect itself, its
    inputs' fingerprints (None when not looked at), and where in the user's source it was
    yielded (when known)."""

    name: str
    kind: str
    effect: Effect
    inputs: dict[str, Any] | None
    line: int | None = None
    file: str | None = None


@dataclass
class Execution:
    """The effects an execution reached, in order, and how it ended: ``returned`` (``value``
    is the return value, ``returned_fp`` its fingerprint), ``raised`` (``error``),
    ``missing`` (a site had no value), ``failed`` (a site where the recorded run failed) or
    ``limit``."""

    steps: dict[str, Step] = field(default_factory=dict)
    outcome: str = "returned"
    value: Any = None
    returned_fp: Any = None
    error: BaseException | None = None

    @property
    def last(self) -> str | None:
        """The name of the last site reached."""
        return next(reversed(self.steps), None)


def site_name(counters: dict[str, int], name: str) -> str:
    """A site's name in one execution: ``step[]`` numbered ``step[0]``, ``step[1]``...

    >>> counters = {}
    >>> site_name(counters, "a[]"), site_name(counters, "a[]"), site_name(counters, "b")
    ('a[0]', 'a[1]', 'b')
    """
    if not name.endswith("[]"):
        return name
    base = name[:-2]
    index = counters.get(base, 0)
    counters[base] = index + 1
    return f"{base}[{index}]"


def execute(
    start: Callable[[], Iterator],
    lookup: Callable[[str], Any],
    after: str | None = None,
    limit: int = MAX_SITES,
) -> Execution:
    """Runs a fresh generator from ``start()``, answering each site with ``lookup(name)``
    (:data:`MISSING` or :data:`STOP` end the execution there).  With ``after``, the steps up
    to that site and the site itself are recorded without inputs or source lines (they are
    known to be the same as before: only its value changes)."""
    run = Execution()
    quiet = after is not None
    counters: dict[str, int] = {}
    scope: tuple[str, ...] = ()
    sent: Any = None
    gen = start()
    try:
        while True:
            try:
                eff, scope = send(gen, sent, scope)
            except StopIteration as stop:
                run.value, run.returned_fp = stop.value, fingerprint(stop.value)
                return run
            if not isinstance(eff, Effect) or len(run.steps) >= limit:
                run.outcome = "limit" if isinstance(eff, Effect) else "raised"
                run.error = None if isinstance(eff, Effect) else TypeError(f"yielded {eff!r}")
                return run
            name = site_name(counters, eff.name)
            if quiet:
                run.steps[name] = Step(name, eff.kind, eff, None)
                quiet = name != after
            else:
                run.steps[name] = Step(name, eff.kind, eff, inputs(eff), *_where(gen))
            value = lookup(name)
            if value is STOP or (value is MISSING and eff.kind not in NO_VALUE_KINDS):
                run.outcome = "failed" if value is STOP else "missing"
                return run
            sent = None if eff.kind in NO_VALUE_KINDS else value
    except Exception as err:
        run.outcome, run.error = "raised", err
        return run
    finally:
        _close(gen)


def _where(gen: Any) -> tuple[int | None, str | None]:
    """The line and file of the innermost generator (through ``yield from``) outside
    lmcascade itself: where the user's program yielded."""
    found: tuple[int | None, str | None] = (None, None)
    while inspect.isgenerator(gen):
        frame = gen.gi_frame
        if frame is None:
            break
        file = frame.f_code.co_filename
        if not os.path.abspath(file).startswith(_PACKAGE + os.sep):
            found = (frame.f_lineno, file)
        gen = gen.gi_yieldfrom
    return found


def _close(gen: Any) -> None:
    try:
        gen.close()
    except Exception:  # a generator that misbehaves on close: nothing more to learn from it
        pass
