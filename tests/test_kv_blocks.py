"""Multi-token blocks, rollback (crop) and the in-place KV buffers, checked against full
recomputes on the tiny random HF model and the default real model, and exactly on ToyLM."""

import pytest
import torch
from tiny_gguf import BACKENDS, reference, tiny_model
from tiny_hf import tiny_lm

import lmcascade as lc
from lmcascade.models import Context, ToyLM

pytest.importorskip("transformers")

TOL = 1e-4


@pytest.fixture(scope="module", params=BACKENDS)
def lm(request):
    return tiny_model(seed=1, backend=request.param)


def recompute(lm, ids):
    """Log-probs after every prefix of ``ids`` (row j: after ids[: j + 1]), no cache."""
    with torch.inference_mode():
        model = reference(lm)
        logits = model.hf(input_ids=torch.tensor([ids], device=model.device)).logits[0].float()
    return torch.log_softmax(logits, -1)


def assert_block(lm, ctx, rows):
    want = recompute(lm, ctx.ids)[len(ctx.ids) - len(rows) :]
    assert rows.shape == want.shape
    diff = (rows - want).abs().max().item() if len(rows) else 0.0
    assert diff < TOL, (ctx.ids, diff)


def assert_next(lm, ctxs, out):
    for ctx, row in zip(ctxs, out, strict=True):
        diff = (row - recompute(lm, ctx.ids)[-1]).abs().max().item()
        assert diff < TOL, (ctx.ids, diff)


def one_by_one(lm, prefix, tokens):
    """Log-probs after each of ``tokens`` appended one at a time to a fresh context."""
    ctx = lm.open(prefix)
    rows = []
    for tok in tokens:
        ctx.append(tok)
        rows.append(lm.next_logprobs([ctx])[0])
    return torch.stack(rows)


def test_ragged_blocks_equal_one_by_one_and_recompute(lm):
    ctxs = [lm.open(lm.encode_prompt(p)) for p in ["Q:", "Q:ab", "abcd Q:", "d"]]
    lm.next_logprobs(ctxs)
    blocks = [[1, 2, 3], [4], [5, 6, 1, 2, 3], [2, 2]]
    for ctx, block in zip(ctxs, blocks, strict=True):
        ctx.extend(block)
    lm.pop_counters()
    rows = lm.block_logprobs(ctxs, [len(b) for b in blocks])
    assert lm.pop_counters()["forward_passes"] == 1  # one pass for the ragged batch
    for ctx, block, got in zip(ctxs, blocks, rows, strict=True):
        assert got.shape == (len(block), lm.vocab_size)
        assert_block(lm, ctx, got)
        prefix = ctx.ids[: len(ctx.ids) - len(block)]
        assert (got - one_by_one(lm, prefix, block)).abs().max().item() < TOL
    # the caches now hold every id: the next step is a one-token decode for each context
    for ctx, tok in zip(ctxs, [1, 2, 3, 4], strict=True):
        ctx.append(tok)
    lm.pop_counters()
    out = lm.next_logprobs(ctxs)
    counts = lm.pop_counters()
    assert counts["decode_tokens"] == len(ctxs) and "prefill_tokens" not in counts
    assert_next(lm, ctxs, out)


def test_block_counts_may_reach_back_and_include_fresh_contexts(lm):
    ctx = lm.open(lm.encode_prompt("Q:ab"))
    lm.next_logprobs([ctx])
    ctx.extend([3, 4])
    fresh = lm.open(lm.encode_prompt("dd:c"))
    rows = lm.block_logprobs([ctx, fresh, lm.fork(ctx)], [4, 3, 0])
    assert [r.shape[0] for r in rows] == [4, 3, 0]
    assert_block(lm, ctx, rows[0])
    assert_block(lm, fresh, rows[1])
    with pytest.raises(lc.errors.ModelError):
        lm.block_logprobs([ctx], [len(ctx) + 1])


def test_blocks_on_forks_sharing_rows(lm):
    root = lm.open(lm.encode_prompt("Q:abc"))
    lm.next_logprobs([root])
    forks = [lm.fork(root) for _ in range(3)]
    for f, block in zip(forks, [[1], [2, 3], [4, 5, 6]], strict=True):
        f.extend(block)
    rows = lm.block_logprobs(forks, [1, 2, 3])
    for f, got in zip(forks, rows, strict=True):
        assert_block(lm, f, got)
    assert len(root) == len(lm.encode_prompt("Q:abc"))  # the parent is untouched
    root.append(2)
    assert_next(lm, [root], lm.next_logprobs([root]))


def test_block_reuses_the_prefix_index(lm):
    first = lm.open(lm.encode_prompt("abcd abcd Q:"))
    lm.next_logprobs([first])
    lm.release(first)
    later = lm.open(first.ids + [1, 2, 3])
    lm.pop_counters()
    rows = lm.block_logprobs([later], [3])
    counts = lm.pop_counters()
    assert counts["reused_prompt_tokens"] == len(first.ids)
    assert counts["prefill_tokens"] == 3
    assert_block(lm, later, rows[0])


