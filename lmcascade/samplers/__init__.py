"""Token samplers: how a decoding step chooses each run's next token(s).

- :class:`Ancestral` — a draw from the (constraint-masked) distribution; predicate
  constraints by adaptive weighted rejection (:mod:`lmcascade.samplers.awrs`). The default.
- :class:`Greedy` — the arg-max token.
- :class:`AllChildren` — every possible token as a child (exact enumeration).
- :class:`TopK` — the k best (run, token) pairs of a step, by the particle's score so far
  plus the token's, as children (beam search); :class:`GumbelTopK` — the k pairs of largest
  Gumbel-perturbed value (stochastic beam).

See :mod:`lmcascade.samplers.base` for the interface a new sampler implements.
"""

from lmcascade.samplers.ancestral import Ancestral, draw
from lmcascade.samplers.base import TokenSampler
from lmcascade.samplers.deterministic import AllChildren, Greedy
from lmcascade.samplers.topk import GumbelTopK, TopK

ANCESTRAL = Ancestral()

__all__ = [
    "ANCESTRAL",
    "AllChildren",
    "Ancestral",
    "Greedy",
    "GumbelTopK",
    "TokenSampler",
    "TopK",
    "draw",
]
