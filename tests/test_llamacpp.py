"""LlamaCppLM (llama.cpp): its cache against fresh evaluation, the default model against
llama.cpp's own generation and TransformersLM, the registry's GGUF, and bad input.

The exactness of every inference method on this backend is checked where the tiny HF model's
is: ``test_hf``, ``test_kv_blocks``, ``test_mcmc``, ``test_speculative``, ``test_diverse`` and
``test_infer_many`` run their tiny-model tests on both backends (``tiny_gguf.BACKENDS``).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
from pathlib import Path

import pytest
import torch
from tiny_gguf import _gguf_path, tiny_llama

import lmcascade as lc
from lmcascade.errors import ModelError, ModelIntegrityError, ModelNotFoundError
from lmcascade.models import Context, registry
from stats import assert_matches, one_draw_per_run

llama_cpp = pytest.importorskip("llama_cpp")

from lmcascade.models.llamacpp import LlamaCppLM, physical_cores  # noqa: E402


def fresh_logprobs(model: LlamaCppLM, ids: list[int]) -> torch.Tensor:
    """The next-token log-probs of ``ids`` computed from nothing (an emptied cache)."""
    model.clear_cache()
    return model.next_logprobs([model.open(ids)])[0]


def random_walk(lm, check, steps: int, seed: int, start: list[str], vocab: range) -> int:
    """Drives ``lm`` through forks, crops, multi-token appends, releases and re-opened
    prompts (recycling sequences), calling ``check(contexts, logprobs)`` after every step;
    returns the number of contexts checked."""
    rng = random.Random(seed)
    ctxs = [lm.open(lm.encode_prompt(p)) for p in start]
    checked = 0
    for _ in range(steps):
        op = rng.random()
        if op < 0.25 and len(ctxs) < 24:
            ctxs += [lm.fork(rng.choice(ctxs)) for _ in range(rng.randint(1, 3))]
        elif op < 0.4:
            c = rng.choice(ctxs)
            lm.crop(c, max(1, len(c) - rng.randint(1, 5)))
        elif op < 0.5 and len(ctxs) > 2:
            gone = ctxs.pop(rng.randrange(len(ctxs)))
            lm.release(gone)  # its sequence is parked; a prompt extending it reuses it
            ctxs.append(lm.open(gone.ids + [rng.choice(vocab)]))
        for c in ctxs:
            c.extend([rng.choice(vocab) for _ in range(rng.choice([1, 1, 2, 4]))])
        check(ctxs, lm.next_logprobs(ctxs))
        checked += len(ctxs)
    return checked


# --- the cache, on the tiny GGUF -------------------------------------------------------------


def test_cache_equals_fresh_evaluation_across_forks_crops_blocks_and_recycling():
    """fp32 cache, no flash attention: llama.cpp's result for a token does not depend on the
    batch it is computed in (measured: 6e-6), so any bookkeeping slip — a wrong cell, a stale
    copy, a crop that left cells behind — shows up as an O(1) error.  A 64-cell start forces
    the cache to be rebuilt larger mid-walk; 300 sequences at once spread over two lanes."""
    lm = tiny_llama(0, n_ctx=64, batch_tokens=64)
    fresh = tiny_llama(0)
    worst = []

    def check(ctxs, out):
        for c, row in zip(ctxs, out, strict=True):
            worst.append((row - fresh_logprobs(fresh, c.ids)).abs().max().item())

    assert random_walk(lm, check, 60, seed=0, start=["Q:", "Q:ab", "abcd Q:"], vocab=range(1, 8))
    counts = lm.pop_counters()
    assert counts["cache_rebuilds"] >= 1 and counts["reused_prompt_tokens"] > 0
    many = [lm.open([5, 6] + [1 + i // 7**k % 7 for k in range(3)]) for i in range(300)]
    out = lm.next_logprobs(many)
    assert len(lm._lanes) >= 2
    check(many[::7], out[::7])
    assert max(worst) < 1e-4, max(worst)


def test_default_settings_stay_within_llama_cpps_own_spread():
    """The default settings (f16 cache, flash attention as llama.cpp decides: on, on a CPU;
    what users get): a token's result then depends on where its cells lie and what it is
    batched with, in llama.cpp itself.  Measured with the bare API on this model: a prompt
    continued in cells freed by another sequence differs from the prompt computed at once by
    up to 0.018 in log-prob over 300 random cases (2.5e-4 without flash attention).  Over this
    walk, which lays cells out far more variously: 0.033 (5e-4 without flash attention), so
    the bound is 0.1; a bookkeeping error (a wrong cell seen or missed) is O(1)."""
    path = _gguf_path(0)
    lm, fresh = LlamaCppLM(path, threads=1, n_ctx=64), LlamaCppLM(path, threads=1)
    worst = []

    def check(ctxs, out):
        for c, row in zip(ctxs, out, strict=True):
            worst.append((row - fresh_logprobs(fresh, c.ids)).abs().max().item())

    random_walk(lm, check, 40, seed=1, start=["Q:", "abcd Q:"], vocab=range(1, 8))
    assert max(worst) < 0.1, max(worst)


def test_sequences_are_recycled_and_idle_ones_evicted():
    lm = tiny_llama(0)
    base = lm.encode_prompt("Q:ab")
    for i in range(600):  # far more contexts than sequences, opened and released one by one
        c = lm.open(base + [1 + i % 7])
        lm.next_logprobs([c])
        lm.release(c)
    assert len(lm._lanes) == 1  # parked sequences were reused, no new lane
    held = [lm.open(base + [1 + i // 7**k % 7 for k in range(3)]) for i in range(256)]
    lm.next_logprobs(held)  # every sequence of the lane held (idle after this step)
    newcomer = lm.open(lm.encode_prompt("dd:"))
    row = lm.next_logprobs([newcomer])[0]
    assert lm.pop_counters().get("evicted_sequences", 0) >= 1  # an idle one made room
    fresh = tiny_llama(0)
    assert (row - fresh_logprobs(fresh, newcomer.ids)).abs().max() < 1e-4
    for c in held[:3]:  # evicted or not, every context still computes right
        c.append(2)
    for c, row in zip(held[:3], lm.next_logprobs(held[:3]), strict=True):
        assert (row - fresh_logprobs(fresh, c.ids)).abs().max() < 1e-4


def test_new_prompts_in_one_step_compute_their_shared_tokens_once():
    """Prompts that start alike, opened together, share the cells of their common tokens (a
    token of several sequences): some cached from an earlier step, some identical, some a
    prefix of another, scored over several positions, and 300 of them over two lanes.  Each
    row equals a fresh evaluation (fp32 cache: within 1e-4), and the shared tokens were
    computed once."""
    lm, fresh = tiny_llama(0), tiny_llama(0)
    rng = random.Random(3)
    stem = lm.encode_prompt("abcd Q:")
    lm.next_logprobs([lm.open(stem[:3])])  # a cached prefix some prompts copy
    for n in (40, 300):
        prompts = []
        for i in range(n):  # a random start of the stem, then (mostly) a tail of their own
            tail = [1 + i // 7**k % 7 for k in range(3)] if i % 10 else []
            prompts.append(stem[: rng.randint(1, len(stem))] + tail)
        ctxs = [lm.open(p) for p in prompts]
        counts = [rng.randint(1, len(p)) if rng.random() < 0.3 else 1 for p in prompts]
        lm.pop_counters()
        rows = lm.block_logprobs(ctxs, counts)
        done = lm.pop_counters()
        distinct = {tuple(p) for p in prompts}
        assert done["shared_prompt_tokens"] > 0
        assert done["prefill_tokens"] < sum(map(len, distinct))
        for ctx, m, row in zip(ctxs, counts, rows, strict=True):
            ks = range(len(ctx.ids) - m + 1, len(ctx.ids) + 1)
            want = torch.stack([fresh_logprobs(fresh, ctx.ids[:k]) for k in ks])
            assert (row - want).abs().max() < 1e-4
        for ctx in ctxs:  # and each context goes on alone from its shared cells
            ctx.append(rng.randint(1, 7))
        for ctx, row in zip(ctxs[:60], lm.next_logprobs(ctxs[:60]), strict=True):
            assert (row - fresh_logprobs(fresh, ctx.ids)).abs().max() < 1e-4
    assert len(lm._lanes) == 2


def test_a_step_retried_for_room_plans_its_new_prompts_anew():
    """A step that runs out of cells is retried after making room; its new prompts must be
    new again then (not contexts holding the failed attempt's sequences), or the retry
    computes their shared tokens once per prompt, needs more cells and grows the cache.
    Four prompts sharing 200 tokens need 232 of the 256 cells once a parked sequence (30
    tokens) is dropped."""
    lm, fresh = tiny_llama(0, n_ctx=64, batch_tokens=64), tiny_llama(0)
    rng = random.Random(0)
    old = lm.open([1] + [rng.randint(1, 7) for _ in range(29)])
    lm.next_logprobs([old])
    lm.release(old)  # parked
    stem = [7, 7] + [rng.randint(1, 7) for _ in range(198)]
    ctxs = [lm.open(stem + [1 + i] * 8) for i in range(4)]
    lm.pop_counters()
    rows = lm.next_logprobs(ctxs)
    done = lm.pop_counters()
    assert done["room_dropped_parked"] == 1 and "cache_rebuilds" not in done, done
    assert done["shared_prompt_tokens"] == 3 * 200 and lm.cached_cells == 256
    for ctx, row in zip(ctxs, rows, strict=True):
        assert (row - fresh_logprobs(fresh, ctx.ids)).abs().max() < 1e-4


def test_a_step_refused_for_a_bad_token_leaves_its_new_prompts_new():
    """A token outside the vocabulary is refused before anything is decoded; the other new
    prompts of that step stay new (planned and shared afresh next time) and compute right."""
    lm, fresh = tiny_llama(0), tiny_llama(0)
    stem = lm.encode_prompt("abcd Q:")
    good = [lm.open(stem + [1]), lm.open(stem + [2])]
    for bad in (99999, float("nan"), -1):
        with pytest.raises(ModelError, match="outside the vocabulary"):
            lm.next_logprobs([*good, lm.open([*stem, bad])])
    lm.pop_counters()
    rows = lm.next_logprobs(good)
    assert lm.pop_counters()["shared_prompt_tokens"] == len(stem)
    for ctx, row in zip(good, rows, strict=True):
        assert (row - fresh_logprobs(fresh, ctx.ids)).abs().max() < 1e-4


def test_path_scoring_leaves_the_contexts_alone():
    lm = tiny_llama(0)
    ctx = lm.open(lm.encode_prompt("Q:ab"))
    before = lm.next_logprobs([ctx])[0]
    rows = lm.path_logprobs([ctx, ctx], [[1, 2, 3], [4]])
    assert [r.shape[0] for r in rows] == [3, 1]
    assert (rows[0][0] - before).abs().max() < 1e-5
    assert (lm.next_logprobs([ctx])[0] - before).abs().max() < 1e-5
    assert ctx.ids == lm.encode_prompt("Q:ab")


def test_an_smc_population_on_the_tiny_gguf_matches_enumeration():
    """SMC with resampling (forks of sequences every step) against exact enumeration: one
    draw per run from 300 runs of 8 particles (i.i.d. draws from SMC's sampling distribution,
    whose bias at N = 8 is far below what 300 draws detect).  Chi-square, false-alarm rate
    <= 1e-3; detects TV >= 0.2 with probability 0.9.  Checked that it can fail: with the
    ancestral sampler drawing at temperature 1.25 (patched for the check only) it fails, as
    do the other tiny-model sampling tests on this backend."""
    lm = tiny_llama(0)

    @lc.program
    def constrained():
        text = yield lc.gen("text", lm, "Q:", max_tokens=3)
        yield lc.condition("has_c", "c" in text)
        return text

    exact = lc.infer(constrained(), method="enumerate").distribution()
    runs = [
        lc.infer(constrained(), method="smc", particles=8, seed=s, progress=False)
        for s in range(300)
    ]
    result = assert_matches(one_draw_per_run(runs, seed=1), exact)
    assert result.detectable_tv <= 0.25, str(result)


def test_beam_search_on_the_tiny_gguf_is_the_exact_top_k():
    lm = tiny_llama(0)

    @lc.program
    def text():
        return (yield lc.gen("t", lm, "Q:", max_tokens=2))

    exact = lc.infer(text(), method="enumerate")
    beam = lc.infer(text(), method="beam", beam_width=len(exact.values), progress=False)
    want = sorted(zip(exact.log_weights, exact.values, strict=True), reverse=True)
    assert beam.values[:5] == [v for _, v in want[:5]]
    for got, (lw, _) in zip(beam.log_weights, want, strict=True):
        assert abs(got - lw) < 1e-5


# --- the default model ---------------------------------------------------------------------


def llama_cpp_greedy(lm: LlamaCppLM, ids: list[int], limit: int) -> list[int]:
    """Greedy generation by llama.cpp alone: its own context (llama.cpp's defaults: f16
    cache, flash attention as llama.cpp decides; 512 cells), the prompt in one decode, then
    llama.cpp's greedy sampler and one decode per token."""
    L = llama_cpp
    params = L.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 512
    params.n_threads = params.n_threads_batch = lm.threads
    ctx = L.llama_init_from_model(lm._model, params)
    sampler = L.llama_sampler_init_greedy()
    batch = L.llama_batch_init(512, 0, 1)
    try:
        out: list[int] = []
        todo, pos = list(ids), 0
        while len(out) < limit:
            batch.n_tokens = len(todo)
            for j, tok in enumerate(todo):
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = tok, pos + j, 1
                batch.seq_id[j][0], batch.logits[j] = 0, j == len(todo) - 1
            assert L.llama_decode(ctx, batch) == 0
            pos += len(todo)
            tok = L.llama_sampler_sample(sampler, ctx, -1)
            if tok == lm.eos_id:
                break
            out.append(tok)
            todo = [tok]
        return out
    finally:
        L.llama_batch_free(batch)
        L.llama_sampler_free(sampler)
        L.llama_free(ctx)


@pytest.fixture(scope="module")
def smol():
    if not registry.is_installed(registry.DEFAULT_MODEL):
        pytest.skip("the default model is not installed")
    return lc.models.load("smollm2-135m", backend="llamacpp")


def test_greedy_equals_llama_cpps_own_greedy_generation(smol):
    """lmcascade's greedy decoding on LlamaCppLM against llama.cpp's own greedy generation
    (its greedy sampler, in a context of its own), token for token.  Both compute the prompt in one
    decode and then one token per decode: with an f16 cache llama.cpp's numbers depend on
    how tokens are batched (a prompt computed in two parts, or several sequences in one
    batch, can flip a near-tie), so the model is loaded afresh (no cached prefixes)."""
    lm = lc.models.load("smollm2-135m", backend="llamacpp")
    prompt = lm.chat("Name three colours.")
    want = llama_cpp_greedy(lm, lm.encode_prompt(prompt), 32)

    @lc.program
    def greedy():
        return (yield lc.gen("answer", lm, prompt, max_tokens=32, temperature=0))

    one = lc.infer(greedy(), method="forward", num_samples=1, progress=False)
    assert list(one.traces[0]["answer"].token_ids) == want
    assert one.values[0] == lm.decode(want)


def test_log_probs_agree_with_transformers_within_quantisation(smol):
    """The same Q4_1 GGUF: transformers dequantises the weights to fp32; llama.cpp keeps them
    quantised and quantises activations to 8 bits for its products.  Teacher-forced over a
    greedy answer, measured: top-1 tokens agree at 15 of 16 positions (a near-tie flips),
    total variation 0.083 at the first position and under 0.01 at the others, and |log p| differences at most 0.41 on tokens either model gives at
    least 1e-3 (far-tail tokens differ by more, up to about 1.3)."""
    hf = lc.models.load("smollm2-135m")
    prompt = smol.chat("What is the capital of France?")
    assert smol.encode_prompt(prompt) == hf.encode_prompt(prompt)
    a, b = smol.open(smol.encode_prompt(prompt)), hf.open(hf.encode_prompt(prompt))
    tvs, heads = [], []
    agree = 0
    for _ in range(16):
        la, lb = smol.next_logprobs([a])[0], hf.next_logprobs([b])[0]
        agree += int(la.argmax()) == int(lb.argmax())
        tvs.append(0.5 * (la.exp() - lb.exp()).abs().sum().item())
        likely = (la.exp() > 1e-3) | (lb.exp() > 1e-3)
        heads.append((la - lb)[likely].abs().max().item())
        a.append(int(lb.argmax()))
        b.append(int(lb.argmax()))
    assert agree >= 14 and max(tvs) < 0.12 and max(heads) < 0.6, (agree, max(tvs), max(heads))


def test_tokenizer_and_chat_agree_with_transformers(smol):
    hf = lc.models.load("smollm2-135m")
    texts = ["Hello, world!", "  two spaces\nand a newline", "héllo ünïcode 🙂", "<|im_start|>x"]
    for text in texts:
        assert smol.encode(text) == hf.encode(text), text
        assert smol.decode(smol.encode(text)) == hf.decode(hf.encode(text))
    assert smol.chat("Hi", system="Be brief.") == hf.chat("Hi", system="Be brief.")
    ours, theirs = smol.token_bytes(), hf.token_bytes()
    differ = [i for i, (x, y) in enumerate(zip(ours, theirs, strict=True)) if x != y]
    # llama.cpp marks the tokenizer's added control tokens (<file_sep>...) as control: no text
    assert all(
        ours[i] is None and smol._l.llama_vocab_is_control(smol._vocab_ptr, i) for i in differ
    )
    assert len(differ) < 20


def test_threads_default_to_physical_cores_and_logs_are_silent(capfd):
    lm = LlamaCppLM(_gguf_path(0))
    lm.next_logprobs([lm.open(lm.encode_prompt("Q:"))])
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert lm.threads == physical_cores() >= 1


# --- loading --------------------------------------------------------------------------------


def test_load_by_name_file_and_auto(smol, tmp_path):
    assert smol.recipe.kwargs["backend"] == "llamacpp"
    assert smol.path == registry.gguf_file("smollm2-135m")  # the installed file, no copy
    tiny = _gguf_path(0)
    by_path = lc.models.load(str(tiny), backend="llamacpp")
    assert isinstance(by_path, LlamaCppLM) and by_path.recipe.args == (str(tiny.resolve()),)
    auto = lc.models.load(str(tiny), backend="auto")  # a .gguf file: llama.cpp
    assert isinstance(auto, LlamaCppLM)
    want = "transformers" if torch.cuda.is_available() else "llamacpp"
    assert registry.resolve_backend("auto") == want
    assert registry.resolve_backend("auto", device="cuda") == "transformers"
    twin = by_path.recipe.make()  # how a Ray worker makes it
    ids = twin.encode_prompt("Q:ab")
    assert torch.equal(
        twin.next_logprobs([twin.open(ids)]), by_path.next_logprobs([by_path.open(ids)])
    )


def test_load_errors_name_the_fix(tmp_path):
    tiny = _gguf_path(0)
    with pytest.raises(ModelError, match="unknown backend"):
        lc.models.load("smollm2-135m", backend="llama")
    with pytest.raises(ModelError, match="runs on the CPU"):
        lc.models.load(str(tiny), backend="llamacpp", device="cuda")
    with pytest.raises(ModelError, match="dtype"):
        lc.models.load(str(tiny), backend="llamacpp", dtype="bf16")
    with pytest.raises(ModelError, match="backend='llamacpp'"):
        lc.models.load(str(tiny))  # a file, on transformers
    with pytest.raises(ModelNotFoundError, match="GGUF"):
        lc.models.load(str(tmp_path), backend="llamacpp")  # a folder
    with pytest.raises(ModelNotFoundError, match="registered"):
        lc.models.load(str(tiny), backend="llamacpp", allow_paths=False)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 100)
    with pytest.raises(ModelError, match="cannot load"):
        LlamaCppLM(junk)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.read_bytes()[:5000])
    with pytest.raises(ModelError, match="cannot load"):
        LlamaCppLM(cut)
    with pytest.raises(ModelError, match="no GGUF file"):
        LlamaCppLM(tmp_path / "missing.gguf")


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"kv_type": "f8"}, "kv_type"),
        ({"n_ctx": 0}, "n_ctx"),
        ({"batch_tokens": 2.5}, "batch_tokens"),
        ({"threads": "2"}, "threads"),
        ({"max_cache_gb": float("nan")}, "max_cache_gb"),
        ({"max_cache_gb": -1}, "max_cache_gb"),
    ],
)
def test_bad_options(option, match):
    with pytest.raises(ModelError, match=match):
        LlamaCppLM(_gguf_path(0), **option)


