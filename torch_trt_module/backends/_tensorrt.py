"""The TensorRT runtime adapter: binds torch tensors to a deserialized engine, zero-copy, and
enqueues it on the caller's CUDA stream. Used for TensorRT (full or lean runtime) and
TensorRT-RTX plans alike.

It keeps no logic that the ONNX Runtime path does not also exercise (specs, validation,
output structure and casts live in ``_module.py``); it binds pointers and checks every
return value, on the module's device:

- TensorRT deserializes, allocates and runs on the *current* CUDA device, so context
  creation and execution run under ``torch.cuda.device(self.device)``.
- On the legacy default stream (handle 0, PyTorch's default) TensorRT inserts device-wide
  synchronisations, so the work goes to a side stream there, ordered after the caller's
  pending work and before its next (``wait_stream`` both ways, ``record_stream`` on the
  tensors it uses), as Torch-TensorRT does. On any other stream it runs on that stream.
- A data-dependent output shape (``IOutputAllocator``) is known when ``execute_async_v3``
  returns; its data is not, so the copy out of TensorRT's buffer is stream-ordered, never
  a host synchronisation.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Iterator, Mapping, Protocol, Sequence

import torch

from .._core.dtypes import by_name, by_trt
from .._core.dtypes import dtype_name as _dtype_name
from .._core.spec import TensorSpec
from .._errors import EngineLoadError, EngineNotRefittable, InputError, RuntimeFailure
from ._device import normalize_device
from ._trt_loader import capture_log, device_guard, logger

__all__ = ["CudaStreams", "Streams", "TensorRTRunner"]

log = logging.getLogger(__name__)


class Streams(Protocol):
    """Where a runner enqueues its work. :class:`CudaStreams` is the real one; tests pass a
    host double whose "streams" defer the double engine's writes."""

    def enqueue(self, tensors: Sequence[torch.Tensor]) -> contextlib.AbstractContextManager[int]:
        """A block that yields the stream handle to enqueue on, ordered after the caller's pending
        work; when it ends, the caller's next work is ordered after what was enqueued."""

    def wait(self, handle: int) -> None:
        """Order the torch work the host issues next after the work enqueued on ``handle``."""


