"""Timing helpers the benchmarks share: synchronised wall time, best of rounds in turns."""

from __future__ import annotations

import math
import time

import torch


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device):
    """Wall time of one run of ``fn``, and its result."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def interleaved(fns: dict, device: torch.device, repeats: int) -> dict:
    """Runs every function of ``fns`` in turn, ``repeats`` rounds: each one's best wall time
    and last result.  Taking turns exposes each one to the same load on a shared machine."""
    best = {name: (math.inf, None) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t, out = timed(fn, device)
            best[name] = (min(best[name][0], t), out)
    return best
