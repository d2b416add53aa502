"""Timing helpers the benchmarks share: synchronised wall time, best of rounds in turns."""

from __future__ import annotations

import math
import platform
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


def machine(device: torch.device) -> dict:
    """What a results file records about where it ran: the card (or CPU), threads, torch."""
    return {
        "card": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
