"""Metropolis-Hastings over whole program traces, built on replay.

A chain's state is a complete trace ``x`` of non-zero weight; its target is the program's
posterior ``pi(x)`` proportional to ``exp(x.log_joint)`` (every site's ``log p``: choices,
observes, factors, conditions; a power-target LM site counts ``alpha * log p``).  A move
edits the trace, replays the program from the edit (one batched engine run for every chain)
and accepts with the Metropolis-Hastings probability.  Three proposals:

- ``"site"`` — pick one random choice of ``x`` uniformly (a scalar or a whole LM text),
  draw it afresh from its proposal (the prior; an LM site's own token proposal), and replay
  the rest: a later choice keeps its value and is rescored under its new distribution, unless
  that distribution changed shape (another type or support, an LM of another vocabulary), in
  which case it is drawn afresh too.
- ``"suffix"`` — pick one random choice uniformly as above; if it is an LM site, pick a
  token position ``t`` uniformly among its ``n`` tokens (eos included), keep the first ``t``
  tokens and generate the rest from the site's token proposal (for a power target
  ``p ** alpha``, the model at temperature ``1 / alpha`` by default), then replay the rest as
  above; a scalar choice gets a site move.
- ``"independent"`` — a whole new trace from the prior.

**The acceptance ratio** (lightweight MH, Wingate et al. 2011, with the reverse move in full):

    log A = log pi(x') - log pi(x)
            + sum of log q over the sites of x that x' does not keep (the reverse move draws them)
            - sum of log q over the sites x' drew afresh
            + log |C(x)| - log |C(x')|           (choosing the site: C = the eligible sites)
            + log n(x) - log n(x')               (suffix: choosing the position)

where ``log q`` of a site is the density its proposal gives its value *now* (each token's
proposal log-probability under the site's current distribution, for a kept LM site computed by
the rescoring pass).  Suffixes of different lengths and suffixes that end on eos need no special
case: both suffixes are scored in full, token by token.  For an LM site with ``alpha = 1``
and no constraint the proposal is the prior, so a suffix move's ratio is ``n(x) / n(x')``:
every move of a site whose texts all have one length is accepted.

>>> import lmcascade as lc
>>> from pyro.distributions import Bernoulli
>>> @lc.program
... def coins():
...     a = yield lc.sample("a", Bernoulli(0.5))
...     b = yield lc.sample("b", Bernoulli(0.5))
...     yield lc.condition("one_head", a + b >= 1)
...     return int(a + b)
>>> r = lc.infer(coins(), method="mcmc", num_samples=2000, burn_in=100, seed=0)
>>> {k: round(v, 1) for k, v in sorted(r.distribution().items())}   # exact: 2/3, 1/3
{1: 0.7, 2: 0.3}
>>> len(r.values), 0 < r.stats["acceptance_rate"] < 1
(2000, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lmcascade.distributions import is_lm, support
from lmcascade.engine import Engine, Particle
from lmcascade.errors import AllWeightsZeroError, OptionError, ProgramError
from lmcascade.inference.base import (
    DRAFT_OPTIONS,
    InferenceMethod,
    register,
    zero_weight_error,
)
from lmcascade.lm.run import LMRun
from lmcascade.policy import Policy, rescore, same_vocabulary
from lmcascade.program import BoundProgram, Effect
from lmcascade.requests import Pending, lm_site
from lmcascade.result import Result
from lmcascade.samplers import Ancestral
from lmcascade.trace import Site, Trace

PROPOSALS = ("site", "suffix", "independent")


# -- the pieces of a move -------------------------------------------------------------------


def same_shape(old: Any, new: Any) -> bool:
    """Whether a value drawn from ``old`` is kept (and rescored) when its site's distribution
    becomes ``new``: two LMs of one vocabulary, or two scalar distributions of one type,
    shape and support.  The rule depends on the distributions only, never on the value, so
    the move that undoes a move makes the same decision.

    >>> from pyro.distributions import Categorical, Normal, Uniform
    >>> same_shape(Categorical(torch.ones(3)), Categorical(torch.tensor([1., 2, 3])))
    True
    >>> same_shape(Categorical(torch.ones(3)), Categorical(torch.ones(4)))
    False
    >>> same_shape(Uniform(0., 1.), Uniform(0., 2.)), same_shape(Normal(0., 1.), Normal(3., 2.))
    (False, True)
    """
    if is_lm(old) or is_lm(new):
        return is_lm(old) and is_lm(new) and same_vocabulary(old.model, new.model)
    if old is None or new is None or type(old) is not type(new):
        return False
    try:
        if tuple(old.batch_shape) != tuple(new.batch_shape):
            return False
        if tuple(old.event_shape) != tuple(new.event_shape):
            return False
        if getattr(old, "has_enumerate_support", False):
            a, b = support(old), support(new)
            return len(a) == len(b) and all(
                bool(torch.equal(torch.as_tensor(x), torch.as_tensor(y)))
                for x, y in zip(a, b, strict=True)
            )
        return _same_support(old.support, new.support)
    except Exception:  # a distribution we cannot compare: resample rather than guess
        return False


def _same_support(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    for attr in ("lower_bound", "upper_bound", "base_constraint"):
        x, y = getattr(a, attr, None), getattr(b, attr, None)
        if attr == "base_constraint" and x is not None:
            if not _same_support(x, y):
                return False
            continue
        if x is None and y is None:
            continue
        if x is None or y is None or not torch.equal(torch.as_tensor(x), torch.as_tensor(y)):
            return False
    return True


def proposal_log_prob(site: Site) -> float:
    """The log-density a fresh proposal gives ``site``'s value under its current
    distribution: the prior's for a scalar, the sum of the tokens' proposal log-probabilities
    for an LM site."""
    if is_lm(site.dist) and site.token_proposal_log_probs is not None:
        return math.fsum(site.token_proposal_log_probs)
    if is_lm(site.dist):
        return site.proposal_log_prob if site.proposal_log_prob is not None else site.log_prob
    return site.log_prob


def choices(trace: Trace) -> list[Site]:
    """The sites a ``"site"`` move may pick: every random choice (sample site)."""
    return [s for s in trace.sites if s.kind == "sample"]


def lm_choices(trace: Trace) -> list[Site]:
    """The choices a ``"suffix"`` proposal moves by a suffix: LM samples with tokens."""
    return [s for s in trace.sites if s.kind == "sample" and is_lm(s.dist) and s.token_ids]


class MovePolicy(Policy):
    """Resolves the sites of a proposed trace: values of the current state are kept
    (rescored) unless their distribution changed shape; an LM site marked for a suffix move
    keeps its first ``t`` tokens and generates the rest."""

    def __init__(self) -> None:
        self.suffixes: dict[int, int] = {}  # id(the recorded site) -> t

    def replay(self, eff: Effect, name: str, recorded: Site) -> Site | Pending | None:
        if recorded.kind != "sample" or eff.kind != "sample":
            return None
        t = self.suffixes.get(id(recorded))
        if t is not None:
            return continue_from(name, eff.dist, recorded, t)  # type: ignore[attr-defined]
        if not same_shape(recorded.dist, eff.dist):  # type: ignore[attr-defined]
            return None
        return rescore(eff, name, recorded)


def continue_from(name: str, dist: Any, recorded: Site, t: int) -> Pending:
    """A generation for ``dist`` whose first ``t`` tokens are ``recorded``'s (with their
    log-probabilities; the model's cache for them comes from its prefix index) and whose
    remaining tokens the engine draws."""
    dist.model.check_fits(len(dist.prompt_ids), dist.max_tokens)
    run = LMRun(dist)
    ids = recorded.token_ids or ()

    def part(values: tuple[float, ...] | None) -> list[float]:
        return [math.nan] * t if values is None else list(values[:t])

    run.feed_block(
        ids[:t],
        part(recorded.token_log_probs),
        part(recorded.token_proposal_log_probs),
        part(recorded.token_model_log_probs),
    )
    return Pending([run], lambda runs: lm_site(name, dist, runs[0]), {"site": name})


@dataclass
class Move:
    """One proposed move of one chain: the particle replaying it and what the ratio needs."""

    particle: Particle
    site: str | None  # the site moved (None: an independent proposal)
    start: int  # sites before this index are the state's own, unchanged
    correction: float  # log-ratio terms known before the replay (choosing site and position)
    position: int | None = None  # suffix moves: the token position


@dataclass
class Chain:
    """One Markov chain: the states it kept (after burn-in, thinned) and, for every step,
    whether the move was accepted, which site it moved and its acceptance probability.

    >>> c = Chain(traces=[], accepted=[True, False], moved=["x", "x"])
    >>> c.acceptance_rate
    0.5
    """

    traces: list[Trace] = field(default_factory=list)
    accepted: list[bool] = field(default_factory=list)
    moved: list[str | None] = field(default_factory=list)
    accept_prob: list[float] = field(default_factory=list)
    log_joint: list[float] = field(default_factory=list)

    @property
    def values(self) -> list:
        """The kept states' return values."""
        return [t.value for t in self.traces]

    @property
    def acceptance_rate(self) -> float:
        return sum(self.accepted) / len(self.accepted) if self.accepted else math.nan


