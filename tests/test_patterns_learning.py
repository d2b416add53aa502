"""STaR rationalisation, selection-inference and Reprompting against exact values by hand.

Every exact number comes from the toy models' scores (a softmax per step, products along
token paths), never from the code under test.  Distribution tests use ``stats.assert_matches``
(Pearson chi-square, false-alarm rate 1e-3 each); each states the TV distance it detects with
probability 0.9 and is paired with a deliberately wrong distribution or sampler that the same
test must reject, so it can fail.
"""

from __future__ import annotations

import importlib
import itertools
import math
from collections import Counter

import pytest
import torch
from test_patterns_selection import THINKER, close, ids, softmax, text_paths, think_scores

import lmcascade as lc
from lmcascade.errors import DuplicateSiteError, OptionError, SiteError
from lmcascade.models import ToyLM
from lmcascade.patterns.reasoning import ANSWER_PROMPT
from lmcascade.patterns.reprompting import (
    Recipes,
    reprompting,
    reprompting_recipes,
    split_demo,
)
from lmcascade.patterns.selection_inference import selection_inference, si_steps
from lmcascade.patterns.star import HINT_PROMPT, rationalise, star_rationales
from stats import accepted_by_weight, assert_matches, chi2_gof, tv_distance

INF = math.inf


def normalised(weights: dict) -> dict:
    z = math.fsum(weights.values())
    return {k: v / z for k, v in weights.items() if v > 0}


def path_prob(scores_fn, vocab, prompt_ids, text_ids) -> float:
    """The probability of the tokens ``text_ids`` right after ``prompt_ids`` (no ending)."""
    ctx, p = tuple(prompt_ids), 1.0
    for tok in text_ids:
        p *= softmax(scores_fn(ctx))[tok]
        ctx = (*ctx, tok)
    return p


# --- STaR: the rationale posterior ------------------------------------------------------------
# THINKER (from the selection tests): thoughts of "x" and "y", and after "=" an answer that
# mostly repeats the token before it.


def toy_star(answer="x", **kw):
    kw.setdefault("think", "{question}")
    return rationalise(
        THINKER,
        "x",
        answer,
        answer_prompt="{question}{thought}=",
        think_tokens=2,
        answer_tokens=1,
        think_stop=None,
        answer_stop=None,
        **kw,
    )


def star_posterior(answer: str, think_prompt: str = "x", temperature: float = 1.0) -> dict:
    """p(thought | prompt) * P(answer | "x" + thought + "=") over every thought, normalised:
    the answer generation writes one token (the length limit ends it) or ends at eos."""

    def scores(ctx):
        return [s / temperature for s in think_scores(ctx)]

    post = {}
    for thought, pt in text_paths(scores, ids(think_prompt), 2).items():
        answers = text_paths(scores, ids("x" + thought + "="), 1)
        post[thought] = pt * answers.get(answer, 0.0)
    return normalised(post)


def prior_thoughts() -> dict:
    return text_paths(think_scores, ids("x"), 2)


def test_rationalise_is_the_posterior_over_thoughts_by_enumeration():
    for answer in ("x", "y", ""):
        r = lc.infer(toy_star(answer), method="enumerate")
        close(r.distribution(), star_posterior(answer), tol=1e-9)
        assert r.traces[0].names == ["star[0]/thought", "star[0]/answer"]
        assert r.traces[0]["star[0]/answer"].kind == "observe"
    # the evidence is the model's probability of answering "x" at all, thought summed out
    z = sum(
        pt * text_paths(think_scores, ids("x" + t + "="), 1).get("x", 0.0)
        for t, pt in prior_thoughts().items()
    )
    r = lc.infer(toy_star("x"), method="enumerate")
    assert r.log_evidence == pytest.approx(math.log(z), abs=1e-9)
    # and it is not the prior: conditioning on the answer moved the thoughts
    assert max(abs(r.distribution()[t] - p) for t, p in prior_thoughts().items()) > 0.05


def test_rationalise_with_a_hint_targets_the_hinted_posterior():
    got = lc.infer(toy_star("y", hint=True, think="{question}{answer}"), method="enumerate")
    close(got.distribution(), star_posterior("y", think_prompt="xy"), tol=1e-9)
    assert got.distribution() != pytest.approx(star_posterior("y"))
    # the default hinted prompt is used when think is left alone, and it names the answer
    chars = sorted(set(HINT_PROMPT + ANSWER_PROMPT + "xy"))
    lm = ToyLM([*chars, "<eos>"], lambda ctx: [0.0] * len(chars) + [-1.0], name="letters")
    hinted = rationalise(lm, "x", "y", hint=True, think_tokens=1, answer_tokens=1, chat=False)
    trace = lc.infer(hinted, method="forward", num_samples=1, seed=0).traces[0]
    assert "Hint: the answer is y." in trace["star[0]/thought"].dist.prompt


