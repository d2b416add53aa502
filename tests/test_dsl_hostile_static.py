"""Hostile ``.lmc`` input before anything runs: reading, parsing, checking and loading.

Every source, file or argument here once gave a raw Python traceback, a silently wrong
program or an unbounded parse; each must now be a located ``DSLError`` (or load correctly).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lmcascade as lc
from lmcascade.dsl import check, parse
from lmcascade.dsl.tools import DEFAULT_TOOLS
from lmcascade.errors import DSLCheckError, DSLError, DSLSyntaxError
from programs import LM

HEAD = "program f() { return "  # 21 characters: an expression after it starts at column 22


def nest(before: str, inner: str, after: str, n: int) -> str:
    return before * n + inner + after * n


# (id, source, error class, line, col, a fragment of the message)
HOSTILE = [
    # deep syntax trees: a RecursionError in the parser, the checker or the compiler before
    ("chain 2000", HEAD + "+".join(["1"] * 2000) + " }", DSLSyntaxError, 1, 22, "2,001 levels"),
    ("brackets 2000", HEAD + nest("[", "1", "]", 2000) + " }", DSLSyntaxError, 1, 2022, "limit"),
    (
        "parenthesised chain",
        HEAD + "(" * 300 + "1" + "+1)" * 300 + " }",
        DSLSyntaxError,
        1,
        322,
        "nested",
    ),
    ("minus 5000", HEAD + "-" * 5000 + "x }", DSLSyntaxError, 1, 5022, "5,002 levels"),
    ("not 3000", HEAD + "not " * 3000 + "true }", DSLSyntaxError, 1, 12022, "limit is 200"),
    ("calls 1000", HEAD + nest("abs(", "1", ")", 1000) + " }", DSLSyntaxError, 1, 4022, "nested"),
    (
        "ifs 1000",
        "program f() {\n" + nest("if true { ", "x = 1", " }", 1000) + "\n}",
        DSLSyntaxError,
        2,
        10005,
        "1,002 levels",
    ),
    (
        "else-if 600",
        "program f(a) {\n  if a { x = 1 }" + " else if a { x = 1 }" * 600 + "\n}",
        DSLSyntaxError,
        2,
        12014,
        "603 levels",
    ),
    (
        "repeats 800",
        "program f() {\n" + nest("repeat 1 { ", "c ~ bernoulli(0.5)", " }", 800) + "\n}",
        DSLSyntaxError,
        2,
        8815,
        "803 levels",
    ),
    # numbers Python cannot hold
    ("5000-digit literal", HEAD + "9" * 5000 + " }", DSLSyntaxError, 1, 22, "5,000 digits"),
    ("1e400", HEAD + "1e400 }", DSLSyntaxError, 1, 22, "not a finite number"),
    ("float past the range", HEAD + "9" * 400 + ".5 }", DSLSyntaxError, 1, 22, "finite"),
    # size
    ("a million characters", "#" * 1_000_001, DSLSyntaxError, 0, 0, "1,000,001 characters"),
    (
        "50,000 tokens",
        HEAD + "[" + "1," * 30_000 + "1] }",
        DSLSyntaxError,
        1,
        50_016,
        "50,000 tokens",
    ),
    # characters
    ("NUL in a string", HEAD + '"a\x00b" }', DSLSyntaxError, 1, 24, "NUL"),
    ("NUL in code", "program f() {\n  x = 1\x00\n}", DSLSyntaxError, 2, 8, "NUL"),
    ("lone surrogate", HEAD + '"\udcff" }', DSLSyntaxError, 1, 23, "surrogate"),
    ("old Mac line ends", "program f() {\r  return y\r}", DSLCheckError, 2, 10, "undefined"),
    (
        "CR hides code after a comment",
        "# note\rprogram f() { return y }",
        DSLCheckError,
        2,
        22,
        "undefined",
    ),
    # names the loader cannot represent
    ("program __class__", "program __class__() { return 1 }", DSLCheckError, 1, 1, "reserved"),
    ("program __dict__", "program __dict__() { return 1 }", DSLCheckError, 1, 1, "reserved"),
    (
        "program __getattribute__",
        "\nprogram __getattribute__() { return 1 }",
        DSLCheckError,
        2,
        1,
        "reserved",
    ),
    (
        "Python keyword parameter",
        "program f(a, class) { return a }",
        DSLSyntaxError,
        1,
        14,
        "keyword",
    ),
    (
        "model declared twice",
        'model lm = "smollm2-135m"\nmodel lm = "./other"\nprogram f() { return 1 }',
        DSLCheckError,
        2,
        1,
        "declared twice",
    ),
    # nothing to run
    ("empty file", "", DSLCheckError, 1, 1, "no program"),
    ("only comments", "# a comment\n# another\n", DSLCheckError, 1, 1, "no program"),
    ("only a model", 'model lm = "smollm2-135m"\n', DSLCheckError, 1, 1, "no program"),
]


def parse_check_load(source: str):
    """parse, check and (for a source with a program body) load: the whole static pipeline."""
    module = parse(source, filename="hostile.lmc")
    check(module, models={"lm"}, tools=DEFAULT_TOOLS)
    if "{" in source:
        return lc.load(source, models={"lm": LM})
    return module


@pytest.mark.parametrize(
    ("source", "error", "line", "col", "fragment"),
    [case[1:] for case in HOSTILE],
    ids=[case[0] for case in HOSTILE],
)
def test_hostile_source_is_a_located_error(source, error, line, col, fragment):
    with pytest.raises(error) as info:
        parse_check_load(source)
    err = info.value
    assert (err.line, err.col) == (line, col), str(err)[:300]
    assert fragment in str(err)
    if line:
        assert str(err).startswith(f"hostile.lmc:{line}:{col}:")


def test_a_too_deep_tree_is_refused_by_check_too():
    """check() guards itself: a hand-built tree deeper than the limit is an error, not a
    RecursionError (parse would have refused the same tree as source)."""
    from lmcascade.dsl import ast

    value: ast.Node = ast.Num(1, 1, 1)
    for _ in range(5000):
        value = ast.Neg(1, 1, value)
    module = ast.Module(
        1, 1, "built.lmc", (), (ast.ProgramDef(1, 1, "f", (), (ast.Return(1, 1, value),)),)
    )
    with pytest.raises(DSLCheckError, match="5,002 levels"):
        check(module, models=set(), tools=DEFAULT_TOOLS)


# --- the limit is safe for everything that walks the tree --------------------------------------

D = 200  # MAX_DEPTH: a program's statements are level 1
AT_THE_LIMIT = {
    "calls": HEAD + nest("abs(", "1", ")", D - 2) + " }",
    "program calls": "program g(x) { return x }\nprogram f() { return "
    + nest("g(", "1", ")", D - 2)
    + " }",
    "chain": HEAD + "+".join(["1"] * (D - 1)) + " }",
    "lists": HEAD + nest("[", "1", "]", D - 2) + " }",
    "ifs": "program f() { x = 0 " + nest("if true { ", "x = -1", " }", D - 3) + " return x }",
    "repeats": "program f() { "
    + nest("repeat 1 { ", 'y ~ bernoulli(0.5) z = calc("1+1")', " }", D - 3)
    + " return 1 }",
}


def _with_frames_used(n: int, fn):
    """Runs ``fn`` with ``n`` more Python frames on the stack (a caller deep in its own code)."""
    return fn() if n == 0 else _with_frames_used(n - 1, fn)


@pytest.mark.parametrize("source", AT_THE_LIMIT.values(), ids=AT_THE_LIMIT.keys())
def test_every_walk_of_the_tree_runs_at_the_depth_limit(source):
    from lmcascade.dsl.compiler import site_names
    from lmcascade.dsl.parser import MAX_DEPTH, nesting
    from lmcascade.graph import from_program

    assert MAX_DEPTH == D
    module = parse(source)
    assert nesting(module)[0] == D

    def everything():
        check(module, models=set(), tools=DEFAULT_TOOLS)
        site_names(module)
        for program in module.programs:
            from_program(program)
        programs = lc.load(source)
        return lc.infer(programs.f(), method="forward", num_samples=1, seed=0)

    result = _with_frames_used(100, everything)
    assert len(result.traces) == 1
    deeper = source.replace("return x }", "return 1 }").replace("return ", "return -")
    deeper = deeper.replace("x = -1", "x = --1").replace("bernoulli(0.5)", "bernoulli(-0.5)")
    with pytest.raises(DSLSyntaxError, match="201 levels"):
        parse(deeper)


_WRAPPERS = st.sampled_from(["-", "not ", "(", "[", "abs(", "1 + ", "x * ", "if x { y = "])


@settings(max_examples=60, deadline=None)
@given(st.lists(_WRAPPERS, min_size=1, max_size=450))
def test_fuzz_nesting_gives_a_program_or_a_located_error(wrappers):
    closing = {"(": ")", "[": "]", "abs(": ")", "if x { y = ": " } return 0"}
    expr = "".join(wrappers) + "1" + "".join(closing.get(w, "") for w in reversed(wrappers))
    source = f"program f(x) {{ return {expr} }}"
    try:
        module = parse(source)
        check(module, models=set(), tools=DEFAULT_TOOLS)
    except DSLError as err:
        assert err.line >= 1 and err.col >= 1
        return
    from lmcascade.dsl.compiler import site_names

    site_names(module)


# --- which sources stay accepted --------------------------------------------------------------


def test_byte_order_mark_and_line_endings_are_read_as_text():
    module = parse("\ufeffprogram f() {\r\n  return 1\r\n}\rprogram g() { return 2 }")
    assert [p.name for p in module.programs] == ["f", "g"]
    assert (module.programs[0].body[0].line, module.programs[0].body[0].col) == (2, 3)
    assert module.programs[1].line == 4


def test_brackets_around_one_value_add_no_depth():
    programs = lc.load(HEAD + "(" * 2000 + "1" + ")" * 2000 + " }")
    assert lc.infer(programs.f(), method="enumerate").distribution() == {1: 1.0}


def test_tiny_and_huge_numbers_that_fit_are_kept():
    module = parse(HEAD + "[1e-400, 1e308, " + "9" * 4300 + ", " + "0" * 5000 + "7] }")
    items = [item.value for item in module.programs[0].body[0].value.items]
    assert items[:2] == [0.0, 1e308] and len(str(items[2])) == 4300 and items[3] == 7


def test_unicode_is_allowed_in_strings_and_located_in_names():
    programs = lc.load('program f() { return "héllo ✓" }')
    assert lc.infer(programs.f(), method="enumerate").distribution() == {"héllo ✓": 1.0}
    with pytest.raises(DSLSyntaxError) as info:
        parse("program héllo() { return 1 }")
    assert (info.value.line, info.value.col) == (1, 10)


# --- files and the arguments of lc.load --------------------------------------------------------

GOOD = "program f() { return 7 }\n"


def test_a_path_with_braces_is_a_path(tmp_path):
    path = tmp_path / "we{ird}.lmc"
    path.write_text(GOOD)
    for arg in (str(path), path):
        assert lc.infer(lc.load(arg).f(), method="enumerate").distribution() == {7: 1.0}


def test_source_and_path_keywords(tmp_path):
    (tmp_path / "a.lmc").write_text(GOOD)
    assert lc.load(path=tmp_path / "a.lmc").f
    assert lc.load(path=str(tmp_path / "a.lmc")).f
    assert lc.load(source=GOOD).f
    # a source that happens to name an existing file is still source with source=
    (tmp_path / "program f() { return 7 }").write_text("not a program")
    assert lc.load(source="program f() { return 7 }").f
    with pytest.raises(DSLError, match="exactly one"):
        lc.load(GOOD, source=GOOD)
    with pytest.raises(DSLError, match="exactly one"):
        lc.load()


def test_a_missing_lmc_path_with_braces_is_not_parsed_as_source():
    with pytest.raises(DSLError, match="no .lmc file at") as info:
        lc.load("c/we{ird}.lmc")
    assert not isinstance(info.value, DSLSyntaxError)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


BAD_FILES = [
    # (id, file bytes, message fragments, line, col)
    ("latin-1", b'program f() {\n  x = "caf\xe9"\n  return x\n}\n', ["0xe9", "offset 24"], 2, 11),
    ("utf-16", GOOD.encode("utf-16"), ["UTF-16", "offset 0"], 1, 1),
    ("a BOM and latin-1", b"\xef\xbb\xbf# \xff\n", ["0xff", "offset 5"], 1, 3),
]


@pytest.mark.parametrize(
    ("data", "fragments", "line", "col"),
    [case[1:] for case in BAD_FILES],
    ids=[case[0] for case in BAD_FILES],
)
def test_a_file_that_is_not_utf8_is_a_located_error(tmp_path, data, fragments, line, col):
    path = _write(tmp_path, "bad.lmc", data)
    with pytest.raises(DSLError) as info:
        lc.load(path)
    err = info.value
    assert (err.filename, err.line, err.col) == (str(path), line, col)
    assert "not UTF-8" in str(err) and all(f in str(err) for f in fragments), str(err)


def test_a_file_with_a_byte_order_mark_loads(tmp_path):
    path = _write(tmp_path, "bom.lmc", b"\xef\xbb\xbf" + GOOD.encode())
    assert lc.load(path).f


def test_a_folder_is_not_a_file(tmp_path):
    folder = tmp_path / "dir.lmc"
    folder.mkdir()
    with pytest.raises(DSLError, match="is a folder"):
        lc.load(folder)
    with pytest.raises(DSLError, match="is a folder"):
        lc.load(str(folder))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs file permissions")
def test_an_unreadable_file_is_a_clear_error(tmp_path):
    path = _write(tmp_path, "secret.lmc", GOOD.encode())
    path.chmod(0)
    try:
        with pytest.raises(DSLError, match="cannot read .*ermission"):
            lc.load(path)
    finally:
        path.chmod(0o644)


def test_a_huge_file_is_refused_before_it_is_read(tmp_path):
    path = _write(tmp_path, "huge.lmc", b"# " + b"x" * 10_000_000 + b"\n" + GOOD.encode())
    with pytest.raises(DSLError, match="at most 1,000,000 characters"):
        lc.load(path)


@pytest.mark.parametrize("value", [b"program f() { return 1 }", 3, 2.5, ["a.lmc"]])
def test_a_wrong_type_is_a_clear_error(value):
    with pytest.raises(DSLError, match=f"got {type(value).__name__}"):
        lc.load(value)


def test_a_reserved_program_name_never_reaches_the_namespace(tmp_path):
    path = _write(tmp_path, "n.lmc", b"program __class__() { return 1 }\n")
    with pytest.raises(DSLCheckError, match="reserved"):
        lc.load(path)


# --- model declarations: registry names, paths relative to the file, allow_paths ---------------


@pytest.fixture
def registry_calls(monkeypatch):
    """Replaces the registry's loader with one that records what it was asked to load."""
    calls: list[tuple[str, dict]] = []

    def fake_load(ref, **kwargs):
        calls.append((os.fspath(ref), kwargs))
        return LM

    monkeypatch.setattr("lmcascade.models.registry.load", fake_load)
    return calls


