"""Verifiers (predicate, LM judge, verification-at-k) and tools (calculator, sandbox).

Exact values come from enumeration of programs *without* the pattern or from first
principles (a ToyLM's softmax computed here by hand, selection rules applied to every
outcome by brute force); statistical tests use tests/stats.py (false-alarm rate 1e-3 each,
detectable total-variation distance stated where they are made).

The semantic tests were run once against deliberately wrong implementations and failed: a judge
weighing by P(No) (the forward-sampling test), verification at k ranking its candidates in
the wrong order (the forward test) or breaking ties towards the later candidate (the exact
test), a predicate whose verdict was ignored (the predicate tests).  Power checks kept here:
``test_judge_sampling_test_catches_a_judge_counted_twice``,
``test_the_exact_check_catches_a_comparer_asked_the_wrong_way_round`` and the unverified
selection in ``test_verification_at_k_under_forward_draws_the_selection_distribution``.
"""

from __future__ import annotations

import itertools
import math
import os
import time

import pytest
import torch
from pyro.distributions import Bernoulli

import lmcascade as lc
from lmcascade.errors import AllWeightsZeroError, SiteError
from lmcascade.models import ToyLM
from lmcascade.patterns.sandbox import (
    CalculatorError,
    SandboxError,
    calculator,
    python_runner,
    python_tool,
    run_tests,
)
from lmcascade.patterns.verify import (
    judge_compare,
    judge_probability,
    judge_vote,
    lm_judge,
    verification_at_k,
    verify_with,
)
from stats import accepted_by_weight, assert_matches, assert_same_exact, chi2_gof

# --- models ---------------------------------------------------------------------------------

WRITER = ToyLM(
    ["a", "b", "c", "<eos>"],
    lambda ctx: [0.3 * len(ctx), 0.5 - 0.2 * len(ctx), -0.4, -0.7],
    name="writer",
)
JUDGE_VOCAB = ["Yes", "No", "a", "b", "c", "?", "<eos>"]


def judge_scores(ctx):
    """A context-dependent judge: its opinion of an answer depends on the answer's tokens."""
    h = sum((i + 3) * (t + 1) for i, t in enumerate(ctx)) % 7
    return [h / 3.0 - 1.0, (6 - h) / 4.0 - 0.5, -1.0, -1.2, -0.8, -2.0, 0.2]


JUDGE = ToyLM(JUDGE_VOCAB, judge_scores, name="judge")
TEMPLATE = "{question}{answer}?"
QUESTION = "c"


def hand_p_yes(answer: str, normalize: bool) -> float:
    """The judge's P(Yes) for ``answer``, from its score function and a softmax written here."""
    ids = tuple(JUDGE.encode(TEMPLATE.format(question=QUESTION, answer=answer)))
    s = judge_scores(ids)
    weights = [math.exp(x) for x in s]
    if normalize:
        return weights[0] / (weights[0] + weights[1])
    return weights[0] / sum(weights)


@lc.program
def write():
    return (yield lc.gen("answer", WRITER, "a", max_tokens=2))


@lc.program
def judged(normalize=True):
    answer = yield lc.gen("answer", WRITER, "a", max_tokens=2)
    yield from lm_judge(JUDGE, QUESTION, answer, template=TEMPLATE, normalize=normalize)
    return answer


def judged_exact(normalize: bool) -> tuple[dict, float]:
    """P(answer | judged) ∝ prior(answer) * P(Yes | answer), and the evidence."""
    prior = lc.infer(write(), method="enumerate").distribution()
    joint = {a: p * hand_p_yes(a, normalize) for a, p in prior.items()}
    z = sum(joint.values())
    return {a: w / z for a, w in joint.items()}, z


# --- the LM judge ---------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_judge_is_prior_times_p_yes_exactly(normalize):
    exact, z = judged_exact(normalize)
    result = lc.infer(judged(normalize), method="enumerate")
    got = result.distribution()
    assert set(got) == set(exact)
    for answer, p in exact.items():
        assert got[answer] == pytest.approx(p, rel=1e-9, abs=1e-12), answer
    assert result.log_evidence == pytest.approx(math.log(z), abs=1e-9)
    # the judge's probabilities differ between answers (so the test has something to detect)
    assert len({round(hand_p_yes(a, normalize), 6) for a in exact}) > 3


