"""Token-by-token generation and scoring of LM sites, batched across many runs.

An :class:`LMRun` is the state machine of one generation under an :class:`~lmcascade.LM`
distribution: it takes one token at a time, tracks the decoded text incrementally, and knows
when the generation has ended (eos, a stop string, or ``max_tokens``).  The same machine
*scores* a given token path by forcing its tokens, so sampling and scoring can never disagree.

:func:`step_runs` advances any number of runs by one token with one batched model call per
model; sampling happens on the model's device and only the chosen ids and their log-probs
are read back.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, 0.0])
>>> run = LMRun(lc.LM(lm, "", max_tokens=2), forced=[0, 1])
>>> while not run.done:
...     step_runs([run], generators={})
>>> run.value, run.end, round(run.log_prob, 4)
('ab', 'max_tokens', -2.1972)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lmcascade.errors import SiteError
from lmcascade.models.base import Context, LanguageModel, Tokenizer
from lmcascade.sampling import draw, process_logprobs

if TYPE_CHECKING:
    from lmcascade.distributions import LM


class Detokenizer:
    """Incremental decoding: text grows token by token without re-decoding whole sequences.

    Decodes a short window of recent tokens and emits only the new characters, holding back
    text while it ends in an incomplete multi-byte character.
    """

    __slots__ = ("tokenizer", "ids", "text", "_prefix", "_read")

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Adds a token and returns the characters it completed (possibly empty)."""
        self.ids.append(token_id)
        piece = getattr(self.tokenizer, "token_text", None)
        if piece is not None:  # concatenative tokenizers: a token's text never changes
            delta = piece(token_id)
            self.text += delta
            return delta
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        after = self.tokenizer.decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def copy(self) -> Detokenizer:
        twin = Detokenizer(self.tokenizer)
        twin.ids = list(self.ids)
        twin.text = self.text
        twin._prefix, twin._read = self._prefix, self._read
        return twin