def test_bad_use_gets_clear_errors():
    lm = tiny_llama(0)
    with pytest.raises(TypeError, match="recipe"):
        pickle.dumps(lm)
    with pytest.raises(ModelError, match="at least one token"):
        lm.next_logprobs([Context([])])
    with pytest.raises(ModelError, match="longer than"):
        lm.next_logprobs([lm.open([1] * 300)])  # the tiny model holds 256
    with pytest.raises(ModelError, match="outside the vocabulary"):
        lm.decode([99])
    with pytest.raises(ModelError, match="fewer than one cache"):
        tiny_llama(0, max_cache_gb=1e-6)
    per_token = 2 * 2 * 2 * 8 * 4  # layers, keys and values, kv heads, head size, fp32
    small = tiny_llama(0, n_ctx=256, max_cache_gb=600 * per_token / 2**30)  # one 512-cell cache
    long = [small.open([1 + (i + j) % 7 for i in range(200)]) for j in range(4)]
    with pytest.raises(ModelError, match="max_cache_gb"):
        small.next_logprobs(long)
    assert small.next_logprobs(long[:2]).shape == (2, 8)  # a step that fits still runs


def test_registered_gguf_is_checked_once_and_joined_from_parts(tmp_path, monkeypatch):
    """A model shipped in parts is joined once (SHA-256 checked, a stamp recorded); later
    loads only stat it; a damaged single-part file is refused with the fix."""
    monkeypatch.setenv("LMCASCADE_HOME", str(tmp_path / "home"))
    data = _gguf_path(0).read_bytes()
    pkg = tmp_path / "site" / "tinyparts"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    half = len(data) // 2
    (pkg / "data" / "part01.bin").write_bytes(data[:half])
    (pkg / "data" / "part02.bin").write_bytes(data[half:])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = registry.ModelSpec(
        name="tiny-parts",
        description="test",
        license="-",
        packages=("tinyparts==0",),
        parts=(("tinyparts", "data/part01.bin"), ("tinyparts", "data/part02.bin")),
        gguf_name="tiny.gguf",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )
    monkeypatch.setitem(registry.MODELS, "tiny-parts", spec)
    first = registry.gguf_file("tiny-parts")
    assert first.read_bytes() == data and first.parent == tmp_path / "home" / "models" / "gguf"
    stamp = json.loads((first.parent / "tiny-parts.json").read_text())
    assert stamp["sha256"] == spec.sha256
    mtime = first.stat().st_mtime_ns
    lm = lc.models.load("tiny-parts", backend="llamacpp", threads=1)
    assert lm.path == first and first.stat().st_mtime_ns == mtime  # not joined again
    # one part: read in place; damage is refused with the fix
    single = registry.ModelSpec(
        **{**spec.__dict__, "name": "tiny-one", "parts": (("tinyparts", "data/one.bin"),)}
    )
    (pkg / "data" / "one.bin").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    monkeypatch.setitem(registry.MODELS, "tiny-one", single)
    with pytest.raises(ModelIntegrityError, match="fetch tiny-one --force"):
        registry.gguf_file("tiny-one")