def test_crop_then_append_equals_recompute(lm):
    prompt = lm.encode_prompt("Q:abcd")
    ctx = lm.open(prompt)
    lm.next_logprobs([ctx])
    for tok in [1, 2, 3, 4, 5]:
        ctx.append(tok)
        lm.next_logprobs([ctx])
    other = lm.fork(ctx)  # shares the cache row and is not cropped
    lm.crop(ctx, len(prompt) + 2)
    assert ctx.ids == prompt + [1, 2]
    ctx.append(6)
    other.append(7)
    out = lm.next_logprobs([ctx, other])  # both in one step, then separately
    assert_next(lm, [ctx, other], out)
    ctx.append(1)
    assert_next(lm, [ctx], lm.next_logprobs([ctx]))
    other.append(2)
    assert_next(lm, [other], lm.next_logprobs([other]))
    # into the prompt, then a block on top
    lm.crop(ctx, 3)
    ctx.extend([4, 5, 6])
    assert_block(lm, ctx, lm.block_logprobs([ctx], [3])[0])
    # cropped state behaves exactly like a fresh context with those ids
    lm.crop(ctx, 4)
    fresh = lm.open(ctx.ids)
    a, b = lm.next_logprobs([ctx]), lm.next_logprobs([fresh])
    assert (a - b).abs().max().item() < TOL


def test_crop_at_or_beyond_the_cache_and_to_nothing(lm):
    ctx = lm.open(lm.encode_prompt("Q:ab"))
    lm.next_logprobs([ctx])
    n = len(ctx)
    ctx.extend([3, 4, 5])  # not processed yet
    lm.crop(ctx, n + 1)  # beyond what is cached
    assert ctx.state.n == n
    assert_next(lm, [ctx], lm.next_logprobs([ctx]))
    lm.crop(ctx, len(ctx))  # a no-op
    lm.crop(ctx, 100)  # also a no-op
    assert_next(lm, [ctx], lm.next_logprobs([ctx]))  # nothing new: recomputes the last
    lm.crop(ctx, 0)
    assert ctx.ids == [] and ctx.state is None
    ctx.extend([5, 1, 2])
    assert_next(lm, [ctx], lm.next_logprobs([ctx]))
    with pytest.raises(lc.errors.ModelError):
        lm.crop(ctx, -1)


def test_speculative_rounds(lm):
    """Draft k tokens per context, verify them in one block, keep a random prefix, repeat."""
    gen = torch.Generator().manual_seed(0)
    ctxs = [lm.open(lm.encode_prompt(p)) for p in ["Q:", "Q:abc", "ab"]]
    lm.next_logprobs(ctxs)
    for _ in range(6):
        drafts = [torch.randint(1, 8, (4,), generator=gen).tolist() for _ in ctxs]
        for ctx, d in zip(ctxs, drafts, strict=True):
            ctx.extend(d)
        rows = lm.block_logprobs(ctxs, 4)
        for ctx, got in zip(ctxs, rows, strict=True):
            assert_block(lm, ctx, got)
        for ctx in ctxs:
            lm.crop(ctx, len(ctx) - int(torch.randint(0, 4, (1,), generator=gen)))
    assert_next(lm, ctxs, lm.next_logprobs(ctxs))


def test_in_place_buffers_across_many_steps_and_forks(lm):
    if not hasattr(lm, "hf"):
        pytest.skip("transformers' in-place buffers")
    prompt = lm.encode_prompt("Q:abcd")
    ctxs = [lm.open(prompt) for _ in range(3)]
    lm.next_logprobs(ctxs)
    gen = torch.Generator().manual_seed(1)
    stores, grown = set(), 0
    for step in range(100):  # past the first buffer's headroom: it grows at least once
        for ctx in ctxs:
            ctx.append(int(torch.randint(1, 8, (1,), generator=gen)))
        before = ctxs[0].state.batch.store if step else None
        out = lm.next_logprobs(ctxs)
        store = ctxs[0].state.batch.store
        grown += before is not None and store is not before
        stores.add(id(store))
        if step % 33 == 0 or step == 99:
            assert_next(lm, ctxs, out)
    assert grown <= 2 and len(stores) <= 3  # in place almost every step
    # forks of the same batch stepping separately: the first writes in place, the second
    # finds the tip taken and copies
    a, b = [lm.fork(c) for c in ctxs], [lm.fork(c) for c in ctxs]
    for x, y in zip(a, b, strict=True):
        x.append(1)
        y.append(2)
    shared = a[0].state.batch.store
    out_a = lm.next_logprobs(a)
    assert a[0].state.batch.store is shared
    out_b = lm.next_logprobs(b)
    assert b[0].state.batch.store is not shared
    assert_next(lm, a, out_a)
    assert_next(lm, b, out_b)
    # and the originals (the batch both forks came from) still read right
    for ctx in ctxs:
        ctx.append(3)
    assert_next(lm, ctxs, lm.next_logprobs(ctxs))


