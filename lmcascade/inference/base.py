"""The inference-method registry and the shared frame every method runs in.

A method is a class with a short ``name``, a dict of ``options`` with their defaults, and a
``run(bound, seed)`` that returns a :class:`~lmcascade.result.Result`.  ``lc.infer`` validates
options, seeds every random source, times the run and fills the common stats.

>>> from lmcascade.inference import methods
>>> {"enumerate", "forward", "importance", "rejection", "smc"} <= set(methods())
True
"""

from __future__ import annotations

import contextlib
import difflib
import math
import random
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np
import torch

from lmcascade.engine import ENGINES, Particle, Schedule
from lmcascade.errors import AllWeightsZeroError, Interrupted, OptionError, UnknownMethodError
from lmcascade.inference.progress import Ticking, progress_bar
from lmcascade.memory import available_memory, size
from lmcascade.policy import ON_TOOL_ERROR, TOOL_ERROR_MODES
from lmcascade.program import BoundProgram
from lmcascade.result import Result
from lmcascade.samplers.base import TokenSampler
from lmcascade.samplers.speculative import Speculative
from lmcascade.trace import error_text, safe_repr

_REGISTRY: dict[str, type[InferenceMethod]] = {}


def register(cls: type[InferenceMethod]) -> type[InferenceMethod]:
    """Class decorator: makes ``cls`` available as ``lc.infer(..., method=cls.name)``."""
    _REGISTRY[cls.name] = cls
    return cls


def methods() -> dict[str, type[InferenceMethod]]:
    """The registered methods by name."""
    return dict(_REGISTRY)


COMMON_OPTIONS: dict[str, Any] = {"progress": True, "on_tool_error": "zero"}
"""Options every method takes, with their defaults: ``progress`` (a progress bar, shown in a
terminal once a run has taken about two seconds) and ``on_tool_error`` (``"zero"``: a tool call
that raises gives its trace weight zero and the run goes on; ``"raise"``: the error stops the
run)."""

DRAFT_OPTIONS: dict[str, Any] = {
    "draft": None,
    "lookahead": 4,
    "adaptive": True,
    "num_drafts": 1,
    "confidence": None,
}
"""Options of the sampling methods whose LM sites may be sampled speculatively (``forward``,
``importance``, ``rejection``, ``smc``, ``mcmc``, ``speculative``), with their defaults:
``draft`` (None: no drafting; a model sharing the site's vocabulary, ``"prompt_lookup"``, or a
list of those from the most to the least expensive: a chain), ``lookahead`` (tokens drafted
per block), ``adaptive`` (grow or shrink the lookahead with the acceptances), ``num_drafts``
(independent drafts per block, verified by recursive rejection) and ``confidence`` (a model
draft ends after a token it gave less than this probability).  A method takes them by merging this dict into its ``options``; its token
sampler then comes from :meth:`InferenceMethod.token_sampler` and its stats get the draft's
counters from :meth:`InferenceMethod.draft_stats`.  Speculative sampling emits exact draws
from each site's own distribution, so the method's contract is unchanged."""