def test_text_programs_and_the_cli_pick_the_backend(smol, capsys):
    from lmcascade.cli import main

    source = (
        'model lm = "smollm2-135m"\nprogram one() {\n  a ~ lm("Hi", max_tokens=2)\n  return a\n}\n'
    )
    progs = lc.load(source=source, model_backend="llamacpp")
    result = lc.infer(progs.one(), method="forward", num_samples=2, seed=0, progress=False)
    assert len(result.values) == 2
    args = ["run", "examples/lmc/verify.lmc", "--input", "a=1", "--input", "b=2"]
    root = Path(__file__).parent.parent
    args[1] = str(root / args[1])
    code = main([*args, "--model-backend", "llamacpp", "--particles", "2", "--seed", "0"])
    assert code == 0 and "forward_passes" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--model-backend", "llama"])


# --- found by review: lifetimes, interruptions, abandoned contexts -----------------------------


def test_tokenizer_outlives_model_and_closed_models_refuse_use():
    tok = tiny_llama(0).tokenizer  # the model object is gone; the tokenizer keeps llama's
    assert tok.decode(tok.encode("Q:ab")) == "Q:ab"
    with pytest.raises(ModelError, match="outside the vocabulary"):
        tok.piece(10**6)
    lm = tiny_llama(0)
    lm.close()
    for use in (lambda: lm.encode("Q"), lambda: lm.next_logprobs([Context([1])])):
        with pytest.raises(ModelError, match="closed"):
            use()


