"""The graph of a Python program, found by intervention on a few sampled runs.

A Python program has no AST we can read the way a ``.lmc`` program has, and its data flow
cannot be read off one sample: texts from LM sites are pasted into f-strings (identity is
lost), and a short or empty text found "inside" a later prompt proves nothing.  So the graph
asks the question a data edge answers — *would this input change if that value changed?* —
and answers it by running the program again with that one value changed:

1. ``runs`` forward samples (:func:`~lmcascade.flowgraph.samples.sample_runs`), which go
   past failed conditions and end quietly on errors, give the sites each run reaches and a
   realistic value for each;
2. each run is re-executed from its recorded values (:func:`~lmcascade.flowgraph.replay.execute`,
   no model, no tool call) and every effect's inputs are fingerprinted — twice, so inputs that
   differ between identical executions (objects made afresh each time) are left out;
3. for each site value, and each program argument, the run is re-executed with that value
   replaced by a few others (:func:`~lmcascade.flowgraph.variants.variants`: other runs'
   values, the support of a finite distribution — only it, when it is listed whole —,
   shifted / empty / long texts, other numbers).  Each such replay runs with a time limit
   (:mod:`~lmcascade.flowgraph.deadline`): a made-up value may send the program into a loop
   no real run enters, and a replay that does not end is given up, is not evidence, and is
   listed in ``g.graph["timed_out"]``.  A later effect whose inputs change gets a ``data``
   edge from it (its ``via``
   names the inputs: ``dist.prompt``, ``args[0]``, ``ok``...); one that appears or disappears
   while the changed run still returns gets a ``control`` edge (the value picks a branch);
   a changed return value gives an edge into ``return``.

The graph is the union over the runs.  Every node carries ``seen`` (``"3/8"``: in how many
runs it was reached) and edges carry in how many runs they were found; a condition carries
``held`` (how often it was true when reached).  A run that raised adds an ``error`` node
(``raises`` edge from the site it raised after or at), and ``g.graph["failures"]`` lists each
error with its count.  The whole analysis stops after ``budget_s`` seconds, or
:data:`BUDGET` re-executed effects (``g.graph["truncated"]``).  With a fixed ``seed`` the
graph is deterministic, unless a replay is given up on time.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, 0.0])
>>> @lc.program
... def echo(question):
...     x = yield lc.gen("x", lm, f"{question}b", max_tokens=2)
...     y = yield lc.call("tool", str.upper, x)
...     yield lc.condition("never", False)
...     return y
>>> g = program_graph(echo("a"), runs=2)
>>> sorted((a, b, d["kind"]) for a, b, d in g.edges(data=True))
[('input:question', 'x', 'data'), ('tool', 'return', 'data'), ('x', 'tool', 'data')]
>>> g.nodes["never"]["held"], g.nodes["x"]["seen"]
('0/2', '2/2')
"""

from __future__ import annotations

import contextlib
import functools
import io
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import networkx as nx
import torch

from lmcascade.distributions import is_lm
from lmcascade.errors import OptionError, ProgramError
from lmcascade.flowgraph.deadline import TIMED_OUT, Limiter
from lmcascade.flowgraph.fingerprint import fingerprint
from lmcascade.flowgraph.replay import MISSING, NO_VALUE_KINDS, STOP, Execution, Step, execute
from lmcascade.flowgraph.samples import Run, Stopped, sample_runs
from lmcascade.flowgraph.variants import value_key, variants
from lmcascade.flowgraph.watch import watch
from lmcascade.program import BoundProgram, Program
from lmcascade.trace import safe_repr

RUNS = 8
"""Sampled runs by default: enough for most branches, fast on a small model."""

MAX_TOKENS = 16
"""Tokens per generation by default, while sampling the runs."""

BUDGET = 200_000
"""Effects re-executed in all by the interventions; past it the graph stops looking for more
edges (``g.graph["truncated"]`` is true)."""

BUDGET_S = 60.0
"""Seconds the whole analysis may take by default (``budget_s``), sampling included; past it
the graph stops looking for more edges (``g.graph["truncated"]`` is true)."""

