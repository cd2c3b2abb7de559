"""Backends: what builds an engine, what runs it here, and why; the one place these are decided.

**Build** (:func:`select_backend`): TensorRT when it is importable and a GPU is in use, else
TensorRT-RTX (it builds ahead of time, on any machine), else ONNX Runtime (the graph itself).

**Run** (:func:`choose_runtime`, :func:`make_runner`): a module that lives on a CUDA GPU takes
the first of this chain that can run there:

1. ``tensorrt`` / ``tensorrt_rtx``: the engine's plan, on a TensorRT runtime that can load it;
2. ``onnxruntime`` with its CUDA execution provider (``onnxruntime-gpu``), zero-copy;
3. ``torch``: PyTorch on the GPU, running the program torch.export captured at compile time;
4. ``onnxruntime`` on the CPU, inputs staged through host memory: the last resort.

A module on the CPU runs on ONNX Runtime. ``runtime=`` forces one; a forced runtime that cannot
run here raises :class:`~torch_trt_module.BackendUnavailable` with the fix. The choice and its
reason are logged once at WARNING where the module will be slower than it could be.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import torch

from .._core.dtypes import dtype_from_name
from .._core.spec import TensorSpec
from .._errors import BackendUnavailable, EngineLoadError, EngineNotRefittable
from .._formats.onnx import initializer_values
from ._autographs import AutoGraphRunner
from ._cudagraphs import CudaGraphRunner
from ._device import normalize_device
from ._onnxruntime import OnnxRuntimeRunner, ort_version
from . import _tensorrt, _trt_loader
from ._torch import TorchRunner
from ._trt_loader import RTX_SUPPORTED, import_tensorrt

__all__ = ["RUNTIMES", "BackendChoice", "Runner", "RuntimeChoice", "backend_version", "can_run_plan",
           "choose_runtime", "default_device", "gpu_identity", "make_runner", "normalize_device", "reusable_runner",
           "rtx_runs_on", "select_backend", "usable_device"]

log = logging.getLogger(__name__)
_announced: set[str] = set()

#: What ``runtime=`` takes.
RUNTIMES = ("auto", "tensorrt", "tensorrt_rtx", "onnxruntime", "torch")


class Runner(Protocol):
    """What runs an engine: flat, validated, contiguous inputs on ``device`` in; new output tensors out.

    Runners may also offer ``call_for(shapes)`` (a call planned for those input shapes),
    ``dedicated()`` (a copy with state of its own, for CUDA graphs) and ``refit(weights)``.
    """

    backend: str
    device: torch.device
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...


@dataclass(frozen=True)
class BackendChoice:
    """What one compile() targets, resolved once by :func:`select_backend` and passed down to the
    cache key, the fleet's grouping and the build: which backend builds, what runs it here, and for
    a TensorRT build the identity of the GPU it is built for (:func:`gpu_identity`)."""

    build: str  # "tensorrt" | "tensorrt_rtx" | "onnxruntime": what makes the engine
    run: str  # what compile() expects to run it here (see choose_runtime)
    reason: str
    gpu: dict[str, Any] | None = field(default=None, hash=False)  # TensorRT builds only


@dataclass(frozen=True)
class RuntimeChoice:
    runtime: str  # "tensorrt" | "tensorrt_rtx" | "onnxruntime" | "torch"
    reason: str


def default_device(backend: str, meta: dict[str, Any], has_plan: bool) -> str:
    """Where a module of an engine lives when no device is given: the GPU for an engine compiled on one
    (or a TensorRT plan that can run on this one) where a GPU exists, else the CPU."""
    if not torch.cuda.is_available():
        return "cpu"
    if meta.get("device") == "cuda" or (has_plan and can_run_plan(backend, meta, "cuda") is None):
        return "cuda"
    return "cpu"


def usable_device(device: str | torch.device, *, what: str = "device=", fix: str = "pass device='cpu', or leave "
                  "device out (the module then lives where it can run)") -> torch.device:
    """``device`` as a torch.device, or BackendUnavailable naming it and the fix where it is a CUDA device
    this machine does not have (torch's own error is "Found no NVIDIA driver", from deep inside)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            f"{what}{str(device)!r} asks for a CUDA GPU, but torch can use none on this machine "
            f"(torch.cuda.is_available() is False: no NVIDIA driver or GPU, or a CPU-only torch). Fix: {fix}")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise BackendUnavailable(f"{what}{str(device)!r} asks for CUDA device {dev.index}, but this machine has "
                                 f"{count} (cuda:0..cuda:{count - 1}). Fix: {fix}")
    return dev