def test_an_interrupted_step_leaves_the_model_correct(monkeypatch):
    """Ctrl-C (or any error) between two decodes of a step rolls every sequence back."""
    lm, fresh = tiny_llama(0, batch_tokens=8), tiny_llama(0)
    ctxs = [lm.open([5, 6, 1 + i % 7, 2]) for i in range(6)]
    lm.next_logprobs(ctxs)
    real, calls = llama_cpp.llama_decode, []

    def flaky(ctx, batch):  # the second decode of the step is interrupted
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(ctx, batch)

    for c in ctxs:
        c.extend([3, 4, 1])
    monkeypatch.setattr(llama_cpp, "llama_decode", flaky)
    with pytest.raises(KeyboardInterrupt):
        lm.next_logprobs(ctxs + [lm.open([2, 2, 2, 2, 2, 2, 2, 2, 2])])
    monkeypatch.setattr(llama_cpp, "llama_decode", real)
    for c, row in zip(ctxs, lm.next_logprobs(ctxs), strict=True):
        assert (row - fresh_logprobs(fresh, c.ids)).abs().max() < 1e-4
    bad = lm.open([1, 2, 99])
    with pytest.raises(ModelError, match="token id 99"):
        lm.next_logprobs([ctxs[0], bad])
    ctxs[0].append(2)
    assert (lm.next_logprobs([ctxs[0]])[0] - fresh_logprobs(fresh, ctxs[0].ids)).abs().max() < 1e-4