def test_rationalise_options_apply_to_the_observed_answer():
    got = lc.infer(toy_star("x", temperature=0.5), method="enumerate").distribution()
    close(got, star_posterior("x", temperature=0.5), tol=1e-9)


def test_rationalise_sampled_matches_the_posterior():
    """Importance sampling (the prior proposes, the observe weighs, every log-weight <= 0) kept
    by weight gives i.i.d. posterior draws.  7 thoughts (df 6), 1053 kept draws: the test
    detects TV >= 0.088 with probability 0.9 at false-alarm rate 1e-3.  The prior over
    thoughts (what a sampler that ignored the answer would give; TV 0.23 away) and the
    posterior given the answer "y" (TV 0.56) are rejected by the same draws — checked here,
    so the test can fail."""
    exact = star_posterior("x")
    r = lc.infer(toy_star("x"), method="importance", num_samples=2000, seed=4)
    kept = accepted_by_weight(r, 0.0, seed=5)
    gof = assert_matches(kept, exact)
    assert (gof.df, gof.n) == (6, 1053) and gof.detectable_tv < 0.089
    assert not chi2_gof(kept, prior_thoughts()).passed()
    assert not chi2_gof(kept, star_posterior("y")).passed()


def test_star_rationales_keeps_each_questions_most_probable_rationale():
    examples = [("x", "x"), ("x", "y"), ("x", "")]
    kept = star_rationales(
        THINKER, examples, method="enumerate", think="{question}",
        answer_prompt="{question}{thought}=", think_tokens=2, answer_tokens=1,
        think_stop=None, answer_stop=None,
    )  # fmt: skip
    assert [(k.question, k.answer) for k in kept] == examples
    for k in kept:
        post = star_posterior(k.answer)
        assert k.rationale == max(post, key=post.get)
        assert k.posterior == pytest.approx(post[k.rationale], abs=1e-9)
        answers = text_paths(think_scores, ids("x" + k.rationale + "="), 1)
        assert k.answer_prob == pytest.approx(answers[k.answer], abs=1e-9)
    # STaR's filter: only rationales after which the answer is likely enough are kept
    floor = sorted(k.answer_prob for k in kept)[1]
    strict = star_rationales(
        THINKER, examples, method="enumerate", min_answer_prob=floor, think="{question}",
        answer_prompt="{question}{thought}=", think_tokens=2, answer_tokens=1,
        think_stop=None, answer_stop=None,
    )  # fmt: skip
    assert [k.answer for k in strict] == [k.answer for k in kept if k.answer_prob >= floor]
    assert len(strict) == 2


def test_star_errors_name_the_argument():
    with pytest.raises(OptionError, match="answer must be a string"):
        rationalise(THINKER, "x", 3)
    with pytest.raises(OptionError, match="hint must be True or False"):
        rationalise(THINKER, "x", "x", hint="yes")
    with pytest.raises(OptionError, match="unknown field"):  # {answer} without a hint
        rationalise(THINKER, "x", "x", think="{question}{answer}")
    with pytest.raises(OptionError, match="question must be a string"):
        rationalise(THINKER, None, "x")
    with pytest.raises(OptionError, match="think_tokens"):
        rationalise(THINKER, "x", "x", think_tokens=0)
    with pytest.raises(OptionError, match="name"):
        rationalise(THINKER, "x", "x", name="a/b")
    with pytest.raises(OptionError, match="examples"):
        star_rationales(THINKER, "xx")
    with pytest.raises(OptionError, match=r"examples\[1\]"):
        star_rationales(THINKER, [("x", "x"), ("x",)])
    with pytest.raises(OptionError, match="min_answer_prob"):
        star_rationales(THINKER, [("x", "x")], min_answer_prob=2)
    with pytest.raises(OptionError, match="method_options"):
        star_rationales(THINKER, [("x", "x")], method_options=[1])
    with pytest.raises(OptionError, match="unknown field"):
        star_rationales(THINKER, [("x", "x")], answer_prompt="{nope}")
    # the model is checked first, and every message names the function the user called
    with pytest.raises(OptionError, match="rationalise: model must be a LanguageModel"):
        rationalise("gpt", "x", "x", think_tokens=0)
    with pytest.raises(OptionError, match=r"rationalise \(think_tokens"):
        rationalise(THINKER, "x", "x", think_tokens=0)
    with pytest.raises(OptionError, match="rationalise: answer_prompt: unknown field"):
        rationalise(THINKER, "x", "x", answer_prompt="{nope}")
    with pytest.raises(OptionError, match="rationalise: chat must be True or False"):
        rationalise(THINKER, "x", "x", chat="no")
    with pytest.raises(OptionError, match="star_rationales: model must be a LanguageModel"):
        star_rationales("gpt", [("x", "x")])
    with pytest.raises(OptionError, match=r"star_rationales \(answer_tokens"):
        star_rationales(THINKER, [("x", "x")], answer_tokens=0)
    with pytest.raises(
        OptionError, match=r"star_rationales: method_options cannot hold \['seed'\]"
    ):
        star_rationales(THINKER, [("x", "x")], method_options={"seed": 1})
    with pytest.raises(OptionError, match=r"cannot hold \['method', 'progress'\]"):
        star_rationales(THINKER, [("x", "x")], method_options={"progress": 1, "method": "smc"})


