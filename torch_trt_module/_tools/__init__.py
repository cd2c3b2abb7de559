"""Tools over the pipeline: ``explain``, ``doctor``, benchmarks, Triton export.
"""
