"""Shared by tests/ and benchmarks/: the conformance cases of ../shared/zoo/cases.md and the model
sweeps (``cases``), cache fault injection (``faults``) and small models (``models``).

Not part of the installed package; both suites put the repository on ``sys.path``.
"""