class MCMCResult(Result):
    """A :class:`~lmcascade.result.Result` of equally weighted chain states, chain after
    chain, with the chains themselves (``chains``) and convergence diagnostics of a scalar
    function of the states: :meth:`r_hat` (split Gelman-Rubin, 2+ chains) and
    :meth:`chain_ess` (effective sample size across chains), both from ``pyro.ops.stats``.
    """

    def __init__(self, chains: list[Chain], stats: dict) -> None:
        traces = [t for c in chains for t in c.traces]
        super().__init__(traces, [0.0] * len(traces), stats=stats)
        self.chains = chains

    MIN_STATES = 10
    """States per chain the diagnostics need (fewer make pyro's estimates meaningless)."""

    @property
    def ess(self) -> float:
        """The effective sample size of the states' log target (``trace.log_joint``) across
        chains: how many independent draws the chains are worth (``nan`` with fewer than
        :attr:`MIN_STATES` states per chain).  :meth:`chain_ess` gives it for any function
        of the values."""
        if min((len(c.traces) for c in self.chains), default=0) < self.MIN_STATES:
            return math.nan
        joint = [[t.log_joint for t in c.traces] for c in self.chains]
        return self._ess_of(torch.tensor(joint, dtype=torch.float64))

    @staticmethod
    def _ess_of(draws: torch.Tensor) -> float:
        from pyro.ops.stats import effective_sample_size

        if bool((draws == draws[..., :1]).all()):
            return math.nan  # a constant: no spread to measure
        value = float(effective_sample_size(draws, chain_dim=0, sample_dim=1))
        return value if value > 0 else math.nan

    def _draws(self, f: Callable[[Any], float]) -> torch.Tensor:
        short = min((len(c.traces) for c in self.chains), default=0)
        if short < self.MIN_STATES:
            raise OptionError(
                f"chain diagnostics need at least {self.MIN_STATES} states per chain, this run "
                f"kept {short}; raise num_samples"
            )
        try:
            rows = [[float(f(v)) for v in c.values] for c in self.chains]
        except (TypeError, ValueError) as err:
            raise OptionError(f"the diagnostic function must return a number: {err}") from None
        return torch.tensor(rows, dtype=torch.float64)

    def r_hat(self, f: Callable[[Any], float] = float) -> float:
        """Split R-hat of ``f(value)`` across chains (close to 1 when they agree).

        >>> import lmcascade as lc
        >>> from pyro.distributions import Normal
        >>> @lc.program
        ... def g():
        ...     return (yield lc.sample("x", Normal(0., 1.)))
        >>> r = lc.infer(g(), method="mcmc", num_samples=400, chains=4, seed=0)
        >>> 0.9 < r.r_hat() < 1.1
        True
        """
        from pyro.ops.stats import split_gelman_rubin

        if len(self.chains) < 2:
            raise OptionError("r_hat compares chains: run with chains=2 or more")
        return float(split_gelman_rubin(self._draws(f), chain_dim=0, sample_dim=1))

    def chain_ess(self, f: Callable[[Any], float] = float) -> float:
        """Effective sample size of ``f(value)`` over all chains (autocorrelation-corrected;
        about the number of states for a well-mixed chain, fewer when it sticks; ``nan`` when
        ``f`` is constant or the estimate breaks down)."""
        return self._ess_of(self._draws(f))


