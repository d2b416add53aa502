"""A tiny random-weight Hugging Face model, built offline, small enough to enumerate."""

from __future__ import annotations

from functools import cache

import torch

CHARS = ["a", "b", "c", "d", "Q", ":", " "]


@cache
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{ch: i + 1 for i, ch in enumerate(CHARS)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_hf_model(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(CHARS) + 1,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.4,
        tie_word_embeddings=False,
        eos_token_id=0,
        bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_lm(seed: int = 0, **kwargs):
    from lmcascade.models.hf import TransformersLM

    return TransformersLM(
        tiny_hf_model(seed), tiny_tokenizer(), name=f"tiny-llama-{seed}", device="cpu", **kwargs
    )
