"""Model cascades with deferral: a small model answers; when it is unsure, a larger one does.

:func:`deferral_cascade` is an ordinary program.  The first model answers (with
``details=True``, so the program sees each token's log-probability under the model), a
*confidence* in ``[0, 1]`` is computed from that answer, and if it is below the threshold the
question goes to the next model, and so on; the last model's answer is final.  Every model's
answer and every confidence are sites of the trace (scoped ``deferral[k]/model[i]/...``), so
any inference method runs it, it composes inside other programs, and the deferral curve can be
swept afterwards without running a model again:

- :func:`deferral_record` reads one execution back from its trace (which model answered, each
  model's answer, confidence and token count);
- :func:`deferral_curve` sweeps thresholds over records or results: run the cascade once per
  input with ``threshold=1`` (every model answers) and every threshold's accuracy, fraction
  deferred and cost follows offline;
- :func:`plot_deferral_curve` draws accuracy against fraction deferred and against cost
  (matplotlib).

The rule: a model's answer is kept when its confidence is at least the threshold, except that
threshold ``1`` always defers (even a confidence of exactly 1) and threshold ``0`` never does,
so the two ends reproduce the first and the last model on their own.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> small = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 2.0, 0.0], name="small")
>>> large = ToyLM(["a", "b", "<eos>"], lambda ctx: [3.0, -3.0, 0.0], name="large")
>>> prog = deferral_cascade([small, large], "a", threshold=0.5, max_tokens=1)
>>> exact = lc.infer(prog, method="enumerate")  # "b" (p 0.79) is kept; "a" and "" defer
>>> {k: round(v, 3) for k, v in exact.distribution().items()}
{'b': 0.787, 'a': 0.202, '': 0.01}
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from lmcascade.errors import LMCascadeError, OptionError, SiteError
from lmcascade.generation import Generation
from lmcascade.models.base import LanguageModel
from lmcascade.program import BoundProgram, Program, call, current_scope, gen, program, scope
from lmcascade.result import Result
from lmcascade.trace import Trace, safe_repr

Confidence = str | Callable[[str, Generation], Any] | Program

SCOPE = "deferral"
"""The scope every cascade's sites live under, numbered per execution: ``deferral[0]/...``."""


def mean_token_prob(generation: Generation) -> float:
    """The geometric mean of the answer's token probabilities, ``exp(mean log-prob)``
    (``confidence="mean_log_prob"``): threshold ``t`` keeps answers whose mean token
    log-probability is at least ``log t``.  An answer without tokens has confidence 0.

    >>> g = Generation("ab", (0, 1), (math.log(0.5), math.log(0.125)), math.log(0.25), "eos")
    >>> mean_token_prob(g)
    0.25
    """
    mean = generation.mean_log_prob
    return 0.0 if math.isnan(mean) else math.exp(mean)


def sequence_prob(generation: Generation) -> float:
    """The probability the model gave its whole answer, the product of its tokens'
    probabilities, end of text included when it was generated (``confidence="max_prob"``).
    Decoding greedily (``temperature=0``) every token is the most probable one, so for a
    one-token answer this is a classifier's maximum softmax probability.  No tokens: 0.

    >>> g = Generation("ab", (0, 1), (math.log(0.5), math.log(0.5)), math.log(0.5), "eos")
    >>> sequence_prob(g)
    0.25
    """
    lps = generation.token_log_probs
    return math.exp(math.fsum(lps)) if lps else 0.0


def min_token_prob(generation: Generation) -> float:
    """The probability of the answer's least likely token (``confidence="min_token_prob"``).

    >>> g = Generation("ab", (0, 1), (math.log(0.5), math.log(0.125)), math.log(0.25), "eos")
    >>> round(min_token_prob(g), 6)
    0.125
    """
    lps = generation.token_log_probs
    return math.exp(min(lps)) if lps else 0.0


CONFIDENCES: dict[str, Callable[[Generation], float]] = {
    "mean_log_prob": mean_token_prob,
    "max_prob": sequence_prob,
    "min_token_prob": min_token_prob,
}
"""The built-in confidences, by name; each maps a :class:`~lmcascade.Generation` to [0, 1]."""


