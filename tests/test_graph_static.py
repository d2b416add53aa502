"""lc.graph for Python programs: data flow found by intervention, independent of the values
sampled, and never stopped by a failing condition or a run that raises."""

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyro.distributions import Bernoulli

import lmcascade as lc
from lmcascade.errors import OptionError, ProgramError
from lmcascade.flowgraph import build
from lmcascade.flowgraph.samples import sample_runs
from lmcascade.graph import to_dot, to_mermaid
from lmcascade.models import ToyLM
from programs import LM

# a model that only ever says nothing: its first token is eos
SILENT = ToyLM(["a", "q", ":", "<eos>"], lambda ctx: [-math.inf, -math.inf, -math.inf, 0.0])
# digits or letters, so int() fails on some samples
MIXED = ToyLM(
    ["1", "x", "<eos>"], lambda ctx: [0.0, 0.0, -1.0] if len(ctx) < 2 else [-9.0, -9.0, 0.0]
)


def edges(g, kind=None):
    return {(a, b) for a, b, d in g.edges(data=True) if kind is None or d["kind"] == kind}


def test_a_condition_that_always_fails_still_gets_its_graph():
    @lc.program
    def impossible():
        x = yield lc.gen("x", LM, "q", max_tokens=2)
        yield lc.condition("never", x == "not a text the model makes")
        y = yield lc.gen("y", LM, "q" + x, max_tokens=2)
        return y

    with pytest.raises(lc.errors.AllWeightsZeroError):  # what the old graph ran into
        lc.infer(impossible(), method="forward", num_samples=1, seed=0)
    g = lc.graph(impossible())
    assert list(g.nodes) == ["x", "never", "y", "return"]
    assert g.nodes["never"]["held"] == "0/8" and g.nodes["y"]["seen"] == "8/8"
    assert {("x", "never"), ("x", "y"), ("y", "return")} <= edges(g, "data")
    assert g.graph["failures"] == []


def test_a_value_passed_unchanged_to_a_tool_gets_an_edge():
    @lc.program
    def tool():
        x = yield lc.gen("x", LM, "q", max_tokens=3)
        n = yield lc.call("count", len, x)
        return n

    g = lc.graph(tool())
    assert g.edges["x", "count"]["kind"] == "data"
    assert g.edges["x", "count"]["via"] == ["args[0]"]
    assert g.nodes["count"]["tool"] == "len" and ("count", "return") in edges(g, "data")


def test_an_empty_output_still_flows_into_the_next_prompt():
    @lc.program
    def silent_then_ask():
        x = yield lc.gen("x", SILENT, "q", max_tokens=3)
        y = yield lc.gen("y", LM, f"q{x}:", max_tokens=2)
        return y

    runs = sample_runs(silent_then_ask(), runs=8, max_tokens=16, seed=0)
    assert all(r.sent["x"] == "" for r in runs)  # every sample is the empty text
    g = lc.graph(silent_then_ask())
    assert g.edges["x", "y"] == {"kind": "data", "seen": "8/8", "via": ["dist.prompt"]}


def test_a_value_that_is_sometimes_empty_gets_its_edge_in_every_run():
    @lc.program
    def maybe_empty():
        x = yield lc.gen("x", LM, "q", max_tokens=2)
        y = yield lc.gen("y", LM, "q" + x + ":", max_tokens=2)
        return x + "|" + y

    values = [r.sent["x"] for r in sample_runs(maybe_empty(), 8, 16, 0)]
    assert "" in values and any(values)
    g = lc.graph(maybe_empty())
    assert g.edges["x", "y"]["seen"] == "8/8"
    assert {("x", "return"), ("y", "return")} <= edges(g, "data")


def test_only_real_flow_makes_an_edge():
    @lc.program
    def independent(question):
        yield lc.gen("x", LM, "q", max_tokens=2)  # its value is not used
        y = yield lc.gen("y", LM, question, max_tokens=2)
        yield lc.factor("short", -len(y))
        return y

    g = lc.graph(independent("qa"))
    assert edges(g) == {("input:question", "y"), ("y", "short"), ("y", "return")}
    assert g.nodes["x"]["seen"] == "8/8"


def test_branches_seen_in_some_runs_appear_with_their_counts():
    @lc.program
    def branch():
        coin = yield lc.sample("coin", Bernoulli(0.5))
        if coin:
            text = yield lc.gen("heads", LM, "q", max_tokens=2)
        else:
            text = yield lc.gen("tails", LM, "qa", max_tokens=2)
        return text

    g = lc.graph(branch())
    heads, tails = (int(g.nodes[n]["seen"].split("/")[0]) for n in ("heads", "tails"))
    assert heads + tails == 8 and 0 < heads < 8
    assert g.nodes["heads"]["label"] == f"heads ~ hashed-toy ({heads}/8)"
    assert g.nodes["coin"]["distribution"] == "Bernoulli"
    assert edges(g, "control") == {("coin", "heads"), ("coin", "tails")}
    assert {("heads", "return"), ("tails", "return")} <= edges(g, "data")


