"""TensorRT >= 10 and TensorRT-RTX, through one code path: the builder and a thin runtime adapter.

Only the named-tensor API is used (the binding API was removed in 10.0). The
runtime adapter keeps no logic that the ONNX Runtime path does not also
exercise: specs, validation, output structure and dtype casts live in
``_module.py``; this file only binds pointers and checks every return value.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

import torch

from .._errors import BackendUnavailable, BuildError, EngineLoadError, InputError, RuntimeFailure
from .._spec import TensorSpec

__all__ = ["TensorRTRunner", "build_serialized", "deserialize", "engine_validity", "import_tensorrt",
           "trt_dtype_to_torch"]

log = logging.getLogger(__name__)

#: Compute capabilities TensorRT-RTX can run on (major, minor); its enum has no SM90/SM100.
RTX_SUPPORTED = {(7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1)}


def import_tensorrt(which: str | None = None) -> tuple[str, Any]:
    """Import ``tensorrt`` (preferred) or ``tensorrt_rtx``; returns (backend name, module)."""
    order = [which] if which else ["tensorrt", "tensorrt_rtx"]
    errors = []
    for name in order:
        try:
            module = __import__(name)
            if not hasattr(module, "Builder"):
                raise ImportError(f"{name} imported but has no Builder (a stub without its libraries?)")
            return name, module
        except Exception as e:  # noqa: BLE001 - stub wheels fail with OSError and friends too
            errors.append(f"{name}: {e}")
    extra = {"tensorrt": "pip install 'torch_trt_module[tensorrt]' (tensorrt-cu12 or -cu13)",
             "tensorrt_rtx": "pip install 'torch_trt_module[rtx]' (tensorrt-rtx-cu13)"}
    hint = " or ".join(extra[n] for n in order if n in extra)
    raise BackendUnavailable(f"TensorRT is not importable here ({'; '.join(errors)}); install it: {hint}")


def _logger(trt: Any) -> Any:
    """A TensorRT ILogger that forwards to ``logging`` (one per process and module)."""
    cached = getattr(trt, "_torch_trt_module_logger", None)
    if cached is not None:
        return cached
    sev = trt.ILogger.Severity
    levels = {sev.INTERNAL_ERROR: logging.CRITICAL, sev.ERROR: logging.ERROR, sev.WARNING: logging.WARNING,
              sev.INFO: logging.DEBUG, sev.VERBOSE: logging.DEBUG}
    trt_log = logging.getLogger("torch_trt_module.tensorrt")

    class _Bridge(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity, logging.INFO)
            if severity == sev.VERBOSE and not os.environ.get("TORCH_TRT_MODULE_VERBOSE"):
                return
            if level >= logging.ERROR:
                self.errors.append(msg)
                del self.errors[:-20]
            trt_log.log(level, "%s", msg)

    bridge = _Bridge()
    trt._torch_trt_module_logger = bridge
    return bridge


def trt_dtype_to_torch(trt: Any, dt: Any) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
             trt.DataType.BF16: torch.bfloat16, trt.DataType.INT8: torch.int8,
             trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64,
             trt.DataType.BOOL: torch.bool, trt.DataType.UINT8: torch.uint8}
    if dt not in table:
        raise EngineLoadError(f"engine tensor dtype {dt} has no torch equivalent")
    return table[dt]


# --------------------------------------------------------------------------- build

class _Progress:
    """IProgressMonitor callbacks as a tqdm bar on a terminal, else INFO log lines; Ctrl-C cancels."""

    def __init__(self, enabled: bool | None) -> None:
        self.cancelled = False
        self.events = 0
        self._bars: dict[str, Any] = {}
        tty = sys.stderr.isatty()
        self._tqdm = None
        if (enabled if enabled is not None else tty):
            try:
                from tqdm import tqdm
                self._tqdm = tqdm
            except ImportError:
                pass

    def phase_start(self, phase: str, parent: str | None, steps: int) -> None:
        self.events += 1
        if self._tqdm is not None and parent is None:
            self._bars[phase] = self._tqdm(total=steps, desc=phase, leave=False)
        else:
            # Only top-level phases at INFO: nested ones would flood a log with ~100 lines a build.
            log.log(logging.INFO if parent is None else logging.DEBUG, "build phase %s started (%d steps)",
                    phase, steps)

    def step_complete(self, phase: str, step: int) -> bool:
        self.events += 1
        bar = self._bars.get(phase)
        if bar is not None:
            bar.update(1)
        return not self.cancelled

    def phase_finish(self, phase: str) -> None:
        self.events += 1
        bar = self._bars.pop(phase, None)
        if bar is not None:
            bar.close()
        else:
            log.debug("build phase %s finished", phase)


def _monitor(trt: Any, progress: _Progress) -> Any:
    class _Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            progress.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return progress.step_complete(phase_name, step)

        def phase_finish(self, phase_name: str) -> None:
            progress.phase_finish(phase_name)

    return _Monitor()


def build_serialized(
    onnx: bytes, inputs: Sequence[TensorSpec], *, backend: str | None = None, workspace: int | None = None,
    optimization_level: int | None = None, tf32: bool = True, targets: Sequence[str] | None = None,
    timing_cache: bytes | None = None, progress: bool | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """Parse ``onnx`` and build a serialized engine with one optimization profile.

    Returns the engine bytes and build facts (``timing_cache`` bytes on TensorRT,
    ``progress_events``, ``build_time_s``).
    """
    name, trt = import_tensorrt(backend)
    logger = _logger(trt)
    logger.errors.clear()
    rtx = name == "tensorrt_rtx"
    builder = trt.Builder(logger)
    flags = 0
    if not rtx and int(trt.__version__.split(".")[0]) < 11:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with tempfile.TemporaryDirectory(prefix="torch_trt_module_") as tmp:
        path = os.path.join(tmp, "model.onnx")
        with open(path, "wb") as f:
            f.write(onnx)
        if not parser.parse_from_file(path):
            errors = []
            for i in range(parser.num_errors):
                err = parser.get_error(i)
                errors.append(f"node {err.node()} ({err.node_name() or '?'}, op {err.node_operator() or '?'}): "
                              f"{err.desc()}")
            raise BuildError(f"{name}'s ONNX parser rejected the graph:\n  " + "\n  ".join(errors)
                             + "\nFix: replace the unsupported op in the model, or use backend='onnxruntime'.")
    config = builder.create_builder_config()
    if workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    if optimization_level is not None:
        config.builder_optimization_level = int(optimization_level)
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for spec in inputs:
        if spec.min is not None and spec.opt is not None and spec.max is not None:
            profile.set_shape(spec.name, spec.min, spec.opt, spec.max)
    config.add_optimization_profile(profile)
    if targets:
        if not rtx:
            raise BuildError("targets= (ahead-of-time compute capabilities) needs TensorRT-RTX; "
                             "full TensorRT builds for the GPU it runs on")
        config.num_compute_capabilities = len(targets)
        for i, t in enumerate(targets):
            cc = getattr(trt.ComputeCapability, t.upper(), None)
            if cc is None:
                valid = [n for n in dir(trt.ComputeCapability) if n.startswith("SM")]
                raise BuildError(f"target {t!r} is not a TensorRT-RTX compute capability; expected one of {valid}")
            config.set_compute_capability(cc, i)
    cache = None
    if not rtx:  # RTX raises on timing-cache calls (deprecated no-ops there)
        cache = config.create_timing_cache(timing_cache or b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    mon = _Progress(progress)
    config.progress_monitor = _monitor(trt, mon)
    previous = None
    if threading.current_thread() is threading.main_thread():
        def _cancel(signum: int, frame: Any) -> None:
            mon.cancelled = True
        previous = signal.signal(signal.SIGINT, _cancel)
    t0 = time.perf_counter()
    try:
        plan = builder.build_serialized_network(network, config)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    elapsed = time.perf_counter() - t0
    if mon.cancelled:
        raise KeyboardInterrupt("engine build cancelled")
    if plan is None:
        raise BuildError(f"{name} failed to build the engine: " + ("; ".join(logger.errors) or "no error logged"))
    facts: dict[str, Any] = {"build_time_s": elapsed, "progress_events": mon.events}
    if cache is not None:
        facts["timing_cache"] = bytes(memoryview(cache.serialize()))
    return bytes(memoryview(plan)), facts


# --------------------------------------------------------------------------- runtime

def deserialize(plan: bytes, *, backend: str, allow_host_code: bool = False) -> Any:
    """Deserialize an engine with the real runtime (needs a GPU)."""
    _, trt = import_tensorrt(backend)
    runtime = trt.Runtime(_logger(trt))
    if hasattr(runtime, "engine_host_code_allowed"):
        runtime.engine_host_code_allowed = bool(allow_host_code)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise EngineLoadError(f"{backend} could not deserialize the engine (built for another version or GPU?)")
    engine._torch_trt_module_runtime = runtime  # the runtime must outlive the engine
    return engine


def engine_validity(plan: bytes, *, backend: str) -> str | None:
    """Why an RTX engine cannot load on this machine's GPU, or None if it can.

    Only meaningful with a GPU: without one TensorRT-RTX logs a fatal message and says
    INVALID for every engine, so callers check ``torch.cuda.is_available()`` first.
    """
    _, trt = import_tensorrt(backend)
    runtime = trt.Runtime(_logger(trt))
    if not hasattr(runtime, "get_engine_validity"):
        return None
    validity, diagnostics = runtime.get_engine_validity(plan)
    if validity != trt.EngineValidity.INVALID:
        if validity != trt.EngineValidity.VALID:  # SUBOPTIMAL loads and runs, only slower
            log.info("TensorRT-RTX reports the cached engine as %s on this GPU", validity)
        return None
    return f"{validity} (diagnostics {int(diagnostics)})"


class _Allocator:
    """Backs IOutputAllocator: torch allocates data-dependent outputs as TensorRT asks."""

    def __init__(self, trt: Any, device: torch.device, dtypes: dict[str, torch.dtype]) -> None:
        outer = self
        self.buffers: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}

        class _Impl(trt.IOutputAllocator):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                trt.IOutputAllocator.__init__(self)

            def reallocate_output(self, tensor_name: str, memory: int, size: int, alignment: int) -> int:
                buf = outer.buffers.get(tensor_name)
                if buf is None or buf.numel() * buf.element_size() < size:
                    buf = torch.empty(max(int(size), 1), dtype=torch.uint8, device=device)
                    outer.buffers[tensor_name] = buf
                return int(buf.data_ptr())

            def reallocate_output_async(self, tensor_name: str, memory: int, size: int, alignment: int,
                                        stream: int) -> int:
                return self.reallocate_output(tensor_name, memory, size, alignment)

            def notify_shape(self, tensor_name: str, shape: Any) -> None:
                outer.shapes[tensor_name] = tuple(shape)

        self.impl = _Impl()
        self.dtypes = dtypes

    def take(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        dtype = self.dtypes[name]
        n = 1
        for d in shape:
            n *= d
        raw = self.buffers.pop(name)
        return raw[: n * torch.empty((), dtype=dtype).element_size()].view(dtype).reshape(shape).clone()


class _ThreadState:
    __slots__ = ("ctx", "shapes", "addrs", "allocator")

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addrs: dict[str, int] = {}
        self.allocator: _Allocator | None = None


class TensorRTRunner:
    """Binds torch tensors to a deserialized engine and enqueues it on the caller's stream.

    One execution context per thread, so a module shared by threads never races
    on shapes or addresses (peers share one context and crash under threads).
    ``stream`` returns the CUDA stream handle to enqueue on; the default is
    ``torch.cuda.current_stream(device)``.
    """

    def __init__(self, engine: Any, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 device: torch.device | str, *, trt: Any, backend: str = "tensorrt",
                 stream: Callable[[], int] | None = None) -> None:
        self.backend = backend
        self.engine = engine
        self.device = torch.device(device)
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self._trt = trt
        self._stream = stream or (lambda: torch.cuda.current_stream(self.device).cuda_stream)
        self._local = threading.local()
        self._out_dtypes = {s.name: s.torch_dtype for s in self.outputs}
        self._check_io()

    def _check_io(self) -> None:
        trt, eng = self._trt, self.engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        expected = [s.name for s in self.inputs] + [s.name for s in self.outputs]
        if sorted(names) != sorted(expected):
            raise EngineLoadError(f"engine I/O tensors {names} do not match the metadata's {expected}")
        for spec in self.inputs + self.outputs:
            is_input = eng.get_tensor_mode(spec.name) == trt.TensorIOMode.INPUT
            if is_input != (spec in self.inputs):
                raise EngineLoadError(f"engine tensor {spec.name!r} has the wrong I/O mode")
            if trt_dtype_to_torch(trt, eng.get_tensor_dtype(spec.name)) != spec.torch_dtype:
                raise EngineLoadError(
                    f"engine tensor {spec.name!r} is {eng.get_tensor_dtype(spec.name)}, metadata says {spec.dtype}")
            if eng.get_tensor_location(spec.name) != trt.TensorLocation.DEVICE:
                raise EngineLoadError(f"engine tensor {spec.name!r} is not in device memory; not supported")
            if eng.get_tensor_format(spec.name) != trt.TensorFormat.LINEAR:
                raise EngineLoadError(f"engine tensor {spec.name!r} has a vectorized format; not supported")

    def _state(self) -> _ThreadState:
        st = getattr(self._local, "state", None)
        if st is None:
            ctx = self.engine.create_execution_context()
            if ctx is None:
                raise RuntimeFailure("TensorRT could not create an execution context (out of GPU memory?)")
            st = self._local.state = _ThreadState(ctx)
        return st

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run on validated, contiguous inputs on ``self.device``; returns new output tensors.

        The caller keeps ``inputs`` (and any contiguous copies) referenced until this
        returns, i.e. until the work is enqueued; torch's allocator is stream-ordered,
        so releasing them afterwards cannot hand their memory to other work too early.
        """
        st = self._state()
        ctx = st.ctx
        keep: list[torch.Tensor] = []
        for spec, t in zip(self.inputs, inputs):
            shape = tuple(t.shape)
            if st.shapes.get(spec.name) != shape:
                if not ctx.set_input_shape(spec.name, shape):
                    st.shapes.pop(spec.name, None)
                    raise InputError(
                        f"TensorRT rejected shape {shape} for input {spec.name!r}; the engine's profile is "
                        f"{spec.profile_str()}. Recompile with a wider dynamic= range."
                    )
                st.shapes[spec.name] = shape
            addr = self._address(t, keep)
            if st.addrs.get(spec.name) != addr:
                if not ctx.set_tensor_address(spec.name, addr):
                    raise RuntimeFailure(f"TensorRT rejected the address of input {spec.name!r}")
                st.addrs[spec.name] = addr
        missing = ctx.infer_shapes()
        if missing:
            raise RuntimeFailure(f"TensorRT could not infer output shapes; unset inputs: {list(missing)}")
        outs: list[torch.Tensor | None] = []
        for spec in self.outputs:
            shape = tuple(ctx.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                if st.allocator is None:
                    st.allocator = _Allocator(self._trt, self.device, self._out_dtypes)
                if not ctx.set_output_allocator(spec.name, st.allocator.impl):
                    raise RuntimeFailure(f"TensorRT rejected the output allocator for {spec.name!r}")
                outs.append(None)
                continue
            out = torch.empty(shape, dtype=spec.torch_dtype, device=self.device)
            if not ctx.set_tensor_address(spec.name, self._address(out, keep)):
                raise RuntimeFailure(f"TensorRT rejected the address of output {spec.name!r}")
            outs.append(out)
        stream = self._stream()
        if not ctx.execute_async_v3(stream):
            raise RuntimeFailure(
                "TensorRT's execute_async_v3 failed for input shapes "
                + ", ".join(f"{s.name}={tuple(t.shape)}" for s, t in zip(self.inputs, inputs))
                + "; see the torch_trt_module.tensorrt log for the engine's error"
            )
        if any(o is None for o in outs):
            # Data-dependent shapes are only known once the work has run.
            torch.cuda.current_stream(self.device).synchronize() if self.device.type == "cuda" else None
            assert st.allocator is not None
            outs = [st.allocator.take(s.name) if o is None else o for s, o in zip(self.outputs, outs)]
        return outs  # type: ignore[return-value]

    @staticmethod
    def _address(t: torch.Tensor, keep: list[torch.Tensor]) -> int:
        if t.numel() == 0:
            # TensorRT must never see a null pointer, even for an empty tensor.
            t = torch.empty(1, dtype=t.dtype, device=t.device)
            keep.append(t)
        return int(t.data_ptr())