def keeps(confidence: float, threshold: float) -> bool:
    """Whether an answer of this confidence is kept (not deferred) at ``threshold``: when the
    confidence is at least the threshold, except that threshold 1 always defers.

    >>> keeps(0.3, 0.0), keeps(0.3, 0.5), keeps(1.0, 1.0)
    (True, False, False)
    """
    return threshold < 1.0 and confidence >= threshold


@dataclass(frozen=True)
class Deferral:
    """One execution of a cascade: what each model that ran answered, how confident it was,
    and what it cost.

    ``answers``, ``confidences`` and ``tokens`` have one entry per model that ran, in cascade
    order; the last model's confidence is ``None`` (the cascade ends with it, so it is never
    computed), and a record whose last entry has a confidence stopped early, its answer kept.
    ``tokens`` counts each model's generated tokens (end of text included); ``costs`` are the
    per-token costs of the models (1 each by default), so ``cost`` is the weighted total.

    >>> d = Deferral(("4", "5"), (0.2, None), (2, 3), (1.0, 10.0))
    >>> d.answer, d.model, d.deferred, d.cost
    ('5', 1, True, 32.0)
    """

    answers: tuple[str, ...]
    confidences: tuple[float | None, ...]
    tokens: tuple[int, ...]
    costs: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.answers)
        if n == 0 or len(self.confidences) != n or len(self.tokens) != n:
            raise OptionError(
                "a Deferral needs one answer, confidence and token count per model that ran, "
                f"got {len(self.answers)}, {len(self.confidences)} and {len(self.tokens)}"
            )
        if any(c is None for c in self.confidences[:-1]):
            raise OptionError(
                "a Deferral's confidence may be None only for its last model (the cascade's "
                f"end), got {self.confidences}"
            )
        if self.costs and len(self.costs) < n:
            raise OptionError(
                f"a Deferral needs a cost for each of its {n} models, got {self.costs}"
            )

    @property
    def answer(self) -> str:
        """The cascade's answer: the last model that ran."""
        return self.answers[-1]

    @property
    def model(self) -> int:
        """The index of the model that answered."""
        return len(self.answers) - 1

    @property
    def deferred(self) -> bool:
        """Whether the first model's answer was passed over."""
        return len(self.answers) > 1

    @property
    def cost(self) -> float:
        """Tokens generated by each model that ran, times its per-token cost."""
        costs = self.costs or (1.0,) * len(self.tokens)
        return math.fsum(c * t for c, t in zip(costs, self.tokens, strict=False))

    def at(self, thresholds: Sequence[float]) -> int:
        """Which model would have answered under ``thresholds`` (one per deferral point);
        an :class:`~lmcascade.errors.OptionError` when that needs a model this record did not
        run (the cascade stopped earlier: run it with ``threshold=1`` to record every model).

        >>> Deferral(("4", "5"), (0.2, None), (2, 3)).at([0.1]), Deferral(("4", "5"), (0.2, None), (2, 3)).at([0.5])
        (0, 1)
        """  # noqa: E501
        for i, conf in enumerate(self.confidences):
            if conf is None:
                return i
            if i >= len(thresholds):
                raise OptionError(
                    f"thresholds: {len(thresholds)} given, but this record has a deferral "
                    f"point after model {i}; give one threshold per model but the last"
                )
            if keeps(conf, thresholds[i]):
                return i
            if i + 1 >= len(self.answers):
                raise OptionError(
                    f"threshold {thresholds[i]} defers model {i}'s answer (confidence "
                    f"{conf:.4g}), but this execution stopped there and model {i + 1} never "
                    "ran; run the cascade with threshold=1 so that every model answers, then "
                    "sweep thresholds offline"
                )
        raise AssertionError("unreachable")  # pragma: no cover

    def cost_at(self, thresholds: Sequence[float], costs: Sequence[float] | None = None) -> float:
        """The cost of the execution ``thresholds`` would have made: every model up to the one
        that answers (``costs`` per token overrides the record's).

        >>> Deferral(("4", "5"), (0.2, None), (2, 3)).cost_at([0.1], costs=[1.0, 10.0])
        2.0
        """
        last = self.at(thresholds)
        costs = tuple(costs) if costs is not None else self.costs or (1.0,) * len(self.tokens)
        return math.fsum(c * t for c, t in zip(costs, self.tokens[: last + 1], strict=False))


