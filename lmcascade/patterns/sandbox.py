"""Tools a model's output can be run through: a calculator and a sandboxed Python runner.

Both are plain functions, meant to be called with ``lc.call``: whatever goes wrong —
an expression the calculator refuses, code that loops, eats memory, exits with an error,
prints too much or reaches for the network — is raised as an exception, which gives that
trace weight zero (a *tool error*, counted in ``stats["tool_errors"]``), never a crash of
the run.

- :func:`calculator` evaluates arithmetic text by walking its ``ast`` (nothing is ``eval``-ed):
  numbers, ``+ - * / // % **``, parentheses and a few functions (``abs``, ``round``, ``min``,
  ``max``, ``sqrt``, ``floor``, ``ceil``, ``log``, ``exp``).  Whole numbers are bounded
  (:data:`MAX_DIGITS`) *before* a product or power is computed, so ``9**9**9`` is refused at
  once.
- :func:`python_runner` runs code in a fresh ``python -I`` subprocess with limits on wall time,
  CPU time, address space and output, without the parent's environment, and with network
  access and process creation blocked by an audit hook; :func:`python_tool` is it as an
  ``lc.tool``.  :func:`run_tests` runs code plus test lines (``assert ...``) and reports which
  passed, without raising.

The network block is **best effort, inside the child process, not an operating-system
sandbox**: a Python audit hook (``sys.addaudithook``) installed before the code runs ends the
process when it creates a non-Unix socket, resolves a host name, starts a process (``fork``,
``exec``, ``os.system``, ``subprocess``), loads a C library with ``ctypes``, sends a signal or
changes its resource limits.  Audit hooks cannot be removed from Python code, but native code
can act without raising audit events; code that runs as root can raise its own hard limits
(the hook blocks ``resource.setrlimit`` for this reason) and can write wherever its user may.
The wall-time limit is enforced from the parent (the process group is killed), so it holds
whatever the code does.  Use it to check what a model wrote, not to run an adversary's code:
for that, put the runner itself in a container or VM without network.

>>> calculator("2 * (3 + 4) ** 2")
98
>>> python_runner("print(sum(range(10)))")
'45\\n'
"""

from __future__ import annotations

import ast
import json
import math
import operator
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lmcascade.errors import SiteError
from lmcascade.toolcall import Tool, tool

__all__ = [
    "MAX_DIGITS",
    "CalculatorError",
    "SandboxError",
    "TestReport",
    "calculator",
    "python_runner",
    "python_tool",
    "run_tests",
]

# --- the calculator --------------------------------------------------------------------------

MAX_DIGITS = 1000  # whole numbers the calculator builds have at most this many digits
MAX_CHARS = 2000  # the longest expression it reads
_MAX_BITS = int(MAX_DIGITS / math.log10(2))  # the same bound in bits

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "sqrt": math.sqrt,
    "floor": math.floor,
    "ceil": math.ceil,
    "log": math.log,
    "exp": math.exp,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}


class CalculatorError(ValueError):
    """An expression :func:`calculator` will not or cannot evaluate (the message says why)."""


def calculator(expression: str) -> int | float:
    """The value of an arithmetic expression, computed without running any code.

    Reads numbers, ``+ - * / // % **``, parentheses, the constants ``pi`` and ``e`` and the
    functions ``abs round min max sqrt floor ceil log exp``; anything else (names,
    attributes, strings, ``__import__('os')``...) is a :class:`CalculatorError`, as are
    division by zero, a result that is not a finite real number, a whole number of more than
    :data:`MAX_DIGITS` digits (refused before it is computed) and an expression longer than
    ``MAX_CHARS`` characters.  ``^`` is refused with a hint to write ``**``.

    >>> calculator("17 + 25"), calculator("7 / 2"), calculator("2 ** -1"), calculator("sqrt(16)")
    (42, 3.5, 0.5, 4.0)
    >>> calculator("9 ** 9 ** 9")
    Traceback (most recent call last):
    ...
    lmcascade.patterns.sandbox.CalculatorError: 9 ** 387420489 has more than 1000 digits
    """
    if not isinstance(expression, str):
        raise CalculatorError(f"calculator takes text, got {type(expression).__name__}")
    text = expression.strip()
    if len(text) > MAX_CHARS:
        raise CalculatorError(f"calculator reads at most {MAX_CHARS} characters, got {len(text)}")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalculatorError(f"calculator cannot read {_short(text)}") from None
    try:
        value = _evaluate(tree.body)
    except ZeroDivisionError:
        raise CalculatorError(f"division by zero in {_short(text)}") from None
    except (OverflowError, ValueError, TypeError) as err:
        if isinstance(err, CalculatorError):
            raise
        raise CalculatorError(f"{_short(text)}: {err}") from None
    return value


