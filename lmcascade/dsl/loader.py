"""Loading a ``.lmc`` file or source text: parse, check, bind models and tools, compile.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> toy = ToyLM(["yes", "no", "<eos>"], lambda ctx: [0.0, 0.0, -1.0])
>>> progs = lc.load('program ask() { a ~ lm("yes", max_tokens=1) return a }', models={"lm": toy})
>>> sorted(lc.infer(progs.ask(), method="enumerate").distribution())
['', 'no', 'yes']
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from lmcascade.dsl.check import check
from lmcascade.dsl.compiler import Interpreter
from lmcascade.dsl.parser import parse
from lmcascade.dsl.tools import DEFAULT_TOOLS
from lmcascade.errors import DSLError, LMCascadeError


def load(
    source: str | os.PathLike,
    *,
    models: dict | None = None,
    tools: dict[str, Callable[..., Any]] | None = None,
) -> SimpleNamespace:
    """Parses, checks and compiles a ``.lmc`` file (or source text) into its programs.

    ``models`` binds model names (host bindings win over the file's ``model`` declarations,
    which are loaded from the registry otherwise); ``tools`` are the only functions the file
    may call.  Returns a namespace with one attribute per program.
    """
    path = os.fspath(source)
    if "\n" not in path and "{" not in path and os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            text, filename = fh.read(), path
    elif isinstance(source, str) and ("{" in source or "\n" in source or "program" in source):
        text, filename = source, "<string>"
    else:
        raise DSLError(f"no .lmc file at {path!r}")
    module = parse(text, filename=filename)
    bound = dict(models or {})
    tools = {**DEFAULT_TOOLS, **(tools or {})}
    check(module, models=set(bound) | {m.name for m in module.models}, tools=tools)
    for decl in module.models:
        if decl.name not in bound:
            from lmcascade.models.registry import load as load_model

            try:
                bound[decl.name] = load_model(decl.ref)
            except LMCascadeError as err:
                raise DSLError(
                    str(err), filename=filename, line=decl.line, col=decl.col, source=text
                ) from None
    programs = Interpreter(module, bound, tools).build()
    return SimpleNamespace(**programs)
