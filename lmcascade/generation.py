"""What a program receives from ``lc.gen(..., details=True)``: the text and how it was made.

A :class:`Generation` is built from the recorded site whenever its value is sent to the
program (live, on replay, after rescoring), so it costs no model call: the site's value stays
the text (results group by text), and the token-level numbers were recorded while the text
was generated or scored.

>>> import lmcascade as lc
>>> from lmcascade.models import ToyLM
>>> lm = ToyLM(["a", "b", "<eos>"], lambda ctx: [0.0, -1.0, -1.0])
>>> @lc.program
... def confident():
...     out = yield lc.gen("x", lm, "", max_tokens=3, details=True)
...     return out.finish_reason
>>> sorted(lc.infer(confident(), method="enumerate").distribution())
['eos', 'max_tokens']
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmcascade.trace import Site


@dataclass(frozen=True, slots=True)
class Generation:
    """A generated text with its tokens and the model's confidence in them.

    ``token_ids`` are every token generated, the end-of-text token included when the
    generation ended on it; ``token_log_probs`` are their log-probabilities under the model
    itself — the next-token distribution before temperature, top-k, top-p, ``min_tokens``
    and constraints, so greedy decoding still reports how sure the model was;
    ``mean_log_prob`` is their mean (NaN when there are none); ``finish_reason`` is
    ``"eos"``, ``"stop"`` (a stop string; the text is cut before it) or ``"max_tokens"``.
    A value that was scored as a text rather than along a token path (importance sampling
    with a proposal whose model has another vocabulary) has no tokens and no finish reason.
    ``str(g)`` is the text.

    >>> g = Generation("hi", (5, 0), (-0.5, -1.5), -1.0, "eos")
    >>> str(g), f"<{g}>", g.mean_log_prob
    ('hi', '<hi>', -1.0)
    """

    text: str
    token_ids: tuple[int, ...]
    token_log_probs: tuple[float, ...]
    mean_log_prob: float
    finish_reason: str | None

    def __str__(self) -> str:
        return self.text

    @classmethod
    def from_site(cls, site: Site) -> Generation:
        """The generation an LM sample site records.

        >>> site = Site("x", "sample", "a", -0.2, -0.2, (0, 2), None, (-0.1, -0.1),
        ...             token_model_log_probs=(-0.25, -0.75), finish_reason="eos")
        >>> Generation.from_site(site)
        Generation(text='a', token_ids=(0, 2), token_log_probs=(-0.25, -0.75), mean_log_prob=-0.5, finish_reason='eos')
        """  # noqa: E501
        ids = tuple(site.token_ids or ())
        lps = tuple(site.token_model_log_probs or ())
        if len(lps) != len(ids):  # no per-token record (a value scored as a text)
            ids, lps = (), ()
        mean = math.fsum(lps) / len(lps) if lps else math.nan
        return cls(site.value, ids, lps, mean, site.finish_reason)
