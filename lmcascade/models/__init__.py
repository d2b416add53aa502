"""Language models: the protocol, the exact toy model, transformers models and the registry.

``TransformersLM`` and ``load`` need the ``hf`` extra, ``LlamaCppLM`` (``load(...,
backend="llamacpp")``) the ``llamacpp`` extra; they are imported on first use so that
``import lmcascade`` stays light.

>>> from lmcascade import models
>>> models.DEFAULT_MODEL
'smollm2-135m'
"""

from typing import Any

from lmcascade.models.base import Context, LanguageModel, Tokenizer
from lmcascade.models.registry import DEFAULT_MODEL, MODELS, fetch, load
from lmcascade.models.restricted import RestrictedLM, frequent_tokens, restrict_head
from lmcascade.models.toy import ToyLM, ToyTokenizer

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "Context",
    "LanguageModel",
    "LlamaCppLM",
    "RestrictedLM",
    "Tokenizer",
    "ToyLM",
    "ToyTokenizer",
    "TransformersLM",
    "fetch",
    "frequent_tokens",
    "load",
    "restrict_head",
]


def __getattr__(name: str) -> Any:
    if name == "TransformersLM":
        from lmcascade.models.hf import TransformersLM

        return TransformersLM
    if name == "LlamaCppLM":
        from lmcascade.models.llamacpp import LlamaCppLM

        return LlamaCppLM
    raise AttributeError(f"module 'lmcascade.models' has no attribute {name!r}")
