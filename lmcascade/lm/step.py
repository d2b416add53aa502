"""One decoding step for any number of runs, in three phases with one model call per model.

1. **distributions** — the shaped (eos masking, temperature, top-k, top-p), constraint-masked
   next-token log-probabilities of every waiting run, on the model's device (:class:`Rows`),
   with the model's own log-probabilities alongside;
2. **choose** — a token sampler (:mod:`lmcascade.samplers`) decides what each run gets: one
   token (ancestral draw, greedy), several children (enumeration, beam), or a block;
3. **feed** — potentials that need a model see the chosen tokens, then each run takes its
   tokens (each with its log-probability under the site's distribution, under what it was
   drawn from, and under the raw model); extra children continue on forks of the run's
   context.

Forced runs (scoring a known token path) skip the phases: they are finished in one
teacher-forced pass per model (:func:`lmcascade.lm.scoring.score_forced`).

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, 0.0])
>>> runs = [LMRun(lc.LM(lm, "", max_tokens=3)) for _ in range(4)]
>>> stats = {}
>>> run_to_end(runs, {}, stats)
>>> stats["model_calls"] <= 3 and all(r.done for r in runs)
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from lmcascade.errors import ModelError, SiteError
from lmcascade.lm.potentials import expert_increments
from lmcascade.lm.run import LMRun
from lmcascade.lm.scoring import by_model, call_model, score_forced
from lmcascade.lm.shaping import proposal_rows, shape_rows
from lmcascade.samplers import ANCESTRAL
from lmcascade.samplers.base import Chosen, Draws, Rows, TokenSampler

Observer = Callable[[Rows], None]


def constraint_masks(
    runs: Sequence[LMRun], like: torch.Tensor, full: bool = True
) -> torch.Tensor | None:
    """Allowed-token masks of the runs' constraints, ``[len(runs), vocab]``; None if none.
    Unless ``full``, predicate constraints are left unmasked (a rejection sampler handles
    them without evaluating the predicate on the whole vocabulary)."""

    def skip(r: LMRun) -> bool:
        c = r.dist.constraint
        return c is None or (not full and getattr(c, "by_rejection", False))

    if all(skip(r) for r in runs):
        return None
    ones = torch.ones(like.shape[-1], dtype=torch.bool, device=like.device)
    return torch.stack(
        [ones if skip(r) else r.dist.constraint.mask(r.model, r.cstate) for r in runs]
    )


def distributions(
    runs: Sequence[LMRun],
    generators: dict[torch.device, torch.Generator],
    stats: dict | None,
    full_masks: bool = False,
    drafts: dict[LMRun, list[list[int]]] | None = None,
) -> list[tuple[Rows, torch.Tensor]]:
    """Phase 1: one batched model call per model for every run's next-token distribution;
    each :class:`Rows` comes with the model's own log-probabilities of its runs (unshaped).
    Runs with ``drafts`` (one or several drafted blocks each) get them scored in the same
    pass (``Rows.drafted``): the first block extends the run's own context, each further one
    a fork of it, and the tokens stay there for the sampler to keep or crop."""
    out = []
    for group in by_model(runs):
        model = group[0].model
        drafted = None
        if drafts and any(drafts.get(r) for r in group):
            contexts, counts, owners = [], [], []
            for i, r in enumerate(group):
                blocks = [b for b in drafts.get(r) or [] if b] or [[]]
                forks = [r.ctx] + [model.fork(r.ctx) for _ in blocks[1:]]
                for ctx, block in zip(forks, blocks, strict=True):
                    ctx.extend(block)
                    contexts.append(ctx)
                    counts.append(len(block) + 1)
                    owners.append(i)
            scored = call_model(model, contexts, stats, counts=counts)
            firsts = [next(j for j, o in enumerate(owners) if o == i) for i in range(len(group))]
            logprobs = torch.stack([scored[j][0] for j in firsts])
            drafted = [[] for _ in group]
            for ctx, rows, i in zip(contexts, scored, owners, strict=True):
                if len(rows) > 1:
                    drafted[i].append((ctx, rows[1:]))
            drafted = [d or None for d in drafted]
        else:
            logprobs = call_model(model, [r.ctx for r in group], stats)
        p = shape_rows(
            logprobs, [r.dist for r in group], [len(r.tokens) for r in group], model.eos_id
        )
        empty: list[LMRun] = []
        nothing = torch.isnan(p).any(dim=-1)
        if bool(nothing.any()):
            if bool(torch.isnan(logprobs).any()):
                raise ModelError(
                    f"model {model.name!r} gave NaN next-token log-probabilities (its weights "
                    "or inputs are broken: check the model files with `lmcascade models verify`)"
                )
            # nothing may be drawn (min_tokens masks the only token the model allows): the
            # run ends on eos with probability zero
            empty = [r for r, bad in zip(group, nothing.tolist(), strict=True) if bad]
            eos_row = torch.full_like(p[0], float("-inf"))
            eos_row[model.eos_id] = 0.0
            p = torch.where(nothing[:, None], eos_row, p)
        gen = generators.get(p.device)
        if gen is None:
            gen = generators[p.device] = torch.Generator(device=p.device)
            gen.seed()
        proposal = proposal_rows(p, [r.dist for r in group])
        mask = constraint_masks(group, p, full=full_masks)
        if mask is None:
            out.append((Rows(group, p, proposal, None, gen, empty, drafted), logprobs))
            continue
        masked = proposal.masked_fill(~mask, float("-inf"))
        blocked = torch.isneginf(masked).all(dim=-1)  # nothing allowed
        q = torch.where(blocked[:, None], proposal, torch.log_softmax(masked, dim=-1))
        out.append((Rows(group, p, q, blocked, gen, empty, drafted), logprobs))
    return out


def model_log_probs(raw: torch.Tensor, rows: Sequence[int], tokens: Sequence[int]) -> list[float]:
    """``raw[rows[j], tokens[j]]`` for every ``j``, as Python floats (one transfer)."""
    if not tokens:
        return []
    index = torch.tensor([list(rows), list(tokens)], dtype=torch.long, device=raw.device)
    return raw[index[0], index[1]].to(torch.float64).cpu().tolist()


def feed(
    rows: Rows, chosen: Chosen, stats: dict | None, raw: torch.Tensor | None = None
) -> dict[LMRun, list[LMRun]]:
    """Phase 3: each run takes its first choice; further choices continue on forks of the run
    (returned as ``run -> [extra runs]``).  ``raw`` holds the model's own log-probabilities of
    the rows: each choice's first token takes its value from there (later tokens of a block,
    which this row does not score, get NaN)."""
    runs = rows.runs
    eos_id = runs[0].model.eos_id
    if isinstance(chosen, Draws):  # one token per run: the hot path
        if any(r.expert is not None for r in runs):
            twists = expert_increments(runs, [[t] for t in chosen.tokens], stats)
            for run, inc in zip(runs, twists, strict=True):
                run.twist += inc[0]
        raws = (
            [math.nan] * len(runs)
            if raw is None
            else model_log_probs(raw, range(len(runs)), chosen.tokens)
        )
        for run, tok, lp, lq, lm in zip(
            runs, chosen.tokens, chosen.log_ps, chosen.log_qs, raws, strict=True
        ):
            run.feed(tok, lp, lq, lm)
        count(stats, len(runs), chosen.tokens.count(eos_id))
        return {}
    if any(r.expert is not None for r in runs):
        if any(
            len(c.tokens) > 1 for r, cs in zip(runs, chosen, strict=True) if r.expert for c in cs
        ):
            raise SiteError("an LM potential steers one token at a time, not blocks of tokens")
        twists = expert_increments(runs, [[c.tokens[0] for c in cs] for cs in chosen], stats)
    else:
        twists = None
    firsts = [(i, c.tokens[0]) for i, cs in enumerate(chosen) for c in cs if c.tokens]
    found = (
        model_log_probs(raw, [i for i, _ in firsts], [t for _, t in firsts])
        if raw is not None
        else [math.nan] * len(firsts)
    )
    first_raw = iter(found)
    branches: dict[LMRun, list[LMRun]] = {}
    generated = eos = 0
    for i, run in enumerate(runs):
        options = chosen[i]
        if not options:  # nothing possible: the site has probability zero here
            run.feed(eos_id, float("-inf"))
            continue
        extra = [run.branch(run.model.fork(run.ctx)) for _ in options[1:]]
        for j, (target, choice) in enumerate(zip([run, *extra], options, strict=True)):
            if twists is not None:
                target.twist += twists[i][j]
            later = choice.model_log_ps or [math.nan] * len(choice.tokens)
            raws = [next(first_raw), *later[1:]] if choice.tokens else []
            target.feed_block(choice.tokens, choice.log_ps, choice.log_qs, raws, choice.in_context)
            generated += len(choice.tokens)
            eos += choice.tokens.count(eos_id)
        if extra:
            branches[run] = extra
    count(stats, generated, eos)
    return branches


def count(stats: dict | None, generated: int, eos: int) -> None:
    """Adds generated-token counts to ``stats``."""
    if stats is not None:
        stats["tokens_generated"] = stats.get("tokens_generated", 0) + generated
        stats["eos_generated"] = stats.get("eos_generated", 0) + eos


def step_runs(
    runs: Sequence[LMRun],
    generators: dict[torch.device, torch.Generator],
    stats: dict | None = None,
    sampler: TokenSampler | None = None,
    observers: Sequence[Observer] = (),
) -> dict[LMRun, list[LMRun]]:
    """Advances every unfinished run: sampled runs by one step of ``sampler`` (ancestral by
    default), forced runs to their end in one teacher-forced pass.

    ``generators`` maps a device to the ``torch.Generator`` used for draws there (created on
    first use, unseeded, if missing); ``stats`` gets ``model_calls``, ``tokens_generated`` and
    ``tokens_scored`` added; ``observers`` see every :class:`Rows` after the distributions
    phase (SMC's entropy segmenting).  Returns the extra runs a sampler branched off.
    """
    sampler = sampler or ANCESTRAL
    live = [r for r in runs if not r.done]
    forced = [r for r in live if r.forced is not None]
    if forced:
        score_forced(forced, stats)
    branches: dict[LMRun, list[LMRun]] = {}
    sampled = [r for r in live if r.forced is None]
    drafts = sampler.draft(sampled) if sampled else {}
    for rows, raw in distributions(sampled, generators, stats, sampler.full_masks, drafts):
        for observe in observers:
            observe(rows)
        branches.update(feed(rows, sampler.choose(rows), stats, raw))
        for run in rows.empty:  # ended on the stand-in eos: the site has probability zero
            run.log_prob = float("-inf")
    return branches


def run_to_end(
    runs: Sequence[LMRun],
    generators: dict[torch.device, torch.Generator],
    stats: dict | None = None,
) -> None:
    """Steps ``runs`` (ancestrally) until every one has ended."""
    while any(not r.done for r in runs):
        step_runs(runs, generators, stats)
