"""Integration tests on the real default model (installed by scripts/setup.sh)."""

import dataclasses
import subprocess
import sys

import pytest
import torch

import lmcascade as lc
from lmcascade.errors import ModelIntegrityError, ModelNotFoundError
from lmcascade.models import registry


@pytest.fixture(scope="module")
def smol():
    return lc.models.load("smollm2-135m", device="cpu")


def test_loaded_model_describes_itself(smol):
    assert smol.name == "smollm2-135m" and smol.device.type == "cpu"
    assert "smollm2-135m" in repr(smol) and smol.vocab_size == 49152
    assert smol.tokenizer.decode([smol.eos_id]) == "<|im_end|>"


def test_chain_of_thought_returns_text(smol):
    @lc.program
    def think_then_answer(question):
        thought = yield lc.gen(
            "thought", smol, smol.chat(question + " Think step by step."), max_tokens=24, stop="\n"
        )
        answer = yield lc.gen(
            "answer",
            smol,
            smol.chat(f"{question}\nReasoning: {thought}\nAnswer in one word."),
            max_tokens=8,
        )
        return answer.strip()

    r = lc.infer(
        think_then_answer("What colour is the sky?"), method="forward", num_samples=4, seed=0
    )
    assert all(isinstance(v, str) and v for v in r.values)
    assert r.stats["model_calls"] <= 24 + 8 + 2  # batched: one call per step, not per sample
    thought = r.traces[0]["thought"]
    assert len(thought.token_ids) <= 24 and "\n" not in thought.value


def test_rejection_with_a_simple_condition(smol):
    @lc.program
    def yes_or_no():
        reply = yield lc.gen(
            "reply", smol, smol.chat("Is water wet? Reply yes or no."), max_tokens=4
        )
        yield lc.condition("says_yes", "yes" in reply.lower())
        return reply

    r = lc.infer(yes_or_no(), method="rejection", num_samples=3, max_attempts=256, seed=0)
    assert len(r.values) == 3 and all("yes" in v.lower() for v in r.values)
    assert 0 < r.stats["acceptance_rate"] <= 1


def test_cached_logprobs_match_recompute_on_real_model(smol):
    prompts = [smol.chat("Hi"), smol.chat("Tell me about the sea, please.")]
    ctxs = [smol.open(smol.encode_prompt(p)) for p in prompts]
    smol.next_logprobs(ctxs)
    for ctx, tok in zip(ctxs, [504, 1032], strict=True):
        ctx.append(tok)
    out = smol.next_logprobs(ctxs)
    for ctx, row in zip(ctxs, out, strict=True):
        with torch.inference_mode():
            full = torch.log_softmax(smol.hf(input_ids=torch.tensor([ctx.ids])).logits[0, -1], -1)
        assert (row - full).abs().max().item() < 1e-4


def test_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LMCASCADE_HOME", str(tmp_path))
    bad = dataclasses.replace(registry.MODELS["smollm2-135m"], sha256="0" * 64)
    with pytest.raises(ModelIntegrityError, match="SHA-256.*lmcascade models fetch smollm2-135m"):
        registry.convert("smollm2-135m", spec=bad)
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_missing_model_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LMCASCADE_HOME", str(tmp_path))
    ghost = dataclasses.replace(
        registry.MODELS["qwen2.5-coder-0.5b"],
        name="ghost-model",
        parts=(("lmcascade_no_such_package", "data/part01.bin"),),
    )
    monkeypatch.setitem(registry.MODELS, "ghost-model", ghost)
    with pytest.raises(ModelNotFoundError, match="lmcascade models fetch ghost-model"):
        lc.models.load("ghost-model")
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope'.*smollm2-135m"):
        lc.models.load("nope")


def test_cli_models_list():
    done = subprocess.run(
        [sys.executable, "-m", "lmcascade.cli", "models", "list"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0
    assert "smollm2-135m" in done.stdout and "(default)" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "lmcascade.cli", "models", "fetch", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "unknown model 'nope'" in bad.stderr
