"""A TEST DOUBLE of TensorRT's runtime objects (engine and execution context), as strict as the
real bindings because its surface is derived from them.

Why a double: no machine in this workplace can execute a TensorRT engine (no builder exists
here to make one the lean runtime would load; TensorRT-RTX refuses the H200's sm_90; the
CPU machine has no GPU). So the runtime adapter (``backends/_tensorrt.py``) runs against
this double. It never shows that TensorRT works: only that the adapter drives the real API
correctly.

**Derived from the real classes.** ``doubles(trt)`` makes the engine and context classes for
one real module: ``tensorrt_lean`` (TensorRT 11.4's runtime) or ``tensorrt_rtx``. Every method
and property a double defines must exist on the real class, and:

- getting, setting or calling an attribute the real class lacks raises AttributeError, as
  pybind11 does (the real objects refuse new attributes too); an attribute the real class has
  but the double does not implement raises AttributeError saying so;
- each call's arity and argument types are checked against the real pybind signatures
  (every overload listed in ``__doc__``); return values are checked against the real
  return annotation (``bool`` from the setters and ``execute_async_v3``, a real ``Dims``
  from ``get_tensor_shape``, real enums, ``None`` for a failed object creation); a method
  whose real return type has no Python binding (``nvinfer1::TensorFormat`` in
  ``tensorrt_lean``) raises TypeError, as the real call does.

**Behaviour.** The context reads its inputs at the addresses bound to it and computes the
outputs (ONNX Runtime on the exported graph, or a torch function); its *writes are
deferred*, and the output buffers are poisoned (NaN, or 0xA5 bytes) until then:

- on the CPU, until the next synchronisation point of the stream it was given
  (:class:`HostStreams`: the end of the runner's enqueue block, or ``synchronize()``);
- on a GPU, it enqueues the writes on the CUDA stream whose handle it was given, behind a
  sleep kernel of at least ``Knobs.sleep_ms`` (50 ms; its cycle count assumes the fastest SM
  clock any GPU has, :func:`sleep_cycles`, so it is never shorter on a fast GPU), so a
  wrong-stream, lifetime or missing-wait bug in the adapter reads poison and gives wrong
  numbers.

It also checks that each bound output buffer holds the shape it reported (on a GPU from the
caching allocator's records; on the CPU when ``Knobs.check_buffers`` is set), supports
several inputs of any I/O dtype torch and TensorRT share, engines with two optimization
profiles (the adapter must refuse them), data-dependent output shapes through the
adapter's ``IOutputAllocator``, and a rejected ``set_input_shape`` (``set_tensor_address``) leaves
that input's shape (address) unspecified (stricter than TensorRT promises: the API leaves it
unstated).

**Refit.** An engine made with ``weights=`` computes with them (``ort_weighted_compute``,
``torch_weighted_compute``), is ``refittable`` (unless ``Knobs.refittable`` says otherwise), and
:func:`refitter_double` is its ``Refitter``, as strict as the real one (its docstrings):
``set_named_weights`` returns False for a name that is not a refittable weight (``Knobs.folded``:
weights the builder folded), and for another dtype or element count than the prototype's (a
``Weights`` has no shape, so TensorRT cannot see one of the same count); weights combined at build
(``Knobs.fused``) are missing until all are set, and ``refit_cuda_engine`` then returns False; the
values are read from the ``Weights``' pointer when ``refit_cuda_engine`` runs, and only then does
the engine compute with them; a refit with the engine's work in flight fails the test (undefined
in TensorRT); a non-refittable engine cannot have one (the real constructor raises). The real
``Refitter`` accepts only a real engine, so a runner reaches the double through
:func:`runtime_module`: the real module with its ``Refitter`` replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import re
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from torch_trt_module._core.dtypes import by_name
from torch_trt_module._core.spec import TensorSpec
from torch_trt_module.backends import normalize_device

Compute = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
#: What an engine with weights computes with: the inputs, and the engine's weights as they are now.
WeightedCompute = Callable[[dict[str, torch.Tensor], Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


# --------------------------------------------------------------------------- the real surface

@dataclass(frozen=True)
class Overload:
    params: tuple[tuple[str, str], ...]  # (name, annotation), self excluded
    required: int
    returns: str


def _split_top(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[(<":
            depth += 1
        elif ch in "])>":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


_SIG = re.compile(r"^(?:\d+\. )?(\w+)\((.*)\) -> (.+)$")


def overloads(real: type, name: str) -> list[Overload]:
    """Every signature pybind11 lists for ``real.name`` (a method)."""
    doc = getattr(real, name).__doc__ or ""
    found = []
    for line in doc.splitlines():
        m = _SIG.match(line.strip())
        if not m or m.group(1) != name or m.group(2) == "*args, **kwargs":
            continue
        params = []
        required = 0
        for p in _split_top(m.group(2))[1:]:  # [0] is self
            head, _, default = p.partition(" = ")
            pname, _, ann = head.partition(": ")
            params.append((pname.strip(), ann.strip()))
            if not default:
                required += 1
        found.append(Overload(tuple(params), required, m.group(3).strip()))
    if not found:
        raise AssertionError(f"no signature found for {real.__name__}.{name} in its __doc__")
    return found


def property_returns(real: type, name: str) -> tuple[str, bool]:
    """(return annotation, writable) of a real property."""
    prop = getattr(real, name)
    m = re.search(r"-> (.+)$", (prop.fget.__doc__ or "").strip())
    return (m.group(1).strip() if m else "object"), prop.fset is not None


def _checker(ann: str, trt: Any) -> Callable[[Any], bool] | None:
    """A type check for one annotation, or None where any value is accepted."""
    base = ann.rpartition(".")[2]
    simple: dict[str, Callable[[Any], bool]] = {
        "bool": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "typing.SupportsInt": lambda v: hasattr(v, "__index__") and not isinstance(v, (bool, float)),
        "str": lambda v: isinstance(v, str),
        "None": lambda v: v is None,
        "tuple": lambda v: isinstance(v, tuple),
        "list": lambda v: isinstance(v, list),
        "list[str]": lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
    }
    if ann in simple:
        return simple[ann]
    if ann.startswith(trt.__name__.split(".")[0]) or ".tensorrt" in ann:
        real_cls = getattr(trt, base, None)
        if isinstance(real_cls, type):
            return lambda v: (isinstance(v, real_cls) or getattr(type(v), "real", None) is real_cls
                              or (v is None and base.startswith("I")))  # a failed creation returns None
    return None


def _matches(ov: Overload, args: tuple[Any, ...], kwargs: dict[str, Any], trt: Any) -> bool:
    names = [n for n, _ in ov.params]
    if len(args) > len(names) or any(k not in names[len(args):] for k in kwargs):
        return False
    given = names[:len(args)] + list(kwargs)
    if any(n not in given for n in names[:ov.required]):
        return False
    values = dict(zip(names, args), **kwargs)
    return all((check := _checker(ann, trt)) is None or check(values[n]) for n, ann in ov.params if n in values)


class StrictDouble:
    """Base of the doubles: the real class's attribute rules (see the module docstring)."""

    real: type = object
    trt: Any = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        real = cls.real
        for name, value in list(vars(cls).items()):
            if name.startswith("_") or name in ("real", "trt"):
                continue
            if not hasattr(real, name):
                raise TypeError(f"the double defines {name!r}, which {real.__name__} does not have")
            if isinstance(value, property):
                ann, writable = property_returns(real, name)
                if value.fset is not None and not writable:
                    raise TypeError(f"{real.__name__}.{name} is read-only; the double must not set it")
                setattr(cls, name, property(_checked_get(value.fget, ann, cls, name),
                                            value.fset if writable else None))
            elif callable(value):
                setattr(cls, name, _checked_call(value, overloads(real, name), cls, name))

    def __getattr__(self, name: str) -> Any:
        if hasattr(self.real, name):
            raise AttributeError(f"the test double of {self.real.__name__} does not implement {name!r}")
        raise AttributeError(f"'{self.real.__module__}.{self.real.__name__}' object has no attribute '{name}'")

    def __setattr__(self, name: str, value: Any) -> None:
        prop = getattr(type(self), name, None)
        if isinstance(prop, property) and prop.fset is not None:
            prop.fset(self, value)
            return
        raise AttributeError(f"'{self.real.__module__}.{self.real.__name__}' object has no attribute '{name}'")