def test_rationalise_runs_under_rejection_without_options():
    """Rejection sampling needs no bound on the weights here (an observed LM text has
    probability at most 1, so the bound is 0): its accepted draws are the posterior.  7
    thoughts (df 6), 800 draws: detects TV >= 0.102 with probability 0.9 at false-alarm rate
    1e-3; the prior over thoughts (TV 0.23 away) is rejected by the same draws, so the test
    can fail."""
    r = lc.infer(toy_star("x"), method="rejection", num_samples=800, seed=0)
    gof = assert_matches(r.values, star_posterior("x"))
    assert gof.detectable_tv < 0.102
    assert not chi2_gof(r.values, prior_thoughts()).passed()


# --- selection-inference ---------------------------------------------------------------------

SI_VOCAB = ["a", "b", "c", "?", ";", "<eos>"]
A, B, C, Q, SEMI, SI_EOS = range(6)


def si_scores(ctx):
    """Writes "c" after a selected "a?" and repeats "c" after "c?" (answering after the
    inference "c"); selecting after the question "c?", it names "b" more than "a"."""
    if ctx[-1] == Q and len(ctx) >= 2 and ctx[-2] == A:
        return [0.0, -1.0, 3.0, -INF, -INF, -0.5]
    if ctx[-1] == Q and len(ctx) >= 2 and ctx[-2] == C:
        return [-0.5, 0.7, 1.0, -INF, -INF, -1.0]
    if ctx[-1] == Q:
        return [0.8, 0.0, 0.3, -INF, -INF, -1.0]
    return [0.0, 0.4, 0.0, -INF, -INF, 0.2]


SI_LM = ToyLM(SI_VOCAB, si_scores, name="si")


def si_ids(text):
    return [SI_VOCAB.index(ch) for ch in text]


def toy_si(steps=1, select=1, **kw):
    return selection_inference(
        SI_LM, ["a", "b"], "c", steps=steps, select=select, sep=";",
        select_prompt="{facts}?{question}?{selected}", infer_prompt="{selection}?",
        answer_prompt="{question}?{facts}?{inferences}?", infer_tokens=1, answer_tokens=1,
        infer_stop=None, answer_stop=None, chat=False, **kw,
    )  # fmt: skip


def si_texts(prompt, max_tokens=1):
    out = Counter()

    def walk(ctx, text, p, n):
        if n == max_tokens:
            out[text] += p
            return
        for tok, q in enumerate(softmax(si_scores(ctx))):
            if q == 0.0:
                continue
            if tok == SI_EOS:
                out[text] += p * q
            else:
                walk((*ctx, tok), text + SI_VOCAB[tok], p * q, n + 1)

    walk(tuple(si_ids(prompt)), "", 1.0, 0)
    return dict(out)


def si_exact(steps, select):
    """(picks per step, inferences, answer) -> probability, by following the procedure the
    docstring states with the toy's own probabilities."""
    facts = ["a", "b"]
    out = Counter()

    def step(t, pool, history, p):
        if t == steps:
            prompt = "c?" + ";".join(facts) + "?" + ";".join(pool[2:]) + "?"
            for ans, q in si_texts(prompt).items():
                out[history, tuple(pool[2:]), ans] += p * q
            return

        def pick(picked, p_pick):
            if len(picked) == select:
                for new, q in si_texts(";".join(pool[i] for i in picked) + "?").items():
                    grown = pool + [new] if new and new not in pool else pool
                    step(t + 1, grown, (*history, tuple(picked)), p_pick * q)
                return
            prompt = ";".join(pool) + "?c?" + "".join(pool[i] + ";" for i in picked)
            cands = [i for i in range(len(pool)) if i not in picked]
            probs = normalised(
                {i: path_prob(si_scores, SI_VOCAB, si_ids(prompt), si_ids(pool[i])) for i in cands}
            )
            for i, q in probs.items():
                pick([*picked, i], p_pick * q)

        pick([], p)

    step(0, list(facts), (), 1.0)
    return dict(out)


def si_key(trace, steps, select):
    pool = ["a", "b"]
    history = []
    for t in range(steps):
        picked = []
        for k in range(select):
            pre = f"si[0]/step[{t}]/pick[{k}]/"
            cands = sorted(
                int(s.name[len(pre) + 5 : -1]) for s in trace if s.name.startswith(pre + "fact[")
            )
            picked.append(cands[int(trace[pre + "choice"].value)])
        history.append(tuple(picked))
        new = trace[f"si[0]/step[{t}]/inference"].value.strip()
        if new and new not in pool:
            pool.append(new)
    return tuple(history), tuple(pool[2:]), trace.value


