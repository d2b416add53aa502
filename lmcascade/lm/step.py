"""One batched decoding step for any number of runs: one model call per model.

Sampling happens on the model's device and only the chosen ids and their log-probs are read
back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmcascade.lm.run import LMRun
from lmcascade.lm.scoring import _by_model, score_forced
from lmcascade.lm.shaping import shape_rows
from lmcascade.models.base import Context, LanguageModel
from lmcascade.samplers.ancestral import draw
from lmcascade.samplers.awrs import _sample_by_rejection, by_rejection


def constraint_masks(
    runs: Sequence[LMRun], like: torch.Tensor, sampling: bool = False
) -> torch.Tensor | None:
    """Allowed-token masks of the runs' constraints, ``[len(runs), vocab]``; None if none.
    When ``sampling``, predicate constraints are left unmasked (rejection handles them)."""

    def skip(r: LMRun) -> bool:
        return r.dist.constraint is None or (sampling and by_rejection(r))

    if all(skip(r) for r in runs):
        return None
    ones = torch.ones(like.shape[-1], dtype=torch.bool, device=like.device)
    return torch.stack(
        [ones if skip(r) else r.dist.constraint.mask(r.model, r.cstate) for r in runs]
    )


def call_model(
    model: LanguageModel, contexts: Sequence[Context], stats: dict | None
) -> torch.Tensor:
    """One batched ``next_logprobs`` call, with its counts added to ``stats``."""
    logprobs = model.next_logprobs(contexts)
    if stats is not None:
        for key, n in model.pop_counters().items():
            stats[key] = stats.get(key, 0) + n
        stats["model_calls"] = stats.get("model_calls", 0) + 1
    return logprobs


def run_logprobs(runs: Sequence[LMRun], stats: dict | None) -> torch.Tensor:
    """The distributions ``runs`` (all of one model) draw their next tokens from, computed
    with one batched model call."""
    model = runs[0].model
    logprobs = call_model(model, [r.ctx for r in runs], stats)
    return shape_rows(logprobs, [r.dist for r in runs], [len(r.tokens) for r in runs], model.eos_id)


def _expert_logprobs(
    runs: Sequence[LMRun], tokens: torch.Tensor, stats: dict | None
) -> list[float] | None:
    """For runs steered by another LM: that LM's log-probability of each run's new token
    (one batched call per expert model); None when no run has one."""
    steered = [i for i, r in enumerate(runs) if r.expert is not None]
    if not steered:
        return None
    out = [0.0] * len(runs)
    groups: dict[int, list[int]] = {}
    for i in steered:
        groups.setdefault(id(runs[i].dist.potential.model), []).append(i)
    for rows in groups.values():
        experts = [runs[i].dist.potential for i in rows]
        model = experts[0].model
        logprobs = call_model(model, [runs[i].expert for i in rows], stats)
        shaped = shape_rows(logprobs, experts, [len(runs[i].tokens) for i in rows], model.eos_id)
        index = torch.tensor(rows, device=tokens.device)
        picked = shaped.gather(1, tokens[index].to(shaped.device)[:, None]).squeeze(1)
        for i, lp in zip(rows, picked.to(torch.float64).cpu().tolist(), strict=True):
            out[i] = lp
    return out


def step_runs(
    runs: Sequence[LMRun],
    generators: dict[torch.device, torch.Generator],
    stats: dict | None = None,
    entropy: bool = False,
) -> None:
    """Advances every unfinished run: sampled runs by one token (one batched call per model,
    drawn on the model's device, only ids and log-probs read back); forced runs to their end
    in one teacher-forced pass.

    ``generators`` maps a device to the ``torch.Generator`` used for draws there (created on
    first use, unseeded, if missing); ``stats`` gets ``model_calls``, ``tokens_generated`` and
    ``tokens_scored`` counts added; with ``entropy`` each sampled run records the entropy of
    the distribution its token was drawn from.
    """
    live = [r for r in runs if not r.done]
    forced = [r for r in live if r.forced is not None]
    if forced:
        score_forced(forced, stats)
    for group in _by_model([r for r in live if r.forced is None]):
        proc = run_logprobs(group, stats)
        device = proc.device
        gen = generators.get(device)
        if gen is None:
            gen = generators[device] = torch.Generator(device=device)
            gen.seed()
        mask = constraint_masks(group, proc, sampling=True)
        if mask is None:
            q = proc
        else:  # draw from the locally masked distribution; the weight gets p/q
            masked = proc.masked_fill(~mask, float("-inf"))
            blocked = torch.isneginf(masked).all(dim=-1, keepdim=True)  # nothing allowed
            q = torch.where(blocked, proc, torch.log_softmax(masked, dim=-1))
        tokens = draw(q, gen)
        chosen_p = proc.gather(1, tokens[:, None]).squeeze(1)
        chosen_q = q.gather(1, tokens[:, None]).squeeze(1)
        if mask is not None:
            chosen_p = torch.where(blocked.squeeze(1), float("-inf"), chosen_p)
        parts = [tokens.to(torch.float64), chosen_p.to(torch.float64), chosen_q.to(torch.float64)]
        if entropy:
            parts.append(-(q.exp() * q).nan_to_num(0.0).sum(dim=-1).to(torch.float64))
        back = torch.stack(parts).cpu().tolist()
        rejection_rows = [i for i, r in enumerate(group) if by_rejection(r)]
        if rejection_rows:
            _sample_by_rejection(group, rejection_rows, proc, gen, back)
            tokens = torch.tensor([int(t) for t in back[0]], device=device)
        expert_lp = _expert_logprobs(group, tokens, stats)
        for i, run in enumerate(group):
            if expert_lp is not None and run.expert is not None:
                run.twist += expert_lp[i]
            run.feed(int(back[0][i]), back[1][i], back[2][i])
            if entropy:
                run.entropy = back[3][i]
        if stats is not None:
            stats["tokens_generated"] = stats.get("tokens_generated", 0) + len(group)
            eos = group[0].model.eos_id
            stats["eos_generated"] = stats.get("eos_generated", 0) + sum(
                int(t) == eos for t in back[0]
            )


def run_to_end(
    runs: Sequence[LMRun],
    generators: dict[torch.device, torch.Generator],
    stats: dict | None = None,
) -> None:
    """Steps ``runs`` until every one has ended."""
    while any(not r.done for r in runs):
        step_runs(runs, generators, stats)