USES_LM = 'program f() { t ~ lm("q", max_tokens=1) return t }\n'


def _project(tmp_path: Path, decl: str, *folders: str) -> Path:
    """``tmp_path/project/prog.lmc`` declaring ``decl``, with the given model folders."""
    project = tmp_path / "project"
    project.mkdir()
    for name in folders:
        (project / name).mkdir(parents=True)
    path = project / "prog.lmc"
    path.write_text(decl + "\n" + USES_LM)
    return path


def test_a_model_path_is_relative_to_the_lmc_file(tmp_path, monkeypatch, registry_calls):
    path = _project(tmp_path, 'model lm = "./weights"', "weights")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    lc.load(path)
    assert registry_calls == [
        (
            str(tmp_path / "project" / "weights"),
            {"device": "auto", "allow_paths": True, "backend": "transformers"},
        )
    ]


def test_a_nested_and_a_parent_model_path(tmp_path, monkeypatch, registry_calls):
    path = _project(tmp_path, 'model lm = "models/tiny"\nmodel up = "../shared"', "models/tiny")
    (tmp_path / "shared").mkdir()
    monkeypatch.chdir(tmp_path)
    lc.load(os.path.relpath(path))
    assert sorted(call[0] for call in registry_calls) == [
        str(tmp_path / "project" / "models" / "tiny"),
        str(tmp_path / "shared"),
    ]


