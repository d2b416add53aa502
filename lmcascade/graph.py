"""The IR graph: a program's sites and data flow as a networkx ``DiGraph``.

Nodes are inputs, sample sites (LM or distribution), deterministic assignments, tool calls,
observe / factor / condition sites and the return, plus structured nodes for ``if``, ``for``
and ``repeat`` (their statements hang off them by ``contains`` edges).  Data edges run from the
node that last defined a variable to the nodes that read it.  ``.lmc`` programs give their
graph exactly (:func:`from_program`).  A Python program's graph (:func:`graph`, ``lc.graph``)
is found by intervention on a few sampled runs: a site's value is changed and the program
re-executed, and every later input that changes gets a data edge
(:mod:`lmcascade.flowgraph.build` explains how, and what the nodes and edges carry).

>>> import lmcascade as lc
>>> module = lc.dsl.parse('program f(q) { a ~ lm("{q}") b = shout(a) return b }')
>>> g = from_program(module.programs[0])
>>> sorted(g.nodes[n]["kind"] for n in g), sorted(g.edges)
(['assign', 'call', 'input', 'return', 'sample'], [('a@1:16', 'b@1:30'), ('a@1:16', 'shout@1:34'), ('b@1:30', 'return@1:43'), ('input:q', 'a@1:16'), ('shout@1:34', 'b@1:30')])
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import networkx as nx

from lmcascade.dsl import ast
from lmcascade.dsl.check import DISTRIBUTIONS
from lmcascade.errors import LMCascadeError


def _reads(e) -> tuple[set[str], list[ast.Call]]:
    """Variables an expression reads and the calls inside it."""
    names: set[str] = set()
    calls: list[ast.Call] = []

    def walk(x) -> None:
        if isinstance(x, ast.Var):
            names.add(x.name)
        elif isinstance(x, ast.Str):
            for p in x.parts:
                walk(p)
        elif isinstance(x, ast.Call):
            calls.append(x)
            for a in x.args:
                walk(a)
            for _, v in x.kwargs:
                walk(v)
        elif isinstance(x, ast.Node):
            for value in vars(x).values():
                if isinstance(value, tuple):
                    for v in value:
                        walk(v)
                elif isinstance(value, ast.Node):
                    walk(value)

    walk(e)
    return names, calls


def _call_args(call: ast.Call) -> ast.ListExpr:
    """A site's own call is the site: only its arguments are read."""
    return ast.ListExpr(call.line, call.col, call.args + tuple(v for _, v in call.kwargs))


def from_program(program: ast.ProgramDef, models: set[str] | None = None) -> nx.DiGraph:
    """The exact graph of one ``.lmc`` program."""
    g = nx.DiGraph(name=program.name)
    defined: dict[str, str] = {}
    for p in program.params:
        node = f"input:{p}"
        g.add_node(node, kind="input", label=p, line=program.line, col=program.col)
        defined[p] = node

    def add(node: str, s, reads: set[str], calls: list[ast.Call], parent: str | None, **attrs):
        g.add_node(node, line=s.line, col=s.col, **attrs)
        if parent:
            g.add_edge(parent, node, kind="contains")
        for name in sorted(reads):  # sorted: a set's order varies with the hash seed
            if name in defined:
                g.add_edge(defined[name], node, kind="data")
        for c in calls:
            if c.func in DISTRIBUTIONS or (models and c.func in models):
                continue
            cnode = f"{c.func}@{c.line}:{c.col}"
            g.add_node(cnode, kind="call", label=f"{c.func}(...)", line=c.line, col=c.col)
            g.add_edge(cnode, node, kind="data")
            for name in sorted(_reads(c)[0]):
                if name in defined:
                    g.add_edge(defined[name], cnode, kind="data")

    def block(body, parent: str | None) -> None:
        for s in body:
            at = f"@{s.line}:{s.col}"
            if isinstance(s, ast.Sample):
                reads, calls = _reads(_call_args(s.call))
                is_dist = s.call.func in DISTRIBUTIONS
                node = f"{s.target}{at}"
                add(
                    node,
                    s,
                    reads,
                    calls,
                    parent,
                    kind="sample",
                    label=f"{s.target} ~ {s.call.func}",
                    model=None if is_dist else s.call.func,
                    distribution=s.call.func if is_dist else "LM",
                )
                defined[s.target] = node
            elif isinstance(s, ast.Assign):
                reads, calls = _reads(s.value)
                node = f"{s.target}{at}"
                add(
                    node,
                    s,
                    reads,
                    calls,
                    parent,
                    kind="assign",
                    label=f"{s.target} = ...",
                )
                defined[s.target] = node
            elif isinstance(s, ast.Observe | ast.Condition | ast.Factor | ast.Return):
                kind = type(s).__name__.lower()
                if isinstance(s, ast.Observe):
                    reads, calls = _reads(
                        ast.ListExpr(s.line, s.col, (s.value, _call_args(s.call)))
                    )
                else:
                    reads, calls = _reads(s.value)
                add(f"{kind}{at}", s, reads, calls, parent, kind=kind, label=kind)
            elif isinstance(s, ast.If | ast.For | ast.Repeat):
                kind = type(s).__name__.lower()
                head = (
                    s.test
                    if isinstance(s, ast.If)
                    else (s.iterable if isinstance(s, ast.For) else s.count)
                )
                reads, calls = _reads(head)
                node = f"{kind}{at}"
                add(node, s, reads, calls, parent, kind=kind, label=kind)
                if isinstance(s, ast.For):
                    defined[s.var] = node
                block(s.body, node)
                if isinstance(s, ast.If):
                    block(s.orelse, node)

    block(program.body, None)
    return g


