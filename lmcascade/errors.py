"""The lmcascade exception family.

Every error a user can cause derives from :class:`LMCascadeError`, names the
site, option or input at fault, and says what to do about it.

>>> try:
...     raise DuplicateSiteError("site 'x' appears twice")
... except LMCascadeError as err:
...     print(type(err).__name__, isinstance(err, ProgramError))
DuplicateSiteError True
"""

from __future__ import annotations


class LMCascadeError(Exception):
    """Base class of every error lmcascade raises on purpose."""


# --- program errors -------------------------------------------------------------------------


class ProgramError(LMCascadeError):
    """The program itself is malformed (bad yield, bad site, not a generator...)."""


class BadYieldError(ProgramError):
    """A program yielded something that is not an effect."""


class DuplicateSiteError(ProgramError):
    """Two sites in one execution share a name."""


class ReplayDivergenceError(ProgramError):
    """Re-running a program with recorded values did not reproduce the recorded trace."""


class SiteError(ProgramError):
    """A site received an invalid distribution, value or argument."""


# --- model errors ---------------------------------------------------------------------------


class ModelError(LMCascadeError):
    """A language model was misconfigured or could not be used as asked."""


class VocabularyError(ModelError):
    """A model's vocabulary is invalid (missing eos, duplicates, empty tokens)."""


class TokenizationError(ModelError):
    """A text cannot be tokenised by the model's tokenizer."""


class ModelNotFoundError(ModelError):
    """A model name is unknown, or its weights are not installed (the message names the fix)."""


class ModelTooLargeError(ModelError):
    """A program's models need more memory than a worker has (``infer_many`` with Ray)."""


class ModelIntegrityError(ModelError):
    """A model's weights do not match their pinned checksum."""


# --- text DSL errors ------------------------------------------------------------------------


class DSLError(LMCascadeError):
    """A problem in a ``.lmc`` source, located by file, line and column.

    The message shows ``file:line:col``, the offending line with a caret under the column,
    and what to do.
    """

    def __init__(
        self,
        message: str,
        *,
        filename: str = "<string>",
        line: int = 0,
        col: int = 0,
        source: str | None = None,
    ) -> None:
        self.filename, self.line, self.col, self.reason = filename, line, col, message
        text = f"{filename}:{line}:{col}: {message}"
        if source is not None and line > 0:
            code, caret = excerpt(source, line, col)
            if code is not None:
                text += f"\n  {code}\n  {' ' * caret}^"
        super().__init__(text)


def excerpt(source: str, line: int, col: int, width: int = 100) -> tuple[str | None, int]:
    """The source line ``line`` (lines end at ``\\n`` only, as positions count them), cut to
    ``width`` characters around column ``col``, and where the caret goes in it.

    >>> excerpt("a = 1\\nb = " + "x" * 500, 2, 300)[0][:8]
    '...xxxxx'
    """
    lines = source.split("\n")
    if not 1 <= line <= len(lines):
        return None, 0
    code = lines[line - 1].rstrip("\r")
    at = max(col - 1, 0)
    if len(code) > width:
        start = max(0, min(at - width // 2, len(code) - width))
        code = (
            ("..." if start else "")
            + code[start : start + width]
            + ("..." if start + width < len(code) else "")
        )
        at = at - start + (3 if start else 0)
    code = "".join(ch if ch.isprintable() or ch == "\t" else "?" for ch in code)
    return code, at


class DSLSyntaxError(DSLError):
    """The source does not follow the grammar (the message says what was expected)."""


class DSLCheckError(DSLError):
    """The source parses but cannot run: an undefined name, an unknown model or tool, a wrong
    number of arguments, a duplicate site, a type error visible in the source."""


class DSLRuntimeError(DSLError):
    """A ``.lmc`` program failed while running (a loop over its limit, a bad value)."""


# --- inference errors -----------------------------------------------------------------------


class InferenceError(LMCascadeError):
    """An inference method could not produce a valid result."""


class UnknownMethodError(InferenceError):
    """``lc.infer`` was asked for a method that is not registered."""


class OptionError(InferenceError):
    """An inference option is unknown or has an invalid value."""


class NothingAcceptedError(InferenceError):
    """Rejection sampling exhausted its attempt budget without accepting a sample; ``traces``
    holds a sample of the rejected traces."""

    def __init__(self, message: str, traces: tuple = ()) -> None:
        super().__init__(message)
        self.traces = list(traces)


class AllWeightsZeroError(InferenceError):
    """Every trace has weight zero: the conditions were never satisfied.  ``traces`` holds
    the rejected traces, so what the model wrote can be read back."""

    def __init__(self, message: str, traces: tuple = ()) -> None:
        super().__init__(message)
        self.traces = list(traces)


class TooManyTracesError(InferenceError):
    """Exact enumeration would exceed its ``max_traces`` budget."""


class NotEnumerableError(InferenceError):
    """A random choice has infinite or continuous support and cannot be enumerated."""


class WorkerLostError(InferenceError):
    """An input of ``lc.infer_many(..., backend="ray")`` whose worker died while running it,
    more times than ``max_retries`` allows (the input itself may be the cause: memory)."""


class RemoteError(InferenceError):
    """What an input's run raised on a Ray worker, when the exception itself could not be
    sent back (it holds something that does not pickle): its type's name and message."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped an inference run; ``progress`` says what was done by then (model calls,
    tokens generated, resampling steps, seconds).  A ``KeyboardInterrupt``, so code that
    catches Ctrl-C still does, and never an :class:`LMCascadeError`."""

    def __init__(self, method: str, progress: dict) -> None:
        self.method, self.progress = method, progress
        done = ", ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in progress.items())
        super().__init__(f"{method} was interrupted ({done})")


__all__ = [
    "LMCascadeError",
    "ProgramError",
    "BadYieldError",
    "DuplicateSiteError",
    "ReplayDivergenceError",
    "SiteError",
    "ModelError",
    "VocabularyError",
    "TokenizationError",
    "ModelNotFoundError",
    "ModelIntegrityError",
    "ModelTooLargeError",
    "DSLError",
    "DSLSyntaxError",
    "DSLCheckError",
    "DSLRuntimeError",
    "InferenceError",
    "UnknownMethodError",
    "OptionError",
    "NothingAcceptedError",
    "AllWeightsZeroError",
    "TooManyTracesError",
    "NotEnumerableError",
    "WorkerLostError",
    "RemoteError",
    "Interrupted",
]
