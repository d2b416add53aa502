"""Cascades a user composes: ordinary programs and effects, each scoped so that two patterns
in one program never collide, each running under any inference method.

The modules: :mod:`~lmcascade.patterns.reasoning` (chain of thought, self-consistency),
:mod:`~lmcascade.patterns.selection` (best-of-N, minimum Bayes risk),
:mod:`~lmcascade.patterns.power` (power sampling), :mod:`~lmcascade.patterns.verify`
(verifiers), :mod:`~lmcascade.patterns.sandbox` (a calculator and a sandboxed Python runner),
:mod:`~lmcascade.patterns.deferral` (model cascades with deferral),
:mod:`~lmcascade.patterns.crs` (reward-guided segment rejection) and
:mod:`~lmcascade.patterns.intersection` (prompt intersection).
"""
