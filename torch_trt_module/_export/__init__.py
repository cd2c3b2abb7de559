"""Stage 1: a model to an :class:`~torch_trt_module.ExportedModel` (ONNX with profiles, the weights
map, a program): exporters, lowering passes and precision.
"""