@pytest.mark.parametrize(("steps", "select"), [(1, 1), (1, 2), (2, 1)])
def test_selection_inference_distribution_by_enumeration(steps, select):
    r = lc.infer(toy_si(steps, select), method="enumerate")
    got = Counter()
    for trace, w in zip(r.traces, r.weights, strict=True):
        got[si_key(trace, steps, select)] += float(w)
    close(dict(got), si_exact(steps, select), tol=1e-9)
    # the answer alone: the program's return value
    answers = Counter()
    for (_, _, ans), p in si_exact(steps, select).items():
        answers[ans] += p
    close(r.distribution(), dict(answers), tol=1e-9)


def test_selection_inference_sites_and_selection_probabilities():
    r = lc.infer(toy_si(2, 1), method="forward", num_samples=1, seed=0)
    names = r.traces[0].names
    assert names[:4] == [
        "si[0]/step[0]/pick[0]/fact[0]",
        "si[0]/step[0]/pick[0]/fact[1]",
        "si[0]/step[0]/pick[0]/choice",
        "si[0]/step[0]/inference",
    ]
    assert names[-1] == "si[0]/answer"
    assert any(n.startswith("si[0]/step[1]/pick[0]/") for n in names)
    # si_steps reads the same reasoning back as texts
    history, inferred, _ = si_key(r.traces[0], 2, 1)
    pool = ["a", "b", *inferred]
    steps = si_steps(r.traces[0], ["a", "b"])
    assert [picked for picked, _ in steps] == [[pool[i] for i in h] for h in history]
    assert [new for _, new in steps] == [r.traces[0][f"si[0]/step[{t}]/inference"].value.strip()
                                         for t in range(2)]  # fmt: skip
    with pytest.raises(SiteError, match="no selection-inference step"):
        si_steps(r.traces[0], ["a", "b"], name="si[1]")
    # the first selection by hand: P(a) = p(a | "a;b?c?") / (p(a | ...) + p(b | ...))
    exact = lc.infer(toy_si(1, 1), method="enumerate")
    p_a = sum(
        float(w)
        for t, w in zip(exact.traces, exact.weights, strict=True)
        if int(t["si[0]/step[0]/pick[0]/choice"].value) == 0
    )
    sa, sb = (path_prob(si_scores, SI_VOCAB, si_ids("a;b?c?"), si_ids(f)) for f in "ab")
    assert p_a == pytest.approx(sa / (sa + sb), abs=1e-12)


SI_MODULE = importlib.import_module("lmcascade.patterns.selection_inference")


def test_selection_inference_sampled_matches_exact(monkeypatch):
    """Forward draws of whole runs (i.i.d., equal weights) — the selections of both steps, the
    inferences and the answer — against their exact joint.  40 outcomes merged into 29 cells
    (df 28), 1500 draws: detects TV >= 0.094 with probability 0.9 at false-alarm rate 1e-3.
    Two wrong selectors run here fail it with 600 draws (detectable TV 0.142): a uniform one
    (every candidate equally likely; TV 0.34 from the exact joint) and one that halves the
    logits (TV 0.17) — so the test can fail.  (The answer alone, as tested before, is only
    TV 0.06 and 0.03 from them.)"""
    exact = si_exact(2, 1)

    def draws(n):
        r = lc.infer(toy_si(2, 1), method="forward", num_samples=n, seed=2)
        return [si_key(t, 2, 1) for t in r.traces]

    gof = assert_matches(draws(1500), exact)
    assert gof.df == 28 and gof.detectable_tv < 0.094
    real = SI_MODULE.Categorical
    for wrong, far in ((torch.zeros_like, 0.34), (lambda logits: 0.5 * logits, 0.17)):
        monkeypatch.setattr(
            SI_MODULE, "Categorical", lambda logits, f=wrong: real(logits=f(logits))
        )
        r = lc.infer(toy_si(2, 1), method="enumerate")
        law = Counter()
        for trace, w in zip(r.traces, r.weights, strict=True):
            law[si_key(trace, 2, 1)] += float(w)
        assert tv_distance(dict(law), exact) > far - 0.01
        bad = chi2_gof(draws(600), exact)
        assert bad.detectable_tv < 0.143 and not bad.passed()


