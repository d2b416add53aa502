"""LMRun checkpoint/restore: rolling a run back equals a fresh run fed the same tokens."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_hf import tiny_lm

import lmcascade as lc
from lmcascade.errors import SiteError
from lmcascade.lm import LMRun
from lmcascade.models import ToyLM

VOCAB = ["a", "b", "ab", " ", "x y", "c", "<eos>"]
LM = ToyLM(VOCAB, lambda ctx: [0.1 * ((len(ctx) + i) % 3) for i in range(len(VOCAB))])

DISTS = {
    "plain": dict(max_tokens=12),
    "stops": dict(max_tokens=12, stop=["ba", "c c"]),
    "words": dict(max_tokens=12, constraint=lc.constraints.max_word_length(3)),
    "regex": dict(max_tokens=12, constraint=lc.constraints.regex(r"[ab ]*(x y)?[abc ]*")),
    "potential": dict(max_tokens=12, potential=lambda text: -0.25 * text.count("a")),
}


def state(run: LMRun) -> tuple:
    """Everything observable about a run (and its model context's ids)."""
    return (
        list(run.tokens),
        run.text,
        round(run.log_prob, 12),
        round(run.log_q, 12),
        round(run.twist, 12),
        run.cstate,
        run.done,
        run.end,
        run.value,
        list(run.token_log_probs),
        list(run.token_log_qs),
        list(run.ctx.ids) if not run.done else None,
    )


def feed(run: LMRun, tokens, offset: int = 0) -> None:
    for i, tok in enumerate(tokens):
        if run.done:
            return
        run.feed(tok, -0.5 - 0.01 * (i + offset), -0.7 - 0.01 * (i + offset))


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(sorted(DISTS)),
    before=st.lists(st.integers(0, len(VOCAB) - 2), max_size=6),
    after=st.lists(st.integers(0, len(VOCAB) - 1), max_size=8),
    again=st.lists(st.integers(0, len(VOCAB) - 1), max_size=8),
)
def test_restore_equals_a_fresh_run(kind, before, after, again):
    dist = lc.LM(LM, "ab", **DISTS[kind])
    run = LMRun(dist)
    feed(run, before)
    if run.done:
        return
    mark = run.checkpoint()
    fresh = LMRun(dist)
    feed(fresh, before)
    assert state(run) == state(fresh)
    feed(run, after, offset=len(before))  # may finish the run (and release its context)
    run.restore(mark)
    assert state(run) == state(fresh)
    feed(run, again, offset=len(before))  # and both continue identically
    feed(fresh, again, offset=len(before))
    assert state(run) == state(fresh)


def test_checkpoint_of_a_finished_run_is_an_error():
    run = LMRun(lc.LM(LM, "ab", max_tokens=1))
    run.feed(0, -1.0)
    with pytest.raises(SiteError, match="finished"):
        run.checkpoint()


def test_a_branch_restores_to_its_parents_checkpoint():
    dist = lc.LM(LM, "ab", max_tokens=10, stop="c c")
    run = LMRun(dist)
    feed(run, [0, 3])
    mark = run.checkpoint()
    twin = run.branch(LM.fork(run.ctx))
    feed(twin, [5, 3, 5])  # the stop ends the twin
    assert twin.done and twin.end == "stop"
    twin.restore(mark)
    assert state(twin) == state(run)


def test_restored_context_scores_like_a_fresh_one_on_a_transformer():
    lm = tiny_lm(seed=3)
    dist = lc.LM(lm, "Q:", max_tokens=8)
    run = LMRun(dist)
    gen = {lm.device: torch.Generator().manual_seed(0)}
    from lmcascade.lm.step import step_runs

    for _ in range(2):
        step_runs([run], gen)
    mark = run.checkpoint()
    for _ in range(3):
        step_runs([run], gen)
    run.restore(mark)
    got = lm.next_logprobs([run.ctx])[0]
    want = lm.next_logprobs([lm.open(list(run.ctx.ids))])[0]
    assert (got - want).abs().max().item() < 1e-4
    assert math.isfinite(run.log_prob)
