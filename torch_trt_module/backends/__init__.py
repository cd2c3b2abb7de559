"""Backend choice: which backend builds the engine, which one runs it, and why."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .._errors import BackendUnavailable

__all__ = ["BackendChoice", "backend_version", "gpu_identity", "normalize_device", "rtx_runs_on", "select_backend"]

log = logging.getLogger(__name__)
_announced: set[str] = set()


@dataclass(frozen=True)
class BackendChoice:
    build: str  # "tensorrt" | "tensorrt_rtx" | "onnxruntime": what makes the engine
    run: str  # what runs it here: the same, or "onnxruntime" when the engine cannot run here
    reason: str


def normalize_device(device: str | torch.device) -> torch.device:
    """``cuda`` -> ``cuda:N`` (the current device), so devices compare by what they are."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def gpu_identity(device: torch.device | str | None) -> dict[str, Any] | None:
    """What makes engines for one GPU different from another: never the device index."""
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(torch.device(device))
    return {"name": p.name, "compute_capability": f"{p.major}.{p.minor}",
            "sm_count": p.multi_processor_count, "total_memory": p.total_memory}


def rtx_runs_on(device: torch.device | str | None) -> bool:
    from ._trt_loader import RTX_SUPPORTED

    ident = gpu_identity(device)
    if ident is None:
        return False
    major, minor = (int(v) for v in ident["compute_capability"].split("."))
    return (major, minor) in RTX_SUPPORTED


def _importable(name: str) -> bool:
    from ._trt_loader import import_tensorrt

    try:
        import_tensorrt(name)
        return True
    except BackendUnavailable:
        return False


def backend_version(name: str) -> str:
    if name == "onnxruntime":
        from ._onnxruntime import ort_version

        return ort_version()
    from ._trt_loader import import_tensorrt

    return str(import_tensorrt(name)[1].__version__)


def select_backend(requested: str, device: torch.device | str | None, *, to_run: bool = True) -> BackendChoice:
    """Pick the backend. ``to_run=False`` (build_engine) only needs to build, not run."""
    cuda = device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
    if requested == "onnxruntime":
        backend_version("onnxruntime")  # raises with an install hint if missing
        return BackendChoice("onnxruntime", "onnxruntime", "requested")
    if requested == "tensorrt":
        from ._trt_loader import import_tensorrt

        import_tensorrt("tensorrt")
        if to_run and not cuda:
            raise BackendUnavailable(
                "backend 'tensorrt' needs a CUDA GPU and none is in use here (device="
                f"{device}); pass device='cuda', use backend='onnxruntime', or build ahead of time "
                "with build_engine(..., backend='tensorrt_rtx', targets=[...])")
        return BackendChoice("tensorrt", "tensorrt", "requested")
    if requested == "tensorrt_rtx":
        from ._trt_loader import import_tensorrt

        import_tensorrt("tensorrt_rtx")
        if to_run and not rtx_runs_on(device):
            ident = gpu_identity(device)
            why = "no CUDA GPU is in use" if ident is None else \
                f"TensorRT-RTX does not support compute capability {ident['compute_capability']}"
            raise BackendUnavailable(
                f"backend 'tensorrt_rtx' cannot run here: {why}. Use backend='auto' (builds the "
                "engine ahead of time and runs on ONNX Runtime) or build_engine(..., targets=[...])")
        return BackendChoice("tensorrt_rtx", "tensorrt_rtx" if to_run else "none", "requested")
    # auto
    if cuda and _importable("tensorrt"):
        choice = BackendChoice("tensorrt", "tensorrt", "TensorRT is installed and a CUDA GPU is in use")
    elif _importable("tensorrt_rtx") and rtx_runs_on(device):
        choice = BackendChoice("tensorrt_rtx", "tensorrt_rtx", "TensorRT-RTX supports this GPU")
    elif _importable("tensorrt_rtx"):
        ident = gpu_identity(device)
        why = "no CUDA GPU is in use" if ident is None else \
            f"TensorRT-RTX cannot run on compute capability {ident['compute_capability']}"
        choice = BackendChoice("tensorrt_rtx", "onnxruntime",
                               f"{why}: the TensorRT-RTX engine is built ahead of time and kept, "
                               "and the module runs on ONNX Runtime")
    else:
        choice = BackendChoice("onnxruntime", "onnxruntime",
                               "neither tensorrt nor tensorrt_rtx is importable: running on ONNX Runtime "
                               "(pip install 'torch_trt_module[rtx]' or '[tensorrt]')")
    if choice.run != "tensorrt" and choice.reason not in _announced:
        _announced.add(choice.reason)
        log.warning("backend='auto' chose to build with %s and run on %s: %s",
                    choice.build, choice.run, choice.reason)
    return choice