def test_selection_inference_errors_name_the_argument():
    def si(**kw):
        base = {"steps": 1, "select": 1}
        base.update(kw)
        facts = base.pop("facts", ["a", "b"])
        return selection_inference(SI_LM, facts, "c", **base)

    with pytest.raises(OptionError, match="facts must be a non-empty list"):
        si(facts=[])
    with pytest.raises(OptionError, match="facts must be a non-empty list"):
        si(facts="ab")
    with pytest.raises(OptionError, match=r"facts\[1\]"):
        si(facts=["a", " "])
    with pytest.raises(OptionError, match="steps"):
        si(steps=0)
    with pytest.raises(OptionError, match="select"):
        si(select=3)
    with pytest.raises(OptionError, match="select"):
        si(select=True)
    with pytest.raises(OptionError, match="unknown field"):
        si(infer_prompt="{question}")
    with pytest.raises(OptionError, match="infer_tokens"):
        si(infer_tokens=0)
    with pytest.raises(OptionError, match="temperature|generation options"):
        si(temprature=0.5)
    with pytest.raises(OptionError, match="name"):
        si(name="")
    with pytest.raises(OptionError, match="question"):
        selection_inference(SI_LM, ["a"], 3)
    with pytest.raises(OptionError, match="selection_inference: model must be a LanguageModel"):
        selection_inference("gpt", ["a"], "c", infer_tokens=0)
    with pytest.raises(OptionError, match="selection_inference: select_prompt: unknown field"):
        si(select_prompt="{nope}")
    # facts the prompts would show otherwise than the candidates
    with pytest.raises(OptionError, match=r"facts\[0\] = 'a;b' holds the separator"):
        si(facts=["a;b", "c"], sep=";")
    with pytest.raises(OptionError, match=r"facts\[0\] = 'a\\nb' holds the separator"):
        si(facts=["a\nb", "c"])
    with pytest.raises(OptionError, match=r"facts\[1\] = 'a' repeats facts\[0\]"):
        si(facts=["a", " a "])
    with pytest.raises(OptionError, match="sep must be a non-empty string"):
        si(sep="")
    with pytest.raises(OptionError, match="sep must be a non-empty string"):
        si(sep=None)


def test_si_steps_checks_its_arguments():
    trace = lc.infer(toy_si(2, 1), method="forward", num_samples=1, seed=0).traces[0]
    with pytest.raises(OptionError, match="si_steps: facts do not match the trace"):
        si_steps(trace, ["a"])
    with pytest.raises(OptionError, match="si_steps: facts do not match the trace"):
        si_steps(trace, ["b", "a"])
    with pytest.raises(OptionError, match="si_steps: facts must be"):
        si_steps(trace, None)
    with pytest.raises(OptionError, match="si_steps: trace must be a Trace"):
        si_steps("trace", ["a", "b"])
    with pytest.raises(OptionError, match="si_steps: name"):
        si_steps(trace, ["a", "b"], name=0)
    assert len(si_steps(trace, [" a", "b "])) == 2  # the program strips its facts too


# --- Reprompting -------------------------------------------------------------------------------

RP_VOCAB = ["a", "b", "=", ";", "<eos>"]
RA, RB, EQ, SEP, RP_EOS = range(5)


def rp_scores(ctx):
    """After "=" the toy repeats the letter before it and leans to the letter the context
    holds more of (so a recipe "a" helps answer "a", in its own example and, as a
    demonstration, in the other); elsewhere it writes anything, eos included."""
    if ctx[-1] == EQ:
        lean = 0.6 * (ctx.count(RA) - ctx.count(RB))
        return [2.0 * (ctx[-2] == RA) + lean, 2.0 * (ctx[-2] == RB), -INF, -INF, -INF]
    return [1.5, 0.0, -0.5, 0.0, 0.0]


RP_LM = ToyLM(RP_VOCAB, rp_scores, name="reprompt")
EXAMPLES = [("a", "a"), ("b", "a")]
DEMO = "{question}{recipe}={answer};"


def rp_ids(text):
    return [RP_VOCAB.index(ch) for ch in text]


def toy_reprompting(**kw):
    return reprompting(RP_LM, EXAMPLES, demo=DEMO, recipe_tokens=1, recipe_stop=None, **kw)


def generation_texts(scores_fn, vocab, prompt_ids, max_tokens, stop=None, count=False) -> dict:
    """text -> probability of a generation by hand: every token path (the toys' token ids
    index ``vocab``; its last entry is eos), ended by eos, by ``stop`` appearing in the
    decoded text (cut before it) or by the length limit; the paths of one text summed.
    ``count=True``: text -> how many paths of positive probability write it."""
    out = Counter()

    def walk(ctx, text, p, n):
        for tok, q in enumerate(softmax(scores_fn(ctx))):
            if q == 0.0:
                continue
            w = 1 if count else p * q
            if tok == len(vocab) - 1:
                out[text] += w
                continue
            grown = text + vocab[tok]
            if stop is not None and stop in grown:
                out[grown[: grown.index(stop)]] += w
            elif n + 1 == max_tokens:
                out[grown] += w
            else:
                walk((*ctx, tok), grown, p * q, n + 1)

    walk(tuple(prompt_ids), "", 1.0, 0)
    return dict(out)


