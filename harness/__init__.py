"""Shared by tests/ and benchmarks/: the conformance cases of ../shared/zoo/cases.md and the model
sweeps (``cases``), cache fault injection (``faults``), small models (``models``) and a real
redis-server on loopback (``redis_server``).

Not part of the installed package; both suites put the repository on ``sys.path``.
"""