def _check_models(models: Any) -> list[LanguageModel]:
    if isinstance(models, LanguageModel) or not isinstance(models, Sequence):
        raise SiteError(
            "deferral_cascade: models must be a list of two or more models, smallest first "
            f"(the same model twice with other settings is fine), got {safe_repr(models, 80)}"
        )
    models = list(models)
    if len(models) < 2:
        raise SiteError(
            f"deferral_cascade: models needs at least two models to defer between, got "
            f"{len(models)}"
        )
    for i, m in enumerate(models):
        if not isinstance(m, LanguageModel):
            raise SiteError(
                f"deferral_cascade: models[{i}] must be a LanguageModel (ToyLM, TransformersLM, "
                f"lc.models.load()...), got {type(m).__name__}"
            )
    return models


def _per_model(name: str, value: Any, n: int, kind: type | tuple[type, ...]) -> list:
    """``value`` once per model: a single value for all, or a sequence of ``n``."""
    if isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool):
        return [value] * n
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        values = list(value)
        if len(values) == n:
            return values
    raise SiteError(
        f"deferral_cascade: {name} must be one value for every model or a list of {n} (one "
        f"per model), got {safe_repr(value, 80)}"
    )


def _check_thresholds(threshold: Any, n: int) -> list[float]:
    values = (
        [threshold] * (n - 1)
        if isinstance(threshold, int | float)
        else list(threshold)
        if isinstance(threshold, Sequence) and not isinstance(threshold, str)
        else None
    )
    if values is None or len(values) != n - 1:
        raise SiteError(
            f"deferral_cascade: threshold must be a number in [0, 1] or a list of {n - 1} (one "
            f"per model but the last), got {safe_repr(threshold, 80)}"
        )
    for t in values:
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0.0 <= t <= 1.0:
            raise SiteError(
                f"deferral_cascade: thresholds are confidences in [0, 1] (0 never defers, 1 "
                f"always does), got {safe_repr(t, 40)}"
            )
    return [float(t) for t in values]


def _check_costs(costs: Any, n: int) -> tuple[float, ...]:
    if costs is None:
        return (1.0,) * n
    values = _per_model("costs", costs, n, (int, float))
    for c in values:
        if isinstance(c, bool) or not isinstance(c, int | float) or not 0 <= c < math.inf:
            raise SiteError(
                f"deferral_cascade: costs are per-token costs, finite numbers >= 0, got "
                f"{safe_repr(c, 40)}"
            )
    return tuple(float(c) for c in values)


def _check_confidence(confidence: Any) -> Confidence:
    if isinstance(confidence, str):
        if confidence not in CONFIDENCES:
            raise SiteError(
                f"deferral_cascade: confidence {confidence!r} is not one of "
                f"{', '.join(CONFIDENCES)}; or pass a function (prompt, generation) -> [0, 1] "
                "or an lc.program taking (prompt, generation)"
            )
        return confidence
    if isinstance(confidence, Program) or callable(confidence):
        return confidence
    raise SiteError(
        f"deferral_cascade: confidence must be one of {', '.join(CONFIDENCES)}, a function "
        f"(prompt, generation) -> [0, 1] or an lc.program, got {type(confidence).__name__}"
    )


def _builtin(name: str) -> Callable[[str, Generation], float]:
    fn = CONFIDENCES[name]

    def confidence(prompt: str, generation: Generation) -> float:
        return fn(generation)

    confidence.__name__ = name
    return confidence


def _checked(value: Any, where: str) -> float:
    """A confidence as a float in [0, 1], or a SiteError naming ``confidence``."""
    if isinstance(value, bool):
        return float(value)
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if isinstance(value, str) or not 0.0 <= number <= 1.0:
        raise SiteError(
            f"site {where!r}: deferral_cascade's confidence returned {safe_repr(value, 60)}; a "
            "confidence must be a number in [0, 1] (squash a score first, e.g. with a "
            "sigmoid, and set the threshold on the same scale)"
        )
    return number


