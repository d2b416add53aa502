"""Power sampling: a program's LM sites sharpened to ``p ** alpha`` and sampled by MCMC.

*Reasoning with Sampling* (Karan and Du, 2025) samples ``p(text) ** alpha`` — the model's
distribution over *whole* texts, sharpened — with Metropolis-Hastings whose moves regenerate a
suffix.  In lmcascade that target is a site option (``lc.gen(..., alpha=a)``, see
``docs/mcmc.md``) and the sampler is ``method="mcmc", proposal="suffix"``.  This module makes
it one line over any program, without editing it:

- :func:`powered` gives a program whose LM sites (all of them, or those ``site`` names) have
  their ``alpha`` multiplied by ``alpha``; it runs under any method (``enumerate`` gives the
  exact power distribution) and inside other programs;
- :func:`power_sample` runs it with MCMC suffix moves and returns the result.

Powering every LM site of a program targets the power of the joint, ``p(thought, answer) **
alpha``.  Powering one site weighs it by ``p(answer | thought) ** alpha`` unnormalised, so
thoughts whose answers are more certain gain weight too (the sum of ``p ** alpha`` over answers
is larger where the answer distribution is sharper).

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> from lmcascade.patterns.power import power_sample, powered
>>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.4, 0.0, -1.0])
>>> @lc.program
... def text():
...     return (yield lc.gen("t", lm, "a", max_tokens=2))
>>> plain = lc.infer(text(), method="enumerate").distribution()
>>> sharp = lc.infer(powered(text(), alpha=4.0), method="enumerate").distribution()
>>> round(plain["aa"], 3), round(sharp["aa"], 3)
(0.272, 0.667)
>>> r = power_sample(text(), alpha=4.0, num_samples=50, burn_in=20, chains=2, seed=0)
>>> r.method, len(r.values)
('mcmc', 100)
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from lmcascade.distributions import POWER_RANGE, is_lm
from lmcascade.errors import OptionError, SiteError
from lmcascade.program import BoundProgram, Program, Sample
from lmcascade.program import program as _program
from lmcascade.result import Result

SiteSpec = str | Iterable[str] | Callable[[str], bool] | None


def _matcher(site: SiteSpec) -> Callable[[str], bool]:
    """Which site names a ``site`` argument selects: every one (``None``), a name or names
    (a name matches itself and any scoped name ending in ``/name``), or a predicate."""
    if site is None:
        return lambda name: True
    if isinstance(site, str):
        names: tuple[str, ...] = (site,)
    elif callable(site):
        return lambda name: bool(site(name))
    elif isinstance(site, Iterable):
        names = tuple(site)
        if not names or not all(isinstance(s, str) and s for s in names):
            raise OptionError(
                f"site must be a site name, a list of names, a predicate on names, or None "
                f"(every LM site), got {site!r}"
            )
    else:
        raise OptionError(
            f"site must be a site name, a list of names, a predicate on names, or None (every "
            f"LM site), got {type(site).__name__}"
        )
    if any(not s for s in names):
        raise OptionError("site names must be non-empty strings")
    return lambda name: any(name == s or name.endswith("/" + s) for s in names)


def _check_alpha(alpha: Any) -> float:
    lo, hi = POWER_RANGE
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not lo <= alpha <= hi:
        raise OptionError(
            f"alpha must be a number from {lo} to {hi} (the power of the target p ** alpha; 1 is "
            f"the model itself, larger is sharper), got {alpha!r}"
        )
    return float(alpha)


def _powered_dist(dist: Any, alpha: float, name: str) -> Any:
    power = dist.alpha * alpha
    lo, hi = POWER_RANGE
    if not lo <= power <= hi:
        raise SiteError(
            f"site {name!r}: its alpha {dist.alpha} times {alpha} is {power}, outside "
            f"{lo}..{hi}; use a smaller alpha"
        )
    out = copy.copy(dist)  # every other setting (and the cached prompt ids) kept
    out.alpha = power
    return out


def powered(program: BoundProgram, alpha: float = 4.0, site: SiteSpec = None) -> BoundProgram:
    """``program`` with the LM sites that ``site`` selects targeting ``p ** alpha`` (their
    own ``alpha`` multiplied by ``alpha``); every other site, and the program's values, are
    unchanged.  ``site``: ``None`` (every LM site), a name (``"answer"`` also matches a scoped
    ``cot[0]/answer``), a list of names, or a predicate on full site names.  Observed LM
    sites are left alone.

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, -1.0, -9.0])
    >>> @lc.program
    ... def one():
    ...     return (yield lc.gen("t", lm, "a", max_tokens=1))
    >>> p = lc.infer(powered(one(), alpha=2.0), method="enumerate").distribution()
    >>> round(p["a"], 4)  # 1 / (1 + e ** -2)
    0.8808
    """
    if isinstance(program, Program):
        raise OptionError(
            f"program must be a bound program: call {program.name!r} with its arguments "
            f"first ({program.name}(...))"
        )
    if not isinstance(program, BoundProgram):
        raise OptionError(
            f"program must be a bound program (an @lc.program called with its arguments), got "
            f"{type(program).__name__}"
        )
    alpha = _check_alpha(alpha)
    selected = _matcher(site)

    def transform(effect: Any) -> Any:
        if isinstance(effect, Sample) and is_lm(effect.dist) and selected(effect.name):
            return dataclasses.replace(effect, dist=_powered_dist(effect.dist, alpha, effect.name))
        return effect

    @_program
    def powered():
        inner = iter(program)
        try:
            try:
                effect = next(inner)
            except StopIteration as stop:
                return stop.value
            while True:
                value = yield transform(effect)
                try:
                    effect = inner.send(value)
                except StopIteration as stop:
                    return stop.value
        finally:
            inner.close()

    bound = powered()
    bound.program.name = f"powered({program.name})"
    return bound


def power_sample(
    program: BoundProgram,
    alpha: float = 4.0,
    site: SiteSpec = None,
    **options: Any,
) -> Result:
    """Samples ``program`` with its LM sites (or those ``site`` selects) sharpened to
    ``p ** alpha``: ``lc.infer(powered(program, alpha, site), method="mcmc",
    proposal="suffix", **options)``.  ``options`` are MCMC's (``num_samples``, ``burn_in``,
    ``chains``, ``thin``, ``seed``...; ``proposal`` may be overridden).  A ``site`` that no
    trace has is a :class:`~lmcascade.errors.SiteError` listing the LM sites there are.

    >>> import lmcascade as lc
    >>> from lmcascade.models import ToyLM
    >>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, -1.0, -9.0])
    >>> @lc.program
    ... def one():
    ...     return (yield lc.gen("t", lm, "a", max_tokens=1))
    >>> power_sample(one(), alpha=2.0, num_samples=10, burn_in=5, seed=0).best()
    'a'
    """
    from lmcascade.inference import infer

    if "method" in options:
        raise OptionError(
            "power_sample always runs method='mcmc'; for another method use "
            "lc.infer(powered(program, alpha), method=...)"
        )
    bound = powered(program, alpha, site)
    options.setdefault("proposal", "suffix")
    result = infer(bound, method="mcmc", **options)
    if site is not None:
        selected = _matcher(site)
        lm_sites = {
            s.name for t in result.traces for s in t if is_lm(s.dist) and s.kind == "sample"
        }
        if not any(selected(name) for name in lm_sites):
            raise SiteError(
                f"power_sample: site={site!r} matched no LM site of {program.name!r}; its LM "
                f"sites are {sorted(lm_sites)}"
            )
    return result


__all__ = ["power_sample", "powered"]
