"""ToyLM, the LM distribution's generation rules, and on-device token processing."""

import math

import pytest
import torch

import lmcascade as lc
from lmcascade.errors import ModelError, SiteError, TokenizationError, VocabularyError
from lmcascade.lm import Detokenizer, LMRun
from lmcascade.lm.shaping import process_logprobs
from lmcascade.lm.step import run_to_end
from lmcascade.models import ToyLM
from lmcascade.samplers.ancestral import BLOCK, draw


def const(*p):
    return ToyLM(["ab", "a", "b", "c", "<eos>"], lambda ctx: [math.log(x) for x in p])


def test_toy_tokenizer_longest_match_and_errors():
    lm = const(0.2, 0.2, 0.2, 0.2, 0.2)
    assert lm.encode("abab") == [0, 0] and lm.encode("aab") == [1, 0]
    assert lm.decode([0, 3, 4]) == "abc"
    with pytest.raises(TokenizationError, match="character 1"):
        lm.encode("a?b")
    with pytest.raises(TokenizationError):
        lm.encode("<eos>")  # eos never matches text


@pytest.mark.parametrize(
    ("vocab", "fragment"),
    [
        ([], "empty"),
        (["a"], "no eos"),
        (["a", "a", "<eos>"], "duplicate"),
        (["", "<eos>"], "non-empty"),
    ],
)
def test_bad_vocab(vocab, fragment):
    with pytest.raises(VocabularyError, match=fragment):
        ToyLM(vocab, lambda ctx: [0.0] * len(vocab))


def test_bad_next_logprobs():
    lm = ToyLM(["a", "<eos>"], lambda ctx: [0.0])
    with pytest.raises(ModelError, match="must return 2 numbers, got 1"):
        lc.LM(lm, "a").sample(seed=0)
    lm = ToyLM(["a", "<eos>"], lambda ctx: [-math.inf, -math.inf])
    with pytest.raises(ModelError, match="forbids every"):
        lc.LM(lm, "a").sample(seed=0)


def test_stop_string_spanning_tokens_cuts_before_first_occurrence():
    # Deterministic model: a, b, c, a, b, ... never eos.
    order = [1, 2, 3]
    lm = ToyLM(
        ["ab", "a", "b", "c", "<eos>"],
        lambda ctx: [0.0 if i == order[len(ctx) % 3] else -math.inf for i in range(5)],
    )
    dist = lc.LM(lm, "", max_tokens=10, stop=["ca", "bc"])
    run = LMRun(dist)
    run_to_end([run], {})
    assert run.value == "a" and run.end == "stop" and len(run.tokens) == 3  # "abc" holds "bc"
    assert lc.LM(lm, "", max_tokens=4).sample(seed=0) == "abca"
    assert lc.LM(lm, "", max_tokens=10, stop="cab").sample(seed=0) == "ab"


def test_log_prob_of_text_containing_stop_is_impossible():
    lm = const(0.1, 0.3, 0.3, 0.1, 0.2)
    assert lc.LM(lm, "", max_tokens=4, stop="c").log_prob("acb") == -math.inf
    assert lc.LM(lm, "", max_tokens=4, stop="c").log_prob("a") == pytest.approx(
        math.log(0.3 * 0.2 + 0.3 * 0.1)
    )  # a then eos, or a then the stop token c


def test_lm_validation():
    lm = const(0.2, 0.2, 0.2, 0.2, 0.2)
    for kwargs, fragment in [
        ({"max_tokens": -1}, "max_tokens"),
        ({"stop": [""]}, "stop"),
        ({"temperature": -1}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
    ]:
        with pytest.raises(SiteError, match=fragment):
            lc.LM(lm, "a", **kwargs)
    with pytest.raises(SiteError, match="LanguageModel"):
        lc.LM("gpt", "a")
    assert "max_tokens=3" in repr(lc.LM(lm, "a", max_tokens=3))


def test_detokenizer_is_incremental():
    lm = const(0.2, 0.2, 0.2, 0.2, 0.2)
    d = Detokenizer(lm.tokenizer)
    pieces = [d.push(t) for t in [0, 3, 1]]
    assert pieces == ["ab", "c", "a"] and d.text == "abca"
    twin = d.copy()
    twin.push(2)
    assert d.text == "abca" and twin.text == "abcab"


def test_process_logprobs_rowwise():
    lp = torch.log(
        torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.5, 0.3, 0.2]], dtype=torch.float64)
    )
    out = process_logprobs(
        lp, torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0, 0, 2]), torch.tensor([1.0, 0.5, 1.0])
    ).exp()
    assert out[0].tolist() == [1.0, 0.0, 0.0]  # greedy
    assert out[1].tolist() == [1.0, 0.0, 0.0]  # top_p .5 keeps only the first token
    assert out[2].tolist() == pytest.approx([0.625, 0.375, 0.0])  # top_k 2


def test_draw_is_seeded_and_on_the_row_distribution():
    lp = torch.log(torch.tensor([[0.0, 1.0, 0.0]] * 4 + [[0.5, 0.5, 0.0]] * 4000))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = draw(lp, g1), draw(lp, g2)
    assert torch.equal(a, b) and a[:4].tolist() == [1, 1, 1, 1]
    frac = (a[4:] == 0).double().mean().item()
    assert abs(frac - 0.5) < 4 * math.sqrt(0.25 / 4000)
    assert not (a == 2).any()


@pytest.mark.parametrize("offset", [3.0, 100.0, -110.0])
def test_draw_over_several_blocks_is_on_the_row_distribution(offset):
    """draw locates a row's uniform among blocks of tokens, then inside one: mass in the
    first, second and last (partial) blocks, on block edges, zeros elsewhere, unnormalised
    by ``offset`` (beyond float32's exp range either way).  Each of the 5 frequencies of
    20000 draws is within 4.5 standard errors (false alarm under 4e-5 per case); an error of
    0.015 in any probability is caught."""
    v = 2 * BLOCK + 37
    p = torch.zeros(v, dtype=torch.float64)
    where = [0, BLOCK - 1, BLOCK, BLOCK + 44, v - 1]
    p[where] = torch.tensor([0.1, 0.2, 0.05, 0.25, 0.4], dtype=torch.float64)
    lp = (p.log() + offset).float().expand(20000, v)
    a = draw(lp, torch.Generator().manual_seed(5))
    counts = torch.bincount(a, minlength=v).double()
    assert counts.sum() == 20000 and counts[p == 0].sum() == 0
    se = (p * (1 - p) / 20000).sqrt()
    assert ((counts / 20000 - p).abs() <= 4.5 * se)[where].all(), counts[where] / 20000
    last = torch.full((3, v), float("-inf"))
    last[:, v - 1] = offset
    assert draw(last, None).tolist() == [v - 1] * 3
    broken = lp[:4].clone()
    broken[:, 10] = float("nan")
    assert draw(broken, None).lt(v).all()  # garbage in, but never an index out of range
