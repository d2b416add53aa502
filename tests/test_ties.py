"""Top-k, top-p and greedy decoding agree with Hugging Face's warpers, ties included.

HF keeps every token tied with the k-th in top-k, and cuts top-p on the ascending cumulative
mass; ``process_logprobs`` must keep exactly the same tokens and give the same normalised
log-probabilities, row by row in one batched call.  Where a group of exactly tied tokens
straddles the top-p cut, which of them HF drops follows ``torch.sort``'s order, which is not
stable on CPU for long rows: the exact comparisons run HF with a stable sort, and a separate
check compares with the unpatched HF up to a permutation inside such a group.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lmcascade.lm.shaping import process_logprobs, shape_rows


@contextlib.contextmanager
def stable_sort():
    """``torch.sort`` made stable while HF's warpers run."""
    original = torch.sort

    def sort(*args, **kwargs):
        kwargs.setdefault("stable", True)
        return original(*args, **kwargs)

    torch.sort = sort
    try:
        yield
    finally:
        torch.sort = original


def hf_scores(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """What HF ``generate(do_sample=True)`` turns one row of scores into (same warper list
    and order: temperature, top-k, top-p, each only when it changes something)."""
    x = scores[None, :]
    if temperature != 1.0:
        x = TemperatureLogitsWarper(temperature)(None, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(top_p)(None, x)
    return x[0]


def ours(scores: torch.Tensor, params: list[tuple[float, int, float]]) -> torch.Tensor:
    temps = torch.tensor([t for t, _, _ in params], dtype=torch.float64)
    ks = torch.tensor([k for _, k, _ in params], dtype=torch.long)
    ps = torch.tensor([p for _, _, p in params], dtype=torch.float64)
    return process_logprobs(scores, temps, ks, ps)


def tied_rows(rows: int, vocab: int, kind: str, seed: int) -> torch.Tensor:
    """Log-probabilities with many exact ties: a few distinct levels, or bf16-rounded."""
    g = torch.Generator().manual_seed(seed)
    if kind == "levels":
        x = torch.randint(0, 6, (rows, vocab), generator=g).float() * 0.75
    else:  # a bf16 model's logits, read back as float32
        x = (3 * torch.randn(rows, vocab, generator=g)).to(torch.bfloat16).float()
    return torch.log_softmax(x, dim=-1)


PARAMS = [
    (t, k, p)
    for t, k, p in itertools.product(
        [1.0, 0.7, 1.6], [0, 1, 2, 3, 5, 17, 200], [1.0, 0.05, 0.3, 0.5, 0.9, 0.99]
    )
    if k or p < 1.0
]


@pytest.mark.parametrize("kind", ["levels", "bf16"])
@pytest.mark.parametrize("vocab", [7, 300, 5000])
def test_batched_rows_match_hf_exactly(kind, vocab):
    scores = tied_rows(len(PARAMS), vocab, kind, seed=vocab)
    got = ours(scores, PARAMS)
    with stable_sort():
        for i, (t, k, p) in enumerate(PARAMS):
            want = torch.log_softmax(hf_scores(scores[i], t, k, p), dim=-1)
            assert torch.equal(torch.isfinite(got[i]), torch.isfinite(want)), (t, k, p)
            assert torch.equal(got[i], want), (t, k, p)


def test_top_k_keeps_every_token_tied_with_the_kth():
    lp = torch.log(torch.tensor([[0.1, 0.3, 0.2, 0.2, 0.2]]))
    out = ours(lp, [(1.0, 2, 1.0)]).exp()[0]
    assert out.tolist() == pytest.approx([0.0, 0.3 / 0.9, 0.2 / 0.9, 0.2 / 0.9, 0.2 / 0.9])
    want = torch.isfinite(TopKLogitsWarper(2)(None, lp))[0]
    assert torch.equal(out > 0, want)


def test_top_p_tie_at_the_cut_follows_the_ascending_cumulative():
    # ascending: .2 .2 .2 .4 -> cumulative .2 .4 .6 1; drop where <= 1 - .5: two of the three
    # tied tokens go, the lower ids first (stable ascending order)
    lp = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]], dtype=torch.float64))
    out = ours(lp, [(1.0, 0, 0.5)]).exp()[0]
    assert out.tolist() == pytest.approx([0.4 / 0.6, 0.0, 0.0, 0.2 / 0.6])
    with stable_sort():
        want = torch.isfinite(TopPLogitsWarper(0.5)(None, lp))[0]
    assert torch.equal(out > 0, want)


def test_top_p_keeps_the_most_likely_token():
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    out = ours(lp, [(1.0, 0, 0.01)]).exp()[0]
    assert out.tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("kind", ["levels", "bf16"])
def test_unpatched_hf_differs_at_most_inside_a_tie_group(kind):
    vocab = 49152
    params = [(1.0, k, p) for k, p in [(0, 0.3), (0, 0.9), (50, 0.5), (0, 0.97), (2000, 0.8)]]
    scores = tied_rows(len(params), vocab, kind, seed=7)
    got = ours(scores, params)
    for i, (t, k, p) in enumerate(params):
        want = hf_scores(scores[i], t, k, p)
        mine = torch.isfinite(got[i])
        theirs = torch.isfinite(want)
        assert int(mine.sum()) == int(theirs.sum())
        assert torch.equal(scores[i][mine].sort().values, scores[i][theirs].sort().values)
        differ = mine != theirs
        if bool(differ.any()):  # only tokens tied with the lowest kept score
            assert bool((scores[i][differ] == scores[i][mine].min()).all())


@pytest.mark.parametrize("vocab", [5, 5000])
def test_greedy_takes_the_first_argmax(vocab):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randint(0, 3, (6, vocab), generator=g).float()
    x[:, vocab // 2] = 3.0
    x[:, vocab - 1] = 3.0  # a tie at the maximum
    lp = torch.log_softmax(x, dim=-1)
    params = [(0.0, k, p) for k, p in [(0, 1.0), (1, 1.0), (3, 0.5)]] * 2
    out = ours(lp, params)
    first = torch.argmax(lp, dim=-1)  # what HF greedy search picks
    assert first.tolist() == [vocab // 2] * 6
    assert torch.equal(out.argmax(dim=-1), first)
    assert bool((out.exp().max(dim=-1).values == 1.0).all())


def test_bf16_rows_match_hf():
    scores = tied_rows(len(PARAMS), 600, "bf16", seed=3).to(torch.bfloat16)
    got = ours(scores, PARAMS)
    with stable_sort():
        for i, (t, k, p) in enumerate(PARAMS):
            want = torch.log_softmax(hf_scores(scores[i], t, k, p), dim=-1)
            assert torch.equal(got[i], want), (t, k, p)


def test_min_tokens_masks_eos_before_the_warpers():
    class D:
        min_tokens, temperature, top_k, top_p = 2, 1.0, 2, 0.7

    lp = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1]] * 2))
    out = shape_rows(lp, [D(), D()], [0, 2], eos_id=0)
    x = lp.clone()
    x[0, 0] = float("-inf")  # HF's min-new-tokens processor
    with stable_sort():
        want = torch.stack([torch.log_softmax(hf_scores(r, 1.0, 2, 0.7), -1) for r in x])
    assert torch.equal(out, want)
