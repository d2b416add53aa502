"""Reprompting: chain-of-thought recipes for a few-shot prompt, found by Gibbs-style MCMC.

Reprompting (Xu et al., 2023) looks for chain-of-thought *recipes* ``z_j``, one per training
example ``(x_j, y_j)``, that work as few-shot demonstrations for each other.  It starts from
the model's zero-shot recipes and then, one example at a time, redraws ``z_j`` from the model
shown the *other* examples ``(x_i, z_i, y_i)`` as demonstrations, keeping recipes that lead to
the right answer: Gibbs sampling over the recipes.

:func:`reprompting` writes the joint as a program with one LM site per example
(``reprompt[0]/recipe[j]``).  Its target, over the recipe texts, is

    ``pi(z_1..z_n)  ∝  prod_j P(recipe z_j | D_-j(z), x_j) · P(tail y_j | D_-j(z), x_j, z_j)``

where ``D_-j(z)`` is the other examples' demonstrations (``demo`` filled with their question,
recipe and answer, in order), ``P(recipe z_j | ...)`` is the probability that a recipe
generation — the recipe sites' own ``recipe_tokens`` and ``recipe_stop`` — from the few-shot
prompt (``D_-j`` then example ``j``'s question) writes the text ``z_j``, every token path and
every ending (end of text, a stop string, the length limit) summed, and ``P(tail y_j | ...)``
is the probability that the rest of the demonstration, with the known answer ``y_j``,
follows that text.  A product over examples of the few-shot probability of a correct worked
example.  Under ``pi`` the conditional of one recipe given the others is

    ``pi(z_j | z_-j)  ∝  P(z_j | D_-j, x_j) · P(y_j | D_-j, x_j, z_j) · prod_{k != j} (...)_k``:

Reprompting's own step — the few-shot model's recipe for ``x_j``, kept in proportion to the
probability that it reaches ``y_j`` — times how well ``z_j``, used as a demonstration, makes
the model reproduce the other examples (the paper's step leaves that factor out, so its
chain has no stated stationary law; this one does).

Each recipe site draws a token path from the zero-shot model (the head of ``demo`` with the
question, nothing before it), and a factor weighs the path by its probability under the
few-shot prompt over its zero-shot probability, both of the same tokens with the same
ending: the drawn tokens teacher-forced, the end-of-text token or the tokens that write the
stop string included.  Summed over the paths that write one text, these weights give the
text's few-shot probability, so the target over texts is exact however the model spells or
ends a recipe; the zero-shot model is only the proposal, and the recipes range over the
texts it can write.  :func:`reprompting_recipes` runs ``method="mcmc"`` on it — a site move
redraws one example's recipe and accepts by the ratio of ``pi`` — and returns the best and
the last recipes.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "b", "=", ";", "<eos>"], lambda ctx: [0.0, 0.0, -2.0, -2.0, 0.0])
>>> prog = reprompting(lm, [("a", "a"), ("b", "b")], demo="{question}{recipe}={answer};",
...                    recipe_tokens=1, recipe_stop=None)
>>> lc.infer(prog, method="forward", num_samples=1, seed=0).traces[0].names[:4]
['reprompt[0]/recipe[0]', 'reprompt[0]/recipe[1]', 'reprompt[0]/paths', 'reprompt[0]/answer[0]']
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmcascade.distributions import LM
from lmcascade.errors import OptionError, SiteError
from lmcascade.generation import Generation
from lmcascade.lm.run import LMRun
from lmcascade.lm.scoring import path_log_prob, score_forced
from lmcascade.models.base import LanguageModel
from lmcascade.patterns.reasoning import _check_generation
from lmcascade.patterns.star import (
    _check_model,
    _check_scope,
    question_answer_pairs,
)
from lmcascade.program import BoundProgram, call, factor, gen, scope, score
from lmcascade.program import program as _program
from lmcascade.result import Result

DEMO_TEMPLATE = "Question: {question}\nReasoning: {recipe}\nAnswer: {answer}\n\n"
"""The default demonstration: ``{question}``, then ``{recipe}``, then ``{answer}``."""

_FIELDS = ("question", "recipe", "answer")


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def split_demo(demo: Any, what: str = "split_demo") -> tuple[str, str]:
    """A demonstration template cut at ``{recipe}``: the head (with ``{question}``) and the
    tail (with ``{answer}``).  Each field must appear once, in the order question, recipe,
    answer (an :class:`~lmcascade.errors.OptionError` from ``what`` otherwise).

    >>> split_demo("Q: {question}\\nA: {recipe} So {answer}.\\n")
    ('Q: {question}\\nA: ', ' So {answer}.\\n')
    """
    if not isinstance(demo, str):
        raise OptionError(
            f"{what}: demo must be a format string with {{question}}, {{recipe}} and "
            f"{{answer}} in that order, got {type(demo).__name__}"
        )
    try:
        parts = list(string.Formatter().parse(demo))
    except ValueError as err:
        raise OptionError(
            f"{what}: demo: {err} in {demo!r}; write literal braces as '{{{{' and '}}}}'"
        ) from None
    named = [f for _, f, _, _ in parts if f is not None]
    if named != list(_FIELDS):
        raise OptionError(
            f"{what}: demo must use {{question}}, {{recipe}} and {{answer}} once each, in "
            f"that order (and no other field), got fields {named} in {demo!r}"
        )
    head, tail, seen = "", "", False
    for literal, field, spec, conversion in parts:
        if spec or conversion:
            raise OptionError(f"{what}: demo: write {{{field}}} plain, without a format spec")
        if field == "recipe":
            head += _escape(literal)
            seen = True
            continue
        piece = _escape(literal) + ("{" + field + "}" if field else "")
        if seen:
            tail += piece
        else:
            head += piece
    return head, tail


def demonstrations(
    demo: str, examples: Sequence[tuple[str, str]], recipes: Sequence[str]
) -> list[str]:
    """Each example filled into ``demo`` with its recipe: the few-shot demonstrations.

    >>> demonstrations("Q{question} R{recipe} A{answer};", [("1", "x"), ("2", "y")], ["a", "b"])
    ['Q1 Ra Ax;', 'Q2 Rb Ay;']
    """
    head, tail = split_demo(demo)
    return [
        head.format(question=q) + z + tail.format(answer=a)
        for (q, a), z in zip(examples, recipes, strict=True)
    ]


def _pairs(examples: Any, what: str) -> list[tuple[str, str]]:
    out = question_answer_pairs(examples, what)
    if len(out) < 2:
        raise OptionError(
            f"{what}: needs at least 2 examples (each one's demonstrations are the others), "
            f"got {len(out)}"
        )
    return out


def path_log_probs(dists: Sequence[LM], paths: Sequence[Sequence[int]]) -> list[float]:
    """The log-probability of each token path under its LM distribution, its ending included:
    the tokens teacher-forced (one batched pass per model), ``-inf`` for a path that the
    distribution ends elsewhere (earlier, later, or not at all).

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["a", "<eos>"], lambda ctx: [0.0, 0.0])
    >>> [round(p, 4) for p in path_log_probs([lc.LM(lm, "a", max_tokens=2)] * 3,
    ...                                      [[0, 1], [0, 0], [0]])]  # "a" then eos; "aa"; too short
    [-1.3863, -1.3863, -inf]
    """
    runs = [LMRun(d, forced=p) for d, p in zip(dists, paths, strict=True)]
    score_forced(runs)
    return [path_log_prob(r) for r in runs]


MEMO_SIZE = 1 << 16
"""How many (prompt, token path) scores one :func:`reprompting` program keeps: a chain that
comes back to a set of recipes, or many particles that hold the same ones, score it once."""


class _PathScores:
    """:func:`path_log_probs` with a memo of the scores already made (a prompt and a path
    always score the same under one program's model and limits), as a recorded tool call; an
    error comes back as the value, so that the program raises it (a tool that raises would
    only give the trace weight zero)."""

    def __init__(self) -> None:
        self.memo: dict[tuple[str, tuple[int, ...]], float] = {}

    def __call__(self, dists: list[LM], paths: list[tuple[int, ...]]) -> tuple | Exception:
        keys = [(d.prompt, tuple(p)) for d, p in zip(dists, paths, strict=True)]
        todo = [i for i, k in enumerate(keys) if k not in self.memo]
        try:
            new = path_log_probs([dists[i] for i in todo], [paths[i] for i in todo])
        except Exception as err:  # noqa: BLE001 - re-raised by the program
            return err
        if len(self.memo) + len(todo) > MEMO_SIZE:
            self.memo.clear()
        found = {keys[i]: lp for i, lp in zip(todo, new, strict=True)}
        self.memo.update(found)
        return tuple(found[k] if k in found else self.memo[k] for k in keys)


def reprompting(
    model: LanguageModel,
    examples: Sequence[tuple[str, str]],
    *,
    demo: str = DEMO_TEMPLATE,
    recipe_tokens: int = 48,
    recipe_stop: str | list[str] | None = "\n",
    name: str = "reprompt[]",
) -> BoundProgram:
    """The program over one recipe per example whose target is Reprompting's joint (module
    docstring); it returns the recipes, a tuple in the order of ``examples``.

    Sites, under ``lc.scope(name)`` (``"reprompt[]"`` numbers each call):
    ``recipe[j]`` draws example ``j``'s recipe from the zero-shot model (the head of
    ``demo`` filled with its question, nothing before it; at most ``recipe_tokens``, ended
    by ``recipe_stop`` or end of text).  ``paths`` holds, for every ``j``, the
    log-probability of recipe ``j``'s drawn tokens, ending included, under the few-shot prompt
    (the other examples' demonstrations, then example ``j``'s head) and under the zero-shot
    prompt (:func:`path_log_probs`): a recorded ``lc.call``, so one teacher-forced pass per
    trace, not batched across particles as the engine batches its sites (pairs of prompt and
    path already scored by the program are remembered, :data:`MEMO_SIZE`).  Then for
    every ``j``, ``answer[j]`` scores the tail (the rest of ``demo``, ``{answer}`` filled)
    after the few-shot prompt and the recipe's text, and the factor ``few_shot[j]`` adds the
    few-shot path score plus ``answer[j]`` minus the zero-shot path score.  A trace's
    log-joint is so ``sum_j (few-shot path score_j + answer[j])``: ``log pi`` of its recipe
    paths up to the constant ``log Z``, and, summed over paths, of its recipe texts.

    The recipes are drawn at temperature 1 with nothing cut; the model reads the prompts as
    they are, with no chat format — few-shot demonstrations are a completion prompt.

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> inf = float("inf")
    >>> def scores(ctx):   # after "=" the toy repeats the letter before it
    ...     if ctx[-1] == 2:
    ...         return [3.0 * (ctx[-2] == 0), 3.0 * (ctx[-2] == 1), -inf, -inf, -inf]
    ...     return [1.0, 0.0, 0.0, 0.0, -inf]
    >>> lm = ToyLM(["a", "b", "=", ";", "<eos>"], scores)
    >>> prog = reprompting(lm, [("a", "a"), ("b", "a")], demo="{question}{recipe}={answer};",
    ...                    recipe_tokens=1, recipe_stop=None)
    >>> post = lc.infer(prog, method="enumerate").distribution()
    >>> max(post, key=post.get), round(post["a", "a"], 4)   # recipe "a" leads "b" to "a"
    (('a', 'a'), 0.6814)
    """
    what = "reprompting"
    _check_model(model, what)
    pairs = _pairs(examples, what)
    head, tail = split_demo(demo, what)
    _check_generation(what, model, recipe_tokens, recipe_stop, {}, "recipe")
    _check_scope(what, name, "reprompt[]")

    def recipe_dist(prompt: str) -> LM:
        return LM(model, prompt, max_tokens=recipe_tokens, stop=recipe_stop)

    scorer = _PathScores()

    @_program
    def reprompting():
        with scope(name):
            drawn: list[Generation] = []
            for j, (question, _) in enumerate(pairs):
                drawn.append(
                    (
                        yield gen(
                            f"recipe[{j}]",
                            model,
                            head.format(question=question),
                            max_tokens=recipe_tokens,
                            stop=recipe_stop,
                            details=True,
                        )
                    )
                )
            recipes = [g.text for g in drawn]
            for j, g in enumerate(drawn):
                if not g.token_ids and g.text:
                    raise SiteError(
                        f"{what}: recipe[{j}] has no token record (it was scored as a text); "
                        "run this program with a method that draws its recipes from the model"
                    )
            shown = demonstrations(demo, pairs, recipes)
            few_shot = [
                "".join(shown[i] for i in range(len(pairs)) if i != j)
                + head.format(question=question)
                for j, (question, _) in enumerate(pairs)
            ]
            zero_shot = [head.format(question=question) for question, _ in pairs]
            paths = [g.token_ids for g in drawn]
            scored = yield call(
                "paths", scorer, [recipe_dist(p) for p in few_shot + zero_shot], paths + paths
            )
            if isinstance(scored, Exception):
                raise scored
            n = len(pairs)
            for j, (_, answer) in enumerate(pairs):
                fit = yield score(
                    f"answer[{j}]", model, few_shot[j] + recipes[j], tail.format(answer=answer)
                )
                few, zero = scored[j], scored[n + j]
                yield factor(f"few_shot[{j}]", few + fit - zero if zero > -math.inf else -math.inf)
        return tuple(recipes)

    return reprompting()


@dataclass(frozen=True)
class Recipes:
    """What :func:`reprompting_recipes` found: the ``best`` recipes (the visited state of
    highest target density ``log pi``, ``best_log_target``; ties: the earliest), the ``last``
    state of the first chain, the ``demo`` template and ``examples``, and the MCMC
    ``result``."""

    best: tuple[str, ...]
    best_log_target: float
    last: tuple[str, ...]
    examples: tuple[tuple[str, str], ...]
    demo: str
    result: Result

    def prompt(self, question: str, recipes: Sequence[str] | None = None) -> str:
        """A few-shot prompt for ``question``: every example as a demonstration with its
        recipe (``best`` unless ``recipes``, one string per example, are given), then the
        question's head, ready for the model to write a recipe and an answer."""
        if not isinstance(question, str):
            raise OptionError(
                f"Recipes.prompt: question must be a string, got {type(question).__name__}"
            )
        if recipes is None:
            recipes = self.best
        elif (
            isinstance(recipes, str)
            or not isinstance(recipes, Sequence)
            or len(recipes) != len(self.examples)
            or not all(isinstance(z, str) for z in recipes)
        ):
            raise OptionError(
                f"Recipes.prompt: recipes must be {len(self.examples)} strings, one per example "
                f"(in the order of examples), got {recipes!r}"
            )
        shown = "".join(demonstrations(self.demo, self.examples, recipes))
        return shown + split_demo(self.demo)[0].format(question=question)