def test_judge_probability_returns_p_and_keeps_the_weight():
    for answer in ["a", "bc", ""]:
        r = lc.infer(
            judge_probability(JUDGE, QUESTION, answer, template=TEMPLATE), method="enumerate"
        )
        assert r.values[0] == pytest.approx(hand_p_yes(answer, True), abs=1e-12)
        assert r.log_evidence == pytest.approx(0.0, abs=1e-12)
        assert r.traces[0].names == ["judge[0]/yes", "judge[0]/no"]
    raw = judge_probability(JUDGE, QUESTION, "a", template=TEMPLATE, normalize=False)
    r = lc.infer(raw, method="enumerate")
    assert r.values[0] == pytest.approx(hand_p_yes("a", False), abs=1e-12)
    assert r.traces[0].names == ["judge[0]/yes"]


def test_judge_under_forward_sampling_matches_the_posterior():
    # Forward sampling weighs each draw by P(Yes) <= 1; keeping draw i with probability w_i
    # gives i.i.d. posterior draws. Chi-square at false-alarm rate 1e-3; with the 1154 kept
    # draws over 13 cells it detects a TV distance of 0.092 (chi2_gof computes it).
    exact, _ = judged_exact(True)
    r = lc.infer(judged(True), method="forward", num_samples=2400, seed=3)
    draws = accepted_by_weight(r, log_bound=0.0, seed=1)
    result = assert_matches(draws, exact)
    assert result.detectable_tv < 0.1, str(result)


def test_judge_sampling_test_catches_a_judge_counted_twice():
    # The same test, fed the draws of a deliberately wrong program (the judge's factor
    # applied twice: weights P(Yes)^2, TV 0.135 from the posterior), must fail: this is the
    # power check of the test above.
    @lc.program
    def judged_twice():
        answer = yield lc.gen("answer", WRITER, "a", max_tokens=2)
        yield from lm_judge(JUDGE, QUESTION, answer, template=TEMPLATE)
        yield from lm_judge(JUDGE, QUESTION, answer, template=TEMPLATE)
        return answer

    exact, _ = judged_exact(True)
    r = lc.infer(judged_twice(), method="forward", num_samples=2400, seed=3)
    assert not chi2_gof(accepted_by_weight(r, log_bound=0.0, seed=1), exact).passed()


def test_conditioning_on_a_sampled_vote_is_the_raw_judge():
    # Sampling a verdict and conditioning on "Yes" has the target of lm_judge(normalize=False):
    # the judge's weight is the vote's condition with the verdict summed out.
    @lc.program
    def voted():
        answer = yield lc.gen("answer", WRITER, "a", max_tokens=2)
        vote = yield from judge_vote(JUDGE, QUESTION, answer, template=TEMPLATE)
        yield lc.condition("said_yes", vote == 1.0)
        return answer

    assert_same_exact(
        lc.infer(voted(), method="enumerate"), lc.infer(judged(False), method="enumerate")
    )
    r = lc.infer(judge_vote(JUDGE, QUESTION, "ab", template=TEMPLATE), method="enumerate")
    assert r.distribution()[1.0] == pytest.approx(hand_p_yes("ab", False), abs=1e-12)


def test_judge_compare_prefers_the_higher_label():
    judge = ToyLM(
        ["A", "B", "x", "y", "<eos>"],
        lambda ctx: [1.0 if ctx[-1] == 2 else 0.0, 0.5, -9, -9, -9],
    )
    # the prompt ends with the second answer: "x" there gives A 1.0 > B 0.5
    assert lc.infer(judge_compare(judge, "x", "y", "x", template="{question}{first}{second}"),
                    method="enumerate").values == [True]  # fmt: skip
    assert lc.infer(judge_compare(judge, "x", "x", "y", template="{question}{first}{second}"),
                    method="enumerate").values == [False]  # fmt: skip


