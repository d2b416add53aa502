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
)
from lmcascade.inference.base import InferenceMethod, infer, methods, register

__all__ = ["InferenceMethod", "infer", "methods", "register"]
