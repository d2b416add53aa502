"""Reward-guided segment rejection (Cascade Reward Sampling, CARDS): write a text segment by
segment, re-drawing each segment until a reward model accepts it.

:func:`cascade_reward_sampling` is an ordinary program.  Each segment is one ``lc.gen`` site
(``details=True``), cut where the segment rules say; the text so far plus the segment is
scored by ``reward`` (an ``lc.call`` tool call, or an ``@lc.program``); the segment is
accepted when its reward reaches the current threshold, which rises with the text's length.
Otherwise the segment is drawn again, up to ``budget`` tries, after which the best try so far
is kept.  Generation continues from the accepted text until the end of text or ``max_tokens``.

**What it samples.**  The program adds no weight (no factor, observe or condition), so every
inference method gives the same distribution: the law of this search procedure — what
``method="forward"`` draws, and what ``method="enumerate"`` computes exactly on a small model.
That is *not* an exact posterior: neither the model's own ``p(x)``, nor a reward-tilted
``p(x) exp(r(x)) / Z``, nor ``p(x | r(x) >= threshold)``; segment rejection with a fallback
to the best try is a heuristic search for high-reward text at a bounded cost.  For an exact
reward-tilted target, weight the model's text with ``lc.factor`` and let ``method="smc"``
resample (``resample_every="segment"``, see docs/smc.md).

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, -1.0 + len(ctx)])
>>> prog = cascade_reward_sampling(lm, "a", lambda prompt, text: text.count("b"),
...                                threshold=1.0, budget=3, max_tokens=3, segment_tokens=2)
>>> r = lc.infer(prog, method="forward", num_samples=200, seed=0)
>>> r.expectation(lambda text: "b" in text) > 0.8
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lmcascade.errors import SiteError
from lmcascade.generation import Generation
from lmcascade.models.base import LanguageModel
from lmcascade.program import (
    BoundProgram,
    Program,
    call,
    current_scope,
    gen,
    program,
    scope,
)
from lmcascade.trace import safe_repr

SCOPE = "crs"
"""The scope a run's sites live under, numbered per execution:
``crs[0]/segment[j]/try[k]/text`` and ``.../reward``."""

Reward = Callable[[str, str], Any] | Program
Threshold = float | tuple[float, float] | Callable[[int], Any]


@dataclass(frozen=True)
class CRSOutcome:
    """What one run of :func:`cascade_reward_sampling` did.

    ``text`` is the final text (the segments joined); per kept segment, ``segments`` has its
    text, ``rewards`` the reward of the text up to and including it, ``tries`` how many draws
    it took and ``accepted`` whether it reached its threshold (``False``: the budget ran out
    and the best try was kept).  ``tokens`` counts every token generated, rejected tries and
    tokens cut off after a segment's end included: the run's model cost.

    >>> CRSOutcome("ab", ("a", "b"), (0.5, 1.0), (1, 3), (True, False), 6).text
    'ab'
    """

    text: str
    segments: tuple[str, ...]
    rewards: tuple[float, ...]
    tries: tuple[int, ...]
    accepted: tuple[bool, ...]
    tokens: int


def threshold_schedule(threshold: Threshold, max_tokens: int) -> Callable[[int], float]:
    """The reward threshold as a function of the number of tokens the text would have with the
    candidate segment: a number is constant; ``(start, end)`` rises linearly from ``start`` (no
    tokens) to ``end`` (``max_tokens``), as CARDS' threshold does; a function is used as is.

    >>> rising = threshold_schedule((0.0, 2.0), max_tokens=8)
    >>> rising(0), rising(4), rising(8), rising(20)
    (0.0, 1.0, 2.0, 2.0)
    """
    if isinstance(threshold, int | float) and not isinstance(threshold, bool):
        value = float(threshold)
        if math.isnan(value):
            raise SiteError("cascade_reward_sampling: threshold is NaN; give a number")
        return lambda n: value
    if isinstance(threshold, tuple) and len(threshold) == 2:
        start, end = threshold
        if all(isinstance(t, int | float) and math.isfinite(t) for t in (start, end)):
            return lambda n: start + (end - start) * min(1.0, n / max_tokens)
    elif callable(threshold):
        return threshold
    raise SiteError(
        "cascade_reward_sampling: threshold must be a number, a (start, end) pair of finite "
        "numbers (rising with the text's length) or a function of the number of tokens, got "
        f"{safe_repr(threshold, 80)}"
    )


def _int(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise SiteError(
            f"cascade_reward_sampling: {name} must be an integer >= {least}, got "
            f"{safe_repr(value, 40)}"
        )
    return value


def cascade_reward_sampling(
    model: LanguageModel,
    prompt: str,
    reward: Reward,
    *,
    threshold: Threshold = 0.0,
    budget: int = 4,
    max_tokens: int = 64,
    segment_tokens: int = 16,
    segment_stop: str | Sequence[str] | None = None,
    uncertainty: float | None = None,
    segment_min: int = 1,
    details: bool = False,
    **gen_params: Any,
) -> BoundProgram:
    """Text from ``model`` after ``prompt``, written segment by segment, each segment drawn
    again until ``reward`` accepts it (at most ``budget`` draws; then the best draw is kept).

    A segment ends after ``segment_tokens`` tokens, at a ``segment_stop`` string (kept in the
    text; e.g. ``"\\n"`` for lines), at the end of text, or — the uncertainty rule — just
    before the first token, from the ``segment_min``-th on, whose probability under the model
    is below ``uncertainty``: that uncertain token then starts the next segment, where it is
    drawn again and judged.  (CARDS cuts where the next-token entropy is high; the program
    sees the probability of the token drawn, from ``details=True``.  The tokens drawn after a
    cut are discarded, and counted in ``CRSOutcome.tokens``.)

    ``reward(prompt, text)`` scores the text so far with the candidate segment (a function,
    run as ``lc.call``: an exception gives the trace weight zero; or an ``@lc.program`` of the
    same arguments).  A candidate is accepted when its reward is at least the threshold at the
    text's length (see :func:`threshold_schedule`: a number, a rising ``(start, end)`` pair
    or a function of the token count).  ``gen_params`` (``temperature``, ``top_k``,
    ``top_p``...) go to every segment's ``lc.gen``.

    The program returns the text, or with ``details=True`` a :class:`CRSOutcome`.  It adds no
    weight: its distribution under any method is the law of the search (see the module
    docstring) — a heuristic search, not an exact posterior.  The next segment's prompt is
    ``prompt + text so far`` re-tokenized, so on a real tokenizer a token may be split
    differently across a segment boundary than the model would have split it.

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, -2.0])
    >>> prog = cascade_reward_sampling(lm, "a", lambda p, t: -t.count("a"), threshold=0.0,
    ...                                budget=2, max_tokens=2, segment_tokens=1, details=True)
    >>> out = lc.infer(prog, method="forward", num_samples=1, seed=0).values[0]
    >>> out.text == "".join(out.segments), len(out.segments) <= 2
    (True, True)
    """
    from lmcascade.distributions import LM

    if not isinstance(model, LanguageModel):
        raise SiteError(
            f"cascade_reward_sampling: model must be a LanguageModel, got {type(model).__name__}"
        )
    if not isinstance(prompt, str):
        raise SiteError(
            f"cascade_reward_sampling: prompt must be a string, got {type(prompt).__name__}"
        )
    if not (isinstance(reward, Program) or callable(reward)):
        raise SiteError(
            "cascade_reward_sampling: reward must be a function (prompt, text) -> number or an "
            f"lc.program taking (prompt, text), got {type(reward).__name__}"
        )
    _int("budget", budget, 1)
    _int("max_tokens", max_tokens, 1)
    _int("segment_tokens", segment_tokens, 1)
    _int("segment_min", segment_min, 1)
    if uncertainty is not None and (
        isinstance(uncertainty, bool)
        or not isinstance(uncertainty, int | float)
        or not 0.0 < uncertainty <= 1.0
    ):
        raise SiteError(
            "cascade_reward_sampling: uncertainty is a token probability in (0, 1] below which "
            f"a segment ends, or None; got {safe_repr(uncertainty, 40)}"
        )
    if not isinstance(details, bool):
        raise SiteError(f"cascade_reward_sampling: details must be True or False, got {details!r}")
    for own, instead in (("stop", "segment_stop"), ("potential", None), ("min_tokens", None)):
        if own in gen_params:
            raise SiteError(
                f"cascade_reward_sampling: {own} is not a setting of the segments' generation"
                + (f"; use {instead}" if instead else "")
            )
    schedule = threshold_schedule(threshold, max_tokens)
    try:  # the generation settings, checked before anything runs
        LM(model, prompt, max_tokens=segment_tokens, stop=segment_stop, **gen_params)
    except TypeError as err:
        raise SiteError(f"cascade_reward_sampling: {err}") from None
    except SiteError as err:
        raise SiteError(f"cascade_reward_sampling: {err}") from None
    return _crs(
        model,
        prompt,
        reward,
        schedule,
        budget,
        max_tokens,
        segment_tokens,
        segment_stop,
        uncertainty,
        segment_min,
        details,
        gen_params,
    )


def cut_segment(
    model: LanguageModel, out: Generation, segment_min: int, uncertainty: float | None
) -> tuple[str, int, bool]:
    """Where a drawn segment ends: its text, its number of tokens, and whether it ends the
    whole text (an end-of-text token).  With ``uncertainty``, the segment stops just before
    the first token at index ``>= segment_min`` whose model probability is below it.

    >>> import math
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, 0.0])
    >>> g = Generation("abb", (0, 1, 1), tuple(map(math.log, (0.9, 0.2, 0.9))), 0.0, "max_tokens")
    >>> cut_segment(lm, g, 1, 0.5), cut_segment(lm, g, 1, None)
    (('a', 1, False), ('abb', 3, False))
    """
    ids = list(out.token_ids)
    if not ids:  # a value scored as a text (no token path): the whole of it
        return out.text, max(1, len(model.encode(out.text))), out.finish_reason == "eos"
    cut = len(ids)
    if uncertainty is not None:
        floor = math.log(uncertainty)
        for k in range(segment_min, len(ids)):
            if out.token_log_probs[k] < floor:
                cut = k
                break
    eos = model.eos_id
    text = model.decode([t for t in ids[:cut] if t != eos])
    while text.endswith("\ufffd") and cut < len(ids):  # never cut inside a character
        cut += 1
        text = model.decode([t for t in ids[:cut] if t != eos])
    return text, cut, ids[cut - 1] == eos


def _here(name: str) -> str:
    prefix = current_scope()
    return f"{prefix}/{name}" if prefix else name


def _checked_reward(value: Any, where: str) -> float:
    try:
        number = math.nan if isinstance(value, str) else float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if math.isnan(number):
        raise SiteError(
            f"site {where!r}: cascade_reward_sampling's reward returned {safe_repr(value, 60)}; "
            "a reward must be a number"
        )
    return number


def _checked_limit(value: Any, tokens: int) -> float:
    try:
        number = math.nan if isinstance(value, str) else float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if math.isnan(number):
        raise SiteError(
            f"cascade_reward_sampling: the threshold function returned {safe_repr(value, 60)} "
            f"for {tokens} tokens; it must return a number"
        )
    return number


@program
def _crs(
    model,
    prompt,
    reward,
    schedule,
    budget,
    max_tokens,
    segment_tokens,
    segment_stop,
    uncertainty,
    segment_min,
    details,
    gen_params,
):
    text = ""
    used = 0  # tokens of the kept text
    spent = 0  # every token generated
    segments: list[str] = []
    rewards: list[float] = []
    tries: list[int] = []
    accepted: list[bool] = []
    finished = False
    with scope(SCOPE + "[]"):
        while not finished and used < max_tokens:
            best = None
            chosen = None
            with scope("segment[]"):
                for attempt in range(budget):
                    with scope("try[]"):
                        out = yield gen(
                            "text",
                            model,
                            prompt + text,
                            max_tokens=min(segment_tokens, max_tokens - used),
                            stop=segment_stop,
                            details=True,
                            **gen_params,
                        )
                        spent += len(out.token_ids)
                        seg, n, ends = cut_segment(model, out, segment_min, uncertainty)
                        if isinstance(reward, Program):
                            with scope("scorer"):
                                raw = yield from reward(prompt, text + seg)
                            value = _checked_reward(raw, _here("reward"))
                            yield call("reward", float, value)  # recorded
                        else:
                            raw = yield call("reward", reward, prompt, text + seg)
                            value = _checked_reward(raw, _here("reward"))
                    candidate = (value, seg, n, ends, attempt + 1)
                    if best is None or value > best[0]:
                        best = candidate
                    limit = _checked_limit(schedule(used + n), used + n)
                    if value >= limit:
                        chosen, ok = candidate, True
                        break
                if chosen is None:
                    chosen, ok = best, False
            value, seg, n, ends, _ = chosen
            text += seg
            used += n
            finished = ends
            segments.append(seg)
            rewards.append(value)
            tries.append(attempt + 1)
            accepted.append(ok)
    if not details:
        return text
    return CRSOutcome(text, tuple(segments), tuple(rewards), tuple(tries), tuple(accepted), spent)


__all__ = ["CRSOutcome", "cascade_reward_sampling", "cut_segment", "threshold_schedule"]