def test_memory_budget_splits_blocks():
    small = tiny_lm(seed=1, memory_budget_gb=1e-6)
    ctxs = [small.open(small.encode_prompt(p)) for p in ["Q:", "Q:a", "Q:ab", "Q:abc"]]
    small.next_logprobs(ctxs)
    for ctx, block in zip(ctxs, [[1], [1, 2], [1, 2, 3], [4, 4]], strict=True):
        ctx.extend(block)
    rows = small.block_logprobs(ctxs, [1, 2, 3, 2])
    assert small.pop_counters()["oom_splits"] > 0
    for ctx, got in zip(ctxs, rows, strict=True):
        assert_block(small, ctx, got)


# -- ToyLM: the base defaults, exactly ----------------------------------------------------------


def toy():
    def table(ids):
        return [((7 * len(ids) + 3 * sum(ids) + j) % 5) / 2.0 for j in range(4)]

    return ToyLM(["a", "b", "c", "<eos>"], table)


def test_toy_block_and_crop_are_exact():
    model = toy()
    ctxs = [model.open([0]), model.open([1, 2, 0])]
    model.next_logprobs(ctxs)
    blocks = [[1, 1, 2], [2]]
    for ctx, block in zip(ctxs, blocks, strict=True):
        ctx.extend(block)
    rows = model.block_logprobs(ctxs, [4, 2])
    for ctx, got in zip(ctxs, rows, strict=True):
        m = len(got)
        want = [
            model.next_logprobs([Context(ctx.ids[: len(ctx) - m + j + 1])])[0] for j in range(m)
        ]
        assert torch.equal(got, torch.stack(want))
    fork = model.fork(ctxs[0])
    model.crop(ctxs[0], 2)
    assert ctxs[0].ids == [0, 1] and fork.ids == [0, 1, 1, 2]
    ctxs[0].append(2)
    assert torch.equal(model.next_logprobs([ctxs[0]]), model.next_logprobs([Context([0, 1, 2])]))
    assert torch.equal(model.next_logprobs([fork]), model.next_logprobs([Context([0, 1, 1, 2])]))
    assert model.block_logprobs([fork], 0)[0].shape == (0, 4)


# -- the default real model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    return lc.models.load("smollm2-135m", device="cpu")


def test_real_model_blocks_crop_and_forks(smol):
    ctxs = [smol.open(smol.encode_prompt(p)) for p in ["The sea was", "A lighthouse keeper"]]
    smol.next_logprobs(ctxs)
    ctxs.append(smol.fork(ctxs[0]))
    blocks = [smol.encode(" calm and"), smol.encode(" climbed"), smol.encode(" grey")]
    for ctx, block in zip(ctxs, blocks, strict=True):
        ctx.extend(block)
    rows = smol.block_logprobs(ctxs, [len(b) for b in blocks])
    for ctx, got in zip(ctxs, rows, strict=True):
        assert_block(smol, ctx, got)
    prefix = ctxs[0].ids[: len(ctxs[0].ids) - len(blocks[0])]
    assert (rows[0] - one_by_one(smol, prefix, blocks[0])).abs().max().item() < TOL
    smol.crop(ctxs[0], 2)  # into the prompt; ctxs[2] shared that row and is not cropped
    ctxs[0].extend(smol.encode(" wind"))
    for ctx in ctxs[1:]:
        ctx.append(smol.encode(" the")[0])
    assert_next(smol, ctxs, smol.next_logprobs(ctxs))


def test_long_rollbacks_compact_the_time_axis(lm):
    ctxs = [lm.open(lm.encode_prompt(p)) for p in ["Q:", "Q:ab"]]
    lm.next_logprobs(ctxs)
    for step in range(50):
        for ctx in ctxs:
            ctx.append(1 + step % 7)
        lm.next_logprobs(ctxs)
    hf = hasattr(lm, "hf")  # transformers: one padded time axis; llama.cpp: cells per token
    wide = ctxs[0].state.batch.width if hf else len(ctxs[0].state.slot.ids)
    lm.crop(ctxs[0], 6)
    lm.crop(ctxs[1], 10)
    for ctx in ctxs:
        ctx.append(3)
    out = lm.next_logprobs(ctxs)
    if hf:
        assert ctxs[0].state.batch.width < wide - 30  # masked columns were squeezed out
    else:
        assert len(ctxs[0].state.slot.ids) == 7 < wide  # the cropped cells left the slot
    assert_next(lm, ctxs, out)
    for ctx in ctxs:
        ctx.extend([4, 5])
    for ctx, got in zip(ctxs, lm.block_logprobs(ctxs, 3), strict=True):
        assert_block(lm, ctx, got)
