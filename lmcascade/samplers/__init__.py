"""Token samplers: how a decoding step chooses each run's next token(s).

- :class:`Ancestral` — a draw from the (constraint-masked) distribution; predicate
  constraints by adaptive weighted rejection (:mod:`lmcascade.samplers.awrs`). The default.
- :class:`Greedy` — the arg-max token.
- :class:`AllChildren` — every possible token as a child (exact enumeration).

See :mod:`lmcascade.samplers.base` for the interface a new sampler implements.
"""

from lmcascade.samplers.ancestral import Ancestral, draw
from lmcascade.samplers.base import TokenSampler
from lmcascade.samplers.deterministic import AllChildren, Greedy

ANCESTRAL = Ancestral()

__all__ = ["ANCESTRAL", "AllChildren", "Ancestral", "Greedy", "TokenSampler", "draw"]
