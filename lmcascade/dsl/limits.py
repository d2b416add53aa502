"""The resource budget of one run of a ``.lmc`` program.

A ``.lmc`` file may come from someone else; running it must not take the machine.  Every
trace gets one budget: how many steps the interpreter may take, how large a value it may
build, how deep calls may nest.  The defaults are far above what a real program meets; raise
them with ``lc.load(..., limits=Limits(steps=...))`` or the CLI's options.

>>> Limits().steps > 10_000
True
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Per-trace budgets of the ``.lmc`` interpreter (each exceeded one is a located
    :class:`~lmcascade.errors.DSLRuntimeError` saying which option raises it)."""

    steps: int = 1_000_000  # statements and expressions evaluated in one trace
    size: int = 1_000_000  # characters of a string, items of a list
    digits: int = 1_000  # decimal digits of a whole number
    depth: int = 100  # nested calls of programs
    iterations: int = 1_000  # iterations of one loop