# -- the method -----------------------------------------------------------------------------


@register
class MCMC(InferenceMethod):
    """Metropolis-Hastings over program traces; see the module docstring for the moves.

    ``num_samples`` states per chain are kept after ``burn_in`` steps, every ``thin``-th
    step; ``chains`` independent chains advance together (their model calls batched), each
    started from a prior draw of non-zero weight (up to ``init_tries`` draws per chain).

    With ``draft`` (:data:`~lmcascade.inference.base.DRAFT_OPTIONS`) every LM text a move
    draws (the starting states, a site move's new text, a suffix) is sampled speculatively.
    The acceptance ratio needs only the density of the tokens under their proposal, and a
    speculative block's tokens are exact draws from it (the draft's own draws are auxiliary
    and never enter the ratio), so the chain is unchanged.  ``stats["acceptance_rate"]``
    stays the chain's; the draft's is ``stats["draft_acceptance_rate"]``.

    >>> MCMC(draft="prompt_lookup", proposal="suffix").config["draft"]
    'prompt_lookup'
    """

    name = "mcmc"
    options = {
        "num_samples": 100,
        "burn_in": 100,
        "thin": 1,
        "chains": 1,
        "proposal": "site",
        "init_tries": 1000,
        **DRAFT_OPTIONS,
    }

    def check_options(self) -> None:
        self.positive_int("num_samples")
        self.positive_int("thin")
        self.positive_int("init_tries")
        self.population("chains")
        burn = self.config["burn_in"]
        if not isinstance(burn, int) or isinstance(burn, bool) or burn < 0:
            raise OptionError(
                f"method 'mcmc': option burn_in must be a whole number >= 0, got {burn!r}"
            )
        kept = self.config["num_samples"] * self.config["chains"]
        if kept * 3_000 > 2**33:  # traces alone would not fit in memory
            raise OptionError(
                f"method 'mcmc': num_samples * chains = {kept:,} states to keep; use fewer "
                "(or thin)"
            )
        if self.config["proposal"] not in PROPOSALS:
            raise OptionError(
                f"method 'mcmc': option proposal must be one of {', '.join(PROPOSALS)}, got "
                f"{self.config['proposal']!r}"
            )

    def run(self, bound: BoundProgram, seed: int) -> Result:
        cfg = self.config
        policy = MovePolicy()
        sampler = self.token_sampler(Ancestral(exact_masks=True), seed)
        engine = Engine(policy, sampler=sampler, seed=seed)
        rng = np.random.default_rng(seed)
        n_chains, thin = cfg["chains"], cfg["thin"]
        steps = cfg["burn_in"] + cfg["num_samples"] * thin
        chains = [Chain() for _ in range(n_chains)]
        tried: dict[str, list[int]] = {}
        done = 0

        def status(_: list) -> str:
            accepted = sum(sum(c.accepted) for c in chains)
            made = sum(len(c.accepted) for c in chains)
            rate = f", accepted {accepted / made:.0%}" if made else ""
            return f"step {done}/{steps}{rate}"

        with self.ticking(status=status) as schedule:
            states = self.initial_states(bound, engine, schedule, n_chains)
            for step in range(steps):
                moves = [self.propose(bound, x, policy, rng) for x in states]
                engine.run([m.particle for m in moves], schedule)
                policy.suffixes.clear()
                for c, (chain, x, move) in enumerate(zip(chains, states, moves, strict=True)):
                    new = move.particle.trace
                    log_a = log_acceptance(x, new, move) if new.done else -math.inf
                    accept = bool(log_a >= 0 or rng.random() < math.exp(log_a))
                    if accept:
                        states[c] = x = new
                    chain.accepted.append(accept)
                    chain.moved.append(move.site)
                    chain.accept_prob.append(min(1.0, math.exp(min(log_a, 0.0))))
                    chain.log_joint.append(x.log_joint)
                    counts = tried.setdefault(move.site or "(all)", [0, 0])
                    counts[0] += 1
                    counts[1] += accept
                    if step >= cfg["burn_in"] and (step - cfg["burn_in"] + 1) % thin == 0:
                        chain.traces.append(x)
                done = step + 1
        stats = dict(engine.stats)
        made = sum(len(c.accepted) for c in chains)
        stats["acceptance_rate"] = sum(sum(c.accepted) for c in chains) / made if made else None
        stats["acceptance_by_site"] = {k: v[1] / v[0] for k, v in tried.items()}
        stats["proposals_by_site"] = {k: v[0] for k, v in tried.items()}
        stats["steps"] = steps
        return self.draft_stats(MCMCResult(chains, stats), sampler)

    def initial_states(
        self, bound: BoundProgram, engine: Engine, schedule: Any, n: int
    ) -> list[Trace]:
        """A prior draw of non-zero weight per chain (batches of draws until every chain has
        one, or ``init_tries`` draws per chain failed)."""
        found: list[Trace] = []
        dead: list[Particle] = []
        budget = n * self.config["init_tries"]
        tries = 0
        while len(found) < n and tries < budget:
            missing = n - len(found)  # one draw per chain first; more once some fail
            batch = min(missing if not tries else max(2 * missing, 16), budget - tries)
            tries += batch
            for p in engine.run([Particle(bound) for _ in range(batch)], schedule):
                if p.done and p.trace.log_joint > -math.inf and not p.dead:
                    if len(found) < n:
                        found.append(p.trace)
                elif len(dead) < 1000:
                    dead.append(p)
        if len(found) < n:
            if not found:
                raise zero_weight_error(dead, f"mcmc found no starting state in {tries} draws")
            raise AllWeightsZeroError(
                f"mcmc: only {len(found)} of {n} chains found a starting state of non-zero "
                f"weight in {tries} prior draws; raise init_tries or use fewer chains",
                tuple(p.trace for p in dead),
            )
        return found

    def propose(
        self, bound: BoundProgram, x: Trace, policy: MovePolicy, rng: np.random.Generator
    ) -> Move:
        """The particle for one move from state ``x`` (not run yet)."""
        kind = self.config["proposal"]
        if kind == "independent":
            return Move(Particle(bound), None, 0, 0.0)
        eligible = choices(x)
        if not eligible:
            raise ProgramError(
                f"mcmc needs a random choice to move, but a trace of program {bound.name!r} "
                f"has none (its sites: {x.names}); a program without random choices has "
                "nothing to sample"
            )
        site = eligible[int(rng.integers(len(eligible)))]
        suffix = kind == "suffix" and site in lm_choices(x)
        start = x.names.index(site.name)
        replay = Trace()
        for s in x.sites[start:]:
            if s is not site or suffix:
                replay.add(s)
        correction = math.log(len(eligible))  # + log|C(x)|; - log|C(x')| after the replay
        position = None
        if suffix:
            n = len(site.token_ids or ())
            position = int(rng.integers(n))
            policy.suffixes[id(site)] = position
            correction += math.log(n)
        particle = Particle(bound, x.prefix(start), replay)
        return Move(particle, site.name, start, correction, position)