class LMRun:
    """One generation (sampled, or forced along ``forced`` token ids) under an LM distribution.

    ``log_prob`` sums the tokens' log-probabilities under the site's distribution, ``log_q``
    under the distribution they were drawn from (the constraint-masked one), and ``twist`` is
    the site's potential at the current prefix: ``log_weight`` is the run's contribution to
    its particle's weight while it is in progress.
    """

    __slots__ = (
        "dist",
        "model",
        "ctx",
        "forced",
        "tokens",
        "log_prob",
        "log_q",
        "twist",
        "cstate",
        "segment",
        "entropy",
        "done",
        "end",
        "value",
        "expert",
        "_detok",
        "_stop_scan",
        "seg_start",
    )

    def __init__(
        self, dist: LM, ctx: Context | None = None, forced: Sequence[int] | None = None
    ) -> None:
        self.dist = dist
        self.model: LanguageModel = dist.model
        self.ctx = ctx if ctx is not None else self.model.open(dist.prompt_ids)
        self.forced = list(forced) if forced is not None else None
        self.tokens: list[int] = []
        self.log_prob = 0.0
        self.log_q = 0.0
        # A potential is a function of the prefix, or another LM whose prefix probability
        # steers the run (its context, ``expert``, advances with this run's tokens).
        self.expert: Context | None = None
        self.twist = 0.0
        if getattr(dist.potential, "is_lm", False):
            if forced is None:
                self.expert = dist.potential.model.open(dist.potential.prompt_ids)
        elif dist.potential is not None:
            self.twist = float(dist.potential(""))
        self.cstate = dist.constraint.start(self.model) if dist.constraint is not None else None
        self.segment = 0  # tokens since the last segment boundary
        self.seg_start = 0  # length of the text at the last segment boundary
        self.entropy = 0.0  # entropy of the distribution the last token was drawn from
        self.done = False
        self.end: str | None = None
        self.value: str | None = None
        self._detok = Detokenizer(self.model.tokenizer)
        self._stop_scan = 0

    @property
    def log_weight(self) -> float:
        """p/q of the tokens so far, times the potential of the prefix (log scale)."""
        if self.log_prob == -math.inf:
            return -math.inf
        return self.log_prob - self.log_q + self.twist

    @property
    def text(self) -> str:
        """The text decoded so far."""
        return self._detok.text

    def branch(self, ctx: Context) -> LMRun:
        """A copy of this run continuing on ``ctx`` (a fork of this run's context)."""
        twin = LMRun.__new__(LMRun)
        for slot in LMRun.__slots__:
            setattr(twin, slot, getattr(self, slot))
        twin.ctx = ctx
        if self.expert is not None:
            twin.expert = self.dist.potential.model.fork(self.expert)
        twin.tokens = list(self.tokens)
        twin._detok = self._detok.copy()
        return twin

    def feed(self, token_id: int, log_prob: float, log_q: float | None = None) -> None:
        """Takes one token with its log-probability under the site's distribution (and under
        the distribution it was drawn from, when that differs)."""
        self.tokens.append(token_id)
        self.segment += 1
        self.log_prob += log_prob
        self.log_q += log_prob if log_q is None else log_q
        if log_prob == -math.inf:
            self._finish("impossible")
            return
        if self.dist.constraint is not None:
            c = self.dist.constraint
            if self.forced is not None and not bool(c.mask(self.model, self.cstate)[token_id]):
                self._finish("impossible")  # a scored path that breaks the constraint
                return
            self.cstate = c.advance(self.model, self.cstate, token_id)
        if token_id == self.model.eos_id:
            self._finish("eos")
            return
        delta = self._detok.push(token_id)
        if delta and self.dist.stop and self._find_stop() is not None:
            self._finish("stop")
            return
        if len(self.tokens) >= self.dist.max_tokens:
            self._finish("max_tokens")
            return
        if self.forced is None and self.dist.potential is not None:
            if self.expert is not None:
                self.expert.append(token_id)
            else:
                self.twist = float(self.dist.potential(self._detok.text))
                if math.isnan(self.twist) or self.twist == math.inf:
                    raise SiteError(
                        f"the potential returned {self.twist} for {self._detok.text!r}; a "
                        "log-potential must be a finite number or -inf"
                    )
        self.ctx.append(token_id)

    def _find_stop(self) -> int | None:
        text = self._detok.text
        start = max(0, self._stop_scan - self.dist.max_stop_len + 1)
        hits = [i for s in self.dist.stop if (i := text.find(s, start)) >= 0]
        self._stop_scan = len(text)
        return min(hits) if hits else None

    def release(self) -> None:
        """Gives the run's model contexts back (it will not be continued)."""
        self._release()

    def _release(self) -> None:
        self.model.release(self.ctx)
        if self.expert is not None:
            self.dist.potential.model.release(self.expert)
            self.expert = None

    def _finish(self, end: str) -> None:
        c = self.dist.constraint
        if (
            end in ("stop", "max_tokens")
            and c is not None
            and not c.complete(self.model, self.cstate)
        ):
            end = "impossible"  # ended before the constraint was satisfied (an unfinished match)
        self.done = True
        self.end = end
        self.twist = 0.0
        self._release()
        if end == "impossible":
            self.log_prob = -math.inf
            return
        text = self.model.decode([t for t in self.tokens if t != self.model.eos_id])
        if self.dist.stop:
            hits = [i for s in self.dist.stop if (i := text.find(s)) >= 0]
            if hits:
                text = text[: min(hits)]
        self.value = text

    def fail(self) -> None:
        """Marks a forced run whose path does not end where it should (probability zero)."""
        self._release()
        self.done = True
        self.end = "impossible"
        self.twist = 0.0
        self.log_prob = -math.inf


def by_rejection(run: LMRun) -> bool:
    """Whether the run's constraint is sampled by rejection (a Python predicate)."""
    return getattr(run.dist.constraint, "by_rejection", False)


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


AWRS_CANDIDATES = 32


