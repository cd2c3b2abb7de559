"""A TEST DOUBLE of a TensorRT engine and execution context.

Why a double: no machine in this workplace can execute a TensorRT engine (no
TensorRT on the GPU machine; TensorRT-RTX refuses its sm_90; the CPU machine
has no GPU). So the runtime adapter (``backends/_tensorrt.py``) is exercised
against this double, which behaves like the real context where it matters:

- it reads the input tensors from the raw addresses the adapter bound (through
  ctypes), runs the ONNX graph on ONNX Runtime, and writes the results to the
  bound output addresses, so a wrong pointer, shape, dtype or a freed temporary
  gives wrong numbers rather than a passing test;
- ``set_input_shape`` fails outside the profile and ``set_tensor_address`` fails
  for a null pointer, returning False as TensorRT does;
- data-dependent outputs report ``-1`` dims and go through the adapter's
  ``IOutputAllocator``;
- every method it defines exists on the real ``tensorrt_rtx`` classes (checked in
  ``test_tensorrt_adapter.py``), and :class:`Recorder` logs every attribute the
  adapter touches so those can be checked too.

It never shows that TensorRT itself works: only that the adapter drives the
named-tensor API correctly.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from torch_trt_module._spec import TensorSpec

_NP = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8,
       "int32": np.int32, "int64": np.int64, "bool": np.bool_}


def _read(addr: int, shape: Sequence[int], dtype: str) -> np.ndarray:
    np_t = np.dtype(_NP[dtype])
    n = int(np.prod(shape)) if len(shape) else 1
    if n == 0:
        return np.empty(shape, dtype=np_t)
    buf = (ctypes.c_char * (n * np_t.itemsize)).from_address(addr)
    return np.frombuffer(buf, dtype=np_t).reshape(shape).copy()


def _write(addr: int, arr: np.ndarray) -> None:
    data = np.ascontiguousarray(arr)
    if data.nbytes:
        ctypes.memmove(addr, data.ctypes.data, data.nbytes)


class Recorder:
    """Wraps an object and records every attribute name accessed on it."""

    def __init__(self, target: Any, log: set[str]) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_log", log)

    def __getattr__(self, name: str) -> Any:
        self._log.add(name)
        value = getattr(self._target, name)
        if name == "create_execution_context":
            return lambda *a, **k: Recorder(value(*a, **k), self._log)
        return value


class FakeEngine:
    """Stands in for ``ICudaEngine``; only methods the real class has."""

    def __init__(self, trt: Any, onnx: bytes, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 *, dds_outputs: Sequence[str] = ()) -> None:
        self._trt = trt
        self._inputs = list(inputs)
        self._outputs = list(outputs)
        self._session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
        self._dds = set(dds_outputs)
        self.contexts: list[FakeContext] = []
        self.fail_execute = False
        dt = trt.DataType
        self._dtypes = {"float32": dt.FLOAT, "float16": dt.HALF, "bfloat16": dt.BF16, "int8": dt.INT8,
                        "uint8": dt.UINT8, "int32": dt.INT32, "int64": dt.INT64, "bool": dt.BOOL}

    @property
    def num_io_tensors(self) -> int:
        return len(self._inputs) + len(self._outputs)

    def get_tensor_name(self, i: int) -> str:
        return (self._inputs + self._outputs)[i].name

    def _spec(self, name: str) -> TensorSpec:
        return next(s for s in self._inputs + self._outputs if s.name == name)

    def get_tensor_mode(self, name: str) -> Any:
        is_in = any(s.name == name for s in self._inputs)
        return self._trt.TensorIOMode.INPUT if is_in else self._trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> Any:
        return self._dtypes[self._spec(name).dtype]

    def get_tensor_location(self, name: str) -> Any:
        return self._trt.TensorLocation.DEVICE

    def get_tensor_format(self, name: str) -> Any:
        return self._trt.TensorFormat.LINEAR

    def create_execution_context(self) -> "FakeContext":
        ctx = FakeContext(self)
        self.contexts.append(ctx)
        return ctx


class FakeContext:
    """Stands in for ``IExecutionContext``; only methods the real class has."""

    def __init__(self, engine: FakeEngine) -> None:
        self._e = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addrs: dict[str, int] = {}
        self.allocators: dict[str, Any] = {}
        self.set_shape_calls = 0
        self.threads: set[int] = set()
        self._results: dict[str, np.ndarray] = {}

    def set_input_shape(self, name: str, shape: Sequence[int]) -> bool:
        self.set_shape_calls += 1
        self.threads.add(threading.get_ident())
        spec = self._e._spec(name)
        shape = tuple(shape)
        if spec.min is None or spec.max is None or len(shape) != len(spec.min):
            return False
        if not all(lo <= s <= hi for s, lo, hi in zip(shape, spec.min, spec.max)):
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, addr: int) -> bool:
        self.threads.add(threading.get_ident())
        if not addr:
            return False  # TensorRT rejects null pointers
        self.addrs[name] = int(addr)
        return True

    def set_output_allocator(self, name: str, allocator: Any) -> bool:
        self.allocators[name] = allocator
        return True

    def _run(self) -> dict[str, np.ndarray]:
        feeds = {s.name: _read(self.addrs[s.name], self.shapes[s.name], s.dtype) for s in self._e._inputs}
        names = [s.name for s in self._e._outputs]
        return dict(zip(names, self._e._session.run(names, feeds)))

    def infer_shapes(self) -> list[str]:
        missing = [s.name for s in self._e._inputs if s.name not in self.shapes or s.name not in self.addrs]
        if not missing:
            # Shapes only: the real context does not read data here, and neither will the
            # values computed now be used (execute re-reads the inputs).
            self._results = self._run()
        return missing

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
        shape = tuple(self._results[name].shape)
        return tuple(-1 for _ in shape) if name in self._e._dds else shape

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.threads.add(threading.get_ident())
        if self._e.fail_execute:
            return False
        results = self._run()  # read the inputs again, at execution time
        for spec in self._e._outputs:
            arr = results[spec.name].astype(_NP[spec.dtype])
            if spec.name in self._e._dds:
                alloc = self.allocators[spec.name]
                addr = alloc.reallocate_output_async(spec.name, 0, max(arr.nbytes, 1), 256, stream_handle)
                _write(addr, arr)
                alloc.notify_shape(spec.name, tuple(arr.shape))
            else:
                if spec.name not in self.addrs:
                    return False
                _write(self.addrs[spec.name], arr)
        return True