def _evaluate(root: ast.expr) -> int | float:
    """Evaluates a parsed expression with an explicit stack (deep nesting cannot overflow
    Python's), checking every intermediate value."""
    values: list[Any] = []
    stack: list[tuple[ast.AST, bool]] = [(root, False)]
    while stack:
        node, ready = stack.pop()
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                raise CalculatorError(f"calculator handles numbers, not {node.value!r}")
            values.append(_checked(node.value))
        elif isinstance(node, ast.Name):
            if node.id not in _CONSTANTS:
                raise CalculatorError(f"unknown name {node.id!r} (known: pi, e)")
            values.append(_CONSTANTS[node.id])
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            if not ready:
                stack += [(node, True), (node.right, False), (node.left, False)]
                continue
            right, left = values.pop(), values.pop()
            values.append(_checked(_binary(node.op, left, right)))
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            if not ready:
                stack += [(node, True), (node.operand, False)]
                continue
            values.append(_UNARY[type(node.op)](values.pop()))
        elif isinstance(node, ast.Call):
            if not ready:
                _check_call(node)
                stack.append((node, True))
                stack += [(arg, False) for arg in reversed(node.args)]
                continue
            args = [values.pop() for _ in node.args][::-1]
            if node.func.id == "round" and len(args) == 2:  # type: ignore[attr-defined]
                if not isinstance(args[1], int) or abs(args[1]) > 100:
                    raise CalculatorError("round()'s digits must be a whole number within 100")
            values.append(_checked(_FUNCTIONS[node.func.id](*args)))  # type: ignore[attr-defined]
        else:
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
                raise CalculatorError("calculator reads ** as power; ^ is not arithmetic")
            kind = type(getattr(node, "op", node)).__name__
            raise CalculatorError(
                f"calculator handles numbers, + - * / // % ** and a few functions, not {kind}"
            )
    return values[0]


def _check_call(node: ast.Call) -> None:
    """A call of one of the known functions with positional arguments only."""
    name = node.func.id if isinstance(node.func, ast.Name) else None
    if name not in _FUNCTIONS:
        what = name or _short(ast.unparse(node.func))[1:-1]
        raise CalculatorError(
            f"calculator cannot call {what!r} (known: {', '.join(sorted(_FUNCTIONS))})"
        )
    if node.keywords or any(isinstance(a, ast.Starred) for a in node.args) or not node.args:
        raise CalculatorError(f"{name}() takes one or more plain numbers")
    if name == "round" and len(node.args) > 2:
        raise CalculatorError("round() takes a number and at most one number of digits")


def _binary(op: ast.operator, left: Any, right: Any) -> Any:
    """``left op right``, refusing whole numbers past the digit bound before computing them."""
    ints = isinstance(left, int) and isinstance(right, int)
    if isinstance(op, ast.Mult) and ints:
        if left.bit_length() + right.bit_length() > _MAX_BITS + 1:
            raise CalculatorError(f"a product has more than {MAX_DIGITS} digits")
    if isinstance(op, ast.Pow):
        if ints and right > 0 and abs(left) > 1:
            if right.bit_length() > 64 or right * math.log2(abs(left)) > _MAX_BITS:
                raise CalculatorError(
                    f"{_short_number(left)} ** {_short_number(right)} has more than "
                    f"{MAX_DIGITS} digits"
                )
    return _BINARY[type(op)](left, right)