def gpu_identity(device: torch.device | str | None) -> dict[str, Any] | None:
    """What makes engines for one GPU different from another: never the device index."""
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(torch.device(device))
    return {"name": p.name, "compute_capability": f"{p.major}.{p.minor}",
            "sm_count": p.multi_processor_count, "total_memory": p.total_memory}


def rtx_runs_on(device: torch.device | str | None) -> bool:
    return _rtx_supports(gpu_identity(device))


def _rtx_supports(ident: dict[str, Any] | None) -> bool:
    if ident is None:
        return False
    major, minor = (int(v) for v in ident["compute_capability"].split("."))
    return (major, minor) in RTX_SUPPORTED


def _importable(name: str, *, runtime: bool = False) -> bool:
    try:
        _trt_loader.import_runtime(name) if runtime else import_tensorrt(name)
        return True
    except BackendUnavailable:
        return False


def backend_version(name: str) -> str:
    if name == "onnxruntime":
        return ort_version()

    return str(import_tensorrt(name)[1].__version__)


def ort_cuda_available() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def can_run_plan(backend: str, meta: dict[str, Any], device: torch.device | str) -> str | None:
    """Why a ``backend`` plan with this metadata cannot run on ``device``, or None if it can."""
    dev = torch.device(device)
    if backend not in ("tensorrt", "tensorrt_rtx"):
        return "the engine has no TensorRT plan"
    if dev.type != "cuda" or not torch.cuda.is_available():
        return "TensorRT plans run on a CUDA GPU, and the module is on " + str(dev)
    if not _importable(backend, runtime=True):
        return f"no {backend} runtime is importable here"
    if backend == "tensorrt_rtx":
        ident = gpu_identity(dev)
        return None if rtx_runs_on(dev) else \
            f"TensorRT-RTX does not support compute capability {ident['compute_capability'] if ident else '?'}"
    return None if gpu_identity(dev) == meta.get("gpu") else "the plan was built for another GPU"


def choose_runtime(backend: str, meta: dict[str, Any], device: torch.device | str, *, has_plan: bool,
                   has_program: bool, runtime: str = "auto") -> RuntimeChoice:
    """The runtime a module of this engine takes on ``device`` (this module's docstring says how)."""
    dev = torch.device(device)
    why_plan = can_run_plan(backend, meta, dev) if has_plan else "the engine has no TensorRT plan"
    cuda = dev.type == "cuda"
    if runtime != "auto":
        if runtime in ("tensorrt", "tensorrt_rtx"):
            if backend != runtime or why_plan:
                raise BackendUnavailable(
                    f"runtime={runtime!r} cannot run this engine here: "
                    + (f"it was built with {backend}" if backend != runtime else str(why_plan))
                    + ". Fix: leave runtime='auto', or compile where that runtime runs.")
            return RuntimeChoice(runtime, "requested")
        if runtime == "torch":
            if not has_program:
                raise BackendUnavailable(
                    "runtime='torch' needs the PyTorch program that torch.export captures at compile time, and this "
                    "engine has none (its graph came from the TorchScript exporter or an .onnx file). Fix: compile "
                    "with exporter='dynamo', or use runtime='auto'.")
            return RuntimeChoice("torch", "requested")
        if runtime == "onnxruntime":
            return RuntimeChoice("onnxruntime", "requested")
        raise BackendUnavailable(f"runtime={runtime!r} is not one of {', '.join(map(repr, RUNTIMES))}")
    if not cuda:
        if (meta.get("model") or {}).get("precision") == "bf16":
            return _bf16_on_cpu(has_program)
        return RuntimeChoice("onnxruntime", "the module lives on the CPU")
    if why_plan is None:
        return RuntimeChoice(backend, f"{backend} runs the engine on this GPU")
    if ort_cuda_available():
        return RuntimeChoice("onnxruntime", f"{why_plan}; onnxruntime's CUDA provider runs the graph on the GPU")
    if has_program:
        return RuntimeChoice("torch", f"{why_plan}, and onnxruntime has no CUDA provider here (pip install "
                                      "onnxruntime-gpu): PyTorch runs the program captured at compile time on the GPU")
    return RuntimeChoice("onnxruntime", f"{why_plan}; onnxruntime has no CUDA provider and the engine has no PyTorch "
                                        "program (TorchScript export), so ONNX Runtime runs on the CPU and CUDA "
                                        "tensors are copied to the host and back: slow. Fix: pip install "
                                        "onnxruntime-gpu, or export with exporter='dynamo'")


