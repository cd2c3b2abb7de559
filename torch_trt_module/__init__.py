"""torch_trt_module: compile PyTorch modules into TensorRT engines that drop into torch code.

``compile(model, example_inputs)`` exports to ONNX with dynamic axes, builds a
TensorRT or TensorRT-RTX engine (or takes it from a content-keyed cache), and
returns a :class:`TRTModule` called exactly like the original. Where no
TensorRT runtime can run, the module runs on ONNX Runtime, so it works on any
machine.

Example:
    >>> import torch, torchvision, torch_trt_module as ttm
    >>> model = torchvision.models.resnet18().eval()
    >>> fast = ttm.compile(model, torch.randn(4, 3, 224, 224))      # doctest: +SKIP
    >>> ttm.verify(model, fast, torch.randn(8, 3, 224, 224)).passed  # doctest: +SKIP
    True
"""

from ._build import build_engine
from ._compare import OutputReport, ParityReport, assert_parity, verify
from ._compile import compile, export_onnx
from ._doctor import DoctorReport, doctor
from ._engine import Engine
from ._errors import (
    BackendUnavailable,
    BuildError,
    CacheError,
    CacheLockTimeout,
    EngineLoadError,
    EngineNotRefittable,
    ExportError,
    InputError,
    PrecisionError,
    RuntimeFailure,
    SettingsError,
    TorchTRTError,
    TritonExportError,
    TritonRepoExists,
    UnsupportedOutput,
    UsageError,
    VerificationError,
)
from ._module import TRTModule
from ._saved import load, save
from ._partition import PartitionedModule, PartitionReport, explain
from ._settings import Settings
from ._split import SegmentedModule
from ._spec import ExportedModel, TensorSpec
from ._triton import export_triton

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "BuildError",
    "CacheError",
    "CacheLockTimeout",
    "DoctorReport",
    "Engine",
    "EngineLoadError",
    "EngineNotRefittable",
    "ExportError",
    "ExportedModel",
    "InputError",
    "OutputReport",
    "ParityReport",
    "PartitionReport",
    "PartitionedModule",
    "PrecisionError",
    "RuntimeFailure",
    "SegmentedModule",
    "Settings",
    "SettingsError",
    "TRTModule",
    "TensorSpec",
    "TorchTRTError",
    "TritonExportError",
    "TritonRepoExists",
    "UnsupportedOutput",
    "UsageError",
    "VerificationError",
    "assert_parity",
    "build_engine",
    "compile",
    "doctor",
    "explain",
    "export_onnx",
    "export_triton",
    "load",
    "save",
    "verify",
]
