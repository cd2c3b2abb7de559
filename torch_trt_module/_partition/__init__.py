"""Models that do not compile as one engine: a graph split into engine and PyTorch parts
(:class:`~torch_trt_module.SegmentedModule`), and torch.compile's graphs
(:class:`~torch_trt_module.PartitionedModule`). It partitions only: what compiles each part is
passed in by :mod:`.._pipeline`.
"""