def awrs(run: LMRun, order: list[int], logp: list[float], more) -> tuple[int, float]:
    """Recursive adaptive weighted rejection sampling for one run.

    ``order`` lists candidate tokens in Gumbel-max order (a sample without replacement from
    the run's distribution) with their log-probabilities ``logp``; ``more()`` returns the full
    order when the candidates run out.  Returns the first token the predicate accepts — an
    exact draw from the constrained distribution — and ``log Z_hat``, an unbiased estimate of
    the allowed probability mass (``-inf`` when nothing is allowed).
    """
    c, model, state = run.dist.constraint, run.model, run.cstate
    rejected, log_m, j = 0.0, 0.0, 0
    while True:
        if j + 1 >= len(order) and len(order) < run.model.vocab_size:
            order, logp = more()
        if j >= len(order) or logp[j] == -math.inf:
            return int(order[max(j - 1, 0)]), -math.inf
        tok, lp = int(order[j]), logp[j]
        last = j + 1 == len(order) or logp[j + 1] == -math.inf
        log_q = 0.0 if last else min(lp - math.log1p(-rejected), 0.0)
        if c.accepts(model, state, tok):
            if last or c.accepts(model, state, int(order[j + 1])):
                return tok, log_m
            return tok, log_m + log_q
        if last or rejected + math.exp(lp) >= 1 - 1e-9:
            return tok, -math.inf
        log_m += math.log1p(-math.exp(log_q))
        rejected += math.exp(lp)
        j += 1


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


def shape_rows(
    logprobs: torch.Tensor, dists: Sequence[LM], positions: Sequence[int], eos_id: int
) -> torch.Tensor:
    """Row ``i`` of ``logprobs`` as the distribution ``dists[i]`` draws its token number
    ``positions[i]`` from: eos masked below ``min_tokens``, then temperature, top-k, top-p."""
    early = [pos < d.min_tokens for d, pos in zip(dists, positions, strict=True)]
    if any(early):
        rows = torch.tensor(early, device=logprobs.device)
        eos = torch.zeros(logprobs.shape[-1], dtype=torch.bool, device=logprobs.device)
        eos[eos_id] = True
        logprobs = torch.log_softmax(
            logprobs.masked_fill(rows[:, None] & eos[None, :], float("-inf")), dim=-1
        )
    n = len(dists)
    if all(d is dists[0] for d in dists):
        d = dists[0]
        temps = torch.full((n,), d.temperature, dtype=torch.float64)
        top_k = torch.full((n,), d.top_k or 0, dtype=torch.long)
        top_p = torch.full((n,), d.top_p, dtype=torch.float64)
    else:
        temps = torch.tensor([d.temperature for d in dists], dtype=torch.float64)
        top_k = torch.tensor([d.top_k or 0 for d in dists], dtype=torch.long)
        top_p = torch.tensor([d.top_p for d in dists], dtype=torch.float64)
    return process_logprobs(logprobs, temps, top_k, top_p)


def run_logprobs(runs: Sequence[LMRun], stats: dict | None) -> torch.Tensor:
    """The distributions ``runs`` (all of one model) draw their next tokens from, computed
    with one batched model call."""
    model = runs[0].model
    logprobs = call_model(model, [r.ctx for r in runs], stats)
    return shape_rows(logprobs, [r.dist for r in runs], [len(r.tokens) for r in runs], model.eos_id)


def _by_model(runs: Sequence[LMRun]) -> list[list[LMRun]]:
    groups: dict[int, list[LMRun]] = {}
    for run in runs:
        groups.setdefault(id(run.model), []).append(run)
    return list(groups.values())