def log_acceptance(x: Trace, new: Trace, move: Move) -> float:
    """The log Metropolis-Hastings ratio of moving from ``x`` to ``new`` (see the module
    docstring); ``-inf`` when ``new`` has probability zero."""
    if new.log_joint == -math.inf:
        return -math.inf
    if move.site is None:  # independent: the ratio of importance weights
        w_new = new.log_joint - math.fsum(proposal_log_prob(s) for s in choices(new))
        w_old = x.log_joint - math.fsum(proposal_log_prob(s) for s in choices(x))
        return w_new - w_old
    old_sites = {s.name: s for s in x.sites[move.start :]}
    if move.position is None:
        log_a = new.log_joint - x.log_joint + move.correction
    else:  # the suffix's p/q token by token, so that equal terms cancel exactly
        rest = [s.log_prob for s in new.sites if s.name != move.site]
        log_a = math.fsum(rest) - math.fsum(s.log_prob for s in x.sites if s.name != move.site)
        log_a += move.correction
    kept: set[str] = set()
    for s in new.sites[move.start :]:
        if s.kind != "sample":
            continue
        before = old_sites.get(s.name)
        if s.name == move.site and move.position is not None:  # the suffix itself
            log_a += suffix_weight(s, move.position) - suffix_weight(before, move.position)  # type: ignore[arg-type]
            log_a -= math.log(len(s.token_ids or ()))
            kept.add(s.name)
        elif (
            before is not None
            and before.kind == "sample"
            and s.name != move.site
            and same_shape(before.dist, s.dist)
        ):
            kept.add(s.name)
        else:
            log_a -= proposal_log_prob(s)  # drawn afresh
    for name, before in old_sites.items():
        if before.kind == "sample" and name not in kept:
            log_a += proposal_log_prob(before)  # the reverse move draws it afresh
    return log_a - math.log(len(choices(new)))


def suffix_weight(site: Site, t: int) -> float:
    """``log p - log q`` of an LM site's tokens from position ``t`` on, token by token."""
    p = site.token_log_probs or ()
    q = site.token_proposal_log_probs or ()
    return math.fsum(a - b for a, b in zip(p[t:], q[t:], strict=True))