def reprompting_target(scores_fn, vocab, examples, recipe_tokens, stop, count_paths=False):
    """The documented target by hand, for the demo "{question}{recipe}={answer};":
    pi(z) ∝ prod_j P(the recipe generation after the other demonstrations and x_j writes z_j)
    · P("=" + y_j + ";" after that and z_j).  The toys' scores read the text only, so every
    context is written one character per token.  ``count_paths=True`` gives a wrong target,
    over token paths rather than texts: each recipe text weighted once more for every path
    the zero-shot model has to it."""

    def ids(text):
        return [vocab.index(ch) for ch in text]

    def texts(x, count=False):
        return generation_texts(scores_fn, vocab, ids(x), recipe_tokens, stop, count)

    weights = {}
    for z in itertools.product(*(sorted(texts(x)) for x, _ in examples)):
        w = 1.0
        for j, (x, y) in enumerate(examples):
            other = "".join(q + z[i] + "=" + a + ";" for i, (q, a) in enumerate(examples) if i != j)
            w *= texts(other + x).get(z[j], 0.0)
            w *= path_prob(scores_fn, vocab, ids(other + x + z[j]), ids("=" + y + ";"))
            if count_paths:
                w *= texts(x, count=True)[z[j]]
        weights[z] = w
    return normalised(weights)


def rp_recipes():
    """The zero-shot model's one-token recipes: every text with positive probability."""
    return sorted(generation_texts(rp_scores, RP_VOCAB, rp_ids("a"), 1))


def rp_exact(divide_zero_shot=True) -> dict:
    """The documented target of ``toy_reprompting()`` by hand; with
    ``divide_zero_shot=False`` the zero-shot density is left in (the wrong target)."""
    exact = reprompting_target(rp_scores, RP_VOCAB, EXAMPLES, 1, None)
    if divide_zero_shot:
        return exact
    zero = [generation_texts(rp_scores, RP_VOCAB, rp_ids(x), 1) for x, _ in EXAMPLES]
    return normalised({z: p * zero[0][z[0]] * zero[1][z[1]] for z, p in exact.items()})


@lc.program
def wrong_reprompting():
    """The likely mistake: the few-shot scores as factors, the zero-shot density left in."""
    with lc.scope("reprompt[]"):
        z = []
        for j, (x, _) in enumerate(EXAMPLES):
            z.append((yield lc.gen(f"recipe[{j}]", RP_LM, x, max_tokens=1)))
        for j, (x, y) in enumerate(EXAMPLES):
            other = "".join(EXAMPLES[i][0] + z[i] + "=" + EXAMPLES[i][1] + ";" for i in
                            range(2) if i != j)  # fmt: skip
            fit = yield lc.score(f"fit[{j}]", RP_LM, other + x, z[j] + "=" + y + ";")
            eos = 0.0 if z[j] else math.log(softmax(rp_scores(tuple(rp_ids(other + x))))[RP_EOS])
            yield lc.factor(f"few_shot[{j}]", fit + eos)
    return tuple(z)


def test_reprompting_target_is_the_exact_joint_by_enumeration():
    r = lc.infer(toy_reprompting(), method="enumerate")
    close(r.distribution(), rp_exact(), tol=1e-9)
    assert r.traces[0].names == [
        "reprompt[0]/recipe[0]",
        "reprompt[0]/recipe[1]",
        "reprompt[0]/paths",
        "reprompt[0]/answer[0]",
        "reprompt[0]/few_shot[0]",
        "reprompt[0]/answer[1]",
        "reprompt[0]/few_shot[1]",
    ]
    # each trace's log-joint is the sum of its few-shot path and answer scores: log pi + log Z
    for t in r.traces:
        few = t["reprompt[0]/paths"].value[:2]
        answers = [t[f"reprompt[0]/answer[{j}]"].value for j in range(2)]
        assert t.log_joint == pytest.approx(sum(few) + sum(answers), abs=1e-9)
    # the conditional of one recipe depends on the other recipe (it is a demonstration)
    exact = rp_exact()
    cond = {z2: normalised({z1: exact.get((z1, z2), 0.0) for z1 in rp_recipes()}) for z2 in "ab"}
    assert abs(cond["a"]["a"] - cond["b"]["a"]) > 0.01
    assert max(abs(exact.get(k, 0.0) - v) for k, v in rp_exact(False).items()) > 0.05


# A toy where one recipe text has several token paths: "aa" is one token or two, and a recipe
# ends on eos or on the stop ";" with the same text.  Its scores read the text only; "b" is
# written only as an answer, and "=" only after a demonstration (so the few-shot model can
# write recipes the zero-shot one cannot: they are outside the target).
MP_VOCAB = ["a", "b", "aa", ";", "=", "<eos>"]


def mp_scores(ctx):
    text = "".join(MP_VOCAB[t] for t in ctx)
    if text.endswith("="):  # answering: leans to "a" after a recipe, more so with more "a"s
        lean = 0.3 * text.count("a") - 0.8 * text.count("b")
        return [lean, 0.0, -INF, -INF, -INF, -INF]
    equals = -1.0 if ";" in text else -INF
    return [0.3 * text.count("b"), -INF, 0.2, -0.4, equals, 0.3 - 0.3 * len(text)]


MP_LM = ToyLM(MP_VOCAB, mp_scores, name="paths")