def test_the_same_seed_gives_the_same_graph():
    @lc.program
    def branchy():
        coin = yield lc.sample("coin", Bernoulli(0.3))
        x = yield lc.gen("x", LM, "q" if coin else "qa", max_tokens=3)
        if "a" in x:
            yield lc.condition("has_b", "b" in x)
        return x

    a, b = lc.graph(branchy(), runs=6, seed=3), lc.graph(branchy(), runs=6, seed=3)
    assert list(a.nodes(data=True)) == list(b.nodes(data=True))
    assert list(a.edges(data=True)) == list(b.edges(data=True)) and a.graph == b.graph


def test_runs_that_raise_are_noted_and_the_rest_is_drawn():
    @lc.program
    def parse():
        x = yield lc.gen("x", MIXED, "1", max_tokens=2)
        n = int(x)
        yield lc.factor("big", n)
        return n

    g = lc.graph(parse())
    failures = g.graph["failures"]  # one entry per message: int('') and int('x')
    assert {f["site"] for f in failures} == {"x"}
    assert all(f["error"].startswith("ValueError: invalid literal") for f in failures)
    raised = sum(f["runs"] for f in failures)
    assert 0 < raised < 8
    assert g.nodes["raise:ValueError@x"]["seen"] == f"{raised}/8"
    assert g.edges["x", "raise:ValueError@x"]["kind"] == "raises"
    assert g.nodes["big"]["seen"] == f"{8 - raised}/8" and ("x", "big") in edges(g, "data")


def test_a_program_that_always_raises_still_shows_its_sites():
    @lc.program
    def broken():
        x = yield lc.gen("x", LM, "q", max_tokens=2)
        yield lc.factor("oops", "not a number")
        return x

    g = lc.graph(broken())
    assert "return" not in g and g.nodes["x"]["seen"] == "8/8"
    (failure,) = g.graph["failures"]
    assert failure["site"] == "oops" and failure["at_site"] and failure["runs"] == 8
    assert "factor needs a number" in failure["error"]


def test_a_failing_tool_is_noted_on_the_graph():
    def picky(text):
        if "a" in text:
            raise ValueError("no a, please")
        return text.upper()

    @lc.program
    def uses_tool():
        x = yield lc.gen("x", LM, "q", max_tokens=3)
        y = yield lc.call("picky", picky, x)
        return y

    g = lc.graph(uses_tool())
    messages = {f["error"] for f in g.graph["failures"]}
    assert messages == {"ValueError: no a, please"}
    assert g.edges["picky", "raise:ValueError@picky"]["kind"] == "raises"
    assert ("x", "picky") in edges(g, "data")


def test_loops_scopes_arguments_and_models():
    @lc.program
    def step(model, prompt):
        return (yield lc.gen("text", model, prompt, max_tokens=2))

    @lc.program
    def chain(model, start, rounds=2):
        text = start
        for _ in range(rounds):
            with lc.scope("round[]"):
                text = yield from step(model, "q" + text)
        yield lc.call("keep", print, text, object())  # a fresh object: no edge from it
        return text

    g = lc.graph(chain(LM, "a"))
    assert [n for n in g if not n.startswith("input:")] == [
        "round[0]/text",
        "round[1]/text",
        "keep",
        "return",
    ]
    assert g.edges["round[0]/text", "round[1]/text"]["via"] == ["dist.prompt"]
    assert g.edges["round[1]/text", "keep"]["via"] == ["args[0]"]
    assert ("input:start", "round[0]/text") in edges(g, "data")
    assert g.edges["input:model", "round[1]/text"]["via"] == ["dist.model"]
    assert ("input:rounds", "round[1]/text") in edges(g, "control")
    assert g.nodes["round[0]/text"]["line"] > 0


def test_generations_are_cut_to_max_tokens():
    @lc.program
    def long():
        return (yield lc.gen("x", LM, "q", max_tokens=200))

    runs = sample_runs(long(), runs=4, max_tokens=2, seed=0)
    assert all(len(r.trace["x"].token_ids) <= 2 for r in runs)
    assert lc.graph(long(), max_tokens=None).nodes["x"]["seen"] == "8/8"