def _checked(value: Any) -> int | float:
    """``value`` if it is a finite real number within the digit bound."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CalculatorError(f"the result {value!r} is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError(f"the result {value} is not a finite number")
    if isinstance(value, int) and value.bit_length() > _MAX_BITS:
        raise CalculatorError(f"a number has more than {MAX_DIGITS} digits")
    return value


def _short(text: str) -> str:
    return repr(text) if len(text) <= 60 else repr(text[:57] + "...")


def _short_number(n: int) -> str:
    return str(n) if n.bit_length() < 64 else f"<{n.bit_length()}-bit number>"


# --- the Python runner -----------------------------------------------------------------------

BLOCKED_EXIT = 87  # the exit status of a child the audit hook stopped
_MARK = "lmcascade sandbox:"  # what the child's own messages start with

# The child's first code: set the limits, read the code and tests, install the audit hook,
# run the code (as __main__), then each test in the same namespace, recording each outcome.
_BOOTSTRAP = r"""
import json, os, resource, sys, traceback
_code_path, _tests_path, _results_path, _mb, _cpu, _fsize = sys.argv[1:7]
_bytes = int(_mb) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (_bytes, _bytes))
resource.setrlimit(resource.RLIMIT_CPU, (int(_cpu), int(_cpu) + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (int(_fsize), int(_fsize)))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
with open(_code_path, encoding="utf-8") as _f:
    _code = _f.read()
_tests = None
if _tests_path:
    with open(_tests_path, encoding="utf-8") as _f:
        _tests = json.load(_f)
_results = open(_results_path, "w", encoding="utf-8") if _results_path else None
_write, _exit, _AF_UNIX = os.write, os._exit, 1
_ALWAYS = frozenset((
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
    "socket.gethostbyaddr", "socket.getnameinfo", "subprocess.Popen", "os.system",
    "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "pty.spawn",
    "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.dlopen", "ctypes.dlsym",
    "resource.setrlimit", "resource.prlimit",
))
def _hook(event, args):
    if event in _ALWAYS or (event == "socket.__new__" and args[1] != _AF_UNIX) or (
        event == "import" and args[0] == "_posixsubprocess"
    ):
        if event.startswith("socket"):
            why = "network access is not allowed"
        elif event.startswith("ctypes"):
            why = "loading C libraries is not allowed; ctypes and numpy cannot be used"
        elif event == "import":
            event, why = "import _posixsubprocess", "the subprocess module cannot be used"
        else:
            why = "starting processes, sending signals and changing limits are not allowed"
        _write(2, f"\nMARK {event} is blocked: {why}\n".encode())
        _exit(BLOCKED)
sys.addaudithook(_hook)
del resource
_globals = {"__name__": "__main__", "__builtins__": __builtins__}
exec(compile(_code, "<code>", "exec"), _globals)
if _tests is not None:
    _failed = 0
    for _i, _test in enumerate(_tests):
        try:
            exec(compile(_test, f"<test {_i}>", "exec"), _globals)
        except Exception:
            _failed += 1
            traceback.print_exc()
            _results.write(f"{_i} fail\n")
        else:
            _results.write(f"{_i} pass\n")
        _results.flush()
    if _failed:
        sys.exit(1)
""".replace("MARK", _MARK).replace("BLOCKED", str(BLOCKED_EXIT))

# what a run's environment holds: PATH and thread settings, nothing else of the parent's
_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class SandboxError(RuntimeError):
    """A sandboxed run that did not succeed.

    ``reason`` is ``"timeout"`` (wall or CPU time), ``"memory"``, ``"blocked"`` (the code
    reached for the network or another process), ``"output"`` (it printed more than
    ``max_output`` bytes to stdout), ``"exit"`` (it raised or exited with a non-zero status) or ``"start"``
    (the interpreter could not be started); ``stdout``, ``stderr`` and ``returncode`` are
    what the run left.
    """

    def __init__(
        self, reason: str, message: str, stdout: str = "", stderr: str = "", returncode=None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.stdout = stdout
        self.stderr = stderr
        self.returncode = returncode


@dataclass(frozen=True)
class _Run:
    """What one child process did."""

    stdout: str
    stderr: str
    returncode: int | None
    reason: str | None  # None: success
    message: str
    results: tuple[bool | None, ...] = ()


def _check_limits(timeout: Any, memory_mb: Any, max_output: Any) -> None:
    def bad(value: Any, kind: type) -> bool:
        return isinstance(value, bool) or not isinstance(value, kind)

    if bad(timeout, int | float) or not 0 < timeout <= 3600:
        raise SiteError(f"timeout must be a number of seconds in (0, 3600], got {timeout!r}")
    if bad(memory_mb, int) or not 32 <= memory_mb <= 1 << 20:
        raise SiteError(
            f"memory_mb must be a whole number of MiB, at least 32 (Python's own need), "
            f"got {memory_mb!r}"
        )
    if bad(max_output, int) or max_output < 1:
        raise SiteError(f"max_output must be a positive number of bytes, got {max_output!r}")


def _run(
    code: str,
    tests: Sequence[str] | None,
    timeout: float,
    memory_mb: int,
    max_output: int,
) -> _Run:
    """Runs ``code`` (then ``tests``) in a sandboxed child process and says what happened."""
    if not isinstance(code, str):
        raise SiteError(f"code must be a string of Python source, got {type(code).__name__}")
    _check_limits(timeout, memory_mb, max_output)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **dict.fromkeys(_THREADS, "1")}
    with tempfile.TemporaryDirectory(
        prefix="lmcascade-sandbox-", ignore_cleanup_errors=True
    ) as workdir:
        code_path = os.path.join(workdir, "code.py")
        with open(code_path, "w", encoding="utf-8") as f:
            f.write(code)
        tests_path = results_path = ""
        if tests is not None:
            tests_path = os.path.join(workdir, "tests.json")
            results_path = os.path.join(workdir, "results.txt")
            with open(tests_path, "w", encoding="utf-8") as f:
                json.dump(list(tests), f)
        cpu = math.ceil(timeout) + 1
        argv = [sys.executable, "-I", "-X", "utf8", "-c", _BOOTSTRAP, code_path, tests_path]
        argv += [results_path, str(memory_mb), str(cpu), str(64 * 2**20)]
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env=env,
                start_new_session=True,  # its own process group, killed as a whole
            )
        except OSError as err:
            return _Run("", "", None, "start", f"could not start Python: {err}")
        out, err, timed_out, overflow = _collect(proc, time.monotonic() + timeout, max_output)
        results: tuple[bool | None, ...] = ()
        if tests is not None:
            results = _read_results(results_path, len(tests))
    return _verdict(proc.returncode, out, err, timed_out, overflow, timeout, max_output, results)


def _collect(
    proc: subprocess.Popen, deadline: float, max_output: int
) -> tuple[bytes, bytes, bool, bool]:
    """Reads the child's stdout (its first ``max_output`` bytes) and stderr (its last
    ``max_output`` bytes) until it ends, the deadline passes or stdout overflows; kills its
    process group in the last two cases."""
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    timed_out = overflow = False
    with selectors.DefaultSelector() as selector:
        for stream in buffers:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map() and not overflow:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in selector.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffer = buffers[key.fileobj]
                if key.fileobj is proc.stderr:  # keep its end: where a traceback says why
                    buffer += chunk
                    del buffer[:-max_output]
                    continue
                room = max_output - len(buffer)
                buffer += chunk[: max(room, 0)]
                overflow = len(chunk) > room
    if not (timed_out or overflow):
        try:
            proc.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            timed_out = True
    if timed_out or overflow:
        _kill(proc)
    for stream in buffers:
        stream.close()
    out, err = (bytes(b) for b in buffers.values())
    return out, err, timed_out, overflow


def _kill(proc: subprocess.Popen) -> None:
    """Kills the child's process group and reaps the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _read_results(path: str, n: int) -> tuple[bool | None, ...]:
    """Each test's outcome as the child recorded it (None: it did not get to run)."""
    outcome: list[bool | None] = [None] * n
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                index, _, word = line.strip().partition(" ")
                if index.isdigit() and int(index) < n:
                    outcome[int(index)] = word == "pass"
    except OSError:
        pass
    return tuple(outcome)