def test_a_registered_name_is_loaded_from_the_registry_only(tmp_path, registry_calls):
    path = _project(tmp_path, 'model lm = "smollm2-135m"', "smollm2-135m")
    lc.load(path)
    assert registry_calls == [
        ("smollm2-135m", {"device": "auto", "allow_paths": False, "backend": "transformers"})
    ]


def test_the_same_model_declared_under_two_names_loads_once(tmp_path, registry_calls):
    path = _project(tmp_path, 'model lm = "./w"\nmodel other = "./w/"', "w")
    lc.load(path)
    assert len(registry_calls) == 1


def test_a_bare_unknown_name_is_not_a_folder(tmp_path, monkeypatch, registry_calls):
    path = _project(tmp_path, 'model lm = "weights"', "weights")
    monkeypatch.chdir(path.parent)
    with pytest.raises(DSLCheckError, match=r'not a registered model.*write "\./weights"') as info:
        lc.load(path)
    assert (info.value.line, info.value.col) == (1, 1)
    assert registry_calls == []


def test_a_missing_model_folder_names_the_resolved_path(tmp_path, registry_calls):
    path = _project(tmp_path, 'model lm = "./nope"')
    with pytest.raises(DSLCheckError, match="no model folder at .*project.nope.*relative to"):
        lc.load(path)
    assert registry_calls == []