# --- the predicate --------------------------------------------------------------------------


def test_predicate_verifier_equals_conditioning():
    def has_b(text: str) -> bool:
        return "b" in text

    @lc.program
    def verified():
        answer = yield lc.gen("answer", WRITER, "a", max_tokens=2)
        return (yield from verify_with(has_b)(answer))

    @lc.program
    def conditioned():
        answer = yield lc.gen("answer", WRITER, "a", max_tokens=2)
        yield lc.condition("has_b", has_b(answer))
        return answer

    a = lc.infer(verified(), method="enumerate")
    b = lc.infer(conditioned(), method="enumerate")
    assert_same_exact(a, b)
    assert 0.1 < math.exp(a.log_evidence) < 0.9


def test_a_raising_predicate_is_a_rejected_trace():
    @lc.program
    def parsed():
        answer = yield lc.gen("answer", WRITER, "a", max_tokens=1)
        return (yield from verify_with(lambda t: {"a": True, "b": False}[t])(answer))

    r = lc.infer(parsed(), method="enumerate")
    assert r.distribution() == {"a": 1.0}
    assert r.stats["tool_errors"] == 2  # "c" and "" raise KeyError
    with pytest.raises(AllWeightsZeroError):
        lc.infer(verify_with(lambda t: 1 / 0)("x"), method="forward", num_samples=2, seed=0)


def test_patterns_twice_in_one_program_never_collide():
    @lc.program
    def both():
        first = yield lc.gen("answer", WRITER, "a", max_tokens=1)
        second = yield lc.gen("again", WRITER, "a", max_tokens=1)
        yield from verify_with(str.isalpha)(first)
        yield from verify_with(str.isalpha)(second)
        yield from lm_judge(JUDGE, QUESTION, first, template=TEMPLATE)
        yield from lm_judge(JUDGE, QUESTION, second, template=TEMPLATE)
        p = yield from judge_probability(JUDGE, QUESTION, first, template=TEMPLATE)
        with lc.scope("inner"):
            yield from lm_judge(JUDGE, QUESTION, first, template=TEMPLATE)
        best = yield from verification_at_k(
            write(), lambda a: judge_vote(JUDGE, QUESTION, a, template=TEMPLATE), n=2, k=1
        )
        other = yield from verification_at_k(
            write(), lambda a: judge_vote(JUDGE, QUESTION, a, template=TEMPLATE), n=2, k=1
        )
        return first + second + best + other + str(p > 0)

    r = lc.infer(both(), method="forward", num_samples=5, seed=0)
    names = next(t.names for t in r.traces if len(t.names) > 10)
    assert len(names) == len(set(names))
    for prefix in ["verify[0]/", "verify[1]/", "judge[0]/", "judge[1]/", "judge[2]/",
                   "inner/judge[0]/", "vatk[0]/candidate[1]/", "vatk[1]/verify[0]/draw[0]/"]:  # fmt: skip
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    lc.infer(both(), method="smc", particles=4, seed=0)  # runs under another method too


# --- verification at k ----------------------------------------------------------------------

PICK_PROBS = {"a": 0.5, "b": 0.3, "c": 0.2}
PICKER = ToyLM(["a", "b", "c", "<eos>"], lambda ctx: [math.log(0.5), math.log(0.3),
               math.log(0.2), -math.inf])  # fmt: skip
OK_PROB = {"a": 0.15, "b": 0.9, "c": 0.5}  # the verifier's chance of saying "right"


def prefer(first: str, second: str) -> float:
    """The comparer's chance of preferring ``first`` (not symmetric on purpose)."""
    return {"a": 0.2, "b": 0.7, "c": 0.6}[first] * 0.5 + (0.3 if second == "a" else 0.1)


@lc.program
def pick():
    return (yield lc.gen("pick", PICKER, "a", max_tokens=1))


