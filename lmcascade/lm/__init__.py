"""Generating and scoring text under LM distributions: the run state machine, the
detokeniser, next-token shaping, the batched step and teacher-forced scoring."""

from lmcascade.lm.detok import Detokenizer
from lmcascade.lm.run import LMRun

__all__ = ["Detokenizer", "LMRun"]