def deferral_cascade(
    models: Sequence[LanguageModel],
    prompt: str | Sequence[str],
    threshold: float | Sequence[float] = 0.5,
    *,
    confidence: Confidence = "mean_log_prob",
    costs: float | Sequence[float] | None = None,
    params: Sequence[dict] | None = None,
    details: bool = False,
    **gen_params: Any,
) -> BoundProgram:
    """A cascade that defers to the next model when the current one is unsure.

    ``models`` (two or more, cheapest first) answer ``prompt`` (one for all, or one per model:
    each its own chat format) in turn with ``lc.gen(..., details=True)`` and ``gen_params``
    (``max_tokens``, ``stop``, ``temperature``...; ``params`` gives each model its own extra
    settings).  After each model but the last, ``confidence`` (in ``[0, 1]``) decides: the
    answer is kept when it is at least that model's threshold (``threshold``: one number for
    every deferral point, or one per model but the last), else the next model answers.
    Threshold 0 never defers, threshold 1 always does.

    ``confidence`` is ``"mean_log_prob"`` (the geometric mean token probability,
    ``exp(mean log-prob)``), ``"max_prob"`` (the probability of the whole answer; with greedy
    decoding, the model's highest), ``"min_token_prob"``, a function ``(prompt, generation)
    -> [0, 1]`` (run as a tool call, ``lc.call``: an exception gives the trace weight zero) or
    an ``@lc.program`` taking ``(prompt, generation)`` whose return value is the confidence
    (a verifier that asks a model).  A value outside ``[0, 1]`` is a ``SiteError``.

    The program returns the answer, or with ``details=True`` a :class:`Deferral` (every
    model's answer, confidence and tokens, and the cost with ``costs`` per token per model).
    Its sites are ``deferral[k]/model[i]/answer`` and ``deferral[k]/model[i]/confidence``;
    :func:`deferral_record` reads them back.  The cascade adds no weight: under any method its
    distribution is the mixture the rule defines (each model's answers where it answers).

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> small = ToyLM(["4", "5", "<eos>"], lambda ctx: [0.0, 0.0, 2.0], name="small")
    >>> large = ToyLM(["4", "5", "<eos>"], lambda ctx: [4.0, 0.0, 4.0], name="large")
    >>> prog = deferral_cascade([small, large], "4", threshold=0.6, max_tokens=2,
    ...                         details=True)
    >>> r = lc.infer(prog, method="forward", num_samples=200, seed=0)
    >>> 0.2 < r.expectation(lambda d: d.deferred) < 0.5
    True
    """
    models = _check_models(models)
    n = len(models)
    prompts = _per_model("prompt", prompt, n, str)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise SiteError(
                f"deferral_cascade: prompt[{i}] must be a string, got {type(p).__name__}"
            )
    thresholds = _check_thresholds(threshold, n)
    confidence = _check_confidence(confidence)
    cost_per_token = _check_costs(costs, n)
    if params is None:
        extra: list[dict] = [{} for _ in models]
    else:
        extra = _per_model("params", params, n, dict)
        if not all(isinstance(p, dict) for p in extra):
            raise SiteError("deferral_cascade: params must be a list of dicts, one per model")
    if not isinstance(details, bool):
        raise SiteError(f"deferral_cascade: details must be True or False, got {details!r}")
    settings = [{**gen_params, **e} for e in extra]
    for i, (m, p, s) in enumerate(zip(models, prompts, settings, strict=True)):
        try:  # every setting checked now, before any model runs
            gen("answer", m, p, **s)
        except SiteError as err:
            raise SiteError(f"deferral_cascade: model {i}: {err}") from None
    return _cascade(models, prompts, thresholds, confidence, cost_per_token, settings, details)


def _here(name: str) -> str:
    """The full name a site ``name`` gets in the running program's scope."""
    prefix = current_scope()
    return f"{prefix}/{name}" if prefix else name