def _verdict(
    returncode: int | None,
    out_bytes: bytes,
    err_bytes: bytes,
    timed_out: bool,
    overflow: bool,
    timeout: float,
    max_output: int,
    results: tuple[bool | None, ...],
) -> _Run:
    """Classifies how the child ended."""
    out = out_bytes.decode("utf-8", errors="replace")
    err = err_bytes.decode("utf-8", errors="replace")
    last = err.strip().splitlines()[-1] if err.strip() else ""
    if overflow:
        reason, message = "output", f"the code printed more than {max_output} bytes; it was killed"
    elif timed_out or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        reason, message = "timeout", f"the code did not finish within {timeout:g} s; it was killed"
    elif returncode == BLOCKED_EXIT and last.startswith(_MARK):
        reason, message = "blocked", last.removeprefix(_MARK).strip()
    elif returncode != 0 and (last.startswith("MemoryError") or "memory allocation" in last):
        reason, message = "memory", "the code ran out of memory (its limit: memory_mb)"
    elif returncode != 0:
        reason = "exit"
        message = f"the code exited with status {returncode}" + (f": {last}" if last else "")
    else:
        reason, message = None, ""
    return _Run(out, err, returncode, reason, message, results)


def python_runner(
    code: str, *, timeout: float = 5.0, memory_mb: int = 512, max_output: int = 10_000
) -> str:
    """Runs Python ``code`` in a sandboxed subprocess and returns what it printed.

    The child is ``python -I`` (isolated: no user site, no ``PYTHON*`` variables) in a fresh
    temporary directory, with only ``PATH`` (and one-thread settings for numeric libraries)
    in its environment, no standard input, at most ``memory_mb`` MiB of address space, CPU
    time ``ceil(timeout) + 1`` s, files of at most 64 MiB, and the audit hook described in
    the module's text (no network, no new processes).  After ``timeout`` seconds of wall time,
    or once stdout passes ``max_output`` bytes, its process group is killed; of stderr only
    the last ``max_output`` bytes are kept (the end of a traceback).  Any
    failure raises :class:`SandboxError` with a ``reason``; inside ``lc.call`` that is a
    tool error (the trace gets weight zero).

    >>> python_runner("import math; print(math.factorial(5))")
    '120\\n'
    >>> try:
    ...     python_runner("while True: pass", timeout=0.5)
    ... except SandboxError as err:
    ...     print(err.reason)
    timeout
    """
    run = _run(code, None, timeout, memory_mb, max_output)
    if run.reason is not None:
        raise SandboxError(run.reason, run.message, run.stdout, run.stderr, run.returncode)
    return run.stdout


