"""``text_score``: exact log P(value == text) with stop strings, against exact enumeration.

The oracle is ``lc.infer(one_site_program, method="enumerate")``, which walks every token
path the sampler can take.  The scorer counts the paths that spell the text with
``model.encode(text)`` (possibly ending inside a token that also carries what follows the
text); other spellings of the text are out of its scope.  So either every value has a single
spelling in the vocabulary (single-character tokens, and multi-character tokens that can
only occur in the ending: they contain a stop string), and the full enumerated distribution
is the oracle — its values then sum to one — or the oracle keeps only the enumerated paths
that follow the text's spelling (``follows_spelling``), said where used.

Every comparison here fails with the previous scorer (the text's tokens, then eos, then
nothing, then each stop string's own tokens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

import lmcascade as lc
from lmcascade.errors import ModelNotFoundError, TokenizationError
from lmcascade.lm.text_score import TextScore, score_texts, text_log_prob
from lmcascade.models import ToyLM
from lmcascade.models.base import LanguageModel


def scores(n: int, seed: int, scale: float = 2.0):
    """Next-token scores that depend on the whole context (deterministic pseudo-random)."""

    def fn(ctx: tuple[int, ...]) -> list[float]:
        return [((hash((seed, *ctx, i)) % 997) / 997.0 - 0.5) * 2 * scale for i in range(n)]

    return fn


def noisy(vocab: Sequence[str], seed: int = 0) -> ToyLM:
    return ToyLM(list(vocab), scores(len(vocab), seed), name=f"noisy{seed}")


def uniform(vocab: Sequence[str]) -> ToyLM:
    return ToyLM(list(vocab), lambda ctx: [0.0] * len(vocab), name="uniform")


def enumerate_site(dist: lc.LM):
    @lc.program
    def one_site():
        x = yield lc.sample("x", dist)
        return x

    return lc.infer(one_site(), method="enumerate", max_traces=200_000)


def enumerated(dist: lc.LM) -> dict[str, float]:
    """P(value) for every value, from the enumerated distribution (times the evidence,
    which is the constraint's mass when there is one)."""
    r = enumerate_site(dist)
    z = math.exp(r.log_evidence)
    return {v: p * z for v, p in r.distribution().items()}


def follows_spelling(model, path: Sequence[int], ids: Sequence[int], text: str) -> bool:
    """Whether a token path starts with the text's tokens ``ids``, or with a prefix of them
    and then a token that finishes the text and goes on."""
    pieces = model.token_bytes()
    want = text.encode("utf-8")
    done = 0
    for k, tok in enumerate(path):
        if k < len(ids) and tok == ids[k]:
            done += len(pieces[tok] or b"")
            continue
        rest = want[done:]
        piece = pieces[tok] or b""
        return k == len(ids) or (piece.startswith(rest) and len(piece) > len(rest))
    return len(path) >= len(ids)


def enumerated_spelled(dist: lc.LM) -> dict[str, float]:
    """P(value, the path follows the value's spelling) for every value that tokenises."""
    r = enumerate_site(dist)
    out: dict[str, float] = {}
    for trace, lw in zip(r.traces, r.log_weights, strict=True):
        if lw == -math.inf:
            continue
        site = trace["x"]
        value = site.value
        try:
            ids = dist.model.encode(value)
        except TokenizationError:
            continue
        path = [t for t in site.token_ids if t != dist.model.eos_id]
        if follows_spelling(dist.model, path, ids, value):
            out[value] = out.get(value, 0.0) + math.exp(lw)
    return out


def check_every_value(dist: lc.LM, want: dict[str, float], extra: Sequence[str] = ()) -> None:
    """All values (and a few impossible ones) scored in one batch match ``want``."""
    texts = list(want) + [t for t in extra if t not in want]
    reqs = [TextScore(dist, t) for t in texts]
    stats: dict = {}
    score_texts(reqs, stats)
    for r in reqs:
        got = math.exp(r.log_prob)
        assert got == pytest.approx(want.get(r.text, 0.0), abs=1e-9), (r.text, want.get(r.text))
    # one teacher-forced pass for all the texts, then one per extra depth
    assert stats["model_calls"] <= dist.max_tokens + 1


def check_normalised(dist: lc.LM) -> dict[str, float]:
    want = enumerated(dist)
    check_every_value(dist, want)
    total = math.fsum(math.exp(text_log_prob(dist, t)) for t in want)
    assert total == pytest.approx(math.exp(enumerate_site(dist).log_evidence), abs=1e-9)
    return want


# -- the reported case ---------------------------------------------------------------------


def test_reported_case_single_char_stop():
    lm = uniform(["a", "b", "bb", "<eos>"])
    d = lc.LM(lm, "a", max_tokens=3, stop="b")
    want = enumerated(d)
    assert want[""] == pytest.approx(0.75) and want["a"] == pytest.approx(0.1875)
    assert math.exp(text_log_prob(d, "")) == pytest.approx(0.75, abs=1e-12)
    assert math.exp(text_log_prob(d, "a")) == pytest.approx(0.1875, abs=1e-12)
    check_every_value(d, want, extra=["b", "ab", "aaaa"])
    assert math.fsum(want.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("max_tokens", [1, 2, 4])
def test_single_char_stop_ended_by_longer_tokens(max_tokens):
    # values are runs of x and y; " ", " x", "  " and "y " all end on the stop " "
    lm = noisy(["x", "y", " ", " x", "  ", "y ", "<eos>"], seed=1)
    check_normalised(lc.LM(lm, "x", max_tokens=max_tokens, stop=" "))


@pytest.mark.parametrize("max_tokens", [2, 3, 4])
def test_two_char_stop_spanning_two_tokens(max_tokens):
    # "\n" then "\n" spans the stop; a text ending in "\n" then "\n" is the shorter value
    lm = noisy(["x", "y", "\n", "\n\n", "<eos>"], seed=2)
    d = lc.LM(lm, "", max_tokens=max_tokens, stop="\n\n")
    want = check_normalised(d)
    assert "x\n" in want and math.exp(text_log_prob(d, "x\n\n")) == 0.0


def test_token_that_finishes_the_text_and_starts_the_stop():
    # "y" then "x\n": the value is "yx", though "x\n" is not one of the text's tokens
    lm = noisy(["x", "y", "\n", "x\n", "<eos>"], seed=3)
    want = check_normalised(lc.LM(lm, "", max_tokens=3, stop="\n"))
    assert want["yx"] > 0


@pytest.mark.parametrize("seed", [4, 5])
def test_several_overlapping_stops(seed):
    # values are a..ac..c; "a"+"b" and "c"+"a" span stops; after a text ending in "c" an
    # "a" (or "ab") completes "ca" that starts inside the text: a shorter value
    lm = noisy(["a", "c", "b", "ab", "bc", "ca", "<eos>"], seed=seed)
    d = lc.LM(lm, "", max_tokens=4, stop=["ab", "b", "ca"])
    check_normalised(d)


def test_stop_longer_than_two_tokens():
    # "--" has two spellings: the oracle keeps the paths that follow the text's spelling
    lm = noisy(["x", "-", "--", "<eos>"], seed=6)
    d = lc.LM(lm, "", max_tokens=4, stop="---")
    want = enumerated_spelled(d)
    assert want["--"] < enumerated(d)["--"]
    check_every_value(d, want)


def test_min_tokens():
    lm = noisy(["x", "y", "\n", "\n\n", "<eos>"], seed=7)
    check_normalised(lc.LM(lm, "", max_tokens=3, min_tokens=2, stop="\n\n"))


@pytest.mark.parametrize(
    "params",
    [
        {"top_k": 2},
        {"top_k": 3, "temperature": 0.7},
        {"top_p": 0.7},
        {"temperature": 1.8, "top_p": 0.9},
    ],
)
def test_decoding_parameters(params):
    lm = noisy(["a", "c", "b", "ab", "bc", "<eos>"], seed=8)
    check_normalised(lc.LM(lm, "", max_tokens=3, stop=["ab", "b"], **params))


def test_greedy():
    # greedy: "a", then "bc" (ties broken towards the first token), which ends on the stop
    best = {(): [1.0, 1.0, 0.0, 0.0, 0.0, 0.0], (0,): [0.0, 0.0, 0.0, 0.0, 2.0, 2.0]}
    lm = ToyLM(["a", "c", "b", "ab", "bc", "<eos>"], lambda ctx: best.get(ctx, [0.0] * 6))
    d = lc.LM(lm, "", max_tokens=3, stop="b", temperature=0.0)
    assert check_normalised(d) == pytest.approx({"a": 1.0})


def test_top_k_ties():
    # a uniform model: every token ties with the k-th, so top-k keeps them all
    lm = uniform(["a", "b", "bb", "<eos>"])
    want = check_normalised(lc.LM(lm, "", max_tokens=3, stop="b", top_k=2))
    assert want[""] == pytest.approx(0.75)


@pytest.mark.parametrize(
    "constraint",
    [
        lc.constraints.regex(r"a+b+"),  # the stop token itself completes the match
        lc.constraints.regex(r"[ab]*"),  # matches the empty text
        lc.constraints.forbid("bb"),
        lc.constraints.predicate(lambda t: t.count("a") <= 1, lambda t: t.count("a") == 1),
    ],
    ids=repr,
)
def test_constraints(constraint):
    lm = noisy(["a", "b", "bb", "ba", "<eos>"], seed=9)
    check_normalised(lc.LM(lm, "", max_tokens=3, stop="b", constraint=constraint))


def test_constraint_with_a_stop_spanning_tokens():
    lm = noisy(["x", "y", "\n", "\n\n", "<eos>"], seed=10)
    d = lc.LM(lm, "", max_tokens=4, stop="\n\n", constraint=lc.constraints.regex(r"x*y?\n*"))
    check_normalised(d)


def test_impossible_texts_and_batches_over_distributions():
    lm = noisy(["a", "b", "bb", "<eos>"], seed=11)
    d1 = lc.LM(lm, "", max_tokens=2, stop="b")
    d2 = lc.LM(lm, "a", max_tokens=3, stop=["b", "aa"])
    w1, w2 = enumerated(d1), enumerated(d2)
    reqs = [TextScore(d, t) for d, w in ((d1, w1), (d2, w2)) for t in list(w) + ["ab", "aaa"]]
    stats: dict = {}
    score_texts(reqs, stats)
    for r in reqs:
        want = (w1 if r.dist is d1 else w2).get(r.text, 0.0)
        assert math.exp(r.log_prob) == pytest.approx(want, abs=1e-12), r.text
    # one pass for every text, one more for the continuation "a" (a prefix of "aa")
    assert stats["model_calls"] == 2 and stats["tokens_scored"] > 0


# -- a byte-level model: the detokeniser holds back incomplete characters ---------------------


class ByteTokenizer:
    """Greedy longest match over bytes; decoding joins bytes (invalid ones become U+FFFD),
    like byte-level BPE.  No ``token_text``: the detokeniser decodes windows."""

    def __init__(self, pieces: list[bytes | None]) -> None:
        self.pieces = pieces
        self.eos_id = pieces.index(None)
        self._ids = {p: i for i, p in enumerate(pieces) if p is not None}

    def encode(self, text: str) -> list[int]:
        data, ids, pos = text.encode("utf-8"), [], 0
        while pos < len(data):
            for end in range(len(data), pos, -1):
                if data[pos:end] in self._ids:
                    ids.append(self._ids[data[pos:end]])
                    pos = end
                    break
            else:
                raise TokenizationError(f"cannot tokenise {text!r}")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        data = b"".join(self.pieces[i] or b"" for i in ids)
        return data.decode("utf-8", errors="replace")


class ByteLM(LanguageModel):
    def __init__(self, pieces: list[bytes | None], seed: int) -> None:
        self.tokenizer = ByteTokenizer(pieces)
        self.name = "bytes"
        self._scores = scores(len(pieces), seed)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer.pieces)

    def next_logprobs(self, contexts):
        table = torch.tensor([self._scores(tuple(c.ids)) for c in contexts], dtype=torch.float64)
        return torch.log_softmax(table, dim=-1)

    def token_bytes(self):
        return list(self.tokenizer.pieces)


QUOTE = "\u2019".encode()  # e2 80 99
BYTES = [b"a", b" ", b"\xe2", b"\x80", b"\x99", b"\xe2\x80", b"\x80\x99", QUOTE, b" \xe2", None]


@pytest.mark.parametrize(
    ("stop", "max_tokens"),
    [("\u2019", 2), ("\u2019", 3), (" ", 2), (" ", 3), (" \u2019", 2), (" \u2019", 3)]
    + [("a\u2019", 3)],
)
def test_held_back_characters(stop, max_tokens):
    # The paths to a quote stop are e2|80|99, e2 80|99, e2|80 99 and the single token; " \xe2"
    # holds the space back until the character completes.  Several spellings exist, so the
    # oracle keeps the enumerated paths that follow the text's spelling.
    lm = ByteLM(BYTES, seed=12)
    d = lc.LM(lm, "a", max_tokens=max_tokens, stop=stop)
    want = enumerated_spelled(d)
    check_every_value(d, want)
    if stop == "\u2019":
        assert want[""] > 0


@pytest.mark.parametrize(
    "constraint", [lc.constraints.forbid("a\u2019"), lc.constraints.predicate(lambda t: True)]
)
def test_held_back_characters_with_a_constraint(constraint):
    lm = ByteLM(BYTES, seed=13)
    d = lc.LM(lm, "a", max_tokens=3, stop=" ", constraint=constraint)
    check_every_value(d, enumerated_spelled(d))


# -- the default model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    try:
        return lc.models.load("smollm2-135m", device="cpu")
    except ModelNotFoundError:
        pytest.skip("the default model is not installed")


def hf_next(smol, prompt: str, after: Sequence[int] = ()) -> torch.Tensor:
    """Next-token probabilities from the raw Hugging Face model (float64)."""
    tok = smol.tokenizer.hf
    ids = tok(prompt, return_tensors="pt").input_ids
    ids = torch.cat([ids, torch.tensor([list(after)], dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = smol.hf(ids).logits[0, -1].double()
    return torch.softmax(logits, dim=-1)


_TEXTS: dict[int, list[str]] = {}


def hf_texts(smol) -> list[str]:
    """Every token's text, decoded alone by the Hugging Face tokenizer."""
    if id(smol) not in _TEXTS:
        tok = smol.tokenizer.hf
        ids = [[i] for i in range(smol.vocab_size)]
        _TEXTS[id(smol)] = tok.batch_decode(ids, clean_up_tokenization_spaces=False)
    return _TEXTS[id(smol)]


def test_default_model_empty_answer_with_a_space_stop(smol):
    prompt = "The capital of France is"
    d = lc.LM(smol, prompt, max_tokens=3, stop=" ")
    p = hf_next(smol, prompt)
    texts = hf_texts(smol)
    starts = torch.tensor([t.startswith(" ") for t in texts])
    ref = p[smol.eos_id].item() + p[starts].sum().item()
    assert ref > 0.99
    assert math.exp(text_log_prob(d, "")) == pytest.approx(ref, abs=1e-4)


def test_default_model_newline_stop(smol):
    prompt = "Q: Name a colour.\nA:"
    text = " Blue"
    d = lc.LM(smol, prompt, max_tokens=6, stop="\n")
    ids = smol.encode(text)
    tok = smol.tokenizer.hf
    ref_path = 1.0
    for k, t in enumerate(ids):
        ref_path *= hf_next(smol, prompt, ids[:k])[t].item()
    p = hf_next(smol, prompt, ids)
    texts = hf_texts(smol)
    ends = torch.tensor([t.startswith("\n") for t in texts])
    ref = ref_path * (p[smol.eos_id].item() + p[ends].sum().item())
    # a token finishing the text and starting the stop ("e\n" after " Bl"...), if any
    for k in range(len(ids)):
        rest = tok.decode(ids[k:])
        more = torch.tensor([t.startswith(rest + "\n") for t in texts])
        if bool(more.any()):
            head = 1.0
            for j, t in enumerate(ids[:k]):
                head *= hf_next(smol, prompt, ids[:j])[t].item()
            ref += head * hf_next(smol, prompt, ids[:k])[more].sum().item()
    got = math.exp(text_log_prob(d, text))
    assert got == pytest.approx(ref, rel=1e-3, abs=1e-6)
    assert got > 0.01


def test_default_model_quote_stop_finishing_token(smol):
    # '."' is one token: after ' Hello', it finishes the text ' Hello.' and starts the stop
    prompt = 'He said: "'
    text = "Hello."
    d = lc.LM(smol, prompt, max_tokens=5, stop='"')
    ids = smol.encode(text)
    assert len(ids) == 2
    texts = hf_texts(smol)
    p0 = hf_next(smol, prompt)
    p1 = hf_next(smol, prompt, ids[:1])
    p2 = hf_next(smol, prompt, ids)
    quote = torch.tensor([t.startswith('"') for t in texts])
    dot_quote = torch.tensor([t.startswith('."') for t in texts])
    spelled = p0[ids[0]].item() * p1[ids[1]].item() * (p2[smol.eos_id] + p2[quote].sum()).item()
    finishing = p0[ids[0]].item() * p1[dot_quote].sum().item()
    got = math.exp(text_log_prob(d, text))
    assert got == pytest.approx(spelled + finishing, rel=1e-3)
    assert finishing > 0.01 * spelled  # the finishing token matters at this tolerance


def test_default_model_held_back_quote(smol):
    # The stop "\u2019" (e2 80 99) is one token, or "\xe2\x80" then a token starting with
    # 0x99, or "\xe2" then one starting with 80 99: the held-back bytes end the generation
    # only when the character completes.
    prompt = "It"
    d = lc.LM(smol, prompt, max_tokens=2, stop="\u2019")
    pieces = smol.token_bytes()
    stop = "\u2019".encode()
    p = hf_next(smol, prompt)
    ref = p[smol.eos_id].item()
    ref += sum(p[i].item() for i, b in enumerate(pieces) if b and b.startswith(stop))
    for i, b in enumerate(pieces):
        if b and len(b) < len(stop) and stop.startswith(b):
            q = hf_next(smol, prompt, [i])
            rest = stop[len(b) :]
            ref += p[i].item() * sum(
                q[t].item() for t, c in enumerate(pieces) if c and c.startswith(rest)
            )
    got = math.exp(text_log_prob(d, ""))
    assert got == pytest.approx(ref, rel=1e-3, abs=1e-7)
    assert math.exp(d.log_prob("")) == pytest.approx(got, rel=1e-9)  # LM.log_prob is this