def test_abandoned_contexts_free_their_sequences():
    """Contexts dropped without release (a run stopped by an error) give their sequences
    back when they are garbage-collected; a full cache evicts idle ones before growing."""
    lm = tiny_llama(0, n_ctx=512)
    for i in range(40):  # 40 x 100 distinct tokens would not fit 512 cells if kept
        ctx = lm.open([1 + (i + j) % 7 for j in range(100)])
        lm.next_logprobs([ctx])
        del ctx
    assert lm.cached_cells == lm._lanes[0].cells == 512  # never grown
    live = sum(1 for s in lm._lanes[0].slots.values() if s.refs > 0)
    assert live <= 1


def test_a_llama_cpp_draft_for_a_transformers_target(smol):
    """The same GGUF on both backends shares one vocabulary (control tokens aside)."""
    hf = lc.models.load("smollm2-135m")

    @lc.program
    def text():
        return (yield lc.gen("t", hf, hf.chat("Say hi."), max_tokens=6, temperature=0))

    fast = lc.infer(text(), method="speculative", draft=smol, num_samples=1, progress=False)
    plain = lc.infer(text(), method="forward", num_samples=1, progress=False)
    assert fast.values == plain.values
    with pytest.raises(ModelError, match="no option 'memory_budget_gb'"):
        lc.models.load("smollm2-135m", backend="llamacpp", memory_budget_gb=1)