@lc.program
def checker(answer):
    return (
        yield lc.sample("ok", Bernoulli(torch.tensor(OK_PROB[answer], dtype=torch.float64)))
    ) == 1


@lc.program
def comparer(first, second):
    q = torch.tensor(prefer(first, second), dtype=torch.float64)
    return (yield lc.sample("first", Bernoulli(q))) == 1


def brute_force_vatk(n: int, k: int, top: int, margin, compare: bool) -> dict:
    """The selection distribution by listing every outcome: candidates, verifier draws and
    comparisons, each with its probability, and the docstring's rule applied to each."""
    out: dict = {}
    for answers in itertools.product(PICK_PROBS, repeat=n):
        p_answers = math.prod(PICK_PROBS[a] for a in answers)
        for votes in itertools.product([0, 1], repeat=n * k):
            p_votes = math.prod(
                OK_PROB[answers[v // k]] if bit else 1 - OK_PROB[answers[v // k]]
                for v, bit in enumerate(votes)
            )
            scores = [sum(votes[i * k : (i + 1) * k]) / k for i in range(n)]
            ranked = sorted(range(n), key=lambda i: (-scores[i], i))[:top]
            finalists = [
                i for i in ranked if margin is None or scores[i] >= scores[ranked[0]] - margin
            ]
            pairs = [
                (i, j)
                for i, j in itertools.combinations(finalists, 2)
                if compare and answers[i] != answers[j]
            ]
            for outcome in itertools.product([True, False], repeat=len(pairs)):
                p = p_answers * p_votes
                wins = dict.fromkeys(finalists, 0)
                for (i, j), first in zip(pairs, outcome, strict=True):
                    q = prefer(answers[i], answers[j])
                    p *= q if first else 1 - q
                    wins[i if first else j] += 1
                best = max(finalists, key=lambda i: (wins[i], scores[i], -i))
                out[answers[best]] = out.get(answers[best], 0.0) + p
    return out


@pytest.mark.parametrize(
    "n,k,top,margin,compare",
    [(3, 1, 2, None, True), (3, 1, 3, None, True), (2, 2, 2, 0.4, True), (2, 3, 1, None, False)],
)
def test_verification_at_k_is_the_selection_rule_exactly(n, k, top, margin, compare):
    exact = brute_force_vatk(n, k, top, margin, compare)
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-12)
    program = verification_at_k(
        pick(), checker, n=n, k=k, top=top, margin=margin, compare=comparer if compare else None
    )
    r = lc.infer(program, method="enumerate")
    got = r.distribution()
    assert r.log_evidence == pytest.approx(0.0, abs=1e-9)
    for answer, p in exact.items():
        assert got.get(answer, 0.0) == pytest.approx(p, abs=1e-9), (answer, got, exact)
    # verification moves mass towards "b", the answer the verifier favours
    assert got["b"] > PICK_PROBS["b"] + 0.1


def test_the_exact_check_catches_a_comparer_asked_the_wrong_way_round():
    # A deliberately wrong use: the pair handed to the comparer in the wrong order, its answer
    # read as if it were not. The selection law moves by TV 0.04 — far beyond the 1e-9 the
    # exact test allows, so that test catches it (a sampling test of 1000 draws would not).
    @lc.program
    def swapped(first, second):
        return not (yield from comparer(second, first))

    exact = brute_force_vatk(3, 1, 2, None, True)
    wrong = verification_at_k(pick(), checker, n=3, k=1, top=2, compare=swapped)
    got = lc.infer(wrong, method="enumerate").distribution()
    assert max(abs(got[a] - exact[a]) for a in exact) > 0.01


def test_verification_at_k_under_forward_draws_the_selection_distribution():
    # Every weight is one, so forward's values are i.i.d. draws of the procedure's output.
    # Chi-square at false-alarm rate 1e-3 with 1000 draws over 3 cells: detects TV >= 0.080.
    exact = brute_force_vatk(3, 1, 2, None, True)
    program = verification_at_k(pick(), checker, n=3, k=1, top=2, compare=comparer)
    r = lc.infer(program, method="forward", num_samples=1000, seed=5)
    result = assert_matches(r.values, exact)
    assert result.detectable_tv < 0.085, str(result)
    # and a deliberately wrong selection (the first candidate, unverified: TV 0.185) is caught
    wrong = lc.infer(pick(), method="forward", num_samples=1000, seed=5).values
    assert not chi2_gof(wrong, exact).passed()


def test_verification_at_k_checks_its_arguments():
    with pytest.raises(SiteError, match="candidate must be a bound program"):
        verification_at_k(pick, checker)
    with pytest.raises(SiteError, match="n must be a whole number"):
        verification_at_k(pick(), checker, n=0)
    with pytest.raises(SiteError, match="margin"):
        verification_at_k(pick(), checker, margin=-1)
    with pytest.raises(SiteError, match="must return a bool or a number"):
        lc.infer(verification_at_k(pick(), lambda a: pick(), n=1), method="enumerate")
    with pytest.raises(SiteError, match="must return a program"):
        lc.infer(verification_at_k(pick(), lambda a: 0.5, n=1), method="enumerate")


def test_judge_and_verify_check_their_arguments():
    with pytest.raises(SiteError, match="model must be a LanguageModel"):
        lm_judge("gpt", "q", "a")
    with pytest.raises(SiteError, match="answer must be a string"):
        lm_judge(JUDGE, "q", 3)
    with pytest.raises(SiteError, match="cannot be filled"):
        lm_judge(JUDGE, "q", "a", template="{question}{answr}")
    with pytest.raises(SiteError, match="yes and no must differ"):
        lm_judge(JUDGE, "q", "a", yes="Yes", no="Yes")
    with pytest.raises(SiteError, match="predicate must be a function"):
        verify_with("is it right?")
    with pytest.raises(SiteError, match="scope name"):
        verify_with(bool, name="a/b")


# --- the calculator -------------------------------------------------------------------------


def test_calculator_computes_arithmetic():
    assert calculator("2 + 3 * 4") == 14
    assert calculator(" (2 + 3) * 4 ") == 20
    assert calculator("7 / 2") == 3.5
    assert calculator("7 // 2") == 3 and calculator("-7 % 3") == 2
    assert calculator("2 ** 10") == 1024 and calculator("2 ** -2") == 0.25
    assert calculator("max(3, abs(-5), round(4.6))") == 5
    assert calculator("sqrt(2) ** 2") == pytest.approx(2.0)
    assert calculator("10 ** 999") == 10**999  # a thousand digits is the limit


@pytest.mark.parametrize(
    "expression,match",
    [
        ("__import__('os')", "cannot call '__import__'"),
        ("__import__('os').system('true')", "cannot call"),
        ("(1).__class__", "not Attribute"),
        ("open('x')", "cannot call 'open'"),
        ("x + 1", "unknown name 'x'"),
        ("'a' * 3", "handles numbers"),
        ("[1, 2]", "not List"),
        ("lambda: 1", "not Lambda"),
        ("1 / 0", "division by zero"),
        ("2 ^ 3", r"\*\* as power"),
        ("(-8) ** 0.5", "not a real number"),
        ("exp(1000)", "range error"),
        ("10 ** 1000", "more than 1000 digits"),
        ("10 ** 600 * 10 ** 600", "more than 1000 digits"),
        ("round(5, -10 ** 6)", "within 100"),
        ("1 +", "cannot read"),
        ("(" * 500 + "1" + ")" * 500, "cannot read"),
        ("1" + "+1" * 1500, "at most 2000 characters"),
    ],
)
def test_calculator_refuses_with_a_clear_error(expression, match):
    with pytest.raises(CalculatorError, match=match):
        calculator(expression)


def test_calculator_refuses_huge_powers_at_once():
    for expression in ["9**9**9", "2 ** 10 ** 100", "(10**500) ** 10**500", "-9 ** 9 ** 9"]:
        start = time.perf_counter()
        with pytest.raises(CalculatorError, match="digits"):
            calculator(expression)
        assert time.perf_counter() - start < 0.05, expression


def test_calculator_as_a_tool_in_a_program():
    exprs = ToyLM(["2+2", "9**9**9", "__import__('os')", "<eos>"],
                  lambda ctx: [0.0, -0.5, -1.0, -math.inf])  # fmt: skip

    @lc.program
    def compute():
        text = yield lc.gen("expr", exprs, "2+2", max_tokens=1)
        return (yield lc.call("calc", calculator, text))

    r = lc.infer(compute(), method="enumerate")
    assert r.distribution() == {4: 1.0}
    assert r.stats["tool_errors"] == 2
    p_ok = 1 / (1 + math.exp(-0.5) + math.exp(-1.0))
    assert math.exp(r.log_evidence) == pytest.approx(p_ok, abs=1e-12)


# --- the sandbox ----------------------------------------------------------------------------

SLACK = 2.5  # seconds for starting and killing a Python process on a busy 2-core machine


def failure(code: str, **limits) -> tuple[SandboxError, float]:
    start = time.perf_counter()
    with pytest.raises(SandboxError) as info:
        python_runner(code, **limits)
    return info.value, time.perf_counter() - start


def test_sandbox_runs_code_and_returns_its_output():
    assert python_runner("print('hello'); print(2 + 2)") == "hello\n4\n"
    assert python_runner("import sys; print(sys.flags.isolated)") == "1\n"


@pytest.mark.parametrize(
    "code",
    ["while True: pass", "import time\nwhile True: time.sleep(1)", "x = 0\nwhile True: x += 1"],
)
def test_sandbox_kills_an_infinite_loop_within_the_timeout(code):
    err, elapsed = failure(code, timeout=1.0)
    assert err.reason == "timeout", err
    assert 1.0 <= elapsed < 1.0 + SLACK


def test_sandbox_kills_a_memory_bomb():
    # (bounded, so a broken limit cannot take the machine: 2 GiB at most)
    for code in ["x = bytearray(2 ** 31)", "a = []\nfor _ in range(2000): a.append(' ' * 10**6)"]:
        err, elapsed = failure(code, memory_mb=128, timeout=10.0)
        assert err.reason == "memory", (code, err, err.stderr[-300:])
        assert elapsed < SLACK + 2.0


@pytest.mark.parametrize(
    "code",
    [
        "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)",
        "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)",
        "import _socket\n_socket.socket()",
        "import socket\nsocket.gethostbyname('localhost')",
        "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9', timeout=1)",
        "import socket\ntry:\n    socket.socket()\nexcept BaseException:\n    print('caught')",
    ],
)
def test_sandbox_blocks_sockets(code):
    err, _ = failure(code)
    assert err.reason == "blocked", (err, err.stderr[-300:])
    assert "network access is not allowed" in str(err)
    assert "caught" not in err.stdout  # the run ends at the attempt; it cannot be caught


@pytest.mark.parametrize(
    "code",
    ["import os\nos.system('true')", "import subprocess", "import os\nos.fork()",
     "import os\nos.execv('/bin/true', ['true'])", "import ctypes",
     "import os\nos.kill(os.getpid(), 0)",
     "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))"],
)  # fmt: skip
def test_sandbox_blocks_processes_and_limit_changes(code):
    err, _ = failure(code)
    assert err.reason == "blocked", (err, err.stderr[-300:])


def test_sandbox_allows_a_unix_socket_pair():
    assert python_runner("import socket\na, b = socket.socketpair()\nprint('ok')") == "ok\n"


def test_sandbox_caps_output():
    err, elapsed = failure("print('x' * 10 ** 6)", max_output=1000)
    assert err.reason == "output" and len(err.stdout) == 1000
    err, elapsed = failure("while True: print('y')", max_output=500, timeout=20.0)
    assert err.reason == "output" and len(err.stdout) == 500 and elapsed < SLACK
    # stderr keeps its end (the end of a traceback), and a flood of it runs into the timeout
    err, _ = failure(
        "import sys\nsys.stderr.write('z' * 10000)\nraise ValueError('end')", max_output=300
    )
    assert err.reason == "exit" and len(err.stderr) == 300 and "ValueError: end" in str(err)
    err, _ = failure(
        "import sys\nwhile True: sys.stderr.write('z' * 100)", max_output=300, timeout=1.0
    )
    assert err.reason == "timeout" and len(err.stderr) == 300


def test_sandbox_hides_the_environment(monkeypatch):
    monkeypatch.setenv("LMCASCADE_TEST_SECRET", "hunter2")
    out = python_runner("import os\nprint(sorted(os.environ))\nprint(os.getcwd())")
    assert "LMCASCADE_TEST_SECRET" not in out and "hunter2" not in out
    assert "PATH" in out
    assert os.getcwd() not in out.splitlines()[1]  # a fresh directory


def test_sandbox_reports_errors_and_exit_codes():
    err, _ = failure("raise ValueError('boom')")
    assert err.reason == "exit" and err.returncode == 1 and "ValueError: boom" in str(err)
    err, _ = failure("import sys\nsys.exit(3)")
    assert err.reason == "exit" and err.returncode == 3
    err, _ = failure("def f(:")
    assert err.reason == "exit" and "SyntaxError" in str(err)


def test_sandbox_checks_its_limits():
    with pytest.raises(SiteError, match="timeout"):
        python_runner("print(1)", timeout=0)
    with pytest.raises(SiteError, match="memory_mb"):
        python_runner("print(1)", memory_mb=8)
    with pytest.raises(SiteError, match="max_output"):
        python_runner("print(1)", max_output=0)
    with pytest.raises(SiteError, match="code must be a string"):
        python_runner(b"print(1)")
    with pytest.raises(SiteError, match="timeout"):
        python_tool(timeout=math.inf)


def test_sandbox_failures_are_zero_weight_traces():
    snippets = ToyLM(["print(1)", "1/0", "while 1: pass", "print('x' * 99)", "<eos>"],
                     lambda ctx: [0.0, -0.3, -0.6, -0.9, -math.inf])  # fmt: skip

    @lc.program
    def run():
        code = yield lc.gen("code", snippets, "print(1)", max_tokens=1)
        return (yield lc.call("run", python_tool(timeout=1.0, max_output=50), code))

    r = lc.infer(run(), method="enumerate")
    assert r.distribution() == {"1\n": 1.0}
    assert r.stats["tool_errors"] == 3
    tool = python_tool(timeout=1.0, max_output=50)
    reasons = []
    for code in ["1/0", "while 1: pass", "print('x' * 99)"]:
        with pytest.raises(SandboxError) as info:
            tool(code)
        reasons.append(info.value.reason)
    assert reasons == ["exit", "timeout", "output"]
    p_ok = 1 / sum(math.exp(-x) for x in (0.0, 0.3, 0.6, 0.9))
    assert math.exp(r.log_evidence) == pytest.approx(p_ok, abs=1e-12)


def test_run_tests_reports_each_test():
    code = "def inc(x):\n    return x + 1\n"
    report = run_tests(code, ["assert inc(1) == 2", "assert inc(2) == 4", "assert inc(0) == 1"])
    assert not report.passed and report.results == (True, False, True)
    assert report.num_passed == 2 and report.error is None and "<test 1>" in report.output
    assert run_tests(code, "assert inc(1) == 2\n\nassert inc(-1) == 0\n").passed
    broken = run_tests("def inc(x) return x", ["assert inc(1) == 2"])
    assert not broken.passed and broken.results == (None,) and "SyntaxError" in broken.error
    hang = run_tests("def f():\n    while True: pass", ["assert f() is None"], timeout=1.0)
    assert not hang.passed and "did not finish" in hang.error
    escaped = run_tests("import sys\nsys.exit(0)", ["assert False"])
    assert not escaped.passed and escaped.error == "the code ended before every test ran"
    with pytest.raises(SiteError, match="tests must be"):
        run_tests(code, [1, 2])
