"""Stage 2: an exported model to an :class:`~torch_trt_module.Engine` (a TensorRT or TensorRT-RTX plan,
or the ONNX graph for ONNX Runtime).
"""
