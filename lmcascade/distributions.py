"""Distributions usable at sample and observe sites.

:class:`LM` is the distribution over strings a language model defines given a prompt and
decoding parameters.  Scalar choices use any ``pyro.distributions`` distribution; the common
ones are re-exported here for convenience.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, 0.0])
>>> d = lc.LM(lm, "", max_tokens=1)
>>> d.sample(seed=0) in {"", "a", "b"}
True
>>> round(d.log_prob("a"), 4)  # one token "a", then the length limit ends it
-1.0986
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import torch
from pyro.distributions import (
    Bernoulli,
    Beta,
    Binomial,
    Categorical,
    Delta,
    Dirichlet,
    Geometric,
    Normal,
    Poisson,
    Uniform,
)

from lmcascade.errors import SiteError
from lmcascade.lm.run import LMRun
from lmcascade.lm.step import run_to_end
from lmcascade.lm.text_score import text_log_prob
from lmcascade.models.base import LanguageModel


class LM:
    """The distribution over texts a language model generates from ``prompt``.

    Tokens are drawn from the model's next-token distribution after ``temperature`` (0 means
    greedy), then ``top_k``, then ``top_p``; eos cannot be drawn before ``min_tokens`` tokens.  Generation ends when eos is drawn (not part of the
    text), when the decoded text contains a ``stop`` string (the text is cut before its first
    occurrence), or after ``max_tokens`` tokens (eos counts as a token).

    ``constraint`` (see :mod:`lmcascade.constraints`) is a hard condition on the text, enforced
    token by token with mass-corrected weights; ``potential`` is a function of the partial text
    used as an SMC twist (it steers, and leaves the target unchanged) — or another ``LM``
    sharing the tokenizer, whose probability of the prefix is the twist (product of experts,
    steered token by token).

    ``alpha`` makes the site a *power target*: its density is ``p(tokens) ** alpha`` (``p``
    after temperature, top-k and top-p; unnormalised — the program's evidence includes the
    normaliser), which sharpens the distribution over whole texts (``alpha > 1``), unlike a
    per-token temperature.  Every method targets it: tokens are proposed from
    ``p ** (1 / proposal_temperature)`` renormalised token by token (by default
    ``proposal_temperature = 1 / alpha``: the model at temperature ``1 / alpha``) and weighted
    by the difference; ``method="mcmc"`` with suffix proposals is the sampler built for it.

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["hi", "<eos>"], lambda ctx: [0.0, 0.0])
    >>> lc.LM(lm, "", max_tokens=3, stop="hihi").sample(seed=0) in {"", "hi"}
    True
    """

    is_lm = True

    def __init__(
        self,
        model: LanguageModel,
        prompt: str,
        *,
        max_tokens: int = 64,
        min_tokens: int = 0,
        stop: str | Sequence[str] | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        constraint: Any = None,
        potential: Callable[[str], float] | None = None,
        alpha: float = 1.0,
        proposal_temperature: float | None = None,
    ) -> None:
        if not isinstance(model, LanguageModel):
            raise SiteError(
                f"LM needs a LanguageModel (ToyLM, TransformersLM...), got {type(model).__name__}"
            )
        if not isinstance(prompt, str):
            raise SiteError(f"LM prompt must be a string, got {type(prompt).__name__}")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise SiteError(f"LM max_tokens must be a positive integer, got {max_tokens!r}")
        if not isinstance(min_tokens, int) or not 0 <= min_tokens <= max_tokens:
            raise SiteError(
                f"LM min_tokens must be an integer in [0, max_tokens], got {min_tokens!r}"
            )
        if stop is None:
            stops: tuple[str, ...] = ()
        elif isinstance(stop, str):
            stops = (stop,)
        else:
            stops = tuple(stop)
        stops = tuple(dict.fromkeys(stops))  # each stop string once (they are alternatives)
        if any(not isinstance(s, str) or s == "" for s in stops):
            raise SiteError(f"LM stop must be a non-empty string or a list of them, got {stop!r}")
        if not (
            isinstance(temperature, int | float)
            and not isinstance(temperature, bool)
            and 0 <= temperature < math.inf
        ):
            raise SiteError(
                f"LM temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}"
            )
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise SiteError(f"LM top_k must be None or an integer >= 1, got {top_k!r}")
        if not (isinstance(top_p, int | float) and 0 < top_p <= 1):
            raise SiteError(f"LM top_p must be in (0, 1], got {top_p!r}")
        if constraint is not None and not hasattr(constraint, "mask"):
            raise SiteError(
                f"LM constraint must be an lmcascade constraint (lc.constraints.forbid, allow, "
                f"max_word_length...), got {type(constraint).__name__}"
            )
        if getattr(potential, "is_lm", False):
            if potential.model.vocab_size != model.vocab_size or (
                potential.model.eos_id != model.eos_id
            ):
                raise SiteError(
                    "an LM used as a potential must share the site's tokenizer (same vocabulary)"
                )
            if (
                potential.temperature != 1.0
                or potential.top_k is not None
                or potential.top_p != 1.0
                or potential.min_tokens
                or potential.constraint is not None
            ):
                raise SiteError(
                    "an LM used as a potential must give every token a probability (temperature "
                    "1, no top_k, top_p 1, min_tokens 0, no constraint): a potential steers and "
                    "cannot forbid a token — forbid it on the site itself instead"
                )
            if potential.alpha != 1.0 or potential.proposal_temperature is not None:
                raise SiteError("an LM used as a potential must have alpha 1 (no power target)")
        elif potential is not None and not callable(potential):
            raise SiteError("LM potential must be a function of the partial text, or an lc.LM")
        if not _in_power_range(alpha):
            raise SiteError(
                f"LM alpha must be a number from {POWER_RANGE[0]} to {POWER_RANGE[1]} (the "
                f"power of the target p(text) ** alpha; 1 is the model itself; beyond "
                f"{POWER_RANGE[1]} use temperature=0), got {alpha!r}"
            )
        if proposal_temperature is not None and not _in_power_range(proposal_temperature):
            raise SiteError(
                "LM proposal_temperature must be None (1 / alpha) or a number from "
                f"{POWER_RANGE[0]} to {POWER_RANGE[1]}, got {proposal_temperature!r}"
            )
        self.alpha = float(alpha)
        self.proposal_temperature = (
            None if proposal_temperature is None else float(proposal_temperature)
        )
        self.constraint = constraint
        self.potential = potential
        self.model = model
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens
        self.stop = stops
        self.temperature = float(temperature)
        self.top_k = None if top_k is None else min(top_k, 2**31 - 1)  # beyond the vocabulary
        self.top_p = float(top_p)

    @property
    def proposal_scale(self) -> float:
        """What the proposal multiplies the site's per-token target log-density by before
        renormalising: ``1 / (alpha * proposal_temperature)`` (1 unless the site has a power
        target or its own proposal temperature)."""
        if self.proposal_temperature is None:
            return 1.0
        return 1.0 / (self.alpha * self.proposal_temperature)

    @property
    def separate_proposal(self) -> bool:
        """Whether tokens are proposed from something other than the target's own
        next-token distribution (a power target, or a proposal temperature)."""
        return self.alpha != 1.0 or self.proposal_temperature is not None

    @cached_property
    def prompt_ids(self) -> list[int]:
        """The prompt's token ids (raises TokenizationError when it cannot be tokenised)."""
        return self.model.encode_prompt(self.prompt)

    @cached_property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)

    def params(self) -> dict:
        """The decoding parameters, as a plain dict (for traces and JSON)."""
        return {
            "model": self.model.name,
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "min_tokens": self.min_tokens,
            "stop": list(self.stop),
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "alpha": self.alpha,
            "proposal_temperature": self.proposal_temperature,
            "constraint": repr(self.constraint) if self.constraint is not None else None,
            "potential": None
            if self.potential is None
            else repr(self.potential)
            if getattr(self.potential, "is_lm", False)
            else getattr(self.potential, "__name__", "potential"),
        }

    def sample(self, seed: int | None = None) -> str:
        """One text drawn from the distribution."""
        gen = torch.Generator(device=self.model.device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        self.model.check_fits(len(self.prompt_ids), self.max_tokens)
        run = LMRun(self)
        run_to_end([run], {self.model.device: gen})
        return run.value  # type: ignore[return-value]

    def log_prob(self, text: str) -> float:
        """Log-probability of generating exactly ``text``: every way a generation can end
        with it (eos, the length limit, each token path that ends on a stop string), scored
        by teacher forcing in batched passes (:mod:`lmcascade.lm.text_score`)."""
        if not isinstance(text, str):
            raise SiteError(f"LM.log_prob needs a string, got {type(text).__name__}")
        ids = self.model.encode(text)
        self.model.check_fits(len(self.prompt_ids), min(len(ids) + 1, self.max_tokens))
        return text_log_prob(self, text)

    def __repr__(self) -> str:
        extra = "".join(
            f", {k}={v!r}"
            for k, v in self.params().items()
            if k not in ("model", "prompt") and v not in (None, [], 1.0, 0)
        )
        return f"LM({self.model.name!r}, {self.prompt!r}{extra})"


POWER_RANGE = (0.001, 1000.0)
"""The values ``alpha`` and ``proposal_temperature`` may take: beyond them ``alpha * log p``
leaves the range where float32 log-probabilities keep their meaning."""


def _in_power_range(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return POWER_RANGE[0] <= float(value) <= POWER_RANGE[1]
    except OverflowError:
        return False


def is_lm(dist: object) -> bool:
    """True for LM string distributions."""
    return getattr(dist, "is_lm", False) is True


__all__ = [
    "LM",
    "Bernoulli",
    "Beta",
    "Binomial",
    "Categorical",
    "Delta",
    "Dirichlet",
    "Geometric",
    "Normal",
    "Poisson",
    "Uniform",
    "is_lm",
]


def _as_python(value: torch.Tensor):
    """0-d tensors become Python numbers (ints stay ints); others stay tensors."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    return value


def score(dist, value) -> float:
    """``dist.log_prob(value)`` of a pyro distribution as a float, summed over event dims.

    Plain Python values are converted to the dtype the distribution expects.
    """
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if not isinstance(value, torch.Tensor) and tensor.is_floating_point():
        tensor = tensor.double()  # Python floats are doubles; keep their precision
    try:
        lp = dist.log_prob(tensor)
    except (RuntimeError, ValueError, TypeError):
        lp = dist.log_prob(tensor.double())
    return float(lp.sum())


def draw_value(dist):
    """A value from a pyro distribution (0-d tensors as Python numbers) and its log-prob."""
    value = dist.sample()
    return _as_python(value), float(dist.log_prob(value).sum())


def support(dist) -> list:
    """The finite support of an enumerable pyro distribution, as Python values."""
    values = dist.enumerate_support(expand=False).reshape(-1, *dist.event_shape)
    return [_as_python(v) for v in values]
