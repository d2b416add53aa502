"""Loading a ``.lmc`` file or source text: read, parse, check, bind models and tools, compile.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> toy = ToyLM(["yes", "no", "<eos>"], lambda ctx: [0.0, 0.0, -1.0])
>>> progs = lc.load('program ask() { a ~ lm("yes", max_tokens=1) return a }', models={"lm": toy})
>>> sorted(lc.infer(progs.ask(), method="enumerate").distribution())
['', 'no', 'yes']

A file is read as strict UTF-8 (a byte-order mark is skipped); what cannot be read is a
:class:`~lmcascade.errors.DSLError` naming the file — and for bytes that are not UTF-8, the
byte offset, line and column.  A ``model`` declaration names a registered model (a bare name
such as ``"smollm2-135m"``) or a model folder (a path: it contains ``/`` or ``\\``, or starts
with ``.`` or ``~``); a path is resolved relative to the folder of the ``.lmc`` file (for
source text, the current directory), and ``allow_paths=False`` refuses it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, NoReturn

from lmcascade.dsl import ast
from lmcascade.dsl.check import check
from lmcascade.dsl.compiler import Interpreter
from lmcascade.dsl.limits import Limits
from lmcascade.dsl.parser import MAX_SOURCE_CHARS, parse
from lmcascade.dsl.tools import DEFAULT_TOOLS
from lmcascade.errors import DSLCheckError, DSLError, LMCascadeError

MAX_PATH_CHARS = 4096  # a longer string is never taken for a path


def read_source(path: str | os.PathLike) -> str:
    """The text of the ``.lmc`` file at ``path``, or a :class:`~lmcascade.errors.DSLError`
    saying why it cannot be read (missing, a folder, unreadable, too large, not UTF-8).

    >>> read_source("no/such/file.lmc")
    Traceback (most recent call last):
    ...
    lmcascade.errors.DSLError: no/such/file.lmc:0:0: no .lmc file at 'no/such/file.lmc'
    """
    name = os.fsdecode(path)
    try:
        if os.path.isdir(name):
            raise DSLError(f"{name!r} is a folder, not a .lmc file", filename=name)
        if os.path.exists(name) and not os.path.isfile(name):  # a FIFO or device would block
            raise DSLError(f"{name!r} is not a regular file", filename=name)
        with open(name, "rb") as fh:
            # a UTF-8 character is at most 4 bytes: this much is always enough to refuse
            data = fh.read(4 * MAX_SOURCE_CHARS + 1)
    except FileNotFoundError:
        raise DSLError(f"no .lmc file at {name!r}", filename=name) from None
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise DSLError(f"cannot read {name!r}: {reason}", filename=name) from None
    if len(data) > 4 * MAX_SOURCE_CHARS:
        raise DSLError(
            f"{name!r} is larger than {4 * MAX_SOURCE_CHARS:,} bytes; a .lmc source may have "
            f"at most {MAX_SOURCE_CHARS:,} characters",
            filename=name,
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(name, data, err) from None


def _not_utf8(name: str, data: bytes, err: UnicodeDecodeError) -> DSLError:
    """The located error for the first byte of ``data`` that is not UTF-8."""
    start = err.start
    line_start = data.rfind(b"\n", 0, start) + 1
    line = data.count(b"\n", 0, start) + 1
    before = data[line_start:start].decode("utf-8", "replace")
    col = len(before.removeprefix("\ufeff") if line == 1 else before) + 1  # as parse counts
    hint = " (it looks like UTF-16)" if data.startswith((b"\xff\xfe", b"\xfe\xff")) else ""
    return DSLError(
        f"the file is not UTF-8 text{hint}: byte 0x{data[start]:02x} at offset {start} cannot "
        "be decoded; save the file as UTF-8",
        filename=name,
        line=line,
        col=col,
        source=data.decode("utf-8", "replace").removeprefix("\ufeff"),
    )


def _looks_like_a_path(text: str) -> bool:
    """How a positional string argument of :func:`load` is read: a path if it names an
    existing file or folder, or ends in ``.lmc``; otherwise source text if it holds a newline
    or a brace; otherwise a (missing) path."""
    if "\n" in text or "\0" in text or len(text) > MAX_PATH_CHARS:
        return False
    if os.path.exists(text) or text.lower().endswith(".lmc"):
        return True
    return "{" not in text and "}" not in text


def is_model_path(ref: str) -> bool:
    """Whether a ``model`` declaration names a folder rather than a registered model: it
    contains a path separator (``/`` or ``\\``) or starts with ``.`` or ``~``.

    >>> [is_model_path(r) for r in ["smollm2-135m", "./weights", "models/tiny", "~/m", ".."]]
    [False, True, True, True, True]
    """
    return ref.startswith((".", "~")) or "/" in ref or "\\" in ref or os.path.isabs(ref)


def _resolve_models(
    module: ast.Module,
    bound: dict,
    base: str | None,
    allow_paths: bool,
) -> list[tuple[ast.ModelDecl, str, bool]]:
    """What each declaration the host did not bind will load: a registered name, or the
    absolute path of a folder (refused under ``allow_paths=False``), and whether it is a path.
    Every declaration is checked before any model loads."""

    def fail(decl: ast.ModelDecl, message: str) -> DSLCheckError:
        return DSLCheckError(
            message,
            filename=module.filename,
            line=decl.line,
            col=decl.col,
            source=module.source,
        )

    from lmcascade.models.registry import MODELS, spec_for

    where = "the folder of the .lmc file" if base else "the current directory"
    folder = base or os.getcwd()
    plan = []
    for decl in module.models:
        if decl.name in bound:
            continue
        ref = decl.ref
        if is_model_path(ref):
            if not allow_paths:
                raise fail(
                    decl,
                    f"model {decl.name!r} names a folder ({ref!r}), and this file was loaded "
                    "with model paths refused (allow_paths=False, or lmcascade run "
                    "--registry-only), as for a file from an untrusted source: use a "
                    f"registered model name, bind {decl.name!r} yourself (models={{...}} or "
                    "--model), or load with allow_paths=True if you trust the file",
                )
            path = os.path.normpath(os.path.join(folder, os.path.expanduser(ref)))
            if not os.path.isdir(path):
                raise fail(
                    decl,
                    f"model {decl.name!r}: no model folder at {path!r} (a model path is "
                    f"relative to {where})",
                )
            plan.append((decl, path, True))
        else:
            try:
                spec_for(ref)
            except LMCascadeError:
                nearby = os.path.isdir(os.path.join(folder, ref))
                hint = f'; for the folder {ref!r} next to it write "./{ref}"' if nearby else ""
                raise fail(
                    decl,
                    f"model {decl.name!r}: {ref!r} is not a registered model (registered: "
                    f"{', '.join(sorted(MODELS))}){hint}",
                ) from None
            plan.append((decl, ref, False))
    return plan


def load(
    source_or_path: str | os.PathLike | None = None,
    *,
    source: str | None = None,
    path: str | os.PathLike | None = None,
    models: dict | None = None,
    tools: dict[str, Callable[..., Any]] | None = None,
    limits: Limits | None = None,
    allow_paths: bool = True,
    device: str = "auto",
    model_backend: str = "transformers",
) -> SimpleNamespace:
    """Reads, parses, checks and compiles a ``.lmc`` file or source text into its programs.

    Give exactly one of: ``path=`` (a file), ``source=`` (the program text), or one
    positional argument — a path if it names an existing file (whatever characters it holds,
    ``{`` included) or ends in ``.lmc``, source text if it holds a newline or a brace.
    ``models`` binds model names (host bindings win over the file's ``model`` declarations,
    which are loaded otherwise: a registered name from the registry, a path relative to the
    ``.lmc`` file's folder); ``allow_paths=False`` refuses declarations that name a folder,
    for files from untrusted sources.  ``tools`` are the only functions the file may call;
    ``limits`` (a :class:`~lmcascade.dsl.limits.Limits`) is the per-trace budget of the
    interpreter; ``device`` is where declared models load (``"auto"``: a GPU when there is
    one) and ``model_backend`` with what (``"transformers"``, ``"llamacpp"`` or ``"auto"``,
    as in :func:`lmcascade.models.load`).  Returns a namespace with one attribute per
    program:

    >>> load(source="program one() { return 1 }").one
    <lmcascade program one()>
    """
    given = [x for x in (source_or_path, source, path) if x is not None]
    if len(given) != 1:
        raise DSLError(
            "load takes exactly one of: a path or source text (positionally), source=..., "
            f"or path=...; got {len(given)}"
        )
    if source_or_path is not None:
        if isinstance(source_or_path, str):
            if _looks_like_a_path(source_or_path):
                path = source_or_path
            else:
                source = source_or_path
        elif isinstance(source_or_path, os.PathLike):
            path = source_or_path
        else:
            _wrong_type(source_or_path, "a path or source text")
    base: str | None = None
    if path is not None:
        if not isinstance(path, str | os.PathLike):
            _wrong_type(path, "path= to be a str or os.PathLike")
        filename = os.fsdecode(path)
        text = read_source(filename)
        base = os.path.dirname(os.path.abspath(filename))
    else:
        if not isinstance(source, str):
            _wrong_type(source, "source= to be a str")
        text, filename = source, "<string>"
    if limits is not None and not isinstance(limits, Limits):
        raise DSLError(f"limits must be lmcascade.dsl.limits.Limits, got {type(limits).__name__}")
    module = parse(text, filename=filename)
    bound = dict(models or {})
    tools = {**DEFAULT_TOOLS, **(tools or {})}
    check(module, models=set(bound) | {m.name for m in module.models}, tools=tools)
    loaded: dict[str, Any] = {}
    for decl, ref, is_path in _resolve_models(module, bound, base, allow_paths):
        if ref not in loaded:
            from lmcascade.models.registry import load as load_model

            try:  # a name loads from the registry only, never from a folder of that name
                loaded[ref] = load_model(
                    ref, device=device, allow_paths=is_path, backend=model_backend
                )
            except LMCascadeError as err:
                raise DSLError(
                    str(err), filename=filename, line=decl.line, col=decl.col, source=module.source
                ) from None
            except Exception as err:  # a folder that is not a model: report it, located
                raise DSLError(
                    f"cannot load model {decl.name!r} from {ref!r}: {type(err).__name__}: {err}",
                    filename=filename,
                    line=decl.line,
                    col=decl.col,
                    source=module.source,
                ) from err
        bound[decl.name] = loaded[ref]
    programs = Interpreter(module, bound, tools, limits=limits).build()
    return SimpleNamespace(**programs)


def _wrong_type(value: object, what: str) -> NoReturn:
    hint = " (decode it first, or pass the path as a str)" if isinstance(value, bytes) else ""
    raise DSLError(f"load needs {what}, got {type(value).__name__}{hint}")
