"""The IR graph and the command line, through the real entry point."""

import subprocess
import sys
from pathlib import Path

import lmcascade as lc
from lmcascade.dsl import parse
from lmcascade.graph import from_program, to_dot, to_mermaid
from programs import LM

ROOT = Path(__file__).resolve().parents[1]
TOUR = ROOT / "examples" / "lmc" / "grammar_tour.lmc"
VERIFY = ROOT / "examples" / "lmc" / "verify.lmc"


def cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "lmcascade.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_golden_graph_of_the_tour():
    module = parse(TOUR.read_text(), filename="grammar_tour.lmc")
    g = from_program(module.programs[0], {"lm"})
    kinds = sorted(d["kind"] for _, d in g.nodes(data=True))
    assert kinds.count("sample") == 3 and kinds.count("input") == 2
    for kind in (
        "assign",
        "call",
        "if",
        "for",
        "repeat",
        "observe",
        "return",
        "factor",
        "condition",
    ):
        assert kind in kinds, kind
    thought = next(n for n, d in g.nodes(data=True) if d.get("label") == "thought ~ lm")
    assert g.nodes[thought]["distribution"] == "LM" and g.nodes[thought]["line"] == 5
    assert ("input:question", thought) in g.edges
    assert any(a == thought and g.nodes[b]["kind"] == "observe" for a, b in g.edges)
    assert any(
        g.nodes[a]["kind"] == "for"
        and g.nodes[b]["kind"] == "sample"
        and g.edges[a, b]["kind"] == "contains"
        for a, b in g.edges
    )
    assert to_dot(g).startswith('digraph "solve"') and "flowchart TD" in to_mermaid(g)


def test_graph_of_a_python_program_from_a_trace():
    @lc.program
    def two():
        x = yield lc.gen("x", LM, "q", max_tokens=2)
        y = yield lc.gen("y", LM, "q" + x + ":", max_tokens=2)
        return x + y

    g = lc.graph(two())
    assert list(g.nodes)[:2] == ["x", "y"] and g.nodes["y"]["distribution"] == "LM"


def test_check_exit_codes(tmp_path):
    ok = cli("check", TOUR)
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad = tmp_path / "bad.lmc"
    bad.write_text("program f() {\n  x = y\n}\n")
    out = cli("check", bad)
    assert out.returncode == 1
    assert f"{bad}:2:7: undefined variable 'y'" in out.stderr and "^" in out.stderr
    syntax = tmp_path / "syntax.lmc"
    syntax.write_text("program f( {")
    assert cli("check", syntax).returncode == 1


def test_graph_writes_dot_and_mermaid(tmp_path):
    for name in ("g.dot", "g.mmd"):
        out = cli("graph", TOUR, "-o", tmp_path / name)
        assert out.returncode == 0, out.stderr
        text = (tmp_path / name).read_text()
        assert ("digraph" in text) if name.endswith("dot") else text.startswith("flowchart")
    assert cli("graph", TOUR, "-o", tmp_path / "g.txt").returncode == 1


def test_run_on_the_default_model():
    out = cli(
        "run",
        VERIFY,
        "--input",
        "a=17",
        "--input",
        "b=25",
        "--method",
        "smc",
        "--particles",
        "4",
        "--seed",
        "0",
    )
    assert out.returncode == 0, out.stderr
    assert "method 'smc'" in out.stdout and "log evidence" in out.stdout
    js = cli(
        "run",
        VERIFY,
        "--input",
        "a=1",
        "--input",
        "b=2",
        "--method",
        "forward",
        "--particles",
        "2",
        "--seed",
        "0",
        "--json",
    )
    assert js.returncode == 0 and '"method": "forward"' in js.stdout


def test_help_everywhere():
    for args in (
        ["--help"],
        ["run", "--help"],
        ["check", "--help"],
        ["graph", "--help"],
        ["models", "--help"],
    ):
        out = cli(*args)
        assert out.returncode == 0 and "usage" in out.stdout.lower()


INPUTS = {
    "grammar_tour.lmc": {"question": "What is 2 + 2?", "n": 2},
    "verify.lmc": {"a": 2, "b": 3},
}


def test_every_example_program_parses_checks_graphs_and_runs():
    for path in sorted((ROOT / "examples" / "lmc").glob("*.lmc")):
        module = parse(path.read_text(), filename=path.name)
        lc.dsl.check(
            module, models={m.name for m in module.models}, tools=lc.dsl.tools.DEFAULT_TOOLS
        )
        g = from_program(module.programs[0], {m.name for m in module.models})
        assert any(d["kind"] == "sample" for _, d in g.nodes(data=True))
        programs = lc.load(path)
        bound = getattr(programs, module.programs[0].name)(**INPUTS[path.name])
        r = lc.infer(bound, method="forward", num_samples=2, seed=0)
        assert len(r.values) == 2


def test_svg_needs_graphviz_or_says_so(tmp_path):
    import shutil

    out = cli("graph", TOUR, "-o", tmp_path / "g.svg")
    if shutil.which("dot"):
        assert out.returncode == 0
    else:
        assert out.returncode == 1 and "Graphviz" in out.stderr
