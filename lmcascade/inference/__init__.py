"""Inference methods, each registered under a short name for :func:`lmcascade.infer`."""

from lmcascade.inference import enumerate, forward, importance, rejection, smc  # noqa: F401
from lmcascade.inference.base import InferenceMethod, infer, methods, register

__all__ = ["InferenceMethod", "infer", "methods", "register"]
