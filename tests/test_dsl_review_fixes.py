"""Regressions from a review of the text DSL's instruct constructs: the kind checker and
``for`` loops, the time ``match`` may take in one run, a failing ``potential=`` tool, regex
literals checked before the run, a misplaced ``try``, unclear model-option errors, and
``calc``'s digit limit under ``try``."""

from __future__ import annotations

import pytest

import lmcascade as lc
from lmcascade.errors import DSLCheckError
from lmcascade.models import ToyLM

TOY = ToyLM(["1", "2", "a", " ", "<eos>"], lambda ctx: [0.0, 0.0, 0.0, -0.5, -1.0])


def load(source: str, **kwargs):
    kwargs.setdefault("models", {"lm": TOY})
    return lc.load(source=source, **kwargs)


def forward(bound, **options):
    return lc.infer(bound, method="forward", num_samples=1, seed=0, **options)


# --- 1. a for loop's own variable after the loop --------------------------------------------


@pytest.mark.parametrize(
    ("body", "value"),
    [
        ('c = "z" for c in [1, 2] { x = 0 } return c == 2', True),
        ('c = 1 for c in "ab" { x = 0 } return c == "b"', True),
        ('c = 1 for c in "" { x = 0 } return c == 1', True),  # no iteration: the old value
        ('c = 1 for c in "ab" { if c == "a" { x = 0 } } return c', "b"),  # text inside
        ('c = "z" for d in [1] { for c in [1, 2] { x = 0 } if c == 2 { } } return c', 2),
    ],
)
def test_a_for_variable_after_its_loop_holds_its_last_item(body, value):
    assert forward(load(f"program f() {{ {body} }}").f()).values == [value]


def test_a_for_variable_over_text_is_still_text_inside_its_loop():
    with pytest.raises(DSLCheckError, match=r"`==` compares c \(text\) with a number"):
        load('program f() { c = 1 for c in "ab" { if c == 1 { } } return c }')