class CudaStreams:
    """The caller's current stream, or a side stream in place of the legacy default stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._side: torch.cuda.Stream | None = None
        self._lock = threading.Lock()

    def _side_stream(self) -> torch.cuda.Stream:
        with self._lock:
            if self._side is None:
                self._side = torch.cuda.Stream(self.device)
            return self._side

    @contextlib.contextmanager
    def enqueue(self, tensors: Sequence[torch.Tensor]) -> Iterator[int]:
        caller = torch.cuda.current_stream(self.device)
        if caller.cuda_stream != 0:
            yield caller.cuda_stream
            return
        side = self._side_stream()
        side.wait_stream(caller)
        try:
            with torch.cuda.stream(side):
                yield side.cuda_stream
        finally:
            caller.wait_stream(side)
            for t in tensors:
                t.record_stream(side)  # their memory is not reused before the side stream is done

    def wait(self, handle: int) -> None:
        # Torch work issued after enqueue() runs on the caller's stream, which that block ordered
        # after the enqueued work: nothing to do.
        return None


class _HostStreams:
    """No streams: only test doubles run "engines" on the CPU."""

    @contextlib.contextmanager
    def enqueue(self, tensors: Sequence[torch.Tensor]) -> Iterator[int]:
        yield 0

    def wait(self, handle: int) -> None:
        return None


class _Allocator:
    """Backs IOutputAllocator: torch allocates data-dependent outputs as TensorRT asks."""

    def __init__(self, trt: Any, device: torch.device, dtypes: dict[str, torch.dtype]) -> None:
        outer = self
        self.buffers: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes = dtypes

        class _Impl(trt.IOutputAllocator):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                trt.IOutputAllocator.__init__(self)

            def reallocate_output(self, tensor_name: str, memory: int, size: int, alignment: int) -> int:
                buf = outer.buffers.get(tensor_name)
                if buf is None or buf.numel() < size:
                    buf = torch.empty(max(int(size), 1), dtype=torch.uint8, device=device)
                    outer.buffers[tensor_name] = buf
                return int(buf.data_ptr())

            def reallocate_output_async(self, tensor_name: str, memory: int, size: int, alignment: int,
                                        stream: int) -> int:
                return self.reallocate_output(tensor_name, memory, size, alignment)

            def notify_shape(self, tensor_name: str, shape: Any) -> None:
                outer.shapes[tensor_name] = tuple(shape)

        self.impl = _Impl()

    def take(self, name: str) -> torch.Tensor:
        """A new tensor with the output's data. The buffer is TensorRT's for the next call, so the
        data is copied out (stream-ordered, like every torch op on the current stream)."""
        shape, dtype = self.shapes[name], self.dtypes[name]
        n = 1
        for d in shape:
            n *= d
        raw = self.buffers[name]
        if raw.is_cuda:
            raw.record_stream(torch.cuda.current_stream(raw.device))  # read here before any reuse
        return raw[: n * torch.empty((), dtype=dtype).element_size()].view(dtype).reshape(shape).clone()


class _ThreadState:
    __slots__ = ("ctx", "shapes", "addrs", "allocator")

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addrs: dict[str, int] = {}
        self.allocator: _Allocator | None = None


class _OneContext:
    """An engine whose ``create_execution_context`` always returns the same, dedicated context
    (for a captured CUDA graph, which needs one that lives as long as the graph and that
    nothing else changes). Everything else is the real engine's."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.context: Any = None

    def create_execution_context(self) -> Any:
        if self.context is None:
            self.context = self._engine.create_execution_context()
        return self.context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class TensorRTRunner:
    """Binds torch tensors to a deserialized engine and enqueues it (this module's docstring says
    on which stream, and why).

    One execution context per thread, so a module shared by threads never races on shapes or
    addresses (peers share one context and crash under threads).

    Example:
        >>> engine = deserialize(plan, backend="tensorrt", device="cuda:0")          # doctest: +SKIP
        >>> runner = TensorRTRunner(engine, inputs, outputs, "cuda:0", trt=trt)     # doctest: +SKIP
        >>> (out,) = runner.run([x])                                               # doctest: +SKIP
    """

    def __init__(self, engine: Any, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 device: torch.device | str, *, trt: Any, backend: str = "tensorrt",
                 streams: Streams | None = None) -> None:
        self.backend = backend
        self.engine = engine
        self.device = normalize_device(device)
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.trt = trt
        self.streams: Streams = streams or (CudaStreams(self.device) if self.device.type == "cuda"
                                            else _HostStreams())
        self._local = threading.local()
        self._out_dtypes = {s.name: s.torch_dtype for s in self.outputs}
        self._refit_lock = threading.Lock()  # no enqueue while the engine's weights are replaced
        # Why the engine must not run (a refit that failed part-way), until a refit succeeds; shared with
        # the runners dedicated() makes, which run the same engine.
        self._unusable: list[str] = []
        self._check_io()

    def dedicated(self) -> tuple["TensorRTRunner", _OneContext]:
        """A runner over the same engine with one execution context of its own (for CUDA graphs)."""
        engine = _OneContext(self.engine)
        runner = TensorRTRunner(engine, self.inputs, self.outputs, self.device, trt=self.trt, backend=self.backend,
                                streams=self.streams)
        runner._unusable = self._unusable
        return runner, engine

    def _check_io(self) -> None:
        trt, eng = self.trt, self.engine
        profiles = eng.num_optimization_profiles
        if profiles != 1:
            raise EngineLoadError(f"the engine has {profiles} optimization profiles; torch_trt_module builds and "
                                  "runs engines with exactly one (profile 0)")
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        expected = [s.name for s in self.inputs] + [s.name for s in self.outputs]
        if sorted(names) != sorted(expected):
            raise EngineLoadError(f"engine I/O tensors {names} do not match the metadata's {expected}")
        input_names = {s.name for s in self.inputs}
        for spec in self.inputs + self.outputs:
            is_input = eng.get_tensor_mode(spec.name) == trt.TensorIOMode.INPUT
            if is_input != (spec.name in input_names):
                raise EngineLoadError(f"engine tensor {spec.name!r} has the wrong I/O mode")
            engine_dtype = eng.get_tensor_dtype(spec.name)
            if by_trt(engine_dtype).torch != spec.torch_dtype:
                raise EngineLoadError(f"engine tensor {spec.name!r} is {engine_dtype}, metadata says {spec.dtype}")
            if eng.get_tensor_location(spec.name) != trt.TensorLocation.DEVICE:
                raise EngineLoadError(f"engine tensor {spec.name!r} is not in device memory; not supported")
            # No TensorFormat here: tensorrt_lean cannot even return one. A vectorized or channel-major
            # layout would make our dense row-major torch tensors wrong, so refuse it.
            if (eng.get_tensor_vectorized_dim(spec.name) != -1
                    or "linear" not in str(eng.get_tensor_format_desc(spec.name)).lower()):
                raise EngineLoadError(f"engine tensor {spec.name!r} has the format "
                                      f"{eng.get_tensor_format_desc(spec.name)!r}; only row-major linear is supported")

    def _state(self) -> _ThreadState:
        st = getattr(self._local, "state", None)
        if st is None:
            with device_guard(self.device):
                ctx = self.engine.create_execution_context()
            if ctx is None:
                raise RuntimeFailure("TensorRT could not create an execution context (out of GPU memory?)")
            st = self._local.state = _ThreadState(ctx)
        return st

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run on validated, contiguous inputs on ``self.device``; returns new output tensors.

        The caller keeps ``inputs`` (and any contiguous copies) referenced until this returns,
        i.e. until the work is enqueued; torch's allocator is stream-ordered (and the side
        stream records its use), so releasing them afterwards cannot hand their memory to
        other work too early.
        """
        st = self._state()
        with self._refit_lock, device_guard(self.device):
            if self._unusable:
                raise RuntimeFailure(self._unusable[0])
            return self._run(st, inputs)

    def refit(self, values: Mapping[str, torch.Tensor]) -> "TensorRTRunner":
        """Replace the engine's weights by name with TensorRT's Refitter (the engine must have been built
        with ``BuilderFlag.REFIT``: ``weights="follow"``). Waits for the device's pending work first
        (refitting an engine with work in flight is undefined) and checks every return value; a
        refit that fails part-way leaves the engine unusable, and says so."""

        if not self.engine.refittable:
            raise EngineNotRefittable(
                "this TensorRT engine was built without BuilderFlag.REFIT (weights='snapshot', or a TensorRT-RTX "
                "build on a machine without a GPU), so its weights cannot change. Fix: compile with "
                "weights='follow' on a machine with a GPU")
        with self._refit_lock, device_guard(self.device), capture_log() as captured:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            refitter = self.trt.Refitter(self.engine, logger(self.trt))
            known = set(refitter.get_all_weights())
            folded = sorted(set(values) - known)
            if folded:
                raise EngineNotRefittable(f"TensorRT folded weights {folded[:5]} into the engine at build time, so "
                                          "they cannot be refit. Fix: compile the model again for its new weights")
            keep = []
            for name, t in values.items():
                host = t.detach().cpu().contiguous()
                keep.append(host)
                weights = self.trt.Weights(getattr(self.trt.DataType, by_name(_dtype_name(host.dtype)).trt),
                                           host.data_ptr(), host.numel())
                if not refitter.set_named_weights(name, weights):
                    raise RuntimeFailure(f"TensorRT refused the new weights for {name!r} (shape {tuple(host.shape)}, "
                                         f"{host.dtype}): {captured.said()}")
            missing = list(refitter.get_missing_weights())
            if missing:
                raise RuntimeFailure(f"TensorRT needs new values for weights {missing[:8]} too before it can refit")
            if not refitter.refit_cuda_engine():
                self._unusable[:] = [
                    "TensorRT's refit_cuda_engine failed; the engine may hold a mix of old and new weights and must "
                    f"not be used: {captured.said()}. Fix: refit it again with all its weights, or compile the "
                    "model again"]
                raise RuntimeFailure(self._unusable[0])
            self._unusable.clear()
            del keep  # TensorRT copied them: "weights can be released after refit_cuda_engine returns"
        return self

    def _run(self, st: _ThreadState, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        ctx = st.ctx
        keep: list[torch.Tensor] = []
        for spec, t in zip(self.inputs, inputs):
            shape = tuple(t.shape)
            if st.shapes.get(spec.name) != shape:
                if not ctx.set_input_shape(spec.name, shape):
                    st.shapes.pop(spec.name, None)  # what the context holds now is unknown
                    raise InputError(
                        f"TensorRT rejected shape {shape} for input {spec.name!r}; the engine's profile is "
                        f"{spec.profile_str()}. Recompile with a wider dynamic= range."
                    )
                st.shapes[spec.name] = shape
            addr = self._address(t, keep)
            if st.addrs.get(spec.name) != addr:
                if not ctx.set_tensor_address(spec.name, addr):
                    st.addrs.pop(spec.name, None)
                    raise RuntimeFailure(f"TensorRT rejected the address of input {spec.name!r}")
                st.addrs[spec.name] = addr
        try:
            missing = ctx.infer_shapes()
        except RuntimeError as e:
            raise RuntimeFailure(f"TensorRT could not infer the output shapes for input shapes "
                                 f"{self._shapes(inputs)}: {e}") from e
        if missing:
            raise RuntimeFailure(f"TensorRT could not infer the output shapes; inputs not set: {list(missing)}")
        outs: list[torch.Tensor | None] = []
        for spec in self.outputs:
            shape = tuple(ctx.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                if st.allocator is None:
                    st.allocator = _Allocator(self.trt, self.device, self._out_dtypes)
                if not ctx.set_output_allocator(spec.name, st.allocator.impl):
                    raise RuntimeFailure(f"TensorRT rejected the output allocator for {spec.name!r}")
                outs.append(None)
                continue
            out = torch.empty(shape, dtype=spec.torch_dtype, device=self.device)
            if not ctx.set_tensor_address(spec.name, self._address(out, keep)):
                raise RuntimeFailure(f"TensorRT rejected the address of output {spec.name!r}")
            outs.append(out)
        used = [*inputs, *keep, *(o for o in outs if o is not None)]
        with self.streams.enqueue(used) as handle:
            if not ctx.execute_async_v3(handle):
                raise RuntimeFailure(
                    f"TensorRT's execute_async_v3 failed for input shapes {self._shapes(inputs)}; "
                    "see the torch_trt_module.tensorrt log for the engine's error")
        if any(o is None for o in outs):
            assert st.allocator is not None
            self.streams.wait(handle)
            outs = [st.allocator.take(s.name) if o is None else o for s, o in zip(self.outputs, outs)]
        return outs  # type: ignore[return-value]

    def _shapes(self, inputs: Sequence[torch.Tensor]) -> str:
        return ", ".join(f"{s.name}={tuple(t.shape)}" for s, t in zip(self.inputs, inputs))

    @staticmethod
    def _address(t: torch.Tensor, keep: list[torch.Tensor]) -> int:
        if t.numel() == 0:
            # TensorRT must never see a null pointer, even for an empty tensor.
            t = torch.empty(1, dtype=t.dtype, device=t.device)
            keep.append(t)
        return int(t.data_ptr())
