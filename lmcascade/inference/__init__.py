"""Inference methods, each registered under a short name for :func:`lmcascade.infer`."""

from lmcascade.inference import (  # noqa: F401
    beam,
    enumerate,
    forward,
    importance,
    mcmc,
    priority,
    rejection,
    smc,
    speculative,
)
from lmcascade.inference.base import InferenceMethod, infer, methods, register
from lmcascade.samplers.speculative import PromptLookup, Speculative

__all__ = [
    "InferenceMethod",
    "PromptLookup",
    "Speculative",
    "infer",
    "methods",
    "register",
]