def _bf16_on_cpu(has_program: bool) -> RuntimeChoice:
    """ONNX Runtime's CPU provider has no bf16 Conv or MatMul (and its Python binding cannot bind
    bfloat16): a bf16 module on the CPU runs its PyTorch program, in bf16, or cannot run."""
    why = "ONNX Runtime's CPU provider has no bf16 Conv or MatMul, and its Python binding cannot bind bfloat16"
    if not has_program:
        raise BackendUnavailable(
            f"this bf16 engine cannot run on the CPU: {why}, and the engine has no PyTorch program (its graph came "
            "from the TorchScript exporter or an .onnx file). Fix: compile with exporter='dynamo' (the PyTorch "
            "program then runs it in bf16), with precision='fp32', or on a GPU")
    return RuntimeChoice("torch", f"the module lives on the CPU and is bf16: {why}, so PyTorch runs the bf16 "
                                  "program captured at compile time")


def _announce(choice: RuntimeChoice, device: torch.device) -> None:
    slow = choice.runtime in ("onnxruntime", "torch") and device.type == "cuda"
    if choice.reason not in _announced and choice.reason != "requested" and slow:
        _announced.add(choice.reason)
        log.warning("the module on %s runs on %s: %s", device, choice.runtime, choice.reason)


def make_runner(engine: Any, device: torch.device | str, *, runtime: str = "auto", cuda_graphs: bool | str = "auto",
                allow_host_code: bool = False, prepared: Runner | None = None,
                weights: Mapping[str, torch.Tensor] | None = None) -> tuple[Runner, str]:
    """A runner for ``engine`` on ``device``, and the reason it was chosen. A plan a runtime refuses
    at load time (another TensorRT version) moves the auto chain on, with a WARNING.
    ``prepared``: a runner compile() already made for this engine and device (the cache's ORT session,
    or the PyTorch runner its check ran, with the programs Inductor compiled for it).
    ``weights``: values for the engine's weights by name, applied before the runner is returned."""
    dev = normalize_device(device)
    if weights is None and engine.meta.get("plan_weights_stale") and engine.backend != "onnxruntime":
        weights = _onnx_weights(engine)  # a saved module refit after its plan was built
    choice = choose_runtime(engine.backend, engine.meta, dev, has_plan=engine.has_plan,
                            has_program=engine.has_program, runtime=runtime)
    if choice.runtime in ("tensorrt", "tensorrt_rtx"):
        try:
            runner: Runner = _tensorrt_runner(engine, dev, allow_host_code)
            if weights:
                runner = runner.refit(weights)  # type: ignore[attr-defined]
        except EngineLoadError as e:
            if runtime != "auto":
                raise
            log.warning("%s could not load the engine here (%s); taking the next runtime", engine.backend, e)
            choice = choose_runtime(engine.backend, engine.meta, dev, has_plan=False, has_program=engine.has_program)
        except EngineNotRefittable as e:
            if runtime != "auto":
                raise
            # Never stale: the new weights run on the next runtime, from the graph or the program.
            log.warning("%s cannot take this module's new weights (%s); the next runtime runs them", engine.backend, e)
            choice = choose_runtime(engine.backend, engine.meta, dev, has_plan=False, has_program=engine.has_program)
        else:
            if cuda_graphs == "auto" and not _capturable(engine):
                return runner, choice.reason
            return _graphs(runner, dev, cuda_graphs, engine), choice.reason
    _announce(choice, dev)
    if choice.runtime == "torch":
        runner = prepared if isinstance(prepared, TorchRunner) and prepared.device == dev else TorchRunner(engine, dev)
        if weights:
            runner = runner.refit(weights)
        return _graphs(runner, dev, cuda_graphs, engine), choice.reason

    if cuda_graphs is True and "cuda-graphs-ort" not in _announced:
        _announced.add("cuda-graphs-ort")
        log.warning("cuda_graphs=True applies to the TensorRT and PyTorch runtimes; this module runs on ONNX Runtime")
    if isinstance(prepared, OnnxRuntimeRunner) and prepared.device == dev and not weights:
        return prepared, choice.reason
    ex = engine.exported
    return OnnxRuntimeRunner(engine.onnx, ex.inputs, ex.outputs, dev, half=ex.precision != "fp32",
                             initializers=weights), choice.reason


def reusable_runner(runner: Runner) -> Runner | None:
    """The runner under ``runner``'s CUDA-graph wrappers where :func:`make_runner` can take it again as
    ``prepared`` for the same engine, else None: a PyTorch runner (the module compile() returns then
    calls the programs Inductor compiled for its check, instead of loading them again) or an ONNX
    Runtime session (not made twice).

    Example:
        >>> module = TRTModule(engine, device="cuda")               # doctest: +SKIP
        >>> make_runner(engine, "cuda", prepared=reusable_runner(module.runner))  # doctest: +SKIP
    """
    while isinstance(runner, (AutoGraphRunner, CudaGraphRunner)):
        runner = runner.inner
    return runner if isinstance(runner, (TorchRunner, OnnxRuntimeRunner)) else None


