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

from . import _errors
from ._build.build import build_engine
from ._build.engine import Engine
from ._core.settings import Settings
from ._core.spec import ExportedModel, TensorSpec
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
from ._partition.partitioned import PartitionedModule
from ._partition.split import SegmentedModule
from ._pipeline.compile import compile, export_onnx
from ._pipeline.saved import load, save
from ._runtime.module import TRTModule
from ._tools.doctor import DoctorReport, doctor
from ._tools.explain import PartitionReport, explain
from ._tools.triton import export_triton
from ._verify.compare import OutputReport, ParityReport
from ._verify.parity import assert_parity, verify

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

# One name per public object, as httpx does: ``torch_trt_module.TRTModule``, not the private module
# that defines it (which moves as the package is reorganised). Exceptions keep ``_errors``' name:
# the flat module that holds every one of them (tests/test_public_api.py checks it).
for _name in __all__:
    _value = globals()[_name]
    if getattr(_value, "__module__", "").startswith(__name__ + ".") and _value.__module__ != _errors.__name__:
        _value.__module__ = __name__
del _name, _value