def python_tool(*, timeout: float = 5.0, memory_mb: int = 512, max_output: int = 10_000) -> Tool:
    """:func:`python_runner` with these limits, as an ``lc.tool`` for ``lc.call``:
    ``out = yield lc.call("run", python_tool(timeout=2.0), code)``.  The tool's own time
    limit (``timeout`` plus 5 s for starting and cleaning up) is only a backstop: the runner
    kills the child itself.

    >>> import lmcascade as lc
    >>> run = python_tool(timeout=2.0)
    >>> run("print(6 * 7)"), run.timeout
    ('42\\n', 7.0)
    """
    _check_limits(timeout, memory_mb, max_output)

    def python(code: str) -> str:
        return python_runner(code, timeout=timeout, memory_mb=memory_mb, max_output=max_output)

    python.__doc__ = "Runs Python code in the sandbox; returns what it printed."
    return tool(python, timeout=timeout + 5.0)


@dataclass(frozen=True)
class TestReport:
    """What :func:`run_tests` found: ``passed`` (the code ran and every test passed),
    ``results`` (each test: True passed, False failed, None not run — the code failed first
    or time ran out), ``output`` (stdout then stderr, each capped), and ``error`` (why the
    run as a whole failed, or None)."""

    __test__ = False  # not a pytest test class

    passed: bool
    results: tuple[bool | None, ...]
    output: str
    error: str | None

    @property
    def num_passed(self) -> int:
        """How many tests passed."""
        return sum(r is True for r in self.results)


def run_tests(
    code: str,
    tests: str | Sequence[str],
    *,
    timeout: float = 5.0,
    memory_mb: int = 512,
    max_output: int = 10_000,
) -> TestReport:
    """Runs ``code`` and then each test (an ``assert`` line, or any statements) in the same
    namespace, in one sandboxed process (limits as in :func:`python_runner`), and reports
    which tests passed.  It never raises for what the code does: a crash, timeout or blocked
    call is the report's ``error``.  ``tests`` is a list of test sources, or one text whose
    non-empty lines are the tests.

    >>> code = "def add(a, b):\\n    return a + b"
    >>> report = run_tests(code, ["assert add(2, 2) == 4", "assert add(1, 1) == 3"])
    >>> report.passed, report.results
    (False, (True, False))
    >>> run_tests(code, "assert add(2, 3) == 5").passed
    True
    """
    if isinstance(tests, str):
        tests = [line for line in tests.splitlines() if line.strip()]
    elif not isinstance(tests, Sequence) or not all(isinstance(t, str) for t in tests):
        raise SiteError("tests must be a list of Python source strings or one text of lines")
    run = _run(code, list(tests), timeout, memory_mb, max_output)
    error = run.message if run.reason is not None else None
    if run.reason == "exit" and all(r is not None for r in run.results):
        error = None  # the code ran; only tests failed
    elif run.reason is None and None in run.results:
        error = "the code ended before every test ran"
    passed = run.reason is None and all(r is True for r in run.results)
    output = run.stdout + run.stderr
    return TestReport(passed, run.results, output, error)