def _capturable(engine: Any) -> bool:
    """Whether a CUDA graph can capture this engine's plan: a TensorRT-RTX context allocates while it
    runs unless its engine was built with REQUIRE_USER_ALLOCATION (only ``cuda_graphs=True`` asks
    for that), so "auto" leaves such an engine uncaptured instead of trying."""
    return engine.backend != "tensorrt_rtx" or "REQUIRE_USER_ALLOCATION" in engine.meta.get("builder_flags", ())


def _onnx_weights(engine: Any) -> dict[str, torch.Tensor]:
    """The values of the engine's mapped weights as its ONNX graph holds them."""

    return initializer_values(engine.onnx, set(engine.exported.weights))


def _tensorrt_runner(engine: Any, device: torch.device, allow_host_code: bool) -> Runner:
    ex = engine.exported
    plan = engine.plan
    if plan is None:
        raise EngineLoadError("the engine's plan could not be read")
    trt_engine = _trt_loader.deserialize(plan, backend=engine.backend, device=device, allow_host_code=allow_host_code)
    trt = _trt_loader.import_runtime(engine.backend)[1]
    return _tensorrt.TensorRTRunner(trt_engine, ex.inputs, ex.outputs, device, trt=trt,
                                     backend=engine.backend)


def _graphs(runner: Runner, device: torch.device, cuda_graphs: bool | str, engine: Any) -> Runner:
    if not cuda_graphs or (cuda_graphs == "auto" and device.type != "cuda"):
        return runner  # "auto" asks for graphs on a GPU only
    # The graph runners take the module's user dtypes at both ends: the casts an fp16 engine needs
    # go into the graph's input copy and into the graph (see _cudagraphs).
    out_dtypes = [dtype_from_name(d) for d in engine.exported.user_output_dtypes]
    if cuda_graphs == "auto":  # graphs where they were measured to pay
        return AutoGraphRunner(runner, device=device, out_dtypes=out_dtypes)
    return CudaGraphRunner(runner, device=device, out_dtypes=out_dtypes)


def select_backend(requested: str, device: torch.device | str | None, *, to_run: bool = True,
                   runtime: str = "auto") -> BackendChoice:
    """Pick what builds the engine (and say what will run it). ``to_run=False`` (build_engine)
    only needs to build, not run."""
    cuda = device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
    ident = gpu_identity(device) if cuda else None  # the one lookup of this compile's GPU
    if requested == "onnxruntime":
        backend_version("onnxruntime")  # raises with an install hint if missing
        build, reason = "onnxruntime", "requested"
    elif requested == "tensorrt":
        import_tensorrt("tensorrt")
        if to_run and not cuda:
            raise BackendUnavailable(
                "backend 'tensorrt' needs a CUDA GPU and none is in use here (device="
                f"{device}); pass device='cuda', use backend='onnxruntime', or build ahead of time "
                "with build_engine(..., backend='tensorrt_rtx', targets=[...])")
        build, reason = "tensorrt", "requested"
    elif requested == "tensorrt_rtx":
        import_tensorrt("tensorrt_rtx")
        if to_run and not _rtx_supports(ident):
            why = "no CUDA GPU is in use" if ident is None else \
                f"TensorRT-RTX does not support compute capability {ident['compute_capability']}"
            raise BackendUnavailable(
                f"backend 'tensorrt_rtx' cannot run here: {why}. Use backend='auto' (builds the "
                "engine ahead of time and runs on another runtime) or build_engine(..., targets=[...])")
        build, reason = "tensorrt_rtx", "requested"
    elif cuda and _importable("tensorrt"):
        build, reason = "tensorrt", "TensorRT is installed and a CUDA GPU is in use"
    elif _importable("tensorrt_rtx"):
        build, reason = "tensorrt_rtx", "TensorRT-RTX builds ahead of time, here or for any supported GPU"
    else:
        build, reason = "onnxruntime", ("neither tensorrt nor tensorrt_rtx is importable (pip install "
                                        "'torch_trt_module[rtx]' or '[tensorrt]')")
    gpu = ident if build == "tensorrt" else None
    if not to_run:
        return BackendChoice(build, "none", reason, gpu)
    meta = {"gpu": gpu} if build == "tensorrt" else {}
    run = choose_runtime(build, meta, device or "cpu", has_plan=build != "onnxruntime", has_program=True,
                         runtime=runtime)
    if build != run.runtime and f"build:{build}:{run.reason}" not in _announced:
        _announced.add(f"build:{build}:{run.reason}")
        log.info("backend=%r builds with %s (%s); the module runs on %s: %s", requested, build, reason,
                 run.runtime, run.reason)
    return BackendChoice(build, run.runtime, f"{reason}; runs on {run.runtime}: {run.reason}", gpu)