class InferenceMethod:
    """Base class: option checking and the common frame; subclasses implement :meth:`run`.

    ``options`` are the method's own; every method also takes :data:`COMMON_OPTIONS`.

    >>> from lmcascade.inference import methods
    >>> methods()["forward"](num_samples=5).config["progress"]
    True
    """

    name: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}

    aliases: ClassVar[dict[str, str]] = {}  # another name users know -> the option's name

    def __init__(self, **options: Any) -> None:
        for alias, name in self.aliases.items():
            if alias in options:
                if name in options and options[name] != options[alias]:
                    raise OptionError(
                        f"method {self.name!r}: {alias} and {name} name the same option; give one"
                    )
                options[name] = options.pop(alias)
        defaults = {**COMMON_OPTIONS, **self.options}
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise OptionError(
                f"method {self.name!r} has no option {unknown[0]!r}; its options are "
                f"{', '.join(sorted(defaults))}"
            )
        self.config = {**defaults, **options}
        self.check_common()
        self.check_options()

    def check_common(self) -> None:
        """Validates the options every method takes (:data:`COMMON_OPTIONS`)."""
        if not isinstance(self.config["progress"], bool):
            raise OptionError(
                f"method {self.name!r}: option progress must be True or False, got "
                f"{safe_repr(self.config['progress'], 100)}"
            )
        if self.config["on_tool_error"] not in TOOL_ERROR_MODES:
            raise OptionError(
                f"method {self.name!r}: option on_tool_error must be 'zero' (a tool call that "
                "raises gives its trace weight zero and the run goes on) or 'raise' (the error "
                f"stops the run), got {safe_repr(self.config['on_tool_error'], 100)}"
            )
        if self.drafts():
            self.check_draft()

    @classmethod
    def drafts(cls) -> bool:
        """Whether the method takes :data:`DRAFT_OPTIONS` (its LM sites may be drafted).

        >>> from lmcascade.inference import methods
        >>> sorted(name for name, cls in methods().items() if cls.drafts())
        ['forward', 'importance', 'mcmc', 'rejection', 'smc', 'speculative']
        """
        return set(DRAFT_OPTIONS) <= set(cls.options)

    def check_draft(self) -> None:
        """Validates the draft options (:data:`DRAFT_OPTIONS`): the draft's errors (not a model
        nor ``"prompt_lookup"``, a lookahead out of range...) name the method; without a draft,
        the others must keep their defaults (they would do nothing)."""
        cfg = self.config
        if cfg["draft"] is None:
            changed = [k for k in DRAFT_OPTIONS if k != "draft" and cfg[k] != DRAFT_OPTIONS[k]]
            if changed:
                raise OptionError(
                    f"method {self.name!r}: option {changed[0]} only applies with draft= (a "
                    "smaller model sharing the target's vocabulary, or 'prompt_lookup')"
                )
            return
        try:
            self._speculative(None)
        except OptionError as err:
            raise OptionError(f"method {self.name!r}: {err}") from None

    def token_sampler(
        self, default: TokenSampler | None = None, seed: int | None = None
    ) -> TokenSampler | None:
        """The token sampler of this run: ``default`` itself without a draft (None stands for
        the engine's ancestral sampler); with one, a
        :class:`~lmcascade.samplers.speculative.Speculative` sampler drafting with it and
        leaving the runs it cannot serve (constrained sites, LM potentials) to ``default``.
        Its draft draws are seeded from ``seed``.

        >>> from lmcascade.inference import methods
        >>> from lmcascade.samplers import Ancestral
        >>> exact = Ancestral(exact_masks=True)
        >>> methods()["mcmc"]().token_sampler(exact) is exact
        True
        >>> spec = methods()["mcmc"](draft="prompt_lookup").token_sampler(exact, seed=0)
        >>> type(spec).__name__, spec.full_masks, spec.seed
        ('Speculative', True, 0)
        """
        cfg = self.config
        if cfg.get("draft") is None:
            return default
        sampler = self._speculative(default)  # computing its fallback's masks (MCMC's exact)
        sampler.seed = seed
        return sampler

    def _speculative(self, fallback: TokenSampler | None) -> Speculative:
        cfg = self.config
        return Speculative(
            cfg["draft"],
            cfg["lookahead"],
            cfg["adaptive"],
            fallback=fallback,
            num_drafts=cfg["num_drafts"],
            confidence=cfg["confidence"],
        )

    @staticmethod
    def draft_stats(result: Result, sampler: TokenSampler | None) -> Result:
        """``result`` with the counters of a speculative ``sampler`` added to its stats
        (nothing for another sampler): ``verify_calls``, ``draft_calls``, ``drafted_tokens``,
        ``accepted_tokens``, ``acceptance_rate``, ``block_efficiency``,
        ``predicted_block_efficiency``, ``mean_lookahead``, and ``tokens_per_target_call``.
        The draft's acceptance rate is also ``draft_acceptance_rate``; a counter whose name
        the method already uses for its own stat (rejection's and MCMC's
        ``acceptance_rate``) is kept under ``draft_`` + its name.

        >>> r = Result([], [], stats={"acceptance_rate": 0.5, "model_calls": 2,
        ...                           "tokens_generated": 6})
        >>> r = InferenceMethod.draft_stats(r, Speculative("prompt_lookup"))
        >>> r.stats["acceptance_rate"], r.stats["verify_calls"], r.stats["tokens_per_target_call"]
        (0.5, 0, 3.0)
        """
        if not isinstance(sampler, Speculative):
            return result
        stats = result.stats
        for key, value in sampler.counters.as_dict().items():
            if key == "acceptance_rate":
                stats["draft_acceptance_rate"] = value
            stats["draft_" + key if key in stats else key] = value
        calls = stats.get("model_calls", 0)
        if calls:
            stats["tokens_per_target_call"] = stats.get("tokens_generated", 0) / calls
        return result

    def check_options(self) -> None:
        """Validates ``self.config``; raise :class:`OptionError` naming the option."""

    def positive_int(self, key: str) -> int:
        value = self.config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise OptionError(
                f"method {self.name!r}: option {key} must be a positive integer, got {value!r}"
            )
        return value

    def population(self, key: str) -> int:
        """A positive whole number of particles or samples that fits in memory: each holds
        about :data:`PARTICLE_BYTES` of host memory before any model cache, so a size whose
        particles alone would not fit is an error before the run starts."""
        n = self.positive_int(key)
        self.check_fits(
            n,
            lambda need: (
                f"{key}={n:,} needs about {need} for the particles alone (about "
                f"{PARTICLE_BYTES / 1000:.0f} KB each, plus the model's cache per token)"
            ),
            "use fewer",
        )
        return n

    def check_fits(self, particles: int, what: Callable[[str], str], advice: str) -> None:
        """An :class:`OptionError` (``what(size needed)``, then ``advice``) when
        ``particles`` particles would not fit in the memory available."""
        need, have = particles * PARTICLE_BYTES, available_memory()
        if have is not None and need > have:
            raise OptionError(
                f"method {self.name!r}: {what(size(need))}, but {size(have)} is available; {advice}"
            )

    @contextlib.contextmanager
    def ticking(
        self, inner: Schedule | None = None, status: Callable[[list], str] | None = None
    ) -> Iterator[Ticking]:
        """A schedule that runs ``inner`` and ticks this run's progress bar once per decoding
        step (``status`` of the population as its postfix); the bar closes with the block."""
        bar = progress_bar(self.name, self.config["progress"])
        try:
            yield Ticking(bar, inner, status)
        finally:
            bar.close()

    def run(self, bound: BoundProgram, seed: int) -> Result:
        raise NotImplementedError