def test_reprompting_target_is_over_texts_whatever_the_paths_to_them():
    """A recipe text the zero-shot model writes along k token paths ("a" then eos, or "a"
    then the stop ";"; "aa" as one token or two, then an ending) counts once, with the
    few-shot probability of the text: enumerate equals the documented target by hand.  The
    old program (each path weighted by the text's score, no ending counted) fails it: run
    against it once, its enumeration was TV 0.46 away.  A target over paths rather than texts
    is TV 0.16 away, checked here."""
    examples = [("a", "a"), ("b", "b")]
    exact = reprompting_target(mp_scores, MP_VOCAB, examples, 2, ";")
    paths = generation_texts(mp_scores, MP_VOCAB, [0], 2, ";", count=True)
    assert paths == {"": 2, "a": 2, "aa": 3, "aaa": 2, "aaaa": 1}
    r = lc.infer(
        reprompting(MP_LM, examples, demo=DEMO, recipe_tokens=2, recipe_stop=";"),
        method="enumerate",
    )
    close(r.distribution(), exact, tol=1e-9)
    wrong = reprompting_target(mp_scores, MP_VOCAB, examples, 2, ";", count_paths=True)
    assert tv_distance(wrong, exact) > 0.1


def test_reprompting_mcmc_matches_the_joint_and_catches_a_wrong_sampler():
    """The last states of 300 independent chains (15 site moves each) are i.i.d. draws from
    the chain's law at step 15.  (Ad hoc, with 2000 chains, that law was within TV 0.02 of the
    target after 10 moves and after 30 — the size of the sampling noise of 2000 draws over
    16 outcomes; a chain's distance to its stationary law never grows with more moves.)
    Merged cells (df 8), 300 draws: the test detects TV >= 0.18 with probability 0.9 at
    false-alarm rate 1e-3.  A wrong sampler — MCMC on the program that forgets to divide out
    the zero-shot density, TV 0.30 from the target — fails the same test with 150 chains
    (detectable TV about 0.23), run here, so the test can fail."""
    exact = rp_exact()
    found = reprompting_recipes(RP_LM, EXAMPLES, num_samples=1, burn_in=15, chains=300,
                                seed=3, demo=DEMO, recipe_tokens=1, recipe_stop=None)  # fmt: skip
    assert isinstance(found, Recipes) and found.result.method == "mcmc"
    draws = [c.values[-1] for c in found.result.chains]
    gof = assert_matches(draws, exact)
    assert gof.detectable_tv < 0.18
    wrong = lc.infer(wrong_reprompting(), method="mcmc", num_samples=1, burn_in=15,
                     chains=150, seed=3)  # fmt: skip
    assert tv_distance(rp_exact(False), exact) > 0.29
    wrong_draws = [c.values[-1] for c in wrong.chains]
    assert chi2_gof(wrong_draws, exact).detectable_tv < 0.24
    assert not chi2_gof(wrong_draws, exact).passed()
    # best: the visited state of highest target density; last: chain 0's final state
    best = max(found.result.traces, key=lambda t: t.log_joint)
    assert found.best == best.value and found.best_log_target == best.log_joint
    assert found.last == found.result.chains[0].values[-1]
    assert found.best == max(exact, key=exact.get)


def test_reprompting_prompt_uses_the_found_recipes():
    found = reprompting_recipes(RP_LM, EXAMPLES, num_samples=5, seed=0, demo=DEMO,
                                recipe_tokens=1, recipe_stop=None)  # fmt: skip
    z1, z2 = found.best
    assert found.prompt("b") == f"a{z1}=a;b{z2}=a;b"
    assert found.prompt("a", recipes=("b", "")) == "ab=a;b=a;a"


def test_split_demo():
    assert split_demo("Q: {question}\nA: {recipe} So {answer}.\n") == ("Q: {question}\nA: ",
                                                                      " So {answer}.\n")  # fmt: skip
    head, tail = split_demo("{{{question}}} {recipe}! {answer} {{x}}")
    assert head.format(question="q") == "{q} " and tail.format(answer="y") == "! y {x}"


