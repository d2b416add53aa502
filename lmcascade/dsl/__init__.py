"""The text DSL: ``.lmc`` files parsed with lark into a positioned syntax tree.

This release parses and reports syntax errors; semantic checks, the IR graph, compilation to a
runnable program (``lc.load``) and the CLI build on it.
"""

from lmcascade.dsl.check import check
from lmcascade.dsl.loader import load
from lmcascade.dsl.parser import parse

__all__ = ["check", "load", "parse"]
