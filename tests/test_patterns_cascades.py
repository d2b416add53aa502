"""Deferral cascades, cascade reward sampling and prompt intersection, against first principles.

Every exact check compares ``lc.infer(..., method="enumerate")`` with a distribution computed
here, independently of the engine: the toy models' token paths are walked in plain Python
(softmax of the scoring function), and each pattern's rule is applied to them as its
docstring states it (:func:`paths`, :func:`deferral_law`, :func:`crs_law`, :func:`product`).
Those checks are deterministic (tolerance 1e-9).

The statistical checks use ``tests/stats.py``'s chi-square test of i.i.d. draws (false-alarm
rate below 1e-3 each); each states, next to it, the smallest total-variation error it detects
with probability 0.9 (printed on failure), and the ones marked "can fail" run the same check
on a deliberately wrong variant and require it to be rejected.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from itertools import product as cartesian

import pytest
import torch

import lmcascade as lc
from lmcascade.errors import AllWeightsZeroError, LMCascadeError, OptionError, SiteError
from lmcascade.models import ToyLM
from lmcascade.patterns.crs import CRSOutcome, cascade_reward_sampling, threshold_schedule
from lmcascade.patterns.deferral import (
    Deferral,
    cascades_in,
    deferral_cascade,
    deferral_curve,
    deferral_record,
    plot_deferral_curve,
)
from lmcascade.patterns.intersection import prompt_intersection
from stats import accepted_by_weight, assert_matches, chi2_gof, one_draw_per_run, tv_distance

VOCAB = ["a", "b", "<eos>"]
EOS = 2


@pytest.fixture(autouse=True)
def one_thread():
    """Toy models make tiny tensor operations, which more threads only slow down (by 10x on a
    busy two-core machine); the setting is put back after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scores_for(shift: float):
    """A context-dependent scoring function; ``shift`` makes another model of the same vocab."""

    def scores(ctx):
        h = (sum((i + 3) * (t + 1) for i, t in enumerate(ctx)) * 7919 + int(shift * 10)) % 97
        return [(h % 5) / 2.0 + shift, ((h // 5) % 4) / 2.0 - shift, -0.5 + 0.4 * len(ctx)]

    return scores


SMALL_SCORES, LARGE_SCORES = scores_for(0.0), scores_for(1.3)
SMALL = ToyLM(VOCAB, SMALL_SCORES, name="small")
LARGE = ToyLM(VOCAB, LARGE_SCORES, name="large")


# --- first principles: the toy models' token paths ------------------------------------------


def paths(scores, prompt: str, max_tokens: int, stop: str | None = None) -> list:
    """Every complete token path after ``prompt`` as (ids, probability, token probabilities),
    walked with the softmax of ``scores`` (the definition of a ToyLM); a path ends at eos, at
    ``max_tokens`` or once its text contains ``stop``."""
    out = []
    start = [VOCAB.index(c) for c in prompt]

    def walk(ids, prob, tps):
        logits = torch.tensor(scores(tuple(start + ids)), dtype=torch.float64)
        probs = torch.softmax(logits, 0).tolist()
        for t, p in enumerate(probs):
            new, new_tps = ids + [t], tps + [p]
            text = "".join(VOCAB[i] for i in new if i != EOS)
            if t == EOS or len(new) >= max_tokens or (stop and stop in text):
                out.append((tuple(new), prob * p, tuple(new_tps)))
            else:
                walk(new, prob * p, new_tps)

    walk([], 1.0, [])
    assert abs(sum(p for _, p, _ in out) - 1.0) < 1e-12
    return out


def text_of(ids, stop: str | None = None) -> str:
    text = "".join(VOCAB[i] for i in ids if i != EOS)
    return text.split(stop)[0] if stop else text


def close(a: dict, b: dict, tol: float = 1e-9) -> None:
    keys = {k for k in set(a) | set(b) if a.get(k, 0.0) > tol or b.get(k, 0.0) > tol}
    for k in keys:
        assert abs(a.get(k, 0.0) - b.get(k, 0.0)) <= tol, (k, a.get(k), b.get(k))


# --- deferral ---------------------------------------------------------------------------------

CONF = {  # the built-in confidences, from their definitions
    "mean_log_prob": lambda tps: math.exp(sum(map(math.log, tps)) / len(tps)),
    "max_prob": lambda tps: math.prod(tps),
    "min_token_prob": lambda tps: min(tps),
}


def deferral_law(prompt: str, max_tokens: int, conf, t: float, costs=(1.0, 1.0)):
    """The cascade's answer distribution and expected tokens/cost, from the rule: the small
    model's answer stays when its confidence is >= t (and t < 1), else the large one answers."""
    dist: dict = defaultdict(float)
    tokens = [0.0, 0.0]
    deferred = 0.0
    large = paths(LARGE_SCORES, prompt, max_tokens)
    for ids, p, tps in paths(SMALL_SCORES, prompt, max_tokens):
        tokens[0] += p * len(ids)
        if t < 1 and conf(tps) >= t:
            dist[text_of(ids)] += p
            continue
        deferred += p
        for ids2, p2, _ in large:
            dist[text_of(ids2)] += p * p2
            tokens[1] += p * p2 * len(ids2)
    cost = costs[0] * tokens[0] + costs[1] * tokens[1]
    return dict(dist), tokens, deferred, cost


def midpoints(prompt: str, max_tokens: int, conf) -> list[float]:
    """Thresholds between the small model's distinct confidences (no float ties at a
    threshold), plus the two ends."""
    cs = sorted({conf(tps) for _, _, tps in paths(SMALL_SCORES, prompt, max_tokens)})
    return [0.0, *((a + b) / 2 for a, b in zip(cs, cs[1:], strict=False)), 1.0]


@pytest.mark.parametrize("name", sorted(CONF))
def test_deferral_is_the_mixture_its_rule_defines(name):
    costs = (1.0, 7.5)
    for t in midpoints("ab", 2, CONF[name]):
        prog = deferral_cascade(
            [SMALL, LARGE], "ab", t, confidence=name, costs=costs, max_tokens=2, details=True
        )
        r = lc.infer(prog, method="enumerate")
        dist, tokens, deferred, cost = deferral_law("ab", 2, CONF[name], t, costs)
        answers: dict = defaultdict(float)
        for d, p in r.distribution().items():
            answers[d.answer] += p
        close(answers, dist)
        assert abs(r.expectation(lambda d: d.deferred) - deferred) < 1e-9
        assert abs(r.expectation(lambda d: d.cost) - cost) < 1e-9
        for i in (0, 1):
            got = r.expectation(lambda d, i=i: d.tokens[i] if i < len(d.tokens) else 0)
            assert abs(got - tokens[i]) < 1e-9
        assert abs(r.log_evidence) < 1e-9  # the cascade adds no weight


def test_thresholds_0_and_1_reproduce_each_model():
    """Threshold 0: the small model's answers and costs; 1: the large model's answers, with
    each model's own token count (the small one still ran first)."""
    alone = {}
    for model in (SMALL, LARGE):

        @lc.program
        def own(model=model):
            out = yield lc.gen("x", model, "ba", max_tokens=3, details=True)
            return out

        r = lc.infer(own(), method="enumerate")
        alone[model.name] = (
            r.distribution(),
            r.expectation(lambda g: len(g.token_ids)),
        )
    for name in CONF:
        for t, m in ((0.0, "small"), (1.0, "large")):
            prog = deferral_cascade(
                [SMALL, LARGE], "ba", t, confidence=name, max_tokens=3, details=True
            )
            r = lc.infer(prog, method="enumerate")
            texts: dict = defaultdict(float)
            for d, p in r.distribution().items():
                texts[d.answer] += p
            own_texts: dict = defaultdict(float)
            for g, p in alone[m][0].items():
                own_texts[g.text] += p
            close(texts, own_texts)
            assert {d.model for d in r.distribution()} == {0 if m == "small" else 1}
            small_tokens = r.expectation(lambda d: d.tokens[0])
            assert abs(small_tokens - alone["small"][1]) < 1e-9
            if m == "large":
                large_tokens = r.expectation(lambda d: d.tokens[1])
                assert abs(large_tokens - alone["large"][1]) < 1e-9
                cost = alone["small"][1] + alone["large"][1]
            else:
                cost = alone["small"][1]
            assert abs(r.expectation(lambda d: d.cost) - cost) < 1e-9


def test_threshold_1_defers_even_a_sure_answer_and_0_keeps_a_hopeless_one():
    for conf, t, model in ((1.0, 1.0, 1), (0.0, 0.0, 0)):
        prog = deferral_cascade(
            [SMALL, LARGE], "a", t, confidence=lambda p, g, c=conf: c, max_tokens=1, details=True
        )
        r = lc.infer(prog, method="enumerate")
        assert {d.model for d in r.distribution()} == {model}


def test_callable_and_program_confidences():
    """A user scorer (here: sure of "a" only) and a verifier program (the large model's
    score of the answer) decide like the built-ins, by hand."""
    by_text = {"a": 1.0}
    r = lc.infer(
        deferral_cascade(
            [SMALL, LARGE],
            "b",
            0.5,
            confidence=lambda prompt, g: by_text.get(g.text, 0.0),
            max_tokens=1,
        ),
        method="enumerate",
    )
    want = defaultdict(float)
    for ids, p, _ in paths(SMALL_SCORES, "b", 1):
        if text_of(ids) == "a":
            want["a"] += p
        else:
            for ids2, p2, _ in paths(LARGE_SCORES, "b", 1):
                want[text_of(ids2)] += p * p2
    close(r.distribution(), want)

    @lc.program
    def verifier(prompt, g):
        lp = yield lc.score("large_says", LARGE, prompt, g.text)
        return math.exp(lp)

    r = lc.infer(
        deferral_cascade([SMALL, LARGE], "b", 0.3, confidence=verifier, max_tokens=1),
        method="enumerate",
    )
    large = paths(LARGE_SCORES, "b", 1)
    p_large_first = {text_of(ids): p for ids, p, _ in large}  # one token: P(first token)
    want = defaultdict(float)
    for ids, p, _ in paths(SMALL_SCORES, "b", 1):
        text = text_of(ids)
        sure = 1.0 if text == "" else p_large_first[text]  # an empty text scores log 1
        if sure >= 0.3:
            want[text] += p
        else:
            for ids2, p2, _ in large:
                want[text_of(ids2)] += p * p2
    close(r.distribution(), want)
    names = r.traces[0].names
    assert "deferral[0]/model[0]/verifier/large_says" in names
    assert "deferral[0]/model[0]/confidence" in names


def test_three_models_per_model_prompts_params_and_thresholds():
    mid = ToyLM(VOCAB, scores_for(0.6), name="mid")
    prog = deferral_cascade(
        [SMALL, mid, LARGE],
        ["a", "b", "ab"],
        [1.0, 0.0],  # always past the first, never past the second
        params=[{}, {"max_tokens": 1}, {}],
        max_tokens=2,
        details=True,
    )
    r = lc.infer(prog, method="enumerate")
    assert {d.model for d in r.distribution()} == {1}
    want = defaultdict(float)
    for ids, p, _ in paths(scores_for(0.6), "b", 1):
        want[text_of(ids)] += p
    got: dict = defaultdict(float)
    for d, p in r.distribution().items():
        got[d.answer] += p
        assert len(d.tokens) == 2 and d.tokens[1] == 1
    close(got, want)


def test_the_curve_offline_equals_rerunning_at_each_threshold():
    """Sweeping thresholds over one threshold-1 run per input gives exactly what rerunning the
    cascade at each threshold gives (enumeration, so no sampling noise)."""
    prompts, labels, costs = ["ab", "ba", "bb"], ["a", "ab", "b"], [1.0, 4.0]
    full = [
        lc.infer(deferral_cascade([SMALL, LARGE], p, 1.0, max_tokens=2), method="enumerate")
        for p in prompts
    ]
    ts = sorted(set().union(*(midpoints(p, 2, CONF["mean_log_prob"]) for p in prompts)))
    rows = deferral_curve(full, labels, thresholds=ts, costs=costs)
    assert [row.threshold for row in rows] == ts
    for row in rows[::3] + rows[-1:]:  # rerunning is slow: every third threshold, and 1
        acc = dfr = cost = 0.0
        for p, label in zip(prompts, labels, strict=True):
            rerun = lc.infer(
                deferral_cascade(
                    [SMALL, LARGE], p, row.threshold, costs=costs, max_tokens=2, details=True
                ),
                method="enumerate",
            )
            acc += rerun.expectation(lambda d, label=label: d.answer == label) / 3
            dfr += rerun.expectation(lambda d: d.deferred) / 3
            cost += rerun.expectation(lambda d: d.cost) / 3
        assert abs(row.accuracy - acc) < 1e-9 and abs(row.deferred - dfr) < 1e-9
        assert abs(row.cost - cost) < 1e-9
        assert abs(sum(row.answered_by) - 1.0) < 1e-9
    assert rows[0].deferred == 0.0 and abs(rows[-1].deferred - 1.0) < 1e-9
    # the default thresholds are every recorded confidence plus the ends: the whole curve
    default = deferral_curve(full, labels)
    assert default[0].threshold == 0.0 and default[-1].threshold == 1.0
    assert len(default) > len(prompts)


def test_the_curve_from_samples_records_and_infer_many():
    @lc.program
    def ask(prompt):
        return (yield from deferral_cascade([SMALL, LARGE], prompt, 1.0, max_tokens=2))

    pairs = list(lc.infer_many(ask, ["ab", "ba"], method="forward", num_samples=40, seed=3))
    rows = deferral_curve(pairs, correct=lambda answer: answer.startswith("a"))
    assert rows[0].threshold == 0.0 and abs(rows[-1].deferred - 1.0) < 1e-9
    # each trace's record, swept by hand at one threshold
    recs = [
        (w, deferral_record(t)) for _, r in pairs for t, w in zip(r.traces, r.weights, strict=True)
    ]
    t = rows[len(rows) // 2].threshold
    by_hand = sum(w * rec.answers[rec.at([t])].startswith("a") for w, rec in recs) / 2
    assert abs(rows[len(rows) // 2].accuracy - by_hand) < 1e-9
    # plain records
    runs = [Deferral(("x", "y"), (0.8, None), (2, 5)), Deferral(("y", "y"), (0.2, None), (1, 5))]
    (row,) = deferral_curve(runs, ["y", "y"], thresholds=[0.5], costs=[1.0, 2.0])
    assert row == (0.5, 0.5, 0.5, (2 + 1 + 10) / 2, (0.5, 0.5))


def test_records_that_stopped_early_serve_only_lower_thresholds():
    r = lc.infer(
        deferral_cascade([SMALL, LARGE], "ab", 0.2, max_tokens=2),
        method="enumerate",
    )
    assert deferral_curve([r], ["a"], thresholds=[0.0, 0.1, 0.2])
    with pytest.raises(OptionError, match="threshold=1"):
        deferral_curve([r], ["a"], thresholds=[0.99])


def test_two_cascades_in_one_program_compose_under_every_method():
    @lc.program
    def both():
        with lc.scope("q"):
            x = yield from deferral_cascade([SMALL, LARGE], "a", 0.4, max_tokens=1)
        y = yield from deferral_cascade([SMALL, LARGE], "b", 0.4, max_tokens=1)
        z = yield from deferral_cascade([SMALL, LARGE], "b", 0.4, max_tokens=1)
        return x + "|" + y + "|" + z

    exact = lc.infer(both(), method="enumerate")
    one = {
        p: lc.infer(deferral_cascade([SMALL, LARGE], p, 0.4, max_tokens=1), method="enumerate")
        for p in "ab"
    }
    want: dict = defaultdict(float)
    for (x, px), (y, py), (z, pz) in cartesian(
        one["a"].distribution().items(),
        one["b"].distribution().items(),
        one["b"].distribution().items(),
    ):
        want[f"{x}|{y}|{z}"] += px * py * pz
    close(exact.distribution(), want)
    trace = max(exact.traces, key=lambda t: len(t.names))
    assert cascades_in(trace) == ["q/deferral[0]", "deferral[0]", "deferral[1]"]
    assert (
        deferral_record(trace, "deferral[1]").answers[0]
        == trace["deferral[1]/model[0]/answer"].value
    )
    with pytest.raises(OptionError, match="prefix"):
        deferral_record(trace)
    few = {"num_samples": 10}
    for method, opts in (
        ("forward", few),
        ("importance", few),
        ("rejection", few),
        ("smc", {"particles": 8}),
        ("mcmc", {"num_samples": 10, "burn_in": 10}),
        ("beam", {}),
        ("priority", {"num_samples": 3}),
    ):
        r = lc.infer(both(), method=method, seed=0, progress=False, **opts)
        assert r.best() in want, method


def test_deferral_errors_name_the_argument():
    with pytest.raises(SiteError, match="at least two"):
        deferral_cascade([SMALL], "a")
    with pytest.raises(SiteError, match="list of two or more"):
        deferral_cascade(SMALL, "a")
    with pytest.raises(SiteError, match=r"models\[1\]"):
        deferral_cascade([SMALL, "large"], "a")
    with pytest.raises(SiteError, match="thresholds are confidences"):
        deferral_cascade([SMALL, LARGE], "a", 1.5)
    with pytest.raises(SiteError, match="one per model but the last"):
        deferral_cascade([SMALL, LARGE], "a", [0.1, 0.2])
    with pytest.raises(SiteError, match="'entropy' is not one of"):
        deferral_cascade([SMALL, LARGE], "a", confidence="entropy")
    with pytest.raises(SiteError, match="prompt"):
        deferral_cascade([SMALL, LARGE], ["a"])
    with pytest.raises(SiteError, match="model 1: .*max_tokens"):
        deferral_cascade([SMALL, LARGE], "a", params=[{}, {"max_tokens": 0}])
    with pytest.raises(SiteError, match="costs"):
        deferral_cascade([SMALL, LARGE], "a", costs=[1.0, -1.0])
    bad = deferral_cascade([SMALL, LARGE], "a", confidence=lambda p, g: 2.0, max_tokens=1)
    with pytest.raises(SiteError, match=r"deferral\[0\]/model\[0\]/confidence.*\[0, 1\]"):
        lc.infer(bad, method="forward", num_samples=2, seed=0)
    # a scorer that raises is a failing tool: weight zero, not a crash
    broken = deferral_cascade([SMALL, LARGE], "a", confidence=lambda p, g: 1 / 0, max_tokens=1)
    with pytest.raises(AllWeightsZeroError, match="confidence"):
        lc.infer(broken, method="forward", num_samples=2, seed=0)
    with pytest.raises(OptionError, match="labels"):
        deferral_curve([Deferral(("a",), (None,), (1,))])
    with pytest.raises(OptionError, match="one label per run"):
        deferral_curve([Deferral(("a",), (None,), (1,))], ["a", "b"])
    with pytest.raises(OptionError, match=r"\[0, 1\]"):
        deferral_curve([Deferral(("a",), (None,), (1,))], ["a"], thresholds=[2.0])
    with pytest.raises(OptionError, match="Result of a deferral cascade"):
        deferral_curve(["a"], ["a"])


def test_plot_writes_a_picture_and_says_when_matplotlib_is_missing(tmp_path, monkeypatch):
    rows = deferral_curve([Deferral(("4", "5"), (0.3, None), (1, 2))], ["5"])
    path = plot_deferral_curve(rows, str(tmp_path / "curve.png"))
    assert (tmp_path / "curve.png").stat().st_size > 0 and path.endswith("curve.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(LMCascadeError, match="pip install matplotlib"):
        plot_deferral_curve(rows, str(tmp_path / "again.png"))


# --- cascade reward sampling ------------------------------------------------------------------

CRS_LM = ToyLM(VOCAB, SMALL_SCORES, name="crs")


def crs_law(
    prompt,
    reward,
    threshold,
    budget,
    max_tokens,
    seg_tokens,
    stop=None,
    unc=None,
    seg_min=1,
    keep="best",
):
    """The law of the search, from its definition: segments drawn from the model (cut by the
    rules), accepted at reward >= threshold(tokens), else redrawn; after ``budget`` draws the
    first best one is kept (``keep="last"``: a deliberately wrong variant, the last draw)."""
    schedule = threshold_schedule(threshold, max_tokens)
    out: dict = defaultdict(float)

    def segments(context: str, limit: int) -> dict:
        law: dict = defaultdict(float)
        for ids, p, tps in paths(SMALL_SCORES, context, limit, stop):
            cut = len(ids)
            if unc is not None:
                cut = next((k for k in range(seg_min, len(ids)) if tps[k] < unc), cut)
            law[ids[:cut]] += p
        return law

    def walk(text: str, used: int, prob: float) -> None:
        if used >= max_tokens:
            out[text] += prob
            return
        cands = []
        for kept, p in segments(prompt + text, min(seg_tokens, max_tokens - used)).items():
            seg = "".join(VOCAB[i] for i in kept if i != EOS)
            r = reward(prompt, text + seg)
            cands.append((kept, seg, p, r, r >= schedule(used + len(kept))))
        choose: dict = defaultdict(float)
        rejected = [c for c in cands if not c[4]]
        p_rej = sum(c[2] for c in rejected)
        for k in range(budget):
            for c in cands:
                if c[4]:
                    choose[c[0]] += p_rej**k * c[2]
        for tries in cartesian(rejected, repeat=budget):
            q = math.prod(c[2] for c in tries)
            pick = tries[-1] if keep == "last" else max(tries, key=lambda c: c[3])  # first max
            choose[pick[0]] += q
        for c in cands:
            if choose[c[0]] > 0:
                kept, seg = c[0], c[1]
                if kept[-1] == EOS:
                    out[text + seg] += prob * choose[kept]
                else:
                    walk(text + seg, used + len(kept), prob * choose[kept])

    walk("", 0, 1.0)
    return dict(out)


def likes_b(prompt: str, text: str) -> float:
    return text.count("b") - 0.3 * text.count("a")


CRS_CASES = {
    "constant": dict(threshold=0.5, budget=3, max_tokens=2, segment_tokens=2),
    "rising, uncertainty cut": dict(
        threshold=(-0.5, 1.0), budget=2, max_tokens=3, segment_tokens=2, uncertainty=0.3
    ),
    "stop string": dict(threshold=0.6, budget=2, max_tokens=3, segment_tokens=3, segment_stop="b"),
    "later cut": dict(
        threshold=0.0, budget=2, max_tokens=3, segment_tokens=3, uncertainty=0.4, segment_min=2
    ),
}


def law_args(case: dict) -> dict:
    return dict(
        threshold=case["threshold"],
        budget=case["budget"],
        max_tokens=case["max_tokens"],
        seg_tokens=case["segment_tokens"],
        stop=case.get("segment_stop"),
        unc=case.get("uncertainty"),
        seg_min=case.get("segment_min", 1),
    )


@pytest.mark.parametrize("case", sorted(CRS_CASES))
def test_crs_is_exactly_the_law_of_its_search(case):
    prog = cascade_reward_sampling(CRS_LM, "a", likes_b, **CRS_CASES[case])
    exact = lc.infer(prog, method="enumerate", max_traces=200_000)
    want = crs_law("a", likes_b, **law_args(CRS_CASES[case]))
    close(exact.distribution(), want)
    # the check can fail: keeping the last draw instead of the best differs visibly
    wrong = crs_law("a", likes_b, keep="last", **law_args(CRS_CASES[case]))
    assert tv_distance(want, wrong) > 0.01


def test_crs_sampling_matches_the_law():
    """Forward sampling of the program (no weights: i.i.d. draws) against the exact law.
    Chi-square, false-alarm rate < 1e-3; 1500 draws detect a TV error of about 0.08 (printed).
    Can fail: the same draws are rejected against the keep-the-last-draw law."""
    case = CRS_CASES["rising, uncertainty cut"]
    prog = cascade_reward_sampling(CRS_LM, "a", likes_b, **case)
    r = lc.infer(prog, method="forward", num_samples=1500, seed=11)
    assert_matches(r.values, crs_law("a", likes_b, **law_args(case)))
    wrong = crs_law("a", likes_b, keep="last", **law_args(case))
    assert not chi2_gof(r.values, wrong).passed()


def test_crs_details_and_scopes():
    case = CRS_CASES["rising, uncertainty cut"]

    @lc.program
    def twice():
        first = yield from cascade_reward_sampling(CRS_LM, "a", likes_b, details=True, **case)
        second = yield from cascade_reward_sampling(CRS_LM, "b", likes_b, details=True, **case)
        return first, second

    r = lc.infer(twice(), method="forward", num_samples=20, seed=2)
    schedule = threshold_schedule(case["threshold"], case["max_tokens"])
    for trace in r.traces:
        names = trace.names
        assert len(names) == len(set(names))
        assert any(n.startswith("crs[1]/segment[0]/try[0]/") for n in names)
        for prompt, out in zip("ab", trace.value, strict=True):
            assert isinstance(out, CRSOutcome) and out.text == "".join(out.segments)
            assert all(1 <= t <= case["budget"] for t in out.tries)
            for j, (rew, ok, tries) in enumerate(
                zip(out.rewards, out.accepted, out.tries, strict=True)
            ):
                so_far = "".join(out.segments[: j + 1])
                assert rew == likes_b(prompt, so_far)
                if ok:  # the threshold rises, and the text has at least this many tokens
                    assert rew >= schedule(len(CRS_LM.encode(so_far)))
                else:
                    assert tries == case["budget"]
            assert out.tokens >= len(out.segments)
    # every method runs it (the same law: the program adds no weight)
    for method, opts in (("smc", {}), ("mcmc", {"num_samples": 10, "burn_in": 5}), ("beam", {})):
        lc.infer(twice(), method=method, seed=0, progress=False, **opts)


def test_crs_reward_program_and_failing_reward():
    @lc.program
    def judged(prompt, text):
        lp = yield lc.score("judge", LARGE, prompt, text)  # the large model's log-probability
        return lp

    prog = cascade_reward_sampling(
        CRS_LM, "a", judged, threshold=-1.5, budget=2, max_tokens=2, segment_tokens=2
    )
    exact = lc.infer(prog, method="enumerate")

    def by_large(prompt, text):
        ids = [VOCAB.index(c) for c in prompt + text]
        lp = 0.0
        for k in range(len(prompt), len(ids)):
            logits = torch.tensor(LARGE_SCORES(tuple(ids[:k])), dtype=torch.float64)
            lp += float(torch.log_softmax(logits, 0)[ids[k]])
        return lp

    close(exact.distribution(), crs_law("a", by_large, -1.5, 2, 2, 2), tol=1e-6)
    assert "crs[0]/segment[0]/try[0]/scorer/judge" in exact.traces[0].names

    def fails(prompt, text):
        raise RuntimeError("reward model down")

    with pytest.raises(AllWeightsZeroError, match="reward"):
        lc.infer(
            cascade_reward_sampling(CRS_LM, "a", fails, max_tokens=2),
            method="forward",
            num_samples=2,
            seed=0,
        )


def test_crs_errors_name_the_argument():
    ok = dict(model=CRS_LM, prompt="a", reward=likes_b)
    for bad, match in (
        ({"budget": 0}, "budget"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"segment_tokens": 1.5}, "segment_tokens"),
        ({"uncertainty": 0.0}, "uncertainty"),
        ({"uncertainty": 1.5}, "uncertainty"),
        ({"threshold": "high"}, "threshold"),
        ({"threshold": (0.0, math.nan)}, "threshold"),
        ({"stop": "\n"}, "segment_stop"),
        ({"temperature": -1.0}, "temperature"),
        ({"reward": 3}, "reward"),
    ):
        with pytest.raises(SiteError, match=match):
            cascade_reward_sampling(**{**ok, **bad})
    nan = cascade_reward_sampling(CRS_LM, "a", lambda p, t: math.nan, max_tokens=2)
    with pytest.raises(SiteError, match=r"crs\[0\]/segment\[0\]/try\[0\]/reward"):
        lc.infer(nan, method="forward", num_samples=2, seed=0)


# --- prompt intersection ----------------------------------------------------------------------


def text_dist(scores, prompt: str, max_tokens: int, stop: str | None = None) -> dict:
    dist: dict = defaultdict(float)
    for ids, p, _ in paths(scores, prompt, max_tokens, stop):
        dist[text_of(ids, stop)] += p
    return dist


def product(p1: dict, p2: dict) -> tuple[dict, float]:
    """The normalised product of two distributions over texts, and its normaliser."""
    joint = {x: p1[x] * p2.get(x, 0.0) for x in p1}
    z = sum(joint.values())
    return {x: v / z for x, v in joint.items()}, z


INTERSECTION_CASES = {
    "one model, two prompts": (SMALL, SMALL_SCORES, "ab", "bb", {"max_tokens": 3}),
    "two models": (LARGE, LARGE_SCORES, "ab", "ab", {"max_tokens": 3}),
    "stop string": (SMALL, SMALL_SCORES, "ab", "ba", {"max_tokens": 3, "stop": "b"}),
}


@pytest.mark.parametrize("case", sorted(INTERSECTION_CASES))
@pytest.mark.parametrize("steer", [True, False])
def test_intersection_is_the_normalised_product(case, steer):
    other, other_scores, p1, p2, params = INTERSECTION_CASES[case]
    prog = prompt_intersection(SMALL, p1, p2, other_model=other, steer=steer, **params)
    exact = lc.infer(prog, method="enumerate")
    stop = params.get("stop")
    want, z = product(
        text_dist(SMALL_SCORES, p1, params["max_tokens"], stop),
        text_dist(other_scores, p2, params["max_tokens"], stop),
    )
    close(exact.distribution(), want)
    assert abs(exact.log_evidence - math.log(z)) < 1e-9


def opposed(ctx):
    """Prompt "a" favours a's, prompt "b" favours b's: their product is far from either."""
    k, h = len(ctx), (sum(ctx) * 7) % 3 / 4
    return [0.7 + h, -0.7, -1.5 + 0.5 * k] if ctx[0] == 0 else [-0.7, 0.7 - h, -1.5 + 0.5 * k]


OPPOSED = ToyLM(VOCAB, opposed, name="opposed")


def test_intersection_smc_and_forward_match_the_product():
    """SMC (steered, resampling every token, 16 particles): one draw from each of 200 runs,
    i.i.d. from SMC's sampling distribution q_N. Chi-square at level 1e-3; it detects a TV
    error of about 0.20 with probability 0.9 (printed on failure). q_N is not exactly the
    product: measured over 1000 runs, its finite-population bias is TV 0.02 (200 * chi2 = 0.7
    on the test's cells), so this test's false-alarm rate as run is about 1.4e-3.
    Forward sampling thinned by its weights (every weight is p2(x) <= max p2, computed here):
    exact i.i.d. draws; the ~900 kept detect a TV error of about 0.13, false alarms < 1e-3.
    Can fail: a program steered by the second prompt but without its observe targets p1 alone
    (TV 0.31 from the product); its forward draws are rejected by the same test (its SMC draws
    too, checked once by hand)."""
    p1, p2 = text_dist(opposed, "a", 2), text_dist(opposed, "b", 2)
    want, _ = product(p1, p2)
    prog = prompt_intersection(OPPOSED, "a", "b", max_tokens=2)
    runs = (lc.infer(prog, method="smc", particles=16, seed=s, progress=False) for s in range(200))
    assert_matches(one_draw_per_run(runs), want)

    r = lc.infer(prog, method="forward", num_samples=3500, seed=5)
    drawn = accepted_by_weight(r, math.log(max(p2.values())), seed=5)
    assert len(drawn) > 700
    assert_matches(drawn, want)

    @lc.program
    def steered_only():  # the twist without the factor: the target is p1, not the product
        guide = lc.LM(OPPOSED, "b", max_tokens=2)
        return (yield lc.gen("text", OPPOSED, "a", max_tokens=2, potential=guide))

    assert tv_distance(want, p1) > 0.3
    wrong = lc.infer(steered_only(), method="forward", num_samples=700, seed=5)
    assert not chi2_gof(accepted_by_weight(wrong, 0.0, seed=5), want).passed()


def test_two_intersections_in_one_program():
    @lc.program
    def pair():
        x = yield from prompt_intersection(SMALL, "a", "b", max_tokens=1)
        y = yield from prompt_intersection(SMALL, "b", "a", max_tokens=1)
        return x + "|" + y

    exact = lc.infer(pair(), method="enumerate")
    a, _ = product(text_dist(SMALL_SCORES, "a", 1), text_dist(SMALL_SCORES, "b", 1))
    b, _ = product(text_dist(SMALL_SCORES, "b", 1), text_dist(SMALL_SCORES, "a", 1))
    close(exact.distribution(), {f"{x}|{y}": a[x] * b[y] for x in a for y in b})
    assert exact.traces[0].names == [
        "intersection[0]/text",
        "intersection[0]/other",
        "intersection[1]/text",
        "intersection[1]/other",
    ]
    for method, opts in (
        ("importance", {"num_samples": 20}),
        ("mcmc", {"num_samples": 10, "burn_in": 10}),
        ("beam", {}),
        ("priority", {"num_samples": 3}),
    ):
        r = lc.infer(pair(), method=method, seed=0, progress=False, **opts)
        assert r.best() in exact.distribution(), method


def test_intersection_errors_name_the_argument():
    other_vocab = ToyLM(["a", "b", "c", "<eos>"], lambda ctx: [0.0] * 4, name="other")
    with pytest.raises(SiteError, match="steer=False"):
        prompt_intersection(SMALL, "a", "b", other_model=other_vocab)
    r = lc.infer(
        prompt_intersection(SMALL, "a", "b", other_model=other_vocab, steer=False, max_tokens=2),
        method="enumerate",
    )
    assert "c" not in "".join(r.distribution())  # SMALL never writes "c"
    with pytest.raises(SiteError, match="other_prompt"):
        prompt_intersection(SMALL, "a", 3)
    with pytest.raises(SiteError, match="other_model"):
        prompt_intersection(SMALL, "a", "b", other_model="big")
    with pytest.raises(SiteError, match="potential"):
        prompt_intersection(SMALL, "a", "b", potential=len)
    with pytest.raises(SiteError, match="max_tokens"):
        prompt_intersection(SMALL, "a", "b", max_tokens=0)