def test_bad_arguments_are_clear_errors():
    @lc.program
    def one():
        return (yield lc.gen("x", LM, "q", max_tokens=2))

    with pytest.raises(ProgramError, match=r"call 'one' with its arguments first"):
        lc.graph(one)
    with pytest.raises(ProgramError, match="needs a bound program"):
        lc.graph("one.lmc")
    with pytest.raises(OptionError, match="option runs must be an integer >= 1, got 0"):
        lc.graph(one(), runs=0)
    with pytest.raises(OptionError, match="max_tokens"):
        lc.graph(one(), max_tokens=1.5)


def test_dot_and_mermaid_of_a_python_graph():
    @lc.program
    def quoted():
        x = yield lc.gen('say "hi"', LM, "q", max_tokens=2)
        yield lc.condition("never", False)
        return x

    g = lc.graph(quoted(), runs=2)
    dot = to_dot(g)
    assert '"say \\"hi\\"" [label="say \\"hi\\" ~ hashed-toy", shape=ellipse];' in dot
    assert '"never" [label="condition never", shape=diamond];' in dot
    assert "flowchart TD" in to_mermaid(g)


def test_a_field_of_a_structured_tool_result_flows_on():
    @dataclass(frozen=True)
    class Parsed:
        answer: str
        score: float

    @lc.program
    def structured():
        x = yield lc.gen("x", LM, "q", max_tokens=2)
        parsed = yield lc.call("parse", lambda t: Parsed(t.upper(), 0.5), x)
        y = yield lc.gen("y", LM, "q" + parsed.answer.lower(), max_tokens=2)
        yield lc.factor("score", parsed.score)
        return y

    g = lc.graph(structured())
    assert g.edges["parse", "y"]["via"] == ["dist.prompt"]
    assert g.edges["parse", "score"]["via"] == ["log_weight"]
    assert ("x", "y") not in g.edges  # through the tool only


def test_a_budget_cut_spreads_over_the_sites(monkeypatch):
    @lc.program
    def chain():
        text = ""
        for _ in range(6):
            text = yield lc.gen("s[]", LM, "q" + text, max_tokens=1)
        return text

    monkeypatch.setattr(build, "BUDGET", 800)  # about two sites' worth per run
    g = lc.graph(chain())
    assert g.graph["truncated"]
    assert {(f"s[{i}]", f"s[{i + 1}]") for i in range(5)} <= edges(g, "data")


def test_comparisons_with_values_no_run_made_still_get_edges():
    @lc.program
    def thresholds():
        x = yield lc.gen("x", LM, "q", max_tokens=3)
        n = yield lc.call("count", len, x)
        yield lc.condition("is_forty_two", n == 42)  # len(x) <= 3 in every run
        yield lc.factor("long", 1.0 if n > 100 else 0.0)
        yield lc.condition("is_yes", x.strip().lower() == "yes")  # the model cannot say it
        return None

    g = lc.graph(thresholds())
    assert g.nodes["is_forty_two"]["held"] == "0/8" and g.nodes["is_yes"]["held"] == "0/8"
    assert {("count", "is_forty_two"), ("count", "long"), ("x", "is_yes")} <= edges(g, "data")


HASH_SEED_SCRIPT = """
import lmcascade as lc
from pyro.distributions import Bernoulli
from lmcascade.graph import from_program, to_dot, to_mermaid
from lmcascade.models import ToyLM

lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, 0.0])

@lc.program
def branchy(q):
    flip = yield lc.sample("flip", Bernoulli(0.5))
    if flip:
        for name in "abcd":
            yield lc.gen(name, lm, q, max_tokens=1)
    e = yield lc.gen("e", lm, q, max_tokens=1)
    return e

g = lc.graph(branchy("a"), runs=4)
module = lc.dsl.parse('program f(q, r, s, t) { a ~ lm("{q}{r}{s}{t}") b = g(a, q, r, s) return b }')
print(to_dot(g) + to_mermaid(g) + to_dot(from_program(module.programs[0], {"lm"})))
"""


def test_dot_and_mermaid_text_do_not_depend_on_the_hash_seed():
    # a set's order changes with PYTHONHASHSEED: the text must not (diffs, golden files)
    texts = []
    for seed in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", HASH_SEED_SCRIPT],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONHASHSEED": seed},
            cwd=Path(__file__).resolve().parents[1],
        )
        assert done.returncode == 0, done.stderr
        texts.append(done.stdout)
    assert texts[0] == texts[1]
    assert texts[0].index('"flip" -> "a"') < texts[0].index('"flip" -> "d"')


