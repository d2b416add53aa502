"""Selection-inference: pick facts, infer one new fact from them, repeat, then answer.

Selection-inference (Creswell, Shanahan and Higgins, 2022) splits multi-step reasoning into
two alternating LM steps: *selection* chooses facts from the context (the given facts and those
inferred so far), and *inference* writes one new fact from the selected facts alone, without
seeing the question, so each new fact follows from facts the trace names.  After ``steps``
rounds the model answers from the facts and the inferences.

:func:`selection_inference` builds it as an ordinary program.  A selection is a choice among
the candidate facts whose probabilities the model gives: each candidate's text is scored as
the continuation of the selection prompt (``lc.score``, one batched pass), and the fact is
drawn from the categorical distribution of those probabilities renormalised over the
candidates, ``P(fact i) = p(fact_i | prompt) / sum_j p(fact_j | prompt)`` — the model made to
name one of the facts.  So the program's distribution is that of the procedure itself:
``enumerate`` gives it exactly on a small model, and conditions or factors added after it
(a check of the answer, say) make any method target the procedure's runs given them.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "b", "c", "?", ";", "<eos>"], lambda ctx: [0.5, 0.0, 0.0, -9, -9, -1.0])
>>> si = selection_inference(lm, ["a", "b"], "c", steps=1, select=1, sep=";",
...                          select_prompt="{facts}?{question}?{selected}",
...                          infer_prompt="{selection}?", answer_prompt="{inferences}?{question}",
...                          infer_tokens=1, answer_tokens=1, chat=False)
>>> lc.infer(si, method="forward", num_samples=1, seed=0).traces[0].names
['si[0]/step[0]/pick[0]/fact[0]', 'si[0]/step[0]/pick[0]/fact[1]', 'si[0]/step[0]/pick[0]/choice', 'si[0]/step[0]/inference', 'si[0]/answer']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pyro.distributions import Categorical

from lmcascade.errors import OptionError, SiteError
from lmcascade.patterns.reasoning import Template, _check_generation, _fill
from lmcascade.patterns.star import (
    _check_flag,
    _check_model,
    _check_prompt,
    _check_scope,
)
from lmcascade.program import BoundProgram, condition, gen, sample, scope, score
from lmcascade.program import program as _program
from lmcascade.trace import Trace

SELECT_PROMPT = (
    "Facts:\n{facts}\nQuestion: {question}\nThe facts needed to answer the question:\n{selected}"
)
"""The default selection prompt: ``{facts}`` (every candidate, one per line), ``{question}``
and ``{selected}`` (the facts picked so far in this step, each followed by a newline)."""

INFER_PROMPT = "{selection}\nTherefore,"
"""The default inference prompt: ``{selection}`` (the selected facts, one per line); the
question is left out on purpose, as in the paper."""

SI_ANSWER_PROMPT = "Facts:\n{facts}\nReasoning:\n{inferences}\nQuestion: {question}\nAnswer:"
"""The default answer prompt: ``{facts}`` (the given facts), ``{inferences}`` (the inferred
ones, in order) and ``{question}``."""


def _whole(value: Any, argument: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise OptionError(
            f"selection_inference: {argument} must be a whole number >= {least}, got {value!r}"
        )
    return value


def _check_facts(facts: Any, sep: Any) -> list[str]:
    """The facts, stripped: distinct non-empty strings none of which holds ``sep``."""
    what = "selection_inference"
    if not isinstance(sep, str) or not sep:
        raise OptionError(
            f"{what}: sep must be a non-empty string (what joins the facts in a prompt), got "
            f"{sep!r}"
        )
    if isinstance(facts, str) or not isinstance(facts, Sequence) or not facts:
        raise OptionError(f"{what}: facts must be a non-empty list of strings, got {facts!r}")
    out: list[str] = []
    for i, fact in enumerate(facts):
        if not isinstance(fact, str) or not fact.strip():
            raise OptionError(f"{what}: facts[{i}] must be a non-empty string, got {fact!r}")
        fact = fact.strip()
        if sep in fact:
            raise OptionError(
                f"{what}: facts[{i}] = {fact!r} holds the separator sep={sep!r}, so the prompts "
                "would show it as several facts; split it into facts of its own, or pass a sep "
                "that no fact holds"
            )
        if fact in out:
            raise OptionError(
                f"{what}: facts[{i}] = {fact!r} repeats facts[{out.index(fact)}]; give each "
                "fact once (a repeated fact would be two candidates of one text)"
            )
        out.append(fact)
    return out


def selection_inference(
    model: Any,
    facts: Sequence[str],
    question: str,
    *,
    steps: int = 2,
    select: int = 2,
    select_prompt: Template = SELECT_PROMPT,
    infer_prompt: Template = INFER_PROMPT,
    answer_prompt: Template = SI_ANSWER_PROMPT,
    infer_tokens: int = 32,
    answer_tokens: int = 16,
    infer_stop: str | list[str] | None = "\n",
    answer_stop: str | list[str] | None = "\n",
    sep: str = "\n",
    chat: bool = True,
    name: str = "si[]",
    **options: Any,
) -> BoundProgram:
    """A program that alternates ``steps`` selections and inferences over ``facts``, then
    answers ``question``; it returns the answer, stripped.

    Step ``t`` (scope ``step[t]``) picks ``select`` distinct facts one after another (scope
    ``pick[k]``): every candidate ``i`` not yet picked in this step — a given fact, or one
    inferred in an earlier step, numbered in that order — gets a score site ``fact[i]``,
    ``log p(fact_i | selection prompt)``, and the ``choice`` site draws one from
    ``Categorical(logits=scores)``, its value the candidate's position among those scored.
    Then the ``inference`` site generates a new fact from the picked ones
    (``infer_tokens``, ended by ``infer_stop``); stripped, and unless empty or already
    known, it joins the candidates of later steps.  Finally the ``answer`` site answers from
    the given facts and the inferences.  All sites sit in ``lc.scope(name)``; the default
    ``"si[]"`` numbers each call, so two selection-inference programs can share a program.

    The prompts are format strings or functions of their fields in order:
    ``select_prompt(facts, question, selected)``, ``infer_prompt(selection)``,
    ``answer_prompt(facts, question, inferences)``; lists of facts are joined with ``sep`` (the
    selected ones also end with it).  So ``sep`` must be a non-empty string that no fact
    holds, and the facts distinct (after stripping): an
    :class:`~lmcascade.errors.OptionError` otherwise, since the model would read other facts
    than the candidates.  An inference is one candidate whatever it holds; keep ``sep``
    among the ``infer_stop`` strings (the defaults are both ``"\\n"``) so that no inference
    holds it.  With ``chat=True`` a model with a chat format gets each prompt as a user
    turn.  ``options`` (``temperature``...) apply to the two generations, not to the scores:
    the selection uses the model's own probabilities.  A long fact scores lower than a short
    one for being long; a step where the model can write none of the candidates gives the
    trace weight zero (``lc.condition`` ``selectable``).

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["a", "b", "c", "?", ";", "<eos>"], lambda ctx: [1.0, 0.0, -9, -9, -9, -9])
    >>> si = selection_inference(lm, ["a", "b"], "c", steps=1, select=1, sep=";",
    ...                          select_prompt="{facts}?{question}?{selected}",
    ...                          infer_prompt="{selection}?", answer_prompt="{inferences}?",
    ...                          infer_tokens=1, answer_tokens=1, chat=False)
    >>> r = lc.infer(si, method="enumerate")
    >>> round(float(sum(w for t, w in zip(r.traces, r.weights)
    ...                 if int(t["si[0]/step[0]/pick[0]/choice"].value) == 0)), 4)  # e / (e + 1)
    0.7311
    """
    what = "selection_inference"
    _check_model(model, what)
    facts = _check_facts(facts, sep)
    if not isinstance(question, str):
        raise OptionError(f"{what}: question must be a string, got {type(question).__name__}")
    steps = _whole(steps, "steps", 1)
    select = _whole(select, "select", 1)
    if select > len(facts):
        raise OptionError(
            f"{what}: select={select} facts per step, but only {len(facts)} facts are given"
        )
    _check_prompt(what, select_prompt, "select_prompt", ("facts", "question", "selected"))
    _check_prompt(what, infer_prompt, "infer_prompt", ("selection",))
    _check_prompt(what, answer_prompt, "answer_prompt", ("facts", "question", "inferences"))
    _check_generation(what, model, infer_tokens, infer_stop, options, "infer")
    _check_generation(what, model, answer_tokens, answer_stop, options, "answer")
    _check_flag(what, chat, "chat")
    _check_scope(what, name, "si[]")
    wrap = getattr(model, "chat", None) if chat else None

    def prompt(text: str) -> str:
        return wrap(text) if wrap is not None else text

    @_program
    def selection_inference():
        with scope(name):
            pool = list(facts)
            for _ in range(steps):
                with scope("step[]"):
                    picked: list[int] = []
                    for _ in range(select):
                        with scope("pick[]"):
                            text = _fill(
                                select_prompt,
                                facts=sep.join(pool),
                                question=question,
                                selected="".join(pool[i] + sep for i in picked),
                            )
                            candidates = [i for i in range(len(pool)) if i not in picked]
                            scores = []
                            for i in candidates:
                                scores.append(
                                    (yield score(f"fact[{i}]", model, prompt(text), pool[i]))
                                )
                            if max(scores) == float("-inf"):
                                yield condition("selectable", False)
                                return ""
                            logits = torch.tensor(scores, dtype=torch.float64)
                            choice = yield sample("choice", Categorical(logits=logits))
                            picked.append(candidates[int(choice)])
                    new = yield gen(
                        "inference",
                        model,
                        prompt(_fill(infer_prompt, selection=sep.join(pool[i] for i in picked))),
                        max_tokens=infer_tokens,
                        stop=infer_stop,
                        **options,
                    )
                    new = new.strip()
                    if new and new not in pool:
                        pool.append(new)
            reply = yield gen(
                "answer",
                model,
                prompt(
                    _fill(
                        answer_prompt,
                        facts=sep.join(facts),
                        question=question,
                        inferences=sep.join(pool[len(facts) :]),
                    )
                ),
                max_tokens=answer_tokens,
                stop=answer_stop,
                **options,
            )
        return reply.strip()

    return selection_inference()


def si_steps(trace: Any, facts: Sequence[str], name: str = "si[0]") -> list[tuple[list[str], str]]:
    """The reasoning a :func:`selection_inference` trace holds: for every step, the facts it
    selected (in the order picked) and the fact it inferred (stripped).  ``facts`` are the
    facts the program was given; ``name`` its scope in the trace (``"si[0]"`` for the first
    call).  Every candidate a selection scored is checked against ``facts`` (its score site
    records the tokens it scored), so facts that are not the program's raise an
    :class:`~lmcascade.errors.OptionError` rather than name the wrong facts.

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["a", "b", "c", "?", ";", "<eos>"], lambda ctx: [-9, -9, 1.0, -9, -9, -9])
    >>> si = selection_inference(lm, ["a", "b"], "c", steps=1, select=2, sep=";",
    ...                          select_prompt="{facts}?{question}?{selected}",
    ...                          infer_prompt="{selection}?", answer_prompt="{inferences}?",
    ...                          infer_tokens=1, answer_tokens=1, chat=False)
    >>> trace = lc.infer(si, method="forward", num_samples=1, seed=0).traces[0]
    >>> [(sorted(picked), new) for picked, new in si_steps(trace, ["a", "b"])]
    [(['a', 'b'], 'c')]
    """
    what = "si_steps"
    if not isinstance(trace, Trace):
        raise OptionError(
            f"{what}: trace must be a Trace (one of lc.infer(...).traces), got "
            f"{type(trace).__name__}"
        )
    if (
        isinstance(facts, str)
        or not isinstance(facts, Sequence)
        or not all(isinstance(f, str) for f in facts)
    ):
        raise OptionError(
            f"{what}: facts must be the list of fact strings the program was given, got {facts!r}"
        )
    if not isinstance(name, str) or not name:
        raise OptionError(f"{what}: name must be the program's scope (like 'si[0]'), got {name!r}")
    pool = [f.strip() for f in facts]
    out: list[tuple[list[str], str]] = []
    step = 0
    while f"{name}/step[{step}]/inference" in trace:
        picked: list[str] = []
        pick = 0
        while f"{name}/step[{step}]/pick[{pick}]/choice" in trace:
            prefix = f"{name}/step[{step}]/pick[{pick}]/fact["
            scored = [s for s in trace if s.name.startswith(prefix)]
            texts = [_candidate(site, int(site.name[len(prefix) : -1]), pool) for site in scored]
            choice = trace[f"{name}/step[{step}]/pick[{pick}]/choice"].value
            picked.append(texts[int(choice)])
            pick += 1
        new = trace[f"{name}/step[{step}]/inference"].value.strip()
        out.append((picked, new))
        if new and new not in pool:
            pool.append(new)
        step += 1
    if not out:
        raise SiteError(
            f"{what}: the trace has no selection-inference step under {name!r}; its sites "
            f"are {trace.names[:8]}"
        )
    return out


def _candidate(site: Any, index: int, pool: list[str]) -> str:
    """Candidate ``index`` of ``pool``, checked against the tokens its score site scored."""
    model = getattr(site.dist, "model", None)
    text = pool[index] if index < len(pool) else None
    if text is not None and (model is None or tuple(model.encode(text)) == tuple(site.token_ids)):
        return text
    scored = repr(model.decode(list(site.token_ids))) if model is not None else "another text"
    raise OptionError(
        f"si_steps: facts do not match the trace: site {site.name!r} scored {scored}, but "
        + (f"facts and inferences give {text!r}" if text is not None else
           f"there are only {len(pool)} facts and inferences")
        + "; pass the facts the program was given, in order"
    )  # fmt: skip


__all__ = ["INFER_PROMPT", "SELECT_PROMPT", "SI_ANSWER_PROMPT", "selection_inference", "si_steps"]
