"""Reprompting: chain-of-thought recipes for a few-shot prompt, found by Gibbs-style MCMC.

Reprompting (Xu et al., 2023) looks for chain-of-thought *recipes* ``z_j``, one per training
example ``(x_j, y_j)``, that work as few-shot demonstrations for each other.  It starts from
the model's zero-shot recipes and then, one example at a time, redraws ``z_j`` from the model
shown the *other* examples ``(x_i, z_i, y_i)`` as demonstrations, keeping recipes that lead to
the right answer: Gibbs sampling over the recipes.

:func:`reprompting` writes the joint as a program with one LM site per example
(``reprompt[0]/recipe[j]``).  Its target is

    ``pi(z_1..z_n)  ∝  prod_j P(z_j + answer line y_j | demonstrations D_-j(z), question x_j)``

where ``D_-j(z)`` is the other examples' demonstrations (``demo`` filled with their question,
recipe and answer, in order) and the probability is the model's, of writing example ``j``'s
recipe and then its known answer line after them: a product over examples of the few-shot
probability of a correct worked example.  Under ``pi`` the conditional of one recipe given the
others is

    ``pi(z_j | z_-j)  ∝  P(z_j, y_j | D_-j, x_j) · prod_{k != j} P(z_k, y_k | D_-k, x_k)``:

Reprompting's own step — the few-shot model's recipe for ``x_j``, kept in proportion to the
probability that it reaches ``y_j`` — times how well ``z_j``, used as a demonstration, makes
the model reproduce the other examples (the paper's step leaves that factor out, so its
chain has no stated stationary law; this one does).  Recipes range over what the zero-shot
model can write (``recipe_tokens``, ``recipe_stop``): each recipe site draws from the
zero-shot model, and a factor divides that density out again, so the zero-shot model is
only the proposal.  :func:`reprompting_recipes` runs ``method="mcmc"`` on it — a site move
redraws one example's recipe and accepts by the ratio of ``pi`` — and returns the best and
the last recipes.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "b", "=", ";", "<eos>"], lambda ctx: [0.0, 0.0, -2.0, -2.0, 0.0])
>>> prog = reprompting(lm, [("a", "a"), ("b", "b")], demo="{question}{recipe}={answer};",
...                    recipe_tokens=1, recipe_stop=None)
>>> lc.infer(prog, method="forward", num_samples=1, seed=0).traces[0].names[:3]
['reprompt[0]/recipe[0]', 'reprompt[0]/recipe[1]', 'reprompt[0]/fit[0]']
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
from lmcascade.models.base import LanguageModel
from lmcascade.patterns.star import question_answer_pairs
from lmcascade.program import BoundProgram, factor, gen, scope, score
from lmcascade.program import program as _program
from lmcascade.result import Result

DEMO_TEMPLATE = "Question: {question}\nReasoning: {recipe}\nAnswer: {answer}\n\n"
"""The default demonstration: ``{question}``, then ``{recipe}``, then ``{answer}``."""

_FIELDS = ("question", "recipe", "answer")


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def split_demo(demo: Any) -> tuple[str, str]:
    """A demonstration template cut at ``{recipe}``: the head (with ``{question}``) and the
    tail (with ``{answer}``).  Each field must appear once, in the order question, recipe,
    answer.

    >>> split_demo("Q: {question}\\nA: {recipe} So {answer}.\\n")
    ('Q: {question}\\nA: ', ' So {answer}.\\n')
    """
    if not isinstance(demo, str):
        raise OptionError(
            f"reprompting: demo must be a format string with {{question}}, {{recipe}} and "
            f"{{answer}} in that order, got {type(demo).__name__}"
        )
    try:
        parts = list(string.Formatter().parse(demo))
    except ValueError as err:
        raise OptionError(
            f"reprompting: demo: {err} in {demo!r}; write literal braces as '{{{{' and '}}}}'"
        ) from None
    named = [f for _, f, _, _ in parts if f is not None]
    if named != list(_FIELDS):
        raise OptionError(
            f"reprompting: demo must use {{question}}, {{recipe}} and {{answer}} once each, in "
            f"that order (and no other field), got fields {named} in {demo!r}"
        )
    head, tail, seen = "", "", False
    for literal, field, spec, conversion in parts:
        if spec or conversion:
            raise OptionError(f"reprompting: demo: write {{{field}}} plain, without a format spec")
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


def _pairs(examples: Any) -> list[tuple[str, str]]:
    out = question_answer_pairs(examples, "reprompting")
    if len(out) < 2:
        raise OptionError(
            f"reprompting: needs at least 2 examples (each one's demonstrations are the others), "
            f"got {len(out)}"
        )
    return out


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
    by ``recipe_stop`` or end of text).  Then for every ``j``, ``fit[j]`` scores
    ``recipe_j + tail`` (the rest of ``demo``, with ``{answer}`` filled) after the other
    examples' demonstrations and example ``j``'s head, and the factor ``few_shot[j]`` adds
    that score minus the recipe's zero-shot log-probability.  The trace's log-joint is so
    the sum of the ``fit`` scores: ``log pi(z)`` up to the constant ``log Z``.

    The recipes are drawn at temperature 1 with nothing cut (so their zero-shot density is
    what the model gives their tokens); the model reads the prompts as they are, with no chat
    format — few-shot demonstrations are a completion prompt.

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
    >>> next(iter(post)), round(post["a", "a"], 4)   # recipe "a" leads "b" to the answer "a"
    (('a', 'a'), 0.6814)
    """
    if not isinstance(model, LanguageModel):
        raise OptionError(
            f"reprompting: model must be a LanguageModel (ToyLM, lc.models.load()...), got "
            f"{type(model).__name__}"
        )
    pairs = _pairs(examples)
    head, tail = split_demo(demo)
    try:
        LM(model, "", max_tokens=recipe_tokens, stop=recipe_stop)
    except SiteError as err:
        raise OptionError(f"reprompting (recipe_tokens / recipe_stop): {err}") from None
    if not isinstance(name, str) or not name or "/" in name or name == "[]":
        raise OptionError(
            f"reprompting: name must be a scope name without '/' (like 'reprompt[]'), got {name!r}"
        )

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
            shown = demonstrations(demo, pairs, recipes)
            for j, (question, answer) in enumerate(pairs):
                if drawn[j].token_ids == () and recipes[j]:
                    raise SiteError(
                        f"reprompting: recipe[{j}] has no token record (it was scored as a text); "
                        "run this program with a method that draws its recipes from the model"
                    )
                others = "".join(shown[i] for i in range(len(pairs)) if i != j)
                fit = yield score(
                    f"fit[{j}]",
                    model,
                    others + head.format(question=question),
                    recipes[j] + tail.format(answer=answer),
                )
                zero_shot = math.fsum(drawn[j].token_log_probs)
                yield factor(f"few_shot[{j}]", fit - zero_shot)
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
        recipe (``best`` unless ``recipes`` are given), then the question's head, ready for
        the model to write a recipe and an answer."""
        recipes = self.best if recipes is None else tuple(recipes)
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

    program = reprompting(
        model, examples, demo=demo, recipe_tokens=recipe_tokens, recipe_stop=recipe_stop
    )
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
        examples=tuple(_pairs(examples)),
        demo=demo,
        result=result,
    )


__all__ = [
    "DEMO_TEMPLATE",
    "Recipes",
    "demonstrations",
    "reprompting",
    "reprompting_recipes",
    "split_demo",
]