def graph(
    bound: Any,
    *,
    runs: int = 8,
    max_tokens: int | None = 16,
    seed: int = 0,
    budget_s: float = 60.0,
) -> nx.DiGraph:
    """The graph of a bound Python program: its sites, and the data flow between them found
    by changing one value at a time over ``runs`` sampled runs (seeded by ``seed``, each
    generation cut to ``max_tokens`` tokens; None keeps each site's own limit).  Conditions
    that fail and runs that raise do not stop it, and after about ``budget_s`` seconds it
    stops looking (``g.graph["truncated"]``); see :mod:`lmcascade.flowgraph.build`.

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, 0.0])
    >>> @lc.program
    ... def two():
    ...     x = yield lc.gen("x", lm, "a", max_tokens=2)
    ...     y = yield lc.gen("y", lm, f"b{x}", max_tokens=2)
    ...     return y
    >>> g = lc.graph(two(), runs=4)
    >>> list(g.nodes), g.edges["x", "y"]["via"]
    (['x', 'y', 'return'], ['dist.prompt'])
    """
    from lmcascade.flowgraph.build import program_graph

    return program_graph(bound, runs=runs, max_tokens=max_tokens, seed=seed, budget_s=budget_s)


def _quoted(text: Any) -> str:
    """A DOT string literal."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(g: nx.DiGraph) -> str:
    """Graphviz DOT text (edges other than data flow are dashed: ``contains``, ``control``,
    ``raises``)."""
    lines = [f"digraph {_quoted(g.graph.get('name', 'program'))} {{", "  rankdir=TB;"]
    shapes = {
        "sample": "ellipse",
        "input": "plaintext",
        "return": "doublecircle",
        "condition": "diamond",
        "observe": "box",
        "factor": "box",
        "error": "octagon",
    }
    for n, d in g.nodes(data=True):
        shape = shapes.get(d.get("kind"), "box")
        lines.append(f"  {_quoted(n)} [label={_quoted(d.get('label', n))}, shape={shape}];")
    for a, b, d in g.edges(data=True):
        kind = d.get("kind", "")
        style = "" if kind in ("data", "") else ", style=dashed"
        lines.append(f"  {_quoted(a)} -> {_quoted(b)} [label={_quoted(kind)}{style}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_mermaid(g: nx.DiGraph) -> str:
    """Mermaid flowchart text."""
    ids = {n: f"n{i}" for i, n in enumerate(g.nodes)}
    lines = ["flowchart TD"]
    for n, d in g.nodes(data=True):
        label = str(d.get("label", n)).replace('"', "'")
        lines.append(f'  {ids[n]}["{label}"]')
    for a, b, d in g.edges(data=True):
        arrow = "-->" if d.get("kind", "data") == "data" else "-.->"
        lines.append(f"  {ids[a]} {arrow} {ids[b]}")
    return "\n".join(lines) + "\n"


def write(g: nx.DiGraph, path: str | os.PathLike) -> str:
    """Writes ``.dot``, ``.mmd``, or ``.svg`` / ``.png`` (those need Graphviz's ``dot``)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".dot", ".gv"):
        text = to_dot(g)
    elif ext in (".mmd", ".mermaid"):
        text = to_mermaid(g)
    elif ext in (".svg", ".png"):
        dot = shutil.which("dot")
        if dot is None:
            raise LMCascadeError(
                f"writing {ext} needs Graphviz's `dot` program, which is not installed; install "
                "graphviz, or write .dot or .mmd instead"
            )
        subprocess.run([dot, f"-T{ext[1:]}", "-o", path], input=to_dot(g), text=True, check=True)
        return path
    else:
        raise LMCascadeError(f"unknown graph format {ext!r}; use .dot, .mmd, .svg or .png")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path