def reprompting_recipes(
    model: LanguageModel,
    examples: Sequence[tuple[str, str]],
    *,
    num_samples: int = 20,
    burn_in: int = 0,
    chains: int = 1,
    proposal: str = "site",
    seed: int | None = None,
    demo: str = DEMO_TEMPLATE,
    recipe_tokens: int = 48,
    recipe_stop: str | list[str] | None = "\n",
    **mcmc_options: Any,
) -> Recipes:
    """Runs ``lc.infer(reprompting(...), method="mcmc", ...)`` and returns the recipes:
    each step picks one example uniformly and redraws its recipe (``proposal="site"``; or
    regenerates its end, ``"suffix"``), accepted by the Metropolis-Hastings ratio of the
    target — a Metropolis-within-Gibbs sweep over the examples' recipes.  ``num_samples``
    states are kept per chain after ``burn_in`` steps; ``mcmc_options`` are MCMC's others
    (``thin``, ``init_tries``, ``draft``...).

    >>> from lmcascade.models import ToyLM
    >>> inf = float("inf")
    >>> def scores(ctx):   # after "=" the toy repeats the letter before it
    ...     if ctx[-1] == 2:
    ...         return [3.0 * (ctx[-2] == 0), 3.0 * (ctx[-2] == 1), -inf, -inf, -inf]
    ...     return [1.0, 0.0, 0.0, 0.0, -inf]
    >>> lm = ToyLM(["a", "b", "=", ";", "<eos>"], scores)
    >>> found = reprompting_recipes(lm, [("a", "a"), ("b", "a")], num_samples=30, seed=0,
    ...                             demo="{question}{recipe}={answer};", recipe_tokens=1,
    ...                             recipe_stop=None)
    >>> found.best
    ('a', 'a')
    >>> found.prompt("b")
    'aa=a;ba=a;b'
    """
    from lmcascade.inference import infer

    what = "reprompting_recipes"
    try:
        program = reprompting(
            model, examples, demo=demo, recipe_tokens=recipe_tokens, recipe_stop=recipe_stop
        )
    except OptionError as err:  # named after the function the user called
        raise OptionError(what + str(err).removeprefix("reprompting")) from None
    result = infer(
        program,
        method="mcmc",
        seed=seed,
        num_samples=num_samples,
        burn_in=burn_in,
        chains=chains,
        proposal=proposal,
        **mcmc_options,
    )
    best = max(result.traces, key=lambda t: t.log_joint)  # max keeps the first of ties
    return Recipes(
        best=best.value,
        best_log_target=best.log_joint,
        last=result.chains[0].traces[-1].value,
        examples=tuple(_pairs(examples, what)),
        demo=demo,
        result=result,
    )


__all__ = [
    "DEMO_TEMPLATE",
    "MEMO_SIZE",
    "Recipes",
    "demonstrations",
    "path_log_probs",
    "reprompting",
    "reprompting_recipes",
    "split_demo",
]
