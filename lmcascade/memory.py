"""How much memory a run may use, so that a population too big to fit fails before it starts.

>>> available_memory("cpu") is None or available_memory("cpu") > 0
True
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from lmcascade.errors import ModelError


def available_memory(device: Any = "cpu") -> int | None:
    """Bytes free now on ``device``: a CUDA device's free memory, else the host's (Linux:
    MemAvailable, and no more than a cgroup memory limit leaves); None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    free = _meminfo()
    limit = _cgroup_room()
    if free is None:
        return limit
    return free if limit is None else min(free, limit)


def _meminfo() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    """What a cgroup v2 memory limit leaves (``memory.max`` minus ``memory.current``)."""
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            text = fh.read().strip()
        if text == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as fh:
            return max(0, int(text) - int(fh.read().strip()))
    except (OSError, ValueError):
        return None


def size(n: float) -> str:
    """Bytes for people: ``size(3 * 2**30)`` is ``'3.0 GiB'``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} bytes"


LOGIT_COPIES = 4
"""Vocabulary-sized float32 rows a decoding step holds per position it computes (logits, their
log-softmax, the shaped and the constraint-masked distributions)."""


def check_step_fits(runs: Sequence[Any], warned: set) -> None:
    """Before a decoding step of ``runs``: a :class:`ModelError` when what the step itself
    allocates cannot fit on a model's device (vocabulary-sized rows for every position it
    computes, and the cache of prompts not yet computed), and a warning (once per model, via
    ``warned``) when the runs' caches could outgrow it by the time every run reaches its
    ``max_tokens``."""
    from lmcascade.lm.scoring import by_model

    for group in by_model(runs):
        model = group[0].model
        per_token = model.cache_bytes_per_token
        if not per_token:
            continue
        positions = sum(len(r.forced) if r.forced is not None else 1 for r in group)
        fresh = {id(r.dist.prompt): len(r.dist.prompt_ids) for r in group if not r.tokens}
        step = positions * model.vocab_size * 4 * LOGIT_COPIES + sum(fresh.values()) * per_token
        more = sum(
            (len(r.forced) if r.forced is not None else r.dist.max_tokens) - len(r.tokens)
            for r in group
        )
        have = available_memory(model.device)
        if have is None:
            continue
        if step > have:
            raise ModelError(
                f"a decoding step of {len(group):,} generations on model {model.name!r} needs "
                f"about {size(step)} ({positions:,} rows of {model.vocab_size:,} "
                f"scores, and the prompts' cache), but {size(have)} is free on "
                f"{model.device}; use fewer particles (or a smaller batch_size)"
            )
        if step + more * per_token > have and id(model) not in warned:
            warned.add(id(model))
            warnings.warn(
                f"{len(group):,} generations of up to {max(r.dist.max_tokens for r in group):,} "
                f"tokens on model {model.name!r} could need {size(more * per_token)} of cache, "
                f"more than the {size(have)} free on {model.device}; fine "
                "if they stop early, otherwise use fewer particles or a lower max_tokens",
                stacklevel=4,
            )