PARTICLE_BYTES = 3_000
"""Host memory of one particle of a short LM program (trace, run state, bookkeeping), as
measured with tracemalloc on SMC populations of 2,000 and 8,000."""


@contextlib.contextmanager
def tool_errors(mode: str) -> Iterator[None]:
    """Sets :data:`lmcascade.policy.ON_TOOL_ERROR` to ``mode`` for a block (then restores it,
    also when the block raises).

    >>> with tool_errors("raise"):
    ...     ON_TOOL_ERROR.get()
    'raise'
    >>> ON_TOOL_ERROR.get()
    'zero'
    """
    token = ON_TOOL_ERROR.set(mode)
    try:
        yield
    finally:
        ON_TOOL_ERROR.reset(token)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seeds torch's global CPU generator (pyro draws), ``random`` and numpy for a block, and
    restores their previous states afterwards."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: no lazy CUDA seeding per run
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def method_class(method: Any) -> type[InferenceMethod]:
    """The registered method named ``method`` (any case), or an :class:`UnknownMethodError`
    with a did-you-mean.

    >>> method_class("SMC").name
    'smc'
    """
    if isinstance(method, str) and method not in _REGISTRY and method.lower() in _REGISTRY:
        method = method.lower()  # "SMC", "Forward"
    cls = _REGISTRY.get(method) if isinstance(method, str) else None
    if cls is None:
        close = difflib.get_close_matches(str(method).lower(), list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownMethodError(
            f"unknown inference method {safe_repr(method, 100)}{hint}; available: "
            f"{', '.join(sorted(_REGISTRY))}"
        )
    return cls


def infer(
    bound: BoundProgram, method: str = "forward", seed: int | None = None, **options: Any
) -> Result:
    """Runs inference on a bound program and returns a :class:`~lmcascade.result.Result`.

    ``method`` is a registered name (see :func:`methods`); ``seed`` makes the run reproducible
    (without one a seed is drawn and recorded in ``result.stats["seed"]``).  Besides its own
    options every method takes :data:`COMMON_OPTIONS`: ``progress`` and ``on_tool_error``
    (set in :data:`lmcascade.policy.ON_TOOL_ERROR` for the run).

    >>> import lmcascade as lc
    >>> from pyro.distributions import Bernoulli
    >>> @lc.program
    ... def flip():
    ...     x = yield lc.sample("x", Bernoulli(0.25))
    ...     return int(x)
    >>> dist = lc.infer(flip(), method="enumerate").distribution()
    >>> {k: round(p, 6) for k, p in dist.items()}
    {0: 0.75, 1: 0.25}
    """
    if not isinstance(bound, BoundProgram):
        from lmcascade.errors import ProgramError

        hint = (
            " Call the program with its arguments first: infer(prog(...))."
            if callable(bound)
            else ""
        )
        raise ProgramError(f"infer needs a bound program, got {type(bound).__name__}.{hint}")
    cls = method_class(method)
    method = cls.name
    instance = cls(**options)
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise OptionError(f"seed must be a whole number from 0 to 2**63 - 1, got {seed!r}")
    start = time.perf_counter()
    engines: list = []
    token = ENGINES.set(engines)
    try:
        with seeded(seed), tool_errors(instance.config["on_tool_error"]), torch.inference_mode():
            result = instance.run(bound, seed)
    except KeyboardInterrupt:
        raise Interrupted(method, progress(engines, time.perf_counter() - start)) from None
    finally:
        ENGINES.reset(token)
    result.stats["wall_time_s"] = time.perf_counter() - start
    result.stats["seed"] = seed
    result.method = method
    result.options = instance.config
    return result


def progress(engines: list, seconds: float) -> dict:
    """What the engines of an interrupted run had done: summed counters, and seconds."""
    out: dict[str, float] = {}
    for engine in engines:
        for key, value in engine.stats.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[key] = out.get(key, 0) + value
    out["seconds"] = round(seconds, 2)
    return out


def zero_weight_error(particles: list[Particle], what: str) -> AllWeightsZeroError:
    """An error naming the sites that set every weight to zero, most frequent first; when a
    tool call that failed is among them, what it raised."""
    killers: dict[str, int] = {}
    failed: dict[str, BaseException] = {}
    kinds: dict[str, Any] = {}
    for p in particles:
        for site in p.trace.sites:
            if site.log_weight == -math.inf:
                killers[site.name] = killers.get(site.name, 0) + 1
                kinds.setdefault(site.name, site)
                if site.error is not None:
                    failed.setdefault(site.name, site.error)
                break
    named = ", ".join(f"{n!r} ({c}x)" for n, c in sorted(killers.items(), key=lambda kv: -kv[1]))
    shown = "; ".join(_what_it_held(p.trace) for p in particles[:3])
    if failed:
        name, err = next(iter(failed.items()))
        why = (
            f"tool call {name!r} failed in {killers[name]} of them, e.g. {error_text(err)}; make "
            "the tool accept such input (or check it first with lc.condition), or pass "
            "on_tool_error='raise' to see the traceback"
        )
    else:
        top = max(killers, key=killers.__getitem__) if killers else None
        why = _why_zero(kinds[top]) if top else "check the program"
    return AllWeightsZeroError(
        f"{what}: every trace has weight zero (zeroed at site {named or 'unknown'}); {why}. "
        f"The first traces held: {shown or 'nothing'} (all of them: err.traces)",
        tuple(p.trace for p in particles),
    )


def _why_zero(site: Any) -> str:
    """What a site that gave weight zero most often means, and what to do about it."""
    dist = getattr(site, "dist", None)
    if site.kind == "sample" and getattr(dist, "constraint", None) is not None:
        return (
            f"its constraint {dist.constraint!r} could not be met (within max_tokens="
            f"{dist.max_tokens}, or at all by this model) — loosen it or raise max_tokens"
        )
    if site.kind == "sample" and getattr(dist, "is_lm", False):
        return "the model could not generate a text it allows (min_tokens, stop, max_tokens?)"
    if site.kind == "observe":
        return "the observed value has probability zero under its distribution"
    if site.kind == "factor":
        return "a factor gave -inf (weight zero) every time"
    return "the condition is never satisfied — relax it, raise the budget, or check the program"


def _what_it_held(trace: Any) -> str:
    """The values a rejected trace drew, short: ``x='Paris.', n=3``."""
    values = trace.values()
    text = ", ".join(f"{k}={safe_repr(v, 60)}" for k, v in list(values.items())[:4])
    return "{" + text + (", ..." if len(values) > 4 else "") + "}"
