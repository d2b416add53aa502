"""Language models: the protocol, the exact toy model, and (with the ``hf`` extra) transformers."""

from lmcascade.models.base import Context, LanguageModel, Tokenizer
from lmcascade.models.toy import ToyLM, ToyTokenizer

__all__ = ["Context", "LanguageModel", "Tokenizer", "ToyLM", "ToyTokenizer"]