REPLAY_S = 0.5
"""Seconds one replay with a changed value may take at least: its limit is this or 20 times
the run's own replay, whichever is more.  A replay that takes longer is given up (the value
may send the program into a loop no real run enters) and noted in ``g.graph["timed_out"]``."""


def program_graph(
    bound: BoundProgram,
    *,
    runs: int = RUNS,
    max_tokens: int | None = MAX_TOKENS,
    seed: int = 0,
    budget_s: float = BUDGET_S,
) -> nx.DiGraph:
    """The graph of a bound Python program from ``runs`` sampled runs (seeded by ``seed``,
    each generation cut to ``max_tokens`` tokens; None keeps the program's own limits),
    looked at for about ``budget_s`` seconds at most."""
    _check(bound, runs, max_tokens, seed, budget_s)
    deadline = time.monotonic() + budget_s
    sampled = sample_runs(bound, runs, max_tokens, seed)
    flow = _Flow(bound, sampled, deadline)
    with _quiet():
        for index, run in enumerate(sampled):
            flow.add(index, run)
    return flow.graph()


def _check(bound: Any, runs: Any, max_tokens: Any, seed: Any, budget_s: Any) -> None:
    if isinstance(bound, Program):
        raise ProgramError(
            f"lc.graph needs a bound program: call {bound.name!r} with its arguments first, "
            f"as in lc.graph({bound.name}(...))"
        )
    if not isinstance(bound, BoundProgram):
        raise ProgramError(
            f"lc.graph needs a bound program (an @lc.program called with its arguments), got "
            f"{type(bound).__name__}; for a .lmc program use lmcascade.graph.from_program"
        )
    for option, value, low in (("runs", runs, 1), ("max_tokens", max_tokens, 1), ("seed", seed, 0)):
        if option == "max_tokens" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise OptionError(
                f"lc.graph option {option} must be an integer >= {low}, got {value!r}"
                + ("; None keeps each site's own max_tokens" if option == "max_tokens" else "")
            )
    if not isinstance(budget_s, int | float) or isinstance(budget_s, bool) or not budget_s > 0:
        raise OptionError(
            f"lc.graph option budget_s must be a number of seconds > 0 (math.inf: no limit), "
            f"got {budget_s!r}"
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Re-executions print nothing and warn nothing (the program runs many times)."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class _Flow:
    """What the runs found: nodes, their counts, edges with the runs that found them."""

    def __init__(self, bound: BoundProgram, runs: list[Run], deadline: float) -> None:
        self.bound = bound
        self.deadline = deadline
        self.limiter = Limiter()
        self.hung: set[tuple[str, str]] = set()  # (source, value) given up on in some run
        self.timed_out: Counter[tuple[str | None, str]] = Counter()
        self.n = len(runs)
        self.arguments = bound.program.signature.bind(*bound.args, **bound.kwargs)
        self.arguments.apply_defaults()
        self.nodes: dict[str, dict[str, Any]] = {}
        self.seen: Counter[str] = Counter()
        self.held: Counter[str] = Counter()
        self.analysed: Counter[str] = Counter()  # how many runs changed each site's value
        self.edges: dict[tuple[str, str], dict[str, Any]] = {}
        self.failures: Counter[tuple[str, str | None, bool, str]] = Counter()
        self.returned = 0
        self.used = 0
        self.truncated = False
        self.own = [run.sent for run in runs]
        self.by_site: dict[str, list[Any]] = {}
        for values in self.own:
            for name, value in values.items():
                if value is not STOP:
                    self.by_site.setdefault(name, []).append(value)

    # -- one run ------------------------------------------------------------------------------

    def add(self, index: int, run: Run) -> None:
        """Executes run ``index`` again as recorded (twice: what differs between the two is
        not compared), notes its nodes, then again with each value changed in turn."""
        own = self.own[index]

        def lookup(name: str) -> Any:
            if name in own:
                return own[name]
            others = self.by_site.get(name)
            return others[0] if others else MISSING

        start = self._start(self.arguments.arguments)
        began = time.monotonic()
        base = self._bounded(lambda: execute(start, lookup), max(REPLAY_S, self._left()))
        if base is None:  # the recorded values themselves: the program is not deterministic
            self.timed_out[(None, "the recorded values")] += 1
            return
        self._record(base, run)
        limit = max(REPLAY_S, 20 * (time.monotonic() - began))
        again = self._bounded(lambda: execute(start, lookup), limit)
        if again is None or self._left() <= 0:
            if self._left() <= 0:
                self.truncated = True
            else:
                self.timed_out[(None, "the recorded values")] += 1
            return
        unstable = {
            name: {p for p in step.inputs if step.inputs[p] != again.steps[name].inputs.get(p)}
            for name, step in base.steps.items()
            if name in again.steps
        }
        stable_return = base.returned_fp == again.returned_fp
        compared = self._compared(lookup, min(limit, self._left()))
        for source, found, run_with in self._jobs(index, base, own, lookup, compared):
            if not self._spend(index, len(found) * (len(base.steps) + 1)):
                break
            self.analysed[source] += 1
            for candidate in found:
                key = (source, value_key(candidate))
                if key in self.hung:  # it never ended in an earlier run: not tried again
                    self.timed_out[(source, safe_repr(candidate, 60))] += 1
                    continue
                left = self._left()
                changed = self._bounded(functools.partial(run_with, candidate), min(limit, left))
                if changed is None and left < limit:  # the analysis is out of time
                    self.truncated = True
                    return
                if changed is None:  # not evidence; the value may loop where no run does
                    self.hung.add(key)
                    self.timed_out[(source, safe_repr(candidate, 60))] += 1
                    continue
                self._compare(index, source, base, changed, unstable, stable_return)

    def _left(self) -> float:
        return self.deadline - time.monotonic()

    def _bounded(self, fn: Callable[[], Execution], seconds: float) -> Execution | None:
        """``fn()``, or None when it has not returned within ``seconds``."""
        if seconds <= 0:
            return None
        found = self.limiter(fn, seconds)
        return None if found is TIMED_OUT else found

    def _jobs(
        self,
        index: int,
        base: Execution,
        own: dict[str, Any],
        lookup: Callable[[str], Any],
        compared: dict[str, list],
    ) -> list[tuple[str, list[Any], Callable[[Any], Execution]]]:
        """What to change in run ``index``: (source, values to try, an execution with one of
        them) — the arguments first, then the sites that earlier runs looked at least, so a
        budget cut leaves no site unseen."""
        start = self._start(self.arguments.arguments)
        jobs: list[tuple[str, list[Any], Callable[[Any], Execution]]] = []
        arguments = self.arguments.arguments
        for param, value in arguments.items():
            found = variants(value, compared=compared.get(f"input:{param}", ()))
            if not found:  # a model, say: passed on unchanged, so followed by identity
                self._identity(index, f"input:{param}", base, fingerprint(value))

            def with_argument(candidate: Any, param: str = param) -> Execution:
                return execute(self._start({**arguments, param: candidate}), lookup)

            jobs.append((f"input:{param}", found, with_argument))
        sites = [
            (name, step)
            for name, step in base.steps.items()
            if step.kind not in NO_VALUE_KINDS and _usable(own.get(name, MISSING))
        ]
        for name, step in sorted(sites, key=lambda item: self.analysed[item[0]]):
            others = [v for v in self.by_site.get(name, ()) if v is not own[name]]
            support, complete = _support(step)
            found = variants(own[name], others, support, compared.get(name, ()), complete)
            if _never_empty(step):  # '' is a value this site cannot return
                found = [v for v in found if not (isinstance(v, str) and v == "")]

            def with_value(candidate: Any, name: str = name) -> Execution:
                return execute(start, _replacing(lookup, name, candidate), name)

            jobs.append((name, found, with_value))
        return jobs

    def _compared(self, lookup: Callable[[str], Any], limit: float) -> dict[str, list]:
        """The texts and numbers each site value and argument was compared with, by one
        execution that hands the program watched values (:mod:`~lmcascade.flowgraph.watch`)."""
        logs: dict[str, list] = {}

        def watched(name: str, value: Any) -> Any:
            return watch(value, logs.setdefault(name, []))

        args = {p: watched(f"input:{p}", v) for p, v in self.arguments.arguments.items()}
        done = self._bounded(
            lambda: execute(self._start(args), lambda name: watched(name, lookup(name))), limit
        )
        if done is None:  # the logs may still change: none are used
            return {}
        return {name: list(dict.fromkeys(log)) for name, log in logs.items()}

    def _start(self, arguments: dict[str, Any]) -> Callable[[], Iterator]:
        bound_args = self.arguments.signature.bind_partial()
        bound_args.arguments.update(arguments)
        fn = self.bound.program.fn
        return lambda: fn(*bound_args.args, **bound_args.kwargs)

    def _spend(self, index: int, cost: int) -> bool:
        """Whether run ``index`` may re-execute ``cost`` more effects: each run has its share
        of :data:`BUDGET`, and what earlier runs left over."""
        if self.used + cost > BUDGET * (index + 1) // self.n:
            self.truncated = True
            return False
        self.used += cost
        return True

    def _record(self, base: Execution, run: Run) -> None:
        for name, step in base.steps.items():
            if name not in self.nodes:
                self.nodes[name] = _attributes(step)
            self.seen[name] += 1
            if step.kind == "condition" and _truth(step.effect) is True:
                self.held[name] += 1
        stopped = run.stopped
        if stopped is not None:
            self.failures[(stopped.message, stopped.site, stopped.at_site, _type(stopped))] += 1
        elif base.outcome == "returned":
            self.returned += 1
        for site in run.trace:  # a tool's error recorded on its site (the engine ended the run)
            error = getattr(site, "error", None)
            if error is not None:
                found = Stopped(
                    error if isinstance(error, BaseException) else Exception(error), site.name, True
                )
                self.failures[(found.message, site.name, True, _type(found))] += 1

    def _compare(
        self,
        index: int,
        source: str,
        base: Execution,
        changed: Execution,
        unstable: dict[str, set[str]],
        stable_return: bool,
    ) -> None:
        for name, step in changed.steps.items():
            before = base.steps.get(name)
            if step.inputs is None:  # before the changed site: the same as in the base
                continue
            if before is None:
                self._edge(source, name, index, "control")
                continue
            skip = unstable.get(name, set())
            paths = {
                p
                for p in before.inputs.keys() | step.inputs.keys()
                if p not in skip and before.inputs.get(p, MISSING) != step.inputs.get(p, MISSING)
            }
            if paths:
                self._edge(source, name, index, "data", paths)
        if changed.outcome != "returned":
            return
        for name in base.steps:  # in program order, not a set's (which varies by hash seed)
            if name not in changed.steps:
                self._edge(source, name, index, "control")
        if base.outcome == "returned" and stable_return and base.returned_fp != changed.returned_fp:
            self._edge(source, "return", index, "data")

    def _identity(self, index: int, source: str, base: Execution, key: Any) -> None:
        for name, step in base.steps.items():
            paths = {p for p, fp in step.inputs.items() if fp == key}
            if paths:
                self._edge(source, name, index, "data", paths)

    def _edge(
        self, a: str, b: str, index: int, kind: str, via: set[str] | frozenset = frozenset()
    ) -> None:
        edge = self.edges.setdefault((a, b), {"kinds": set(), "via": set(), "runs": set()})
        edge["kinds"].add(kind)
        edge["via"] |= via
        edge["runs"].add(index)

    # -- the graph ----------------------------------------------------------------------------

    def graph(self) -> nx.DiGraph:
        g = nx.DiGraph(name=self.bound.name, runs=self.n, truncated=self.truncated)
        everywhere = f"{self.n}/{self.n}"
        for param in self.arguments.arguments:
            g.add_node(f"input:{param}", kind="input", label=param, seen=everywhere)
        for name, attrs in self.nodes.items():
            k = self.seen[name]
            label = attrs["label"] + ("" if k == self.n else f" ({k}/{self.n})")
            g.add_node(name, **{**attrs, "label": label, "seen": f"{k}/{self.n}"})
            if attrs["kind"] == "condition":
                g.nodes[name]["held"] = f"{self.held[name]}/{k}"
        failures = []
        for (message, site, at_site, kind), k in self.failures.items():
            node = f"raise:{kind}@{site or 'start'}"
            failures.append({"error": message, "site": site, "at_site": at_site, "runs": k})
            if node not in g:
                g.add_node(node, kind="error", label=f"raises {kind}", error=message, runs=0)
            g.nodes[node]["runs"] += k
            g.nodes[node]["seen"] = f"{g.nodes[node]['runs']}/{self.n}"
            if site is not None and site in g:
                g.add_edge(site, node, kind="raises")
        g.graph["failures"] = failures
        g.graph["timed_out"] = [
            {"site": source, "value": value, "runs": k}
            for (source, value), k in self.timed_out.items()
        ]
        if self.returned:
            label = "return" + ("" if self.returned == self.n else f" ({self.returned}/{self.n})")
            g.add_node("return", kind="return", label=label, seen=f"{self.returned}/{self.n}")
        order = {node: i for i, node in enumerate(g)}
        found = [(a, b) for a, b in self.edges if a in g and b in g and a != b]
        for a, b in sorted(found, key=lambda ab: (order[ab[0]], order[ab[1]])):
            edge = self.edges[a, b]
            kind = "data" if "data" in edge["kinds"] else "control"
            attrs = {"kind": kind, "seen": f"{len(edge['runs'])}/{self.n}"}
            if kind == "data" and edge["via"]:
                attrs["via"] = sorted(edge["via"])
            g.add_edge(a, b, **attrs)
        return g


def _replacing(lookup: Callable[[str], Any], name: str, value: Any) -> Callable[[str], Any]:
    return lambda site: value if site == name else lookup(site)


def _support(step: Step) -> tuple[list[Any], bool]:
    """Up to 8 values of a scalar finite distribution's support (none for other sites), and
    whether they are the whole support."""
    dist = getattr(step.effect, "dist", None)
    if (
        step.kind != "sample"
        or not isinstance(dist, torch.distributions.Distribution)
        or not dist.has_enumerate_support
        or dist.batch_shape != ()
        or dist.event_shape != ()
    ):
        return [], False
    try:
        values = dist.enumerate_support(expand=False).reshape(-1)
        return values[:8].tolist(), len(values) <= 8
    except Exception:  # a support that cannot be listed: synthetic variants only
        return [], False


def _never_empty(step: Step) -> bool:
    """Whether the site is an LM generation of at least one token (it never returns '')."""
    dist = getattr(step.effect, "dist", None)
    return step.kind == "sample" and is_lm(dist) and getattr(dist, "min_tokens", 0) >= 1


def _truth(eff: Any) -> bool | None:
    try:
        return bool(eff.ok)
    except Exception:
        return None


def _type(stopped: Stopped) -> str:
    return type(stopped.error).__name__


def _attributes(step: Step) -> dict[str, Any]:
    """A node's attributes, named as :func:`lmcascade.graph.from_program` names them."""
    eff, name = step.effect, step.name
    attrs: dict[str, Any] = {"kind": step.kind, "label": f"{step.kind} {name}"}
    dist = getattr(eff, "dist", None)
    model = dist.model if is_lm(dist) else getattr(eff, "model", None)
    if is_lm(dist):
        attrs["distribution"] = "LM"
    elif dist is not None:
        attrs["distribution"] = type(dist).__name__
    if model is not None or step.kind == "sample":
        attrs["model"] = getattr(model, "name", None)
    if step.kind == "sample":
        attrs["label"] = f"{name} ~ {attrs['model'] or attrs.get('distribution')}"
    elif step.kind == "call":
        fn = getattr(eff, "fn", None)
        attrs["tool"] = getattr(fn, "__name__", type(fn).__name__)
        attrs["label"] = f"{name} = {attrs['tool']}(...)"
    if step.line is not None:
        attrs.update(line=step.line, file=step.file)
    return attrs


def _usable(value: Any) -> bool:
    return value is not MISSING and value is not STOP
