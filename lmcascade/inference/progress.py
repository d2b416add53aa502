"""Progress bars for inference runs: one tqdm bar per run, ticked once per decoding step.

A bar appears only in a terminal (tqdm leaves it off when the output is not a TTY) and only
once a run has taken :data:`DELAY` seconds, so short runs print nothing; it is removed when
the run ends.  Every method takes ``progress=False`` to turn it off.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "<eos>"], lambda ctx: [0.0, 0.0])
>>> @lc.program
... def word():
...     return (yield lc.gen("w", lm, "", max_tokens=3))
>>> len(lc.infer(word(), method="forward", num_samples=8, seed=0, progress=False))
8
"""

from __future__ import annotations

from collections.abc import Callable

from tqdm.auto import tqdm

from lmcascade.engine import Engine, Particle, Schedule

DELAY = 2.0
"""Seconds a run must take before its bar is drawn."""

STATUS_EVERY = 8
"""The bar's status text is recomputed every this many steps."""


def progress_bar(desc: str, enabled: bool, unit: str = "step") -> tqdm:
    """A bar named ``desc``, drawn only in a terminal after :data:`DELAY` seconds, or never
    when ``enabled`` is false.

    >>> bar = progress_bar("demo", enabled=False)
    >>> bar.disable
    True
    >>> bar.close()
    """
    return tqdm(desc=desc, unit=unit, delay=DELAY, leave=False, disable=None if enabled else True)


class Ticking(Schedule):
    """A schedule that runs ``inner`` (the default schedule when None) and ticks ``bar`` once
    per decoding step; every :data:`STATUS_EVERY` steps the bar shows ``status(population)``.

    >>> ticking = Ticking(progress_bar("demo", enabled=False))
    >>> ticking.after_step(None, []), ticking.steps
    ([], 1)
    """

    def __init__(
        self,
        bar: tqdm,
        inner: Schedule | None = None,
        status: Callable[[list[Particle]], str] | None = None,
    ) -> None:
        self.bar = bar
        self.inner = inner or Schedule()
        self.status = status
        self.steps = 0

    def select(
        self, engine: Engine, particles: list[Particle], waiting: list[Particle]
    ) -> tuple[list[Particle], list[Particle]]:
        return self.inner.select(engine, particles, waiting)

    def after_step(self, engine: Engine, particles: list[Particle]) -> list[Particle]:
        particles = self.inner.after_step(engine, particles)
        self.steps += 1
        self.bar.update(1)
        if self.status is not None and not self.bar.disable and self.steps % STATUS_EVERY == 0:
            self.bar.set_postfix_str(self.status(particles), refresh=False)
        return particles