def _checked_get(fget: Any, ann: str, cls: type, name: str) -> Any:
    def get(self: Any) -> Any:
        value = fget(self)
        check = _checker(ann, cls.trt)  # type: ignore[attr-defined]
        assert check is None or check(value), f"double {cls.real.__name__}.{name} returned {value!r}, real: {ann}"
        return value
    return get


def _checked_call(fn: Callable[..., Any], ovs: list[Overload], cls: type, name: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        trt = cls.trt  # type: ignore[attr-defined]
        matching = [ov for ov in ovs if _matches(ov, args, kwargs, trt)]
        if not matching:
            sigs = "; ".join(f"({', '.join(f'{n}: {a}' for n, a in ov.params)}) -> {ov.returns}" for ov in ovs)
            raise TypeError(f"{name}(): incompatible function arguments {args!r} {kwargs!r}. "
                            f"The real {cls.real.__name__}.{name} takes: {sigs}")
        if any(ov.returns.startswith("nvinfer1::") for ov in matching):
            raise TypeError(f"Unable to convert function return value to a Python type! The signature was "
                            f"{name}(...) -> {matching[0].returns}")
        value = fn(self, *args, **kwargs)
        checks = [_checker(ov.returns, trt) for ov in matching]
        assert any(c is None or c(value) for c in checks), \
            f"double {cls.real.__name__}.{name} returned {value!r}; the real one returns {matching[0].returns}"
        return value
    return call


# --------------------------------------------------------------------------- memory

def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


class _CudaMemory:
    """A raw device pointer as torch sees it (``__cuda_array_interface__``), no copy."""

    def __init__(self, addr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (addr, False),
                                         "version": 3, "strides": None}


def read(addr: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    nbytes = _nbytes(shape, dtype)
    if nbytes == 0:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    if device.type == "cuda":
        raw = torch.as_tensor(_CudaMemory(addr, nbytes), device=device)
    else:
        raw = torch.frombuffer((ctypes.c_char * nbytes).from_address(addr), dtype=torch.uint8)
    return raw.clone().view(dtype).reshape(tuple(shape))


def view(addr: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """The bytes at ``addr`` as a uint8 tensor sharing that memory."""
    if device.type == "cuda":
        return torch.as_tensor(_CudaMemory(addr, nbytes), device=device)
    return torch.frombuffer((ctypes.c_char * nbytes).from_address(addr), dtype=torch.uint8)


def poison(addr: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
    nbytes = _nbytes(shape, dtype)
    if nbytes:
        target = view(addr, nbytes, device)
        if dtype.is_floating_point:
            target.view(dtype).fill_(float("nan"))
        else:
            target.fill_(0xA5)


def _cpu_buffer_size(addr: int) -> int | None:
    """Bytes from ``addr`` to the end of the live CPU tensor holding it (slow: a gc scan)."""
    for obj in gc.get_objects():
        if type(obj) is torch.Tensor and obj.device.type == "cpu" and obj.numel():
            start = obj.untyped_storage().data_ptr()
            size = obj.untyped_storage().nbytes()
            if start <= addr < start + size:
                return start + size - addr
    return None


def _cuda_buffer_size(addr: int, device: torch.device) -> int | None:
    for seg in torch.cuda.memory_snapshot():
        if seg.get("device") != device.index:
            continue
        start = seg["address"]
        for block in seg["blocks"]:
            start = block.get("address", start)
            if block["state"] == "active_allocated" and start <= addr < start + block["size"]:
                return start + block["size"] - addr
            start += block["size"]
    return None


# --------------------------------------------------------------------------- streams

class HostStreams:
    """TEST DOUBLE of the adapter's CUDA streams on a CPU machine (implements its ``Streams``).

    Work the double engine submits on a handle runs at that handle's next synchronisation
    point: the end of the runner's enqueue block (where, on CUDA, the caller's stream is
    ordered after the work), ``wait(handle)``, or ``synchronize()``. Work on any other
    handle (the legacy stream 0, say) stays pending, its outputs poisoned.
    """

    def __init__(self, handle: int = 7) -> None:
        self.handle = handle
        self.pending: dict[int, list[Callable[[], None]]] = {}
        self._lock = threading.Lock()

    def submit(self, handle: int, work: Callable[[], None]) -> None:
        with self._lock:
            self.pending.setdefault(handle, []).append(work)

    @contextlib.contextmanager
    def enqueue(self, tensors: Sequence[torch.Tensor]) -> Iterator[int]:
        try:
            yield self.handle
        finally:
            self.synchronize(self.handle)

    def wait(self, handle: int) -> None:
        self.synchronize(handle)

    def synchronize(self, handle: int | None = None) -> None:
        with self._lock:
            handles = list(self.pending) if handle is None else [handle]
            work = [w for h in handles for w in self.pending.pop(h, [])]
        for w in work:
            w()


#: Above the SM clock of any GPU (the fastest boost clocks are 2.5-3 GHz), in kHz: cycles per ms.
MAX_SM_KHZ = 3_500_000


def sleep_cycles(device: torch.device, ms: float) -> int:
    """Cycles for ``torch.cuda._sleep`` (a kernel that spins on the SM clock) to last at least ``ms``
    milliseconds on ``device``: sized for the fastest clock the device reports or any GPU has, so
    a fast GPU never makes it shorter (a slower clock only makes it longer)."""
    reported = getattr(torch.cuda.get_device_properties(device), "clock_rate", 0) or 0  # kHz, the max clock
    return int(ms * max(int(reported), MAX_SM_KHZ))


# --------------------------------------------------------------------------- the doubles

@dataclass
class Knobs:
    """What a test changes about the double (never attributes of the double itself: the real
    objects take none)."""

    fail_execute: bool = False
    no_context: bool = False  # create_execution_context fails (returns None), as out of device memory
    reject_address: set[str] = field(default_factory=set)  # tensors whose set_tensor_address returns False
    reject_allocator: bool = False  # set_output_allocator returns False
    host_location: set[str] = field(default_factory=set)  # tensors the engine reports in host memory
    infer_shapes_raises: str | None = None
    forget_shapes: set[str] = field(default_factory=set)  # inputs whose shape the context loses
    profiles: int = 1
    dtype_override: dict[str, str] = field(default_factory=dict)  # tensor -> the dtype the engine reports
    format_desc: str = "Row major linear FP32 format (kLINEAR)"
    vectorized_dim: int = -1
    check_buffers: bool = False  # on the CPU (a gc scan per output); always on a GPU
    sleep_ms: float = 50.0  # on a GPU: the writes land at least this long after they are enqueued
    refittable: bool | None = None  # None: refittable when the engine has weights (a REFIT build)
    folded: frozenset[str] = frozenset()  # weights the builder folded: not refittable
    fused: tuple[frozenset[str], ...] = ()  # weights combined at build: set one, the others are missing
    fail_refit: bool = False  # refit_cuda_engine refits a subset, logs an error and returns False
    refits: list[list[str]] = field(default_factory=list)  # the weights of every successful refit
    record: list[tuple[Any, int]] | None = None  # set: execute_async_v3 records instead of running
    handles: list[int] = field(default_factory=list)  # every stream handle execute was given
    contexts: list[Any] = field(default_factory=list)
    # What a context's is_stream_capturable answers (only where the real class has it: tensorrt_rtx); False is a
    # TensorRT-RTX engine built without REQUIRE_USER_ALLOCATION. The handles it was asked about.
    stream_capturable: bool = True
    capturable_asked: list[int] = field(default_factory=list)


@functools.lru_cache(maxsize=None)
def doubles(trt: Any) -> tuple[type, type]:
    """The (engine, context) double classes whose surface is that of ``trt``'s real classes."""

    class Engine(StrictDouble):
        real = trt.ICudaEngine

        def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                     compute: Compute | WeightedCompute, *, knobs: Knobs | None = None,
                     device: str | torch.device = "cpu", streams: HostStreams | None = None,
                     dds_outputs: Sequence[str] = (), weights: Mapping[str, torch.Tensor] | None = None) -> None:
            """``weights``: the engine's weights by name, as built; then ``compute`` is a
            :data:`WeightedCompute`, called with the weights the engine holds at each run."""
            object.__setattr__(self, "_d", _EngineState(list(inputs), list(outputs), compute, knobs or Knobs(),
                                                        normalize_device(device), streams, set(dds_outputs), trt,
                                                        weights))

        @property
        def refittable(self) -> bool:
            knob = self._d.knobs.refittable
            return bool(self._d.weights is not None if knob is None else knob)

        @property
        def num_io_tensors(self) -> int:
            return len(self._d.inputs) + len(self._d.outputs)

        @property
        def num_optimization_profiles(self) -> int:
            return self._d.knobs.profiles

        def get_tensor_name(self, index: int) -> str:
            return (self._d.inputs + self._d.outputs)[index].name

        def get_tensor_mode(self, name: str) -> Any:
            mode = trt.TensorIOMode
            return mode.INPUT if any(s.name == name for s in self._d.inputs) else mode.OUTPUT

        def get_tensor_dtype(self, name: str) -> Any:
            dtype = self._d.knobs.dtype_override.get(name, self._d.spec(name).dtype)
            return getattr(trt.DataType, by_name(dtype).trt)

        def get_tensor_location(self, name: str) -> Any:
            host = name in self._d.knobs.host_location
            return trt.TensorLocation.HOST if host else trt.TensorLocation.DEVICE

        def get_tensor_vectorized_dim(self, name: str, profile_index: int = 0) -> int:
            return self._d.knobs.vectorized_dim

        def get_tensor_format_desc(self, name: str, profile_index: int = 0) -> str:
            return self._d.knobs.format_desc

        def get_tensor_format(self, name: str, profile_index: int = 0) -> Any:
            raise AssertionError("unreachable where the real return type has no binding (tensorrt_lean)")

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Any]:
            s = self._d.spec(name)
            return [trt.Dims(s.min), trt.Dims(s.opt), trt.Dims(s.max)]

        def create_execution_context(self, *args: Any, **kwargs: Any) -> Any:
            self._d.on_its_device("create_execution_context")
            if self._d.knobs.no_context:
                return None
            ctx = Context(self)
            self._d.knobs.contexts.append(ctx)
            return ctx

    class Context(StrictDouble):
        real = trt.IExecutionContext

        def __init__(self, engine: Engine) -> None:
            object.__setattr__(self, "_c", _ContextState(engine._d))

        def set_input_shape(self, name: str, shape: Any) -> bool:
            return self._c.set_shape(name, tuple(shape))

        def set_tensor_address(self, name: str, memory: int) -> bool:
            return self._c.set_address(name, int(memory))

        def get_tensor_address(self, name: str) -> int:
            return self._c.addrs.get(name, 0)

        def set_output_allocator(self, name: str, output_allocator: Any) -> bool:
            if self._c.e.knobs.reject_allocator:
                return False
            self._c.allocators[name] = output_allocator
            return True

        def infer_shapes(self) -> list[str]:
            return self._c.infer_shapes()

        def get_tensor_shape(self, name: str) -> Any:
            return trt.Dims(self._c.shape_of(name))

        def execute_async_v3(self, stream_handle: int) -> bool:
            self._c.e.on_its_device("execute_async_v3")
            return self._c.execute(int(stream_handle))

        if hasattr(trt.IExecutionContext, "is_stream_capturable"):  # tensorrt_rtx; not tensorrt_lean
            def is_stream_capturable(self, stream: int) -> bool:
                knobs = self._c.e.knobs
                knobs.capturable_asked.append(int(stream))
                return bool(knobs.stream_capturable)

    Engine.trt = Context.trt = trt
    return Engine, Context


def runtime_double(trt: Any, seen: list[bool], *, refuse: Sequence[bytes] = (b"bad",)) -> type:
    """A double of ``trt.Runtime`` whose ``deserialize_cuda_engine`` returns an engine double (or
    None for a plan in ``refuse``) and records ``engine_host_code_allowed`` at each call in ``seen``."""
    engine_cls, _ = doubles(trt)

    class Runtime(StrictDouble):
        real = trt.Runtime

        def __init__(self, logger: Any) -> None:
            object.__setattr__(self, "_host_code", False)  # the real default

        @property
        def engine_host_code_allowed(self) -> bool:
            return bool(self._host_code)

        @engine_host_code_allowed.setter
        def engine_host_code_allowed(self, value: bool) -> None:
            object.__setattr__(self, "_host_code", value)

        def deserialize_cuda_engine(self, serialized_engine: Any) -> Any:
            seen.append(self.engine_host_code_allowed)
            if bytes(serialized_engine) in refuse:
                return None
            return engine_cls([], [], lambda feeds: {})

    Runtime.trt = trt
    return Runtime


def _bind(cls: type, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a call of the real ``cls.real.name`` by parameter name, or pybind11's TypeError."""
    for ov in overloads(cls.real, name):
        if _matches(ov, args, kwargs, cls.trt):  # type: ignore[attr-defined]
            return dict(zip([n for n, _ in ov.params], args), **kwargs)
    sigs = "; ".join(f"({', '.join(f'{n}: {a}' for n, a in ov.params)})" for ov in overloads(cls.real, name))
    raise TypeError(f"{name}(): incompatible constructor arguments {args!r} {kwargs!r}. "
                    f"The real {cls.real.__name__} takes: {sigs}")


@functools.lru_cache(maxsize=None)
def refitter_double(trt: Any) -> type:
    """The double of ``trt.Refitter`` over an engine double (the module docstring says how strict)."""

    class Refitter(StrictDouble):
        real = trt.Refitter

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            bound = _bind(Refitter, "__init__", args, kwargs)
            engine, logger = bound["engine"], bound["logger"]
            if engine is None or logger is None:  # references in C++: pybind11 refuses None
                raise TypeError("__init__(): incompatible constructor arguments: engine and logger cannot be None")
            state = getattr(engine, "_d", None)
            assert isinstance(state, _EngineState), "the Refitter double refits engine doubles only"
            if not engine.refittable:
                # What TensorRT does: it logs this, createInferRefitter returns nullptr, and pybind11 raises.
                logger.log(trt.ILogger.Severity.ERROR,
                           "[refit.cpp::createInferRefitter] Error Code 3: API Usage Error (Parameter check "
                           "failed, condition: e.isRefittable()) [test double]")
                raise TypeError("pybind11::init(): factory function returned nullptr")
            object.__setattr__(self, "_r", _RefitState(state, logger, trt))

        @property
        def logger(self) -> Any:
            return self._r.logger

        def get_all_weights(self) -> list[str]:
            return self._r.refittable()

        def get_weights_prototype(self, weights_name: str) -> Any:
            return self._r.prototype(weights_name)

        def set_named_weights(self, name: str, weights: Any, location: Any = None) -> bool:
            return self._r.set(name, weights, trt.TensorLocation.HOST if location is None else location)

        def unset_named_weights(self, weights_name: str) -> bool:
            return self._r.staged.pop(weights_name, None) is not None

        def get_missing_weights(self) -> list[str]:
            return self._r.missing()

        def refit_cuda_engine(self) -> bool:
            self._r.e.on_its_device("refit_cuda_engine")
            return self._r.refit()

    Refitter.trt = trt
    return Refitter


@functools.lru_cache(maxsize=None)
def runtime_module(trt: Any) -> types.ModuleType:
    """``trt`` with its ``Refitter`` replaced by :func:`refitter_double` (the real one takes only a
    real engine): what a runner over an engine double that refits is given as ``trt=``. Every other
    name is the real module's own object."""
    module = types.ModuleType(trt.__name__, trt.__doc__)
    for name, value in vars(trt).items():
        if not name.startswith("__") or name == "__version__":
            setattr(module, name, value)
    module.Refitter = refitter_double(trt)  # type: ignore[attr-defined]
    return module


def weights_address(w: Any) -> int:
    """The address a real ``trt.Weights`` points at. Its binding shows no pointer: ``numpy()`` is a
    view for the dtypes numpy has, and not for BF16. So it is read from the ``nvinfer1::Weights``
    (``{DataType type; void const* values; int64_t count}``) that the pybind11 instance holds,
    checked against the type and count the binding reports and, where numpy can, its view."""
    holder = ctypes.c_void_p.from_address(id(w) + object.__basicsize__).value
    assert holder, "not a pybind11 instance"
    dtype = ctypes.c_int32.from_address(holder).value
    values = ctypes.c_void_p.from_address(holder + 8).value or 0
    count = ctypes.c_int64.from_address(holder + 16).value
    assert dtype == int(w.dtype) and count == w.size, \
        "trt.Weights is not laid out as nvinfer1::Weights {type, values, count}: update weights_address"
    if values and count > 0:
        array = w.numpy()
        assert array is w or array.ctypes.data == values, "weights_address disagrees with Weights.numpy()"
    return values


class _RefitState:
    def __init__(self, engine: "_EngineState", logger: Any, trt: Any) -> None:
        self.e, self.logger, self.trt = engine, logger, trt
        self.staged: dict[str, tuple[Any, Any]] = {}  # name -> (Weights, TensorLocation), until unset

    def error(self, msg: str) -> None:
        self.logger.log(self.trt.ILogger.Severity.ERROR, f"{msg} [test double]")

    def _known(self, name: str) -> torch.Tensor | None:
        return None if name in self.e.knobs.folded else (self.e.weights or {}).get(name)

    def refittable(self) -> list[str]:
        return [n for n in self.e.weights or {} if n not in self.e.knobs.folded]

    def prototype(self, name: str) -> Any:
        if self._known(name) is None:  # "size -1 when the name does not correspond to any refittable weights"
            return self.trt.Weights(self.trt.DataType.FLOAT, 0, -1)
        built = self.e.built[name]
        return self.trt.Weights(_trt_dtype(self.trt, built.dtype), built.data_ptr(), built.numel())

    def set(self, name: str, weights: Any, location: Any) -> bool:
        proto = self._known(name)
        if not name or proto is None:
            self.error(f"IRefitter::setNamedWeights: Error Code 3: API Usage Error ({name!r} does not correspond "
                       "to any refittable weights)")
            return False
        want = _trt_dtype(self.trt, proto.dtype)
        if weights.dtype != want:
            self.error(f"IRefitter::setNamedWeights: Error Code 3: API Usage Error (weights {name!r} are "
                       f"{weights.dtype}, the engine's are {want})")
            return False
        if weights.size != proto.numel():
            self.error(f"IRefitter::setNamedWeights: Error Code 3: API Usage Error (weights {name!r} have "
                       f"{weights.size} elements, the engine's have {proto.numel()})")
            return False
        if location == self.trt.TensorLocation.DEVICE and self.e.device.type != "cuda":
            self.error(f"IRefitter::setNamedWeights: weights {name!r} on the device, and there is none")
            return False
        self.staged[name] = (weights, location)
        return True

    def missing(self) -> list[str]:
        out: list[str] = []
        for group in self.e.knobs.fused:
            if any(n in self.staged for n in group):
                out += sorted(n for n in group if n not in self.staged and n not in out)
        return out

    def _read(self, name: str, weights: Any, location: Any) -> torch.Tensor:
        proto = self.e.weights[name]  # type: ignore[index]
        where = self.e.device if location == self.trt.TensorLocation.DEVICE else torch.device("cpu")
        value = read(weights_address(weights), proto.shape, proto.dtype, where)  # a Weights has no shape
        return value.to(self.e.device)

    def refit(self) -> bool:
        # "The behavior is undefined if the engine has pending enqueued work": here, the test fails.
        assert not self.e.busy(), "refit_cuda_engine with the engine's work in flight (undefined in TensorRT)"
        missing = self.missing()
        if missing:
            self.error(f"IRefitter::refitCudaEngine: Error Code 3: API Usage Error (missing weights {missing})")
            return False
        new = {name: self._read(name, w, loc) for name, (w, loc) in self.staged.items()}  # read now, not at set
        assert self.e.weights is not None
        if self.e.knobs.fail_refit:  # "If False is returned, a subset of weights may have been refitted."
            subset = dict(list(new.items())[: (len(new) + 1) // 2])
            self.e.weights = {**self.e.weights, **subset}
            self.error("IRefitter::refitCudaEngine: Error Code 1: refit failed (Knobs.fail_refit)")
            return False
        self.e.weights = {**self.e.weights, **new}
        self.e.knobs.refits.append(sorted(new))
        return True


def _trt_dtype(trt: Any, dtype: torch.dtype) -> Any:
    return getattr(trt.DataType, by_name(str(dtype).removeprefix("torch.")).trt)


class _EngineState:
    def __init__(self, inputs: list[TensorSpec], outputs: list[TensorSpec], compute: Any, knobs: Knobs,
                 device: torch.device, streams: HostStreams | None, dds: set[str], trt: Any,
                 weights: Mapping[str, torch.Tensor] | None = None) -> None:
        self.inputs, self.outputs, self.compute, self.knobs = inputs, outputs, compute, knobs
        self.device, self.streams, self.dds, self.trt = device, streams, dds, trt
        self._stream: Any = None
        # What the engine computes with: replaced (a new dict) by each refit that changes it.
        self.weights: dict[str, torch.Tensor] | None = None if weights is None else {
            k: v.detach().to(device).contiguous().clone() for k, v in weights.items()}
        # The values it was built with, in host memory (what get_weights_prototype points at).
        self.built: dict[str, torch.Tensor] = {} if weights is None else {
            k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
        self._inflight = 0  # on the CPU: submitted work that has not landed
        self._events: list[Any] = []  # on a GPU: one event after each run's writes
        self._lock = threading.Lock()


    def on_its_device(self, what: str) -> None:
        """Stricter than TensorRT, which creates contexts, runs and refits on the *current* CUDA
        device whatever the engine's (it fails later, or writes another GPU's memory): a call made
        while another device is current is the adapter's bug, so the double stops there."""
        if self.device.type == "cuda" and self.device.index is not None:
            current = torch.cuda.current_device()
            if current != self.device.index:
                raise AssertionError(f"{what} while cuda:{current} is the current device; the engine is on "
                                     f"{self.device} [test double]")
    def evaluate(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.weights is None:
            return self.compute(feeds)
        return self.compute(feeds, self.weights)

    def submitted(self, event: Any = None) -> None:
        with self._lock:
            if event is None:
                self._inflight += 1
            else:
                self._events.append(event)

    def landed(self) -> None:
        with self._lock:
            self._inflight -= 1

    def busy(self) -> bool:
        """Whether work this engine enqueued has not finished."""
        with self._lock:
            self._events = [e for e in self._events if not e.query()]
            return self._inflight > 0 or bool(self._events)

    def private_stream(self) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def spec(self, name: str) -> TensorSpec:
        for s in self.inputs + self.outputs:
            if s.name == name:
                return s
        raise AssertionError(f"no tensor {name!r}")


class _ContextState:
    def __init__(self, engine: _EngineState) -> None:
        self.e = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addrs: dict[str, int] = {}
        self.allocators: dict[str, Any] = {}
        self.results: dict[str, torch.Tensor] = {}
        self.set_shape_calls = 0
        self.threads: set[int] = set()

    def set_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.set_shape_calls += 1
        self.threads.add(threading.get_ident())
        spec = self.e.spec(name)
        ok = (spec.min is not None and spec.max is not None and len(shape) == len(spec.min)
              and all(lo <= s <= hi for s, lo, hi in zip(shape, spec.min, spec.max)))
        if ok:
            self.shapes[name] = shape
        else:
            self.shapes.pop(name, None)  # strict: a rejected shape leaves the input unspecified
        return ok

    def set_address(self, name: str, addr: int) -> bool:
        self.threads.add(threading.get_ident())
        if not addr or name in self.e.knobs.reject_address:  # TensorRT rejects null pointers
            self.addrs.pop(name, None)  # strict: a rejected address leaves the tensor's unspecified
            return False
        self.addrs[name] = addr
        return True

    def _feeds(self) -> dict[str, torch.Tensor]:
        return {s.name: read(self.addrs[s.name], self.shapes[s.name], s.torch_dtype, self.e.device)
                for s in self.e.inputs}

    def infer_shapes(self) -> list[str]:
        for name in self.e.knobs.forget_shapes:
            self.shapes.pop(name, None)
        if self.e.knobs.infer_shapes_raises:
            raise RuntimeError(self.e.knobs.infer_shapes_raises)
        missing = [s.name for s in self.e.inputs if s.name not in self.shapes or s.name not in self.addrs]
        if not missing:
            self.results = self._compute()  # shapes only; execute computes again from the inputs then
        return missing

    @contextlib.contextmanager
    def _private(self) -> Iterator[None]:
        """The double's own work: on a GPU on a stream of its own, and host-synchronous."""
        if self.e.device.type != "cuda":
            yield
            return
        torch.cuda.synchronize(self.e.device)  # the caller's pending writes to the inputs land first
        with torch.cuda.stream(self.e.private_stream()):
            yield
        torch.cuda.synchronize(self.e.device)

    def _compute(self) -> dict[str, torch.Tensor]:
        with self._private():
            return {k: v.to(self.e.spec(k).torch_dtype) for k, v in self.e.evaluate(self._feeds()).items()}

    def shape_of(self, name: str) -> tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
        shape = tuple(self.results[name].shape)
        return tuple(-1 for _ in shape) if name in self.e.dds else shape

    def _buffer_ok(self, addr: int, nbytes: int) -> bool:
        if self.e.device.type == "cuda":
            size = _cuda_buffer_size(addr, self.e.device)
        elif self.e.knobs.check_buffers:
            size = _cpu_buffer_size(addr)
        else:
            return True
        return size is not None and size >= nbytes

    def execute(self, handle: int) -> bool:
        knobs = self.e.knobs
        self.threads.add(threading.get_ident())
        knobs.handles.append(handle)
        if knobs.record is not None:  # a CUDA graph capture double records instead of running
            knobs.record.append((self, handle))
            return True
        return self.run(handle)

    def run(self, handle: int) -> bool:
        if self.e.knobs.fail_execute or any(s.name not in self.addrs for s in self.e.outputs if s.name not in self.e.dds):
            return False
        results = self._compute()  # the inputs as they are when the work is enqueued
        writes: list[tuple[int, torch.Tensor]] = []
        for spec in self.e.outputs:
            value = results[spec.name].contiguous()
            nbytes = value.numel() * value.element_size()
            if spec.name in self.e.dds:  # TensorRT calls these before execute returns
                alloc = self.allocators[spec.name]
                addr = alloc.reallocate_output_async(spec.name, 0, max(nbytes, 1), 256, handle)
                alloc.notify_shape(spec.name, self.e.trt.Dims(tuple(value.shape)))
            else:
                addr = self.addrs[spec.name]
                assert self._buffer_ok(addr, nbytes), \
                    f"output {spec.name!r}: the buffer bound at {addr:#x} is smaller than its {nbytes} bytes"
            writes.append((addr, value))
        with self._private():
            for addr, value in writes:
                poison(addr, value.shape, value.dtype, self.e.device)
        self._defer(handle, writes)
        return True

    def _defer(self, handle: int, writes: list[tuple[int, torch.Tensor]]) -> None:
        device = self.e.device

        def land() -> None:
            for addr, value in writes:
                n = value.numel() * value.element_size()
                if n:
                    view(addr, n, device).copy_(value.reshape(-1).view(torch.uint8), non_blocking=True)

        if device.type == "cuda":
            stream = torch.cuda.ExternalStream(handle, device=device)
            with torch.cuda.stream(stream):
                torch.cuda._sleep(sleep_cycles(device, self.e.knobs.sleep_ms))  # the writes land after it
                land()
                for _, value in writes:
                    value.record_stream(stream)
                done = torch.cuda.Event()
                done.record(stream)
            self.e.submitted(done)
        else:
            assert self.e.streams is not None, "a CPU double needs HostStreams"

            def land_on_host() -> None:
                land()
                self.e.landed()

            self.e.submitted()
            self.e.streams.submit(handle, land_on_host)


def replay(context: Any, handle: int) -> bool:
    """Run work a capture recorded (``Knobs.record``) on ``context``, as a graph replay would."""
    return bool(context.run(handle))


def ort_compute(onnx: bytes, output_names: Sequence[str]) -> Compute:
    """Compute the outputs by running the exported graph on ONNX Runtime (CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    graph_inputs = {i.name for i in session.get_inputs()}

    def compute(feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        arrays = {k: v.cpu().numpy() for k, v in feeds.items() if k in graph_inputs}
        return {n: torch.from_numpy(a) for n, a in zip(output_names, session.run(list(output_names), arrays))}

    return compute


def torch_compute(fn: Callable[..., Any], input_names: Sequence[str], output_names: Sequence[str]) -> Compute:
    """Compute the outputs with a torch function of the inputs (in order); it returns a tensor or a tuple."""

    def compute(feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            out = fn(*(feeds[n] for n in input_names))
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        return dict(zip(output_names, outs))

    return compute


def onnx_weights(onnx: bytes, names: Any) -> dict[str, torch.Tensor]:
    """The values of the graph's initializers ``names`` (what an engine built from it holds)."""
    import onnx as onnx_lib
    from onnx import numpy_helper

    model = onnx_lib.load_from_string(onnx)
    return {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer
            if i.name in names}


def ort_weighted_compute(onnx: bytes, output_names: Sequence[str]) -> WeightedCompute:
    """Like :func:`ort_compute`, computing with the engine's weights: the graph's initializers of
    those names replaced by them (a session over the new graph each time the weights change)."""
    import onnx as onnx_lib
    import onnxruntime as ort
    from onnx import numpy_helper

    lock = threading.Lock()
    last: list[Any] = [None, None]  # the weights mapping (kept alive: compared by identity), its session

    def session_for(weights: Mapping[str, torch.Tensor]) -> Any:
        with lock:
            if last[0] is not weights:
                model = onnx_lib.load_from_string(onnx)
                for init in model.graph.initializer:
                    if init.name in weights:
                        init.CopyFrom(numpy_helper.from_array(weights[init.name].detach().cpu().numpy(), init.name))
                last[:] = [weights, ort.InferenceSession(model.SerializeToString(),
                                                         providers=["CPUExecutionProvider"])]
            return last[1]

    def compute(feeds: dict[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        session = session_for(weights)
        graph_inputs = {i.name for i in session.get_inputs()}
        arrays = {k: v.cpu().numpy() for k, v in feeds.items() if k in graph_inputs}
        return {n: torch.from_numpy(a) for n, a in zip(output_names, session.run(list(output_names), arrays))}

    return compute


def torch_weighted_compute(module: torch.nn.Module, input_names: Sequence[str], output_names: Sequence[str],
                           names: Mapping[str, str] | None = None) -> WeightedCompute:
    """Like :func:`torch_compute`, computing with the engine's weights in place of the module's
    parameters and buffers (``torch.func.functional_call``); ``names`` maps an engine weight's name
    to the module's (default: the same)."""

    def compute(feeds: dict[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        params = {(names or {}).get(k, k): v for k, v in weights.items()}
        with torch.inference_mode():
            out = torch.func.functional_call(module, params, tuple(feeds[n] for n in input_names))
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        return dict(zip(output_names, outs))

    return compute