@program
def _cascade(models, prompts, thresholds, confidence, costs, settings, details):
    answers: list[str] = []
    confidences: list[float | None] = []
    tokens: list[int] = []
    with scope(SCOPE + "[]"):
        for i, model in enumerate(models):
            with scope("model[]"):
                out = yield gen("answer", model, prompts[i], details=True, **settings[i])
                answers.append(out.text)
                tokens.append(len(out.token_ids))
                if i == len(models) - 1:
                    confidences.append(None)
                    break
                if isinstance(confidence, Program):
                    with scope("verifier"):
                        raw = yield from confidence(prompts[i], out)
                    conf = _checked(raw, _here("confidence"))
                    yield call("confidence", float, conf)  # recorded, for deferral_record
                else:
                    fn = _builtin(confidence) if isinstance(confidence, str) else confidence
                    raw = yield call("confidence", fn, prompts[i], out)
                    conf = _checked(raw, _here("confidence"))
                confidences.append(conf)
                if keeps(conf, thresholds[i]):
                    break
    record = Deferral(tuple(answers), tuple(confidences), tuple(tokens), costs)
    return record if details else record.answer


_SITE = re.compile(r"^(?P<prefix>(?:.*/)?" + SCOPE + r"\[\d+\])/model\[(?P<i>\d+)\]/answer$")


def cascades_in(trace: Trace) -> list[str]:
    """The scope prefixes of the cascades one trace ran (``deferral[0]``, ``q/deferral[0]``...).

    >>> cascades_in(Trace())
    []
    """
    seen: dict[str, None] = {}
    for name in trace.names:
        found = _SITE.match(name)
        if found:
            seen.setdefault(found.group("prefix"))
    return list(seen)


def deferral_record(
    trace: Trace, prefix: str | None = None, costs: Sequence[float] | None = None
) -> Deferral:
    """The :class:`Deferral` one cascade execution recorded in ``trace``: each model's answer
    and token count, and the confidences, read from its sites (no model runs).  ``prefix``
    picks the cascade when the trace ran several (see :func:`cascades_in`).

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["a", "<eos>"], lambda ctx: [0.0, 0.0])
    >>> r = lc.infer(deferral_cascade([lm, lm], "a", threshold=1.0, max_tokens=2),
    ...              method="forward", num_samples=1, seed=0)
    >>> rec = deferral_record(r.traces[0])
    >>> rec.model, len(rec.answers), rec.confidences[1]
    (1, 2, None)
    """
    found = cascades_in(trace)
    if prefix is None:
        if len(found) != 1:
            raise OptionError(
                f"deferral_record: the trace holds {len(found)} cascades "
                f"({', '.join(found) or 'none'}); pass prefix= to pick one"
                if found
                else "deferral_record: the trace holds no deferral cascade (no site named "
                "deferral[k]/model[i]/answer); was it made by deferral_cascade?"
            )
        prefix = found[0]
    elif prefix not in found:
        raise OptionError(
            f"deferral_record: prefix {prefix!r} is not a cascade of this trace; it has "
            f"{', '.join(found) or 'none'}"
        )
    answers, confidences, tokens = [], [], []
    i = 0
    while f"{prefix}/model[{i}]/answer" in trace:
        site = trace[f"{prefix}/model[{i}]/answer"]
        answers.append(site.value)
        tokens.append(len(site.token_ids or ()))
        conf_name = f"{prefix}/model[{i}]/confidence"
        confidences.append(trace[conf_name].value if conf_name in trace else None)
        i += 1
    if any(c is None for c in confidences[:-1]):
        raise OptionError(
            f"deferral_record: cascade {prefix!r} has a model without a confidence before "
            "its last model (an unfinished trace?)"
        )
    return Deferral(tuple(answers), tuple(confidences), tuple(tokens), tuple(costs or ()))


class DeferralPoint(NamedTuple):
    """One point of a deferral curve: at ``threshold``, the fraction of inputs ``deferred``
    (answered by a model after the first), the mean ``accuracy`` and mean ``cost`` per input,
    and the fraction each model answered (``answered_by``)."""

    threshold: float | tuple[float, ...]
    deferred: float
    accuracy: float
    cost: float
    answered_by: tuple[float, ...]


