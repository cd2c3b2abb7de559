"""The orchestrator: ``compile()`` sequences the stages (export, build, cache, runtime) and compiles
each part of a partitioned model; ``save``/``load``.
"""
