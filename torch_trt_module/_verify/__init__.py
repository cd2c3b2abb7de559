"""Checks of a compiled module against eager: comparisons (``verify``, ``assert_parity``) and the
pipeline's checks at the profile's corners.
"""
