"""TensorRT modules, their logger bridged into ``logging``, and loading serialized engines.

Three Python modules share one API here: ``tensorrt`` (full TensorRT >= 10: builder and
runtime), ``tensorrt_rtx`` (TensorRT-RTX: builder and runtime) and ``tensorrt_lean``
(TensorRT's lean runtime: no builder; it loads version-compatible plans that full
TensorRT built). Their binding objects are pybind11 objects: they refuse new attributes,
so nothing of ours is ever stored on them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from types import ModuleType
from typing import Any, Iterator

import torch

from .._errors import BackendUnavailable, EngineLoadError

__all__ = ["RTX_SUPPORTED", "Captured", "capture_log", "deserialize", "device_guard", "engine_validity",
           "import_runtime", "import_tensorrt", "logger"]

log = logging.getLogger(__name__)
trt_log = logging.getLogger("torch_trt_module.tensorrt")

#: Compute capabilities TensorRT-RTX can run on (major, minor); its enum has no SM90/SM100.
RTX_SUPPORTED = {(7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1)}
_INSTALL = {"tensorrt": "pip install 'torch_trt_module[tensorrt]' (tensorrt-cu12 or -cu13)",
            "tensorrt_rtx": "pip install 'torch_trt_module[rtx]' (tensorrt-rtx-cu13)",
            "tensorrt_lean": "pip install tensorrt-lean-cu13 (runs version-compatible TensorRT plans)"}
# Which modules can run a backend's plans, in order of preference.
_RUNTIMES = {"tensorrt": ("tensorrt", "tensorrt_lean"), "tensorrt_rtx": ("tensorrt_rtx",)}


def _import(name: str, needs: str) -> ModuleType:
    module = __import__(name)
    if not hasattr(module, needs):
        raise ImportError(f"{name} imported but has no {needs} (a stub without its libraries?)")
    return module


def import_tensorrt(which: str | None = None) -> tuple[str, Any]:
    """A builder: ``tensorrt`` (preferred) or ``tensorrt_rtx``; returns (backend name, module)."""
    order = [which] if which else ["tensorrt", "tensorrt_rtx"]
    errors = []
    for name in order:
        try:
            return name, _import(name, "Builder")
        except Exception as e:  # noqa: BLE001 - stub wheels fail with OSError and friends too
            errors.append(f"{name}: {e}")
    hint = " or ".join(_INSTALL[n] for n in order if n in _INSTALL)
    raise BackendUnavailable(f"TensorRT is not importable here ({'; '.join(errors)}); install it: {hint}")


def import_runtime(backend: str) -> tuple[str, Any]:
    """A runtime for ``backend``'s plans: for ``tensorrt``, full TensorRT or else its lean
    runtime; for ``tensorrt_rtx``, TensorRT-RTX. Returns (module name, module)."""
    errors = []
    for name in _RUNTIMES.get(backend, (backend,)):
        try:
            return name, _import(name, "Runtime")
        except Exception as e:  # noqa: BLE001
            errors.append(f"{name}: {e}")
    hint = " or ".join(_INSTALL[n] for n in _RUNTIMES.get(backend, ()) if n in _INSTALL)
    raise BackendUnavailable(f"no runtime for {backend} engines is importable here ({'; '.join(errors)}); "
                             f"install one: {hint}")


# --------------------------------------------------------------------------- logging

_bridges: dict[str, Any] = {}
_bridges_lock = threading.Lock()
_captured = threading.local()  # this thread's Captured while capture_log() is active


def logger(trt: Any) -> Any:
    """The ILogger of ``trt`` (one per module and process) that forwards to ``logging``:
    INTERNAL_ERROR and ERROR at ERROR level and up, WARNING at WARNING, INFO and VERBOSE at
    DEBUG (VERBOSE only with ``$TORCH_TRT_MODULE_VERBOSE``)."""
    with _bridges_lock:  # two threads must not each make one
        bridge = _bridges.get(trt.__name__)
        if bridge is None:
            bridge = _bridges[trt.__name__] = _make_bridge(trt)
    return bridge


def _make_bridge(trt: Any) -> Any:
    sev = trt.ILogger.Severity
    levels = {sev.INTERNAL_ERROR: logging.CRITICAL, sev.ERROR: logging.ERROR, sev.WARNING: logging.WARNING,
              sev.INFO: logging.DEBUG, sev.VERBOSE: logging.DEBUG}

    class _Bridge(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            if severity == sev.VERBOSE and not os.environ.get("TORCH_TRT_MODULE_VERBOSE"):
                return
            level = levels.get(severity, logging.INFO)
            captured = getattr(_captured, "log", None)
            if captured is not None:
                captured.add(level, msg)
            # A probe (the parser asked what it takes) expects refusals: they are its answer, not errors.
            trt_log.log(logging.DEBUG if captured is not None and captured.quiet else level, "%s", msg)

    return _Bridge()


class Captured:
    """What TensorRT logged from one thread during :func:`capture_log` (the last 20 of each)."""

    def __init__(self, quiet: bool = False) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.quiet = quiet

    def add(self, level: int, msg: str) -> None:
        bucket = self.errors if level >= logging.ERROR else self.warnings if level >= logging.WARNING else None
        if bucket is not None:
            bucket.append(msg)
            del bucket[:-20]

    def said(self) -> str:
        return "; ".join(self.errors) or "no error logged"


@contextlib.contextmanager
def capture_log(*, quiet: bool = False) -> Iterator[Captured]:
    """Collect the errors and warnings TensorRT logs from this thread during the block. Each
    thread has its own, so concurrent builds never mix (or clear) each other's messages.
    ``quiet``: log them at DEBUG only (a probe whose refusals are its answer)."""
    outer = getattr(_captured, "log", None)
    captured = Captured(quiet)
    _captured.log = captured
    try:
        yield captured
    finally:
        _captured.log = outer
        if outer is not None:
            outer.errors.extend(captured.errors)
            outer.warnings.extend(captured.warnings)


# --------------------------------------------------------------------------- loading

def device_guard(device: torch.device | str | None) -> Any:
    """TensorRT deserializes, allocates and runs on the *current* CUDA device: make it ``device``."""
    dev = None if device is None else torch.device(device)
    if dev is None or dev.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(dev)


def deserialize(plan: bytes, *, backend: str, device: torch.device | str | None = None,
                allow_host_code: bool = False) -> Any:
    """An ``ICudaEngine`` from a serialized plan, on ``device``; EngineLoadError with TensorRT's
    own messages if it cannot load. (The engine keeps its runtime alive: pybind11's
    keep_alive on ``deserialize_cuda_engine``.)"""
    name, trt = import_runtime(backend)
    with device_guard(device), capture_log() as captured:
        runtime = trt.Runtime(logger(trt))
        if runtime is None:
            raise EngineLoadError(f"{name} could not create a runtime: {captured.said()}")
        if hasattr(type(runtime), "engine_host_code_allowed"):
            runtime.engine_host_code_allowed = bool(allow_host_code)
        try:
            engine = runtime.deserialize_cuda_engine(plan)
        except Exception as e:  # noqa: BLE001 - a TypeError for a bad buffer, a RuntimeError from CUDA
            raise EngineLoadError(f"{name} could not deserialize the engine: {e}") from e
    if engine is None:
        raise EngineLoadError(f"{name} could not deserialize the engine ({len(plan)} bytes): {captured.said()}. Plans are "
                              "tied to the TensorRT version (and, for full TensorRT, the GPU) that built them: "
                              "rebuild it here, or load it where it was built")
    return engine


def engine_validity(plan: bytes, *, backend: str) -> str | None:
    """Why an RTX engine cannot load on this machine's GPU, or None if it can.

    Only meaningful with a GPU: without one TensorRT-RTX logs a fatal message and says
    INVALID for every engine, so callers check ``torch.cuda.is_available()`` first.
    """
    _, trt = import_runtime(backend)
    runtime = trt.Runtime(logger(trt))
    if not hasattr(type(runtime), "get_engine_validity"):
        return None
    validity, diagnostics = runtime.get_engine_validity(plan)
    if validity != trt.EngineValidity.INVALID:
        if validity != trt.EngineValidity.VALID:  # SUBOPTIMAL loads and runs, only slower
            log.info("TensorRT-RTX reports the cached engine as %s on this GPU", validity)
        return None
    return f"{validity} (diagnostics {int(diagnostics)})"
