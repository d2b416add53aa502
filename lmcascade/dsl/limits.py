"""The resource budget of one run of a ``.lmc`` program.

A ``.lmc`` file may come from someone else; running it must not take the machine.  Every
trace (each particle, each sample, each replay) gets one fresh budget: how many steps the
interpreter may take, how large a value it may build, how many digits a whole number may
have, how deep calls of programs may nest and how many times one loop may run.  The defaults
are far above what a real program meets; raise them with
``lc.load(..., limits=Limits(steps=...))`` or the CLI's ``--max-steps``, ``--max-size`` and
``--max-depth``.

The size of a value is about the number of characters it takes to write it down: a string
counts its characters, a whole number its digits, any other number one, and a list one per
item plus the sizes of its items (through nested lists).  Sizes add up: ``a + b`` has the size
of ``a`` plus that of ``b``, and ``xs * n`` ``n`` times that of ``xs`` — so a value is refused
*before* it is built.

>>> Limits().steps > 10_000
True
>>> size_of(["ab", [1, 2]], cap=100)
8
>>> budget = Budget(Limits(steps=10))
>>> try:
...     budget.charge(11)
... except Refusal as err:
...     print(err)
this run took more than 10 steps (the step budget of one run); a loop or a recursion may never \
end; raise the limit with lc.load(..., limits=Limits(steps=...)) or `lmcascade run --max-steps N`
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmcascade.errors import OptionError

# the command-line option that raises each limit (the others: only lc.load(limits=...))
CLI_OPTIONS = {"steps": "--max-steps", "size": "--max-size", "depth": "--max-depth"}

# log10(2) as a ratio of integers: digits of a number with b bits are about b * 30103 / 100000
_LOG2_NUM, _LOG2_DEN = 30103, 100000

# what measuring and working on a value costs: one step per SIZE_PER_STEP units of its size and
# per VISITS_PER_STEP values visited one by one (each visit takes several times a unit's work)
SIZE_PER_STEP = 32
VISITS_PER_STEP = 2
# a call of a program costs more than one step (a new frame, a name scope)
CALL_STEPS = 4


@dataclass(frozen=True)
class Limits:
    """Per-trace budgets of the ``.lmc`` interpreter (each exceeded one is a located
    :class:`~lmcascade.errors.DSLRuntimeError` saying which option raises it).

    ``steps`` counts statements and expression evaluations (building or comparing a large
    value costs one more step per 32 units of its size, a call of a program four, a template
    placeholder one); ``size`` bounds every string and list
    the program builds (see the module's text for how sizes are counted); ``digits`` bounds
    whole numbers (``calc`` included); ``depth`` bounds nested calls of programs;
    ``iterations`` bounds each ``repeat`` and ``for`` loop; ``match_seconds`` bounds the
    time all the ``match`` searches of one run may take together (each one also gives up
    after :data:`~lmcascade.dsl.instruct.MATCH_TIMEOUT_S`), so a loop cannot add slow
    searches up to minutes.
    """

    steps: int = 1_000_000
    size: int = 1_000_000
    digits: int = 1_000
    depth: int = 100
    iterations: int = 1_000
    match_seconds: float = 5.0

    def __post_init__(self) -> None:
        for name in ("steps", "size", "digits", "depth", "iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                option = f" ({CLI_OPTIONS[name]})" if name in CLI_OPTIONS else ""
                raise OptionError(
                    f"Limits.{name}{option} must be a whole number >= 1, got {value!r}"
                )
        seconds = self.match_seconds
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not 0 < seconds < math.inf
        ):
            raise OptionError(
                f"Limits.match_seconds must be a finite number of seconds > 0, got {seconds!r}"
            )


class Refusal(ValueError):
    """An operation refused before it ran: it would exceed a limit, or it is not something a
    ``.lmc`` program may do.  The message says which, and how to raise the limit."""


class OverLimit(Refusal):
    """A run went over one of its budgets (or an operation gave up, as ``match`` does on a
    pattern that backtracks without end).  ``try ... else ...`` does not catch it: the budget
    is spent, and what follows could not run either.

    >>> isinstance(over("steps", "too many"), OverLimit)
    True
    """


def how_to_raise(name: str) -> str:
    """How to raise limit ``name``: the ``lc.load`` keyword, and the CLI option if it has one."""
    advice = f"lc.load(..., limits=Limits({name}=...))"
    if name in CLI_OPTIONS:
        advice += f" or `lmcascade run {CLI_OPTIONS[name]} N`"
    return advice


def over(name: str, what: str) -> OverLimit:
    """The refusal for exceeding limit ``name``: ``what`` happened, and how to raise it."""
    return OverLimit(f"{what}; raise the limit with {how_to_raise(name)}")


def digits_of(n: int) -> int:
    """About how many decimal digits ``n`` has (exact or one more), without converting it."""
    return abs(n).bit_length() * _LOG2_NUM // _LOG2_DEN + 1


def size_of(value: object, cap: int) -> int:
    """The size of ``value`` (see the module's text); counting stops once it passes ``cap``,
    so measuring never visits more than about ``cap`` items whatever the value shares or
    nests."""
    return _measure(value, cap)[0]


_SCALARS = frozenset({float, bool, type(None)})
_WHOLE = frozenset({int, bool})


def _measure(value: object, cap: int) -> tuple[int, int]:
    """``(size, visits)``: the size of ``value`` and how many values the walk visited one by
    one (flat lists of numbers or of strings are counted in bulk, at C speed)."""
    total, visits, stack = 0, 0, [value]
    while stack and total <= cap:
        item = stack.pop()
        visits += 1
        kind = type(item)
        if kind is str:
            total += len(item)  # type: ignore[arg-type]
        elif kind is int:
            total += digits_of(item)  # type: ignore[arg-type]
        elif kind is list or kind is tuple:
            total += len(item)  # type: ignore[arg-type]
            if len(item) < 16:  # type: ignore[arg-type]
                stack.extend(item)  # type: ignore[arg-type]
                continue
            kinds = set(map(type, item))  # type: ignore[call-overload]
            if kinds <= _SCALARS:
                total += len(item)  # type: ignore[arg-type]
            elif kinds <= _WHOLE:
                bits = sum(map(int.bit_length, item))  # type: ignore[call-overload]
                total += bits * _LOG2_NUM // _LOG2_DEN + len(item)  # type: ignore[arg-type]
            elif kinds == {str}:
                total += sum(map(len, item))  # type: ignore[call-overload]
            else:
                stack.extend(item)  # type: ignore[arg-type]
        elif kind is dict:
            total += len(item)  # type: ignore[arg-type]
            stack.extend(item.keys())  # type: ignore[attr-defined]
            stack.extend(item.values())  # type: ignore[attr-defined]
        else:
            total += 1
    return total, visits


class Budget:
    """What one trace has used of its :class:`Limits`: steps so far, the current depth of
    program calls and the seconds ``match`` has searched.  Every check raises a
    :class:`Refusal`, which the interpreter turns into a
    :class:`~lmcascade.errors.DSLRuntimeError` at the node that ran over."""

    __slots__ = ("limits", "steps", "depth", "int_bound", "max_bits", "match_seconds")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.steps = 0
        self.depth = 0
        self.match_seconds = 0.0
        self.int_bound = 10**limits.digits  # whole numbers lie strictly between -this and this
        self.max_bits = self.int_bound.bit_length()

    def charge(self, steps: int) -> None:
        """Spends ``steps`` of the step budget."""
        self.steps += steps
        if self.steps > self.limits.steps:
            raise over(
                "steps",
                f"this run took more than {self.limits.steps:,} steps (the step budget of one "
                "run); a loop or a recursion may never end",
            )

    def measure(self, value: object) -> int:
        """The size of ``value``, paid for: work on a value grows with its size, and so does
        measuring it (one step per ``SIZE_PER_STEP`` units of size, and per
        ``VISITS_PER_STEP`` values the walk visited one by one)."""
        if type(value) is str:
            size, visits = len(value), 0  # type: ignore[arg-type]
        else:
            size, visits = _measure(value, self.limits.size)
        cost = size // SIZE_PER_STEP + visits // VISITS_PER_STEP
        if cost:
            self.charge(cost)
        return size

    def build(self, size: int, what: str) -> None:
        """Before building ``what`` of ``size``: refused over the size limit, and paid for
        (one step per ``SIZE_PER_STEP`` units), so the steps also bound what a run can
        allocate in all."""
        self.check_size(size, what)
        if size >= SIZE_PER_STEP:
            self.charge(size // SIZE_PER_STEP)

    def check_size(self, size: int, what: str) -> None:
        """Refuses to build ``what`` when its ``size`` is over the size limit."""
        if size > self.limits.size:
            raise over(
                "size",
                f"{what} would have size {size:,}, over the limit of {self.limits.size:,} "
                "(characters of text, items of a list)",
            )

    def check_int(self, n: int) -> int:
        """``n`` itself, refused when it has more digits than the digit limit."""
        if not -self.int_bound < n < self.int_bound:
            raise over(
                "digits",
                f"a whole number of about {digits_of(n):,} digits, over the limit of "
                f"{self.limits.digits:,} digits",
            )
        return n

    def check_product(self, a: int, b: int) -> None:
        """Refuses ``a * b`` before multiplying when the product must exceed the digit limit
        (the product of numbers of ``p`` and ``q`` bits has at least ``p + q - 1`` bits)."""
        if a and b and a.bit_length() + b.bit_length() - 1 > self.max_bits:
            raise over(
                "digits",
                f"the product would have about {digits_of(a) + digits_of(b) - 1:,} digits, over "
                f"the limit of {self.limits.digits:,} digits",
            )

    def enter(self) -> None:
        """One program call deeper; refused past the depth limit."""
        self.charge(CALL_STEPS)
        if self.depth >= self.limits.depth:
            raise over(
                "depth",
                f"program calls nest more than {self.limits.depth:,} deep (the depth limit); "
                "a recursion may never end",
            )
        self.depth += 1