def _weighted_records(run: Any, index: int) -> list[tuple[float, Deferral]]:
    """(weight, record) pairs of one input: a Deferral, a Result, or an (input, Result) pair."""
    if isinstance(run, tuple) and len(run) == 2 and not isinstance(run, Deferral):
        run = run[1]
    if isinstance(run, Deferral):
        return [(1.0, run)]
    if isinstance(run, BaseException):
        raise OptionError(
            f"deferral_curve: input {index} failed ({type(run).__name__}: {run}); leave it out "
            "or rerun it"
        )
    if isinstance(run, Result):
        pairs = [
            (float(w), deferral_record(t))
            for t, w, lw in zip(run.traces, run.weights, run.log_weights, strict=True)
            if lw > -math.inf and w > 0
        ]
        if not pairs:
            raise OptionError(f"deferral_curve: input {index}'s result has no trace of weight > 0")
        if run.estimator != "self-normalised":
            raise OptionError(
                f"deferral_curve: input {index}'s result is {run.estimator}; use a sampling "
                "method whose weights are self-normalised (forward, enumerate, smc...)"
            )
        return pairs
    raise OptionError(
        "deferral_curve: each run must be a Result of a deferral cascade, an (input, Result) "
        f"pair from lc.infer_many, or a Deferral record; got {type(run).__name__} at {index}"
    )


def deferral_curve(
    runs: Iterable[Any],
    labels: Sequence[Any] | None = None,
    *,
    correct: Callable[..., Any] | None = None,
    thresholds: Iterable[float | Sequence[float]] | None = None,
    costs: Sequence[float] | None = None,
) -> list[DeferralPoint]:
    """Accuracy, fraction deferred and cost of a cascade at each threshold, swept offline.

    ``runs`` has one entry per input: a :class:`Deferral`, a ``Result`` of
    :func:`deferral_cascade` (its traces weighted by their normalised weights), or an
    ``(input, Result)`` pair as ``lc.infer_many`` yields.  Run the cascade with
    ``threshold=1`` and every model answers every input once; each threshold then picks, from
    the recorded confidences, which answer counts — no model runs again.  Records that stopped
    early serve the thresholds they can (an ``OptionError`` says when one needs a model that
    did not run).

    An answer scores ``correct(answer, label)`` with ``labels`` (one per run; by default the
    stripped answer equals the stripped label), or ``correct(answer)`` without labels.
    ``thresholds`` are numbers (every deferral point alike) or tuples (one per point); by
    default 0, 1 and every confidence recorded, which traces the whole curve.  ``costs``
    (per token, one per model) override the records'.  Returns :class:`DeferralPoint` rows,
    by threshold.

    >>> runs = [Deferral(("4", "4"), (0.9, None), (1, 1)), Deferral(("5", "4"), (0.4, None), (1, 1))]
    >>> for row in deferral_curve(runs, ["4", "4"], thresholds=[0.0, 0.5, 1.0], costs=[1, 10]):
    ...     print(row.threshold, row.deferred, row.accuracy, row.cost)
    0.0 0.0 0.5 1.0
    0.5 0.5 1.0 6.0
    1.0 1.0 1.0 11.0
    """  # noqa: E501
    per_input = [_weighted_records(run, i) for i, run in enumerate(runs)]
    if not per_input:
        raise OptionError("deferral_curve: runs is empty; give one result or record per input")
    if labels is not None:
        labels = list(labels)
        if len(labels) != len(per_input):
            raise OptionError(
                f"deferral_curve: {len(labels)} labels for {len(per_input)} runs; give one "
                "label per run, in the same order"
            )
    if correct is None:
        if labels is None:
            raise OptionError(
                "deferral_curve: give labels (one per run) or correct=, a function of the "
                "answer (and the label) that says whether it is right"
            )

        def correct(answer: str, label: Any) -> bool:
            return answer.strip() == str(label).strip()

    elif not callable(correct):
        raise OptionError(f"deferral_curve: correct must be a function, got {correct!r}")
    n_models = max(len(r.answers) for recs in per_input for _, r in recs)
    if costs is not None:
        costs = list(costs)
        if len(costs) < n_models or any(
            isinstance(c, bool) or not isinstance(c, int | float) or not 0 <= c < math.inf
            for c in costs
        ):
            raise OptionError(
                f"deferral_curve: costs must be {n_models} finite numbers >= 0 (per token, one "
                f"per model), got {costs}"
            )
    if thresholds is None:
        seen = {0.0, 1.0}
        for recs in per_input:
            for _, r in recs:
                seen.update(c for c in r.confidences if c is not None)
        points: list = sorted(seen)
    else:
        points = list(thresholds)
    if not points:
        raise OptionError("deferral_curve: thresholds is empty")
    scores: dict[tuple[int, int, int], float] = {}  # (input, record, model) -> correctness

    def score(i: int, j: int, rec: Deferral, model: int) -> float:
        key = (i, j, model)
        if key not in scores:
            answer = rec.answers[model]
            value = correct(answer) if labels is None else correct(answer, labels[i])
            scores[key] = float(value)
        return scores[key]

    rows = []
    for point in points:
        per_point = _point_thresholds(point, n_models)
        deferred = accuracy = cost = 0.0
        answered = [0.0] * n_models
        for i, recs in enumerate(per_input):
            for j, (w, rec) in enumerate(recs):
                model = rec.at(per_point)
                deferred += w * (model > 0)
                accuracy += w * score(i, j, rec, model)
                cost += w * rec.cost_at(per_point, costs)
                answered[model] += w
        m = len(per_input)
        rows.append(
            DeferralPoint(
                point if isinstance(point, int | float) else tuple(per_point),
                deferred / m,
                accuracy / m,
                cost / m,
                tuple(a / m for a in answered),
            )
        )
    return rows


