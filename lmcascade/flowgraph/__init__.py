"""The graph of a Python program, found by intervention on a few sampled runs.

``samples`` draws the runs (past failed conditions, ending quietly on errors), ``replay``
re-executes a run with chosen values (``deadline`` gives up on one that does not end),
``fingerprint`` makes effects' inputs comparable, ``variants`` and ``watch`` pick the values
to try, and ``build`` assembles the graph (:func:`lmcascade.graph.graph`, ``lc.graph``, is
its entry point).
"""
