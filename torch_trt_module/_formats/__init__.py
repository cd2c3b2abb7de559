"""The stored graph formats: ONNX (:mod:`.onnx`) and torch.export's program (:mod:`.program`), each
with the checks a stored blob passes before anything reads it (``*_safety``).
"""