def test_reprompting_errors_name_the_argument():
    with pytest.raises(OptionError, match="at least 2 examples"):
        reprompting(RP_LM, [("a", "a")])
    with pytest.raises(OptionError, match=r"examples\[0\]"):
        reprompting(RP_LM, [("a", 1), ("b", "a")])
    with pytest.raises(OptionError, match="examples must be a list"):
        reprompting(RP_LM, "ab")
    with pytest.raises(OptionError, match="in that order"):
        reprompting(RP_LM, EXAMPLES, demo="{answer}{recipe}{question}")
    with pytest.raises(OptionError, match="in that order"):
        reprompting(RP_LM, EXAMPLES, demo="{question}{recipe}")
    with pytest.raises(OptionError, match="demo must be a format string"):
        reprompting(RP_LM, EXAMPLES, demo=lambda q, r, a: q)
    with pytest.raises(OptionError, match="format spec"):
        reprompting(RP_LM, EXAMPLES, demo="{question}{recipe!r}{answer}")
    with pytest.raises(OptionError, match="recipe_tokens"):
        reprompting(RP_LM, EXAMPLES, recipe_tokens=0)
    with pytest.raises(OptionError, match="model must be a LanguageModel"):
        reprompting("gpt", EXAMPLES)
    with pytest.raises(OptionError, match="name"):
        reprompting(RP_LM, EXAMPLES, name="a/b")
    with pytest.raises(OptionError, match="proposal"):
        reprompting_recipes(RP_LM, EXAMPLES, proposal="gibbs", demo=DEMO, recipe_tokens=1)
    with pytest.raises(OptionError, match="reprompting: model must be a LanguageModel"):
        reprompting("gpt", EXAMPLES, recipe_tokens=0)
    with pytest.raises(OptionError, match=r"reprompting \(recipe_tokens"):
        reprompting(RP_LM, EXAMPLES, recipe_tokens=0)
    with pytest.raises(OptionError, match="reprompting_recipes: model must be a LanguageModel"):
        reprompting_recipes("gpt", EXAMPLES)
    with pytest.raises(OptionError, match="reprompting_recipes: needs at least 2 examples"):
        reprompting_recipes(RP_LM, EXAMPLES[:1])
    with pytest.raises(OptionError, match="reprompting_recipes: demo must use"):
        reprompting_recipes(RP_LM, EXAMPLES, demo="{answer}")
    found = reprompting_recipes(RP_LM, EXAMPLES, num_samples=1, seed=0, demo=DEMO,
                                recipe_tokens=1, recipe_stop=None)  # fmt: skip
    with pytest.raises(OptionError, match="Recipes.prompt: recipes must be 2 strings"):
        found.prompt("a", recipes=["a"])
    with pytest.raises(OptionError, match="Recipes.prompt: recipes must be 2 strings"):
        found.prompt("a", recipes="ab")
    with pytest.raises(OptionError, match="Recipes.prompt: question must be a string"):
        found.prompt(3)


def test_reprompting_raises_a_failed_path_score():
    """A model error while the few-shot paths are scored stops the run with that error; it
    does not give the trace weight zero, as a failing tool call would."""

    def scores(ctx):
        if len(ctx) > 3:
            raise RuntimeError("context too long for this toy")
        return rp_scores(ctx)

    short = ToyLM(RP_VOCAB, scores, name="short")
    with pytest.raises(RuntimeError, match="context too long for this toy"):
        lc.infer(reprompting(short, EXAMPLES, demo=DEMO, recipe_tokens=1, recipe_stop=None),
                 method="forward", num_samples=2, seed=0)  # fmt: skip


# --- composition -----------------------------------------------------------------------------


def test_two_of_each_pattern_in_one_program_do_not_collide():
    @lc.program
    def twice():
        a = yield from toy_star("x")
        b = yield from toy_star("y")
        return a + "|" + b

    r = lc.infer(twice(), method="enumerate")
    assert r.traces[0].names == [
        "star[0]/thought", "star[0]/answer", "star[1]/thought", "star[1]/answer",
    ]  # fmt: skip
    px, py = star_posterior("x"), star_posterior("y")
    close(r.distribution(), {f"{a}|{b}": px[a] * py[b] for a in px for b in py}, tol=1e-9)

    @lc.program
    def all_of_them():
        yield from toy_si()
        yield from toy_si()
        z = yield from toy_reprompting()
        w = yield from toy_reprompting()
        return z, w

    names = lc.infer(all_of_them(), method="forward", num_samples=1, seed=0).traces[0].names
    assert len(names) == len(set(names))
    for prefix in ("si[0]/", "si[1]/", "reprompt[0]/", "reprompt[1]/"):
        assert any(n.startswith(prefix) for n in names), prefix

    @lc.program
    def two_reprompts():
        z = yield from toy_reprompting()
        w = yield from toy_reprompting()
        return z, w

    r = lc.infer(two_reprompts(), method="enumerate")
    exact = rp_exact()
    got = Counter()
    for t, w in zip(r.traces, r.weights, strict=True):
        got[t.value] += float(w)
    close(dict(got), {(z, w): exact[z] * exact[w] for z in exact for w in exact}, tol=1e-9)

    @lc.program
    def same_name():
        yield from toy_star("x", name="fixed")
        yield from toy_star("x", name="fixed")

    with pytest.raises(DuplicateSiteError):
        lc.infer(same_name(), method="forward", num_samples=1, seed=0)


def test_patterns_raise_site_errors_for_untokenisable_answers():
    bad = rationalise(THINKER, "x", "zz", think="{question}", answer_prompt="{question}=",
                      think_tokens=1, answer_tokens=1)  # fmt: skip
    with pytest.raises((SiteError, lc.errors.TokenizationError), match="zz"):
        lc.infer(bad, method="forward", num_samples=1, seed=0)
