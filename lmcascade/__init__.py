"""lmcascade: language-model cascades as probabilistic programs.

Write a cascade as a generator that yields effects, then pick how to run it:

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["2", "+", "=", "4", "5", "<eos>"], lambda ctx: [-9.0, -9.0, -9.0, 0.0, -1.0, -1.0])
>>> @lc.program
... def add():
...     answer = yield lc.gen("answer", lm, "2+2=", max_tokens=1)
...     yield lc.condition("is_digit", answer.isdigit())
...     return answer
>>> {k: round(v, 3) for k, v in lc.infer(add(), method="enumerate").distribution().items()}
{'4': 0.731, '5': 0.269, '2': 0.0}
"""

import os as _os
import sys as _sys

try:
    from lmcascade import constraints, dsl, errors, models
    from lmcascade.distributions import LM
    from lmcascade.dsl.loader import load
    from lmcascade.generation import Generation
    from lmcascade.graph import graph
    from lmcascade.inference import infer, methods
    from lmcascade.inference.many import infer_many
    from lmcascade.program import (
        BoundProgram,
        Program,
        call,
        condition,
        factor,
        gen,
        observe,
        program,
        sample,
        scope,
        score,
    )
    from lmcascade.result import REJECTED, Result
    from lmcascade.toolcall import tool
    from lmcascade.trace import Site, Trace
except KeyboardInterrupt:  # Ctrl-C while the command line is still loading: one line
    if _os.path.basename(_sys.argv[0]) == "lmcascade" or _sys.argv[0] == "-m":
        print("lmcascade: interrupted; no result", file=_sys.stderr)
        raise SystemExit(130) from None
    raise

__version__ = "0.1.0"

__all__ = [
    "LM",
    "REJECTED",
    "BoundProgram",
    "Generation",
    "Program",
    "Result",
    "Site",
    "Trace",
    "call",
    "condition",
    "constraints",
    "errors",
    "factor",
    "dsl",
    "gen",
    "graph",
    "infer",
    "infer_many",
    "load",
    "methods",
    "models",
    "observe",
    "program",
    "sample",
    "scope",
    "score",
    "tool",
]
