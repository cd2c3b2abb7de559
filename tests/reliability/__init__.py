"""Hardening tests (issue 6): bad inputs, concurrency, cache faults and safe loading."""