def test_a_run_that_does_not_end_is_capped_and_noted():
    @lc.program
    def sometimes():
        flip = yield lc.sample("flip", Bernoulli(0.5))
        while flip:
            yield lc.sample("x[]", Bernoulli(0.5))
        return 1

    g = lc.graph(sometimes(), runs=4, seed=1)  # two runs loop, two return
    (failure,) = g.graph["failures"]
    assert failure["error"].startswith("ProgramError: reached 1000 sites")
    assert failure["runs"] == 2 and failure["site"] == "x[998]"
    assert g.nodes["return"]["seen"] == "2/4" and g.nodes["x[998]"]["seen"] == "2/4"
    assert ("x[998]", "raise:ProgramError@x[998]") in edges(g, "raises")
    assert ("flip", "x[0]") in edges(g, "control")


LOOPING_SCRIPT = """
import json
import lmcascade as lc

toy = lc.models.ToyLM(["1", "2", "<eos>"], lambda ctx: [0.0, 0.0, -1.0])

@lc.program
def pad(q):
    x = yield lc.gen("x", toy, q, min_tokens=1, max_tokens=2)  # never ''
    s = ""
    while len(s) < 10:  # never ends with x == ''
        s += x
    y = yield lc.gen("y", toy, s[:3], max_tokens=1)
    return y

@lc.program
def parity(n):
    while n != 0:  # never ends for an odd n
        n -= 2
    x = yield lc.gen("x", toy, "1", max_tokens=2)
    k = yield lc.call("double", lambda t: 2 * len(t), x)  # always even
    while k != 0:
        k -= 2
    y = yield lc.gen("y", toy, "1" + x, max_tokens=1)
    return y

out = {}
for bound in (pad("1"), parity(4)):
    g = lc.graph(bound, runs=3)
    out[bound.name] = [sorted(map(list, g.edges)), g.graph["timed_out"], g.graph["truncated"]]
print(json.dumps(out))
"""


def test_values_that_send_the_program_into_an_endless_loop_are_given_up():
    # lc.infer runs these programs fine; the graph tries values no run receives ('' for a
    # site with min_tokens=1, an odd number for a loop that counts down by 2)
    done = subprocess.run(
        [sys.executable, "-c", LOOPING_SCRIPT],
        capture_output=True,
        text=True,
        timeout=240,  # hung for ever before
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    pad_edges, _, pad_truncated = found["pad"]
    assert pad_edges == [["input:q", "x"], ["x", "y"], ["y", "return"]] and not pad_truncated
    parity_edges, timed_out, parity_truncated = found["parity"]
    assert [["x", "double"], ["x", "y"], ["y", "return"]] == parity_edges
    given_up = {(t["site"], t["value"]) for t in timed_out}
    assert {("input:n", "5"), ("input:n", "-41")} <= given_up and not parity_truncated
    assert all(t["runs"] <= 3 for t in timed_out)


def test_the_time_budget_stops_the_analysis_and_says_so():
    @lc.program
    def slow():
        xs = []
        for _ in range(4):
            time.sleep(0.05)  # work between sites, repeated by every replay
            xs.append((yield lc.gen("x[]", LM, "q" + "".join(xs), max_tokens=1)))
        return xs

    began = time.monotonic()
    g = lc.graph(slow(), runs=4, budget_s=1.5)
    assert time.monotonic() - began < 10
    assert g.graph["truncated"] and g.graph["timed_out"] == []
    assert [n for n in g if n.startswith("x[")] == ["x[0]", "x[1]", "x[2]", "x[3]"]
    assert g.nodes["x[3]"]["seen"] == "4/4"  # every run's sites are still recorded
    assert lc.graph(slow(), runs=1, budget_s=math.inf).graph["truncated"] is False
    for bad in (0, -1.0, True, "5", math.nan):
        with pytest.raises(OptionError, match="budget_s"):
            lc.graph(slow(), budget_s=bad)


def test_values_a_site_can_never_return_are_not_tried():
    received = []

    @lc.program
    def coin():
        flip = yield lc.sample("flip", Bernoulli(0.5))
        x = yield lc.gen("x", LM, "q", min_tokens=1, max_tokens=2)
        received.append((flip, x))
        y = yield lc.gen("y", LM, "q" if flip else "q" + x, max_tokens=1)
        return y

    g = lc.graph(coin(), runs=4)
    assert {("flip", "y"), ("x", "y"), ("y", "return")} <= edges(g, "data")
    # a whole finite support is all a replay tries (as the type real runs get), and an LM
    # site of at least one token is never given ''
    assert {float(flip) for flip, _ in received} == {0.0, 1.0}
    assert all(isinstance(flip, float) for flip, _ in received)
    assert "" not in {x for _, x in received}
