"""Pictures of inference runs (needs matplotlib: ``pip install "lmcascade[viz]"``).

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, 0.0, -1.0])
>>> @lc.program
... def p():
...     text = yield lc.gen("text", lm, "", max_tokens=4, potential=lambda t: -t.count("b"))
...     return text
>>> r = lc.infer(p(), method="smc", particles=16, ess_threshold=1.0, seed=0)
>>> import tempfile, os
>>> path = plot_smc(r, os.path.join(tempfile.mkdtemp(), "smc.png"))
>>> os.path.getsize(path) > 0
True
"""

from __future__ import annotations

import os

import numpy as np

from lmcascade.errors import LMCascadeError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise LMCascadeError(
            "lmcascade.viz needs matplotlib; install it with: pip install matplotlib"
        ) from err
    return plt, MaxNLocator


def ancestry(genealogy: list[list[int]], n: int) -> np.ndarray:
    """``lineage[t, i]``: the index at resampling point ``t`` of final particle ``i``'s ancestor
    (row ``len(genealogy)`` is the final population itself)."""
    steps = len(genealogy)
    lineage = np.zeros((steps + 1, n), dtype=np.int64)
    lineage[steps] = np.arange(n)
    for t in range(steps - 1, -1, -1):
        lineage[t] = np.asarray(genealogy[t])[lineage[t + 1]]
    return lineage


def plot_smc(result, path: str | os.PathLike) -> str:
    """Draws an SMC run's ancestry (which particle descends from which at every resampling)
    and its ESS over time, with the final particles sized by weight; saves to ``path``."""
    genealogy = getattr(result, "genealogy", None) or []
    n = len(result.traces)
    plt, MaxNLocator = _pyplot()
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(9, 6), gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True
    )
    for t, ancestors in enumerate(genealogy):
        for child, parent in enumerate(ancestors):
            top.plot([t, t + 1], [parent, child], color="0.8", lw=0.6, zorder=1)
    if genealogy:
        lineage = ancestry(genealogy, n)
        survivors = set(lineage[0].tolist())
        for i in range(n):
            top.plot(
                range(len(genealogy) + 1),
                lineage[:, i],
                color="tab:blue",
                lw=1.0,
                alpha=0.5,
                zorder=2,
            )
        top.set_title(
            f"SMC ancestry: {n} particles, {len(genealogy)} resamplings, "
            f"{len(survivors)} initial lineage(s) survive"
        )
    else:
        top.set_title(f"SMC: {n} particles, no resampling")
    weights = result.weights
    sizes = 10 + 200 * np.nan_to_num(weights) / max(np.nanmax(weights), 1e-12)
    top.scatter(
        [len(genealogy)] * n,
        range(n),
        s=sizes,
        color="tab:red",
        zorder=3,
        label="final particles (size = weight)",
    )
    top.xaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_xlabel("resampling point")
    top.set_ylabel("particle")
    top.legend(loc="upper left", fontsize=8)
    ess = result.stats.get("ess") or []
    bottom.plot(range(len(ess)), ess, color="tab:green")
    bottom.axhline(n, color="0.6", lw=0.8, ls="--")
    bottom.set_xlabel("resampling check")
    bottom.set_ylabel("ESS")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