def score_forced(runs: Sequence[LMRun], stats: dict | None = None) -> None:
    """Finishes forced runs by teacher forcing: one batched pass per model scores every
    position of every path, then each run takes its tokens through the ending rules."""
    for group in _by_model(runs):
        model = group[0].model
        todo = []
        for r in group:
            if len(r.forced or ()) > len(r.tokens):
                todo.append(r)
            else:
                r.fail()  # nothing left to force, yet the generation has not ended
        if not todo:
            continue
        paths = [r.forced[len(r.tokens) :] for r in todo]  # type: ignore[index]
        rows = model.path_logprobs([r.ctx for r in todo], paths)
        if stats is not None:
            for key, n in model.pop_counters().items():
                stats[key] = stats.get(key, 0) + n
            stats["model_calls"] = stats.get("model_calls", 0) + 1
            stats["tokens_scored"] = stats.get("tokens_scored", 0) + sum(map(len, paths))
        dists = [r.dist for r, p in zip(todo, paths, strict=True) for _ in p]
        positions = [
            len(r.tokens) + j for r, p in zip(todo, paths, strict=True) for j in range(len(p))
        ]
        proc = shape_rows(torch.cat(rows), dists, positions, model.eos_id)
        tokens = torch.tensor([t for p in paths for t in p], device=proc.device)
        chosen = proc.gather(1, tokens[:, None]).squeeze(1).to(torch.float64).cpu().tolist()
        offset = 0
        for run, path in zip(todo, paths, strict=True):
            for j, tok in enumerate(path):
                if run.done:
                    break
                run.feed(tok, chosen[offset + j])
            offset += len(path)
            if not run.done:
                run.fail()


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


def _sample_by_rejection(group, rows, proc, gen, back) -> None:
    """AWRS for the runs ``rows`` of ``group``: Gumbel-max candidate orders are computed on the
    device (the top few per row read back), the predicate is tested on the host, and ``back``
    (token, log p, log q rows) is overwritten with the accepted tokens and their weights."""
    index = torch.tensor(rows, device=proc.device)
    logp = proc.index_select(0, index).to(torch.float64)
    u = torch.rand(logp.shape, generator=gen, device=logp.device, dtype=torch.float64)
    keys = logp - torch.log(-torch.log(u.clamp_min(1e-300)))
    k = min(AWRS_CANDIDATES, logp.shape[-1])
    top = keys.topk(k, dim=-1).indices
    ids = top.cpu().tolist()
    lps = logp.gather(1, top).cpu().tolist()
    for n, i in enumerate(rows):

        def more(n=n):
            full = keys[n].argsort(descending=True)
            return full.cpu().tolist(), logp[n, full].cpu().tolist()

        tok, log_z = awrs(group[i], ids[n], lps[n], more)
        lp = float(logp[n, tok])
        back[0][i] = tok
        back[1][i] = lp if log_z > -math.inf else -math.inf
        back[2][i] = lp - log_z if log_z > -math.inf else 0.0


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


def scoring_runs(dist: LM, text: str) -> list[LMRun]:
    """Forced runs for every way a generation can end with value ``text``.

    The alternatives are disjoint token paths: the text's tokens then eos, then each stop
    string's tokens, or the text's tokens alone when they reach ``max_tokens``.
    """
    ids = dist.model.encode(text)
    paths = [ids + [dist.model.eos_id], ids]
    paths += [ids + dist.model.encode(s) for s in dist.stop]
    return [LMRun(dist, forced=p) for p in paths]


def path_log_prob(run: LMRun, expected_value: str | None = None) -> float:
    """Log-probability of a finished forced run: its token path, if it ends exactly there.

    A path that ends early or late, or whose value differs from ``expected_value``, has
    probability zero under the distribution.
    """
    if not run.done or run.end == "impossible":
        return -math.inf
    if run.forced is not None and len(run.tokens) != len(run.forced):
        return -math.inf
    if expected_value is not None and run.value != expected_value:
        return -math.inf
    return run.log_prob


def logsumexp(values: Sequence[float]) -> float:
    """Stable log(sum(exp(values))) of plain floats (``-inf`` for none)."""
    finite = [v for v in values if v != -math.inf]
    if not finite:
        return -math.inf
    m = max(finite)
    return m + math.log(sum(math.exp(v - m) for v in finite))