def _point_thresholds(point: Any, n_models: int) -> list[float]:
    if isinstance(point, int | float) and not isinstance(point, bool):
        values = [float(point)] * max(n_models - 1, 1)
    elif isinstance(point, Sequence) and not isinstance(point, str):
        values = [float(t) for t in point]
    else:
        raise OptionError(
            f"deferral_curve: a threshold is a number in [0, 1] or a tuple of them, got "
            f"{safe_repr(point, 40)}"
        )
    if not all(0.0 <= t <= 1.0 for t in values):
        raise OptionError(f"deferral_curve: thresholds must lie in [0, 1], got {point!r}")
    return values


def plot_deferral_curve(
    rows: Sequence[DeferralPoint], path: str, *, title: str | None = None
) -> str:
    """Draws accuracy against the fraction deferred (left) and against the mean cost (right)
    and saves the picture to ``path`` (any format matplotlib writes); returns ``path``.
    Needs matplotlib (``pip install matplotlib``).

    >>> import os, tempfile
    >>> rows = deferral_curve([Deferral(("4", "5"), (0.3, None), (1, 1))], ["5"])
    >>> path = plot_deferral_curve(rows, os.path.join(tempfile.mkdtemp(), "curve.png"))
    >>> os.path.getsize(path) > 0
    True
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise LMCascadeError(
            "plot_deferral_curve needs matplotlib; install it with: pip install matplotlib "
            "(deferral_curve's rows need nothing more)"
        ) from err
    rows = list(rows)
    if not rows or not all(isinstance(r, DeferralPoint) for r in rows):
        raise OptionError("plot_deferral_curve: rows must be deferral_curve's output")
    by_deferred = sorted(rows, key=lambda r: (r.deferred, r.cost))
    by_cost = sorted(rows, key=lambda r: (r.cost, r.deferred))
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    try:
        left.plot([r.deferred for r in by_deferred], [r.accuracy for r in by_deferred], "o-")
        left.set_xlabel("fraction deferred")
        left.set_ylabel("accuracy")
        right.plot([r.cost for r in by_cost], [r.accuracy for r in by_cost], "o-")
        right.set_xlabel("mean cost per input")
        for ax in (left, right):
            ax.grid(alpha=0.3)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


__all__ = [
    "CONFIDENCES",
    "Deferral",
    "DeferralPoint",
    "cascades_in",
    "deferral_cascade",
    "deferral_curve",
    "deferral_record",
    "keeps",
    "mean_token_prob",
    "min_token_prob",
    "plot_deferral_curve",
    "sequence_prob",
]
