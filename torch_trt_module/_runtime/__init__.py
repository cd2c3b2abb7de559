"""Stage 4: an engine run as a module (:class:`~torch_trt_module.TRTModule`): weights that follow the
model, refit, copying.
"""
