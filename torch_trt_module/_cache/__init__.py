"""Stage 3: engines by content key: the keys and fingerprints, the local directory, the store interface
and its remote and fleet tiers, and the entries they hold.
"""