def test_allow_paths_false_refuses_a_model_path_at_its_declaration(tmp_path, registry_calls):
    path = _project(tmp_path, '# from a stranger\nmodel lm = "../../home/me/model"')
    with pytest.raises(DSLCheckError) as info:
        lc.load(path, allow_paths=False)
    err = info.value
    assert (err.filename, err.line, err.col) == (str(path), 2, 1)
    assert "allow_paths" in str(err) and "--registry-only" in str(err)
    assert registry_calls == []


def test_allow_paths_false_still_loads_registered_and_bound_models(tmp_path, registry_calls):
    path = _project(tmp_path, 'model lm = "./w"\nmodel reg = "smollm2-135m"', "w")
    lc.load(path, allow_paths=False, models={"lm": LM})
    assert registry_calls == [
        ("smollm2-135m", {"device": "auto", "allow_paths": False, "backend": "transformers"})
    ]


def test_a_real_model_folder_next_to_the_file_loads_and_runs(tmp_path, monkeypatch):
    from tiny_hf import tiny_hf_model, tiny_tokenizer

    path = _project(tmp_path, 'model lm = "./tiny"')
    path.write_text(path.read_text().replace('lm("q"', 'lm("Q:"'))  # in the tiny vocabulary
    tiny_hf_model(0).save_pretrained(path.parent / "tiny")
    tiny_tokenizer().save_pretrained(path.parent / "tiny")
    monkeypatch.chdir(tmp_path)
    programs = lc.load(path)
    result = lc.infer(programs.f(), method="forward", num_samples=2, seed=0)
    assert len(result.traces) == 2
    with pytest.raises(DSLCheckError, match="allow_paths"):
        lc.load(path, allow_paths=False)


def test_limits_are_passed_to_the_interpreter():
    from lmcascade.dsl.limits import Limits

    programs = lc.load(
        source="program f() { x = 0 repeat 50 { x = x + 1 } return x }",
        limits=Limits(steps=20),
    )
    with pytest.raises(lc.errors.DSLRuntimeError, match="steps"):
        lc.infer(programs.f(), method="forward", num_samples=1, seed=0)
    with pytest.raises(DSLError, match="Limits"):
        lc.load(source=GOOD, limits={"steps": 20})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
