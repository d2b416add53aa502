"""Constraints refuse what they cannot enforce, accept redundant anchors, and bound their
compile time; an impossible constraint is named when every trace fails."""

import math

import pytest

import lmcascade as lc
from lmcascade import constraints
from lmcascade.errors import AllWeightsZeroError, SiteError
from lmcascade.models import ToyLM

LM = ToyLM(["1", "2", "a", "b", "<eos>"], lambda ctx: [0.0, -0.5, -1.0, -1.5, -1.0])


@pytest.mark.parametrize(
    "schema, keyword, where",
    [
        ({"type": "integer", "minimum": 5}, "minimum", "/minimum"),
        (
            {"type": "array", "items": {"type": "integer", "maximum": 3}},
            "maximum",
            "/items/maximum",
        ),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems", ""),
        (
            {"type": "object", "properties": {"n": {"type": "number", "multipleOf": 2}}},
            "multipleOf",
            "/properties/n/multipleOf",
        ),
        ({"anyOf": [{"type": "integer", "exclusiveMinimum": 0}]}, "exclusiveMinimum", "/anyOf/0"),
    ],
)
def test_json_schema_refuses_keywords_it_cannot_enforce(schema, keyword, where):
    """Before, these were silently ignored: `minimum: 5` let the model write 1."""
    with pytest.raises(SiteError, match=f"keyword {keyword!r} \\(at {where}"):
        constraints.json_schema(schema)


def test_json_schema_keeps_property_names_and_data_that_look_like_keywords():
    named = {
        "type": "object",
        "properties": {"minimum": {"type": "integer"}},
        "required": ["minimum"],
    }
    assert "minimum" in constraints.json_schema(named).pattern
    assert constraints.json_schema({"enum": [{"maximum": 1}]}).pattern


def test_json_schema_enforces_what_it_accepts():
    """A schema the compiler does enforce: every enumerated text is valid (exact)."""

    @lc.program
    def pick():
        text = yield lc.gen(
            "x", LM, "1", max_tokens=3, constraint=constraints.json_schema({"enum": [1, 12, 21]})
        )
        return text

    dist = lc.infer(pick(), method="enumerate").distribution()
    assert set(dist) == {"1", "12", "21"} and math.isclose(sum(dist.values()), 1.0)


def _exact(constraint):
    @lc.program
    def digits():
        text = yield lc.gen("x", LM, "1", max_tokens=3, constraint=constraint)
        return text

    return lc.infer(digits(), method="enumerate").distribution()


def test_anchors_are_redundant_not_errors():
    """A regex constraint is a full match: ^ and $ at the ends change nothing."""
    plain = _exact(constraints.regex("1[12]*"))
    assert _exact(constraints.regex("^1[12]*$")) == plain
    assert constraints.regex(r"a\$").pattern == r"a\$"  # an escaped dollar is kept
    with pytest.raises(SiteError, match="besides its anchors"):
        constraints.regex("^$")


def test_compile_time_is_bounded(monkeypatch):
    """An automaton that grows exponentially is refused after COMPILE_TIMEOUT_S, with advice,
    instead of compiling for hours."""
    monkeypatch.setattr(constraints, "COMPILE_TIMEOUT_S", 0.0)

    @lc.program
    def explode():
        text = yield lc.gen(
            "x", LM, "1", max_tokens=2, constraint=constraints.regex("(a|b)*a(a|b){15}")
        )
        return text

    with pytest.raises(SiteError, match="took more than 0 s.*COMPILE_TIMEOUT_S"):
        lc.infer(explode(), method="forward", num_samples=1, seed=0)


def test_an_impossible_constraint_is_named_not_called_a_condition():
    @lc.program
    def short():
        text = yield lc.gen("x", LM, "1", max_tokens=1, constraint=constraints.regex("ab+"))
        return text

    with pytest.raises(AllWeightsZeroError) as caught:
        lc.infer(short(), method="forward", num_samples=3, seed=0)
    message = str(caught.value)
    assert "its constraint regex('ab+') could not be met (within max_tokens=1" in message
    assert "condition" not in message


def test_regex_objects_with_one_pattern_share_their_automaton(monkeypatch):
    """A program that builds regex(p) afresh for every input compiles p once per model."""
    compiled = []
    real = constraints.compile_index

    def counting(*args):
        compiled.append(args[1])
        return real(*args)

    monkeypatch.setattr(constraints, "compile_index", counting)
    model = ToyLM(["1", "2", "<eos>"], lambda ctx: [0.0, 0.0, 0.0])
    first, second = constraints.regex("[12]+2"), constraints.regex("[12]+2")
    first.start(model)
    second.start(model)
    assert len(compiled) == 1 and first.cache(model) is second.cache(model)
    constraints.regex("[12]+1").start(model)
    assert len(compiled) == 2
