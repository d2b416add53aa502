"""The tiny random-weight Llama of :mod:`tiny_hf`, written as a GGUF file for llama.cpp.

Same weights, same seven-character vocabulary (plus eos), fp32: llama.cpp's log-probs on it
agree with ``tiny_hf.tiny_lm`` to float rounding, so every exactness test that runs on the
tiny HF model can run on the llama.cpp backend too.
"""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path

import numpy as np
from tiny_hf import CHARS, tiny_hf_model, tiny_lm

EOS = "<eos>"


def _byte_level(ch: str) -> str:
    """GPT-2's printable stand-in for a one-byte character (a space is 'Ġ')."""
    return "\u0120" if ch == " " else ch


def _rope_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF keeps q/k rows in rotate-half order; llama.cpp's llama graph expects them
    interleaved (the same permutation llama.cpp's converter applies)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_tiny_gguf(path: str | Path, seed: int = 0, layers: int = 2) -> Path:
    """Writes ``tiny_hf_model(seed, layers)`` to ``path`` as a llama GGUF and returns it."""
    import gguf

    model = tiny_hf_model(seed, layers)
    cfg = model.config
    path = Path(path)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"tiny-llama-{seed}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(getattr(cfg, "rope_theta", None) or 10000.0)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = [EOS, *[_byte_level(ch) for ch in CHARS]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * len(CHARS))
    w.add_token_merges(["x y"])  # llama.cpp wants merges; this one never applies
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", state[p + "input_layernorm.weight"])
        w.add_tensor(
            b + "attn_q.weight", _rope_permute(state[p + "self_attn.q_proj.weight"], heads)
        )
        w.add_tensor(
            b + "attn_k.weight", _rope_permute(state[p + "self_attn.k_proj.weight"], kv_heads)
        )
        w.add_tensor(b + "attn_v.weight", state[p + "self_attn.v_proj.weight"])
        w.add_tensor(b + "attn_output.weight", state[p + "self_attn.o_proj.weight"])
        w.add_tensor(b + "ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
        w.add_tensor(b + "ffn_gate.weight", state[p + "mlp.gate_proj.weight"])
        w.add_tensor(b + "ffn_up.weight", state[p + "mlp.up_proj.weight"])
        w.add_tensor(b + "ffn_down.weight", state[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    w.add_tensor("output.weight", state["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


BACKENDS = ["transformers", "llamacpp"]


@cache
def _gguf_path(seed: int) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="lmcascade-tiny-gguf-"))
    return write_tiny_gguf(folder / f"tiny-{seed}.gguf", seed)


def tiny_llama(seed: int = 0, **kwargs):
    """A LlamaCppLM on the tiny GGUF (fp32 cache, no flash attention: within float rounding
    of ``tiny_lm(seed)``, which it carries as ``twin``, the reference for checks)."""
    from lmcascade.models.llamacpp import LlamaCppLM

    options = {"kv_type": "f32", "flash_attention": False, "threads": 1, **kwargs}
    lm = LlamaCppLM(_gguf_path(seed), name=f"tiny-gguf-{seed}", **options)
    lm.twin = tiny_lm(seed)
    return lm


def tiny_model(seed: int = 0, backend: str = "transformers"):
    """The tiny model on ``backend`` (the test is skipped where llama.cpp is not installed)."""
    import pytest

    if backend == "transformers":
        return tiny_lm(seed)
    pytest.importorskip("llama_cpp")
    return tiny_llama(seed)


def reference(lm):
    """The transformers model that computes what ``lm`` computes (itself, or its twin)."""
    return getattr(lm, "twin", lm)
