"""How much memory a run may use, so that a population too big to fit fails before it starts.

>>> available_memory("cpu") is None or available_memory("cpu") > 0
True
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from lmcascade.errors import ModelError


def available_memory(device: Any = "cpu") -> int | None:
    """Bytes free now on ``device``: a CUDA device's free memory, else the host's
    (Linux: MemAvailable); None where it cannot be known."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
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


def check_cache_fits(runs: Sequence[Any]) -> None:
    """Raises :class:`ModelError` when the model caches of ``runs`` (LM runs about to
    generate) could outgrow their device: each distinct prompt is cached once, and each run
    may add up to its ``max_tokens``."""
    by_model: dict[int, list] = {}
    for run in runs:
        by_model.setdefault(id(run.model), []).append(run)
    for group in by_model.values():
        model = group[0].model
        per_token = getattr(model, "cache_bytes_per_token", 0)
        if not per_token:
            continue
        prompts = {tuple(r.ctx.ids) for r in group}
        tokens = sum(len(p) for p in prompts) + sum(r.dist.max_tokens for r in group)
        need, have = tokens * per_token, available_memory(model.device)
        if have is not None and need > have:
            raise ModelError(
                f"{len(group):,} generations of up to {max(r.dist.max_tokens for r in group):,} "
                f"tokens on model {model.name!r} could need {need / 2**30:,.1f} GiB of cache "
                f"({per_token / 1024:.0f} KiB per token), but {have / 2**30:,.1f} GiB is free "
                f"on {model.device}; use fewer particles or a lower max_tokens"
            )
