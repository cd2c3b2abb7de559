"""The ground every stage stands on: settings, dtypes, tensor specs, call signatures and trees,
numerics, inference modes, the checksummed container and its signing, and input matching. Imports
nothing of the package but :mod:`.._errors`.
"""
