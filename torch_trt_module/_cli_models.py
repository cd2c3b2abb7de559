"""What the command line needs besides argument parsing: model specs, trtexec-style
shapes, example inputs, engines straight from ``.onnx`` files, and the latency
measurement that ``bench`` and ``benchmarks/bench_latency.py`` share.

Only the standard library and torch are imported at module level, so a benchmark
can use :func:`measure` on a machine that has nothing else.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ._errors import BackendUnavailable, TorchTRTError

__all__ = ["BACKENDS", "Candidate", "ModelSource", "Timing", "UsageError", "example_inputs", "exported_from_onnx",
           "load_model", "make_candidates", "measure", "parse_dtypes", "parse_shapes"]

Shape = tuple[int, ...]
Profile = tuple[Shape, Shape, Shape]  # (min, opt, max)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "int64": torch.int64, "long": torch.int64,
           "int32": torch.int32, "int": torch.int32, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}


class UsageError(TorchTRTError, ValueError):
    """The command line was given something it cannot use (exit code 2)."""


# --------------------------------------------------------------------------- shapes and dtypes

def _dims(text: str, item: str) -> Shape:
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"shape {text!r} in {item!r} is not dims joined by 'x' (e.g. 8x3x224x224)") from None
    if any(d < 0 for d in dims):
        raise UsageError(f"shape {text!r} in {item!r} has a negative dim")
    return dims


def parse_shapes(items: Sequence[str]) -> dict[str | None, Profile]:
    """trtexec-style shapes: ``x:1x3x224x224,8x3x224x224,32x3x224x224`` is min,opt,max of
    input ``x``; one shape (``x:8x3x224x224``) is static. Several inputs: repeat the option,
    or continue the list with the next ``name:`` (``a:1x4,2x4,8x4,b:1x2,2x2,8x2``). A
    shape without a name belongs to the single (or next positional) input: key ``None``.

    Example:
        >>> parse_shapes(["x:1x3,2x3,4x3"])
        {'x': ((1, 3), (2, 3), (4, 3))}
    """
    groups: list[tuple[str | None, list[str], str]] = []
    for item in items:
        current: list[str] | None = None  # each option value starts afresh
        for part in item.replace(";", ",").replace(" ", ",").split(","):
            if not part:
                continue
            if ":" in part:
                name, _, part = part.rpartition(":")
                groups.append((name, [], item))
            elif current is None or (groups[-1][0] is not None and len(current) == 3):
                groups.append((None, [], item))
            current = groups[-1][1]
            current.append(part)
    out: dict[str | None, Profile] = {}
    for name, shapes, item in groups:
        if len(shapes) not in (1, 3):
            raise UsageError(f"--shapes {item!r}: input {name or '(unnamed)'} has {len(shapes)} shapes; "
                             "give one (static) or three (min,opt,max)")
        lo, opt, hi = (_dims(s, item) for s in (shapes * 3 if len(shapes) == 1 else shapes))
        if not len(lo) == len(opt) == len(hi):
            raise UsageError(f"--shapes {item!r}: min, opt and max of {name or 'the input'} differ in rank")
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise UsageError(f"--shapes {item!r}: need min <= opt <= max in every dim")
        if name in out:
            raise UsageError(f"--shapes gives input {name or '(unnamed)'} twice")
        out[name] = (lo, opt, hi)
    return out


def parse_dtype(text: str) -> torch.dtype:
    try:
        return _DTYPES[text.lower()]
    except KeyError:
        raise UsageError(f"dtype {text!r} is not one of {', '.join(sorted(_DTYPES))}") from None


def parse_dtypes(items: Sequence[str]) -> dict[str | None, torch.dtype]:
    """``--dtype int64`` (every input) or ``--dtype input_ids:int64`` (one input)."""
    out: dict[str | None, torch.dtype] = {}
    for item in items:
        for part in filter(None, item.split(",")):
            name, _, dt = part.rpartition(":")
            out[name or None] = parse_dtype(dt)
    return out


def with_batch(profile: Profile, batches: Sequence[int]) -> Profile:
    """Widen dim 0 of a profile so that it covers ``batches``."""
    lo, opt, hi = profile
    if not lo or not batches:
        return profile
    return ((min(lo[0], *batches),) + lo[1:], opt, (max(hi[0], *batches),) + hi[1:])


# --------------------------------------------------------------------------- models

@dataclass
class ModelSource:
    """A model named on the command line: a torch module (from a factory) or an ONNX file."""

    spec: str
    module: torch.nn.Module | None = None
    onnx_path: str | None = None

    @property
    def input_names(self) -> list[str]:
        if self.module is not None:
            from ._signature import params_of

            return [p.name for p in params_of(self.module.forward) if p.kind in ("positional_only",
                                                                                "positional_or_keyword")]
        return [i[0] for i in onnx_io(self.onnx_path)[0]]  # type: ignore[arg-type]


def load_model(spec: str) -> ModelSource:
    """``path/model.onnx``, ``package.module:factory`` or ``path/file.py:factory``.

    The factory is called with no arguments and the result is put in eval mode.
    """
    if spec.lower().endswith(".onnx"):
        if not os.path.isfile(spec):
            raise UsageError(f"ONNX file {spec!r} does not exist")
        return ModelSource(spec, onnx_path=spec)
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise UsageError(f"model {spec!r} is neither an .onnx file nor 'package.module:factory' "
                         "(e.g. torchvision.models:resnet18)")
    try:
        if mod_name.endswith(".py"):
            if not os.path.isfile(mod_name):
                raise UsageError(f"model file {mod_name!r} does not exist")
            file_spec = importlib.util.spec_from_file_location(os.path.basename(mod_name)[:-3], mod_name)
            module: Any = importlib.util.module_from_spec(file_spec)  # type: ignore[arg-type]
            file_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(f"cannot import {mod_name!r} for model {spec!r}: {e} (is it on PYTHONPATH?)") from e
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise UsageError(f"{mod_name!r} has no attribute {attr!r} (model {spec!r})")
        factory = getattr(factory, part)
    if not callable(factory):
        raise UsageError(f"{spec!r} is a {type(factory).__name__}, not a factory to call")
    try:
        model = factory()
    except TypeError as e:
        raise UsageError(f"calling {spec}() with no arguments failed: {e}") from e
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{spec}() returned a {type(model).__name__}; expected a torch.nn.Module")
    return ModelSource(spec, module=model.eval())


def input_plan(source: ModelSource, shapes: Mapping[str | None, Profile],
               dtypes: Mapping[str | None, torch.dtype]) -> list[tuple[str, torch.dtype, Profile]]:
    """(name, dtype, profile) of each model input, from --shapes and --dtype."""
    names = source.input_names
    if source.onnx_path is not None:
        if dtypes:
            raise UsageError(f"{source.spec}: an ONNX file's input dtypes come from the graph; drop --dtype")
        graph = {n: (dt, dims) for n, dt, dims in onnx_io(source.onnx_path)[0]}
        profiles = _onnx_profiles(graph, _named(shapes, list(graph)), source.spec)
        return [(n, graph[n][0], p) for n, p in zip(graph, profiles)]
    if not shapes:
        raise UsageError(f"{source.spec} needs --shapes for its inputs ({', '.join(names) or 'none'}), e.g. "
                         f"--shapes {names[0] if names else 'x'}:1x3x224x224,8x3x224x224,32x3x224x224")
    named = _named(shapes, names)
    unknown = [n for n in list(named) + [k for k in dtypes if k] if n not in names]
    if unknown:
        raise UsageError(f"{source.spec}: unknown input(s) {unknown}; forward takes {names}")
    default = dtypes.get(None, torch.float32)
    return [(n, dtypes.get(n, default), p) for n, p in named.items()]


def _named(shapes: Mapping[str | None, Profile], names: list[str]) -> dict[str, Profile]:
    if None not in shapes:
        return dict(shapes)  # type: ignore[arg-type]
    free = [n for n in names if n not in shapes]
    if not free:
        raise UsageError(f"an unnamed shape in --shapes has no input left to go to (inputs: {names})")
    out = {free[0]: shapes[None]}
    out.update({k: v for k, v in shapes.items() if k is not None})
    return out


def example_inputs(plan: Sequence[tuple[str, torch.dtype, Profile]], *, which: int = 1,
                   batch: int | None = None) -> dict[str, torch.Tensor]:
    """Random inputs at the min (0), opt (1) or max (2) shape, optionally with batch ``batch``.

    Floats are normal noise; integer inputs are 0/1 (valid token ids for any vocabulary),
    except inputs named ``*mask*``, which are all ones.
    """
    out = {}
    for name, dtype, profile in plan:
        shape = profile[which]
        if batch is not None and shape:
            shape = (batch,) + shape[1:]
        if dtype.is_floating_point:
            t = torch.randn(shape).to(dtype)
        elif "mask" in name.lower():
            t = torch.ones(shape, dtype=dtype)
        else:
            t = torch.randint(0, 2, shape).to(dtype)
        out[name] = t
    return out


def dynamic_of(plan: Sequence[tuple[str, torch.dtype, Profile]]) -> dict[str, dict[int, tuple[int, int, int]]] | None:
    """compile()'s ``dynamic=`` for a plan: every dim whose min and max differ."""
    dyn = {n: {d: (lo, o, hi) for d, (lo, o, hi) in enumerate(zip(*p)) if lo != hi} for n, _, p in plan}
    dyn = {n: d for n, d in dyn.items() if d}
    return dyn or None


# --------------------------------------------------------------------------- ONNX files

def onnx_io(path: str | None, data: bytes | None = None) -> tuple[list[tuple[str, torch.dtype, tuple[Any, ...]]],
                                                                    list[tuple[str, torch.dtype, tuple[Any, ...]]]]:
    """(name, dtype, dims) of the graph's real inputs (not initializers) and outputs."""
    import onnx

    from ._spec import ONNX_ELEM_TYPES, dtype_from_name

    try:
        proto = onnx.load_from_string(data) if data is not None else onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf decode errors have no common base
        raise UsageError(f"{path or 'the data'} is not a readable ONNX model: {e}") from e
    inits = {i.name for i in proto.graph.initializer}

    def io(values: Any) -> list[tuple[str, torch.dtype, tuple[Any, ...]]]:
        rows = []
        for v in values:
            if v.name in inits:
                continue
            elem = v.type.tensor_type.elem_type
            if elem not in ONNX_ELEM_TYPES:
                raise UsageError(f"{path}: tensor {v.name!r} has ONNX element type {elem}, which engines do not support")
            dims = tuple(d.dim_param or (d.dim_value if d.HasField("dim_value") else "?")
                         for d in v.type.tensor_type.shape.dim)
            rows.append((v.name, dtype_from_name(ONNX_ELEM_TYPES[elem]), dims))
        return rows

    return io(proto.graph.input), io(proto.graph.output)


def _onnx_profiles(graph: Mapping[str, tuple[torch.dtype, tuple[Any, ...]]], shapes: Mapping[str, Profile],
                   spec: str) -> list[Profile]:
    unknown = sorted(set(shapes) - set(graph))
    if unknown:
        raise UsageError(f"{spec}: --shapes names unknown input(s) {unknown}; the graph's inputs are {list(graph)}")
    out = []
    for name, (_, dims) in graph.items():
        if name not in shapes:
            if not all(isinstance(d, int) for d in dims):
                raise UsageError(f"{spec}: input {name!r} has dynamic dims {dims}; give its range with --shapes "
                                 f"{name}:MIN,OPT,MAX (each like {'x'.join(str(d) if isinstance(d, int) else 'N' for d in dims)})")
            out.append((dims, dims, dims))
            continue
        profile = shapes[name]
        for which in profile:
            if len(which) != len(dims) or any(isinstance(d, int) and d != s for d, s in zip(dims, which)):
                raise UsageError(f"{spec}: --shapes {name}:{'x'.join(map(str, which))} does not fit the graph's "
                                 f"input shape {dims}")
        out.append(profile)
    return out


def exported_from_onnx(path: str, shapes: Mapping[str | None, Profile]) -> Any:
    """An :class:`~torch_trt_module.ExportedModel` for an ONNX file, so that it builds like an export.

    Inputs are called by keyword with the graph's input names; outputs come back as a
    dict keyed by the graph's output names.
    """
    from ._export import ExportedModel
    from ._signature import Param
    from ._spec import TensorSpec, TreeSpec, dtype_name

    with open(path, "rb") as f:
        data = f.read()
    ins, outs = onnx_io(path, data)
    graph = {n: (dt, dims) for n, dt, dims in ins}
    profiles = _onnx_profiles(graph, _named(shapes, list(graph)), path)
    inputs = tuple(TensorSpec(n, dtype_name(dt), dims, *p) for (n, dt, dims), p in zip(ins, profiles))
    outputs = tuple(TensorSpec(n, dtype_name(dt), dims) for n, dt, dims in outs)
    floats = {s.dtype for s in inputs + outputs} & {"float16", "bfloat16"}
    precision = "fp16" if "float16" in floats else "bf16" if floats else "fp32"
    return ExportedModel(
        onnx=data, inputs=inputs, outputs=outputs,
        call_tree=TreeSpec("dict", [TreeSpec("tensor") for _ in inputs], [s.name for s in inputs]),
        output_tree=TreeSpec("dict", [TreeSpec("tensor") for _ in outputs], [s.name for s in outputs]),
        params=tuple(Param(s.name, "keyword_only") for s in inputs), exporter="onnx-file", precision=precision,
        user_input_dtypes=tuple(s.dtype for s in inputs), user_output_dtypes=tuple(s.dtype for s in outputs))


# --------------------------------------------------------------------------- latency

@dataclass(frozen=True)
class Timing:
    """Latency statistics of one measured callable, in milliseconds."""

    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    iters: int
    warmup: int
    timer: str
    first_ms: float  # the first call alone (torch.compile compiles there)


def _pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def measure(fn: Callable[[], Any], *, warmup: int = 5, iters: int = 50, max_seconds: float | None = None,
            min_iters: int = 5, cuda: torch.device | None = None) -> Timing:
    """Call ``fn`` ``warmup`` times (at least once: the first call is timed alone), then time up to ``iters`` calls (fewer once ``max_seconds``
    have passed and ``min_iters`` are done). ``cuda``: time with CUDA events on that device's
    current stream (GPU time between the call's start and end); else ``time.perf_counter``.

    Example:
        >>> measure(lambda: sum(range(100)), warmup=1, iters=10).iters
        10
    """
    t = time.perf_counter()
    fn()
    if cuda is not None:
        torch.cuda.synchronize(cuda)
    first_ms = (time.perf_counter() - t) * 1e3
    for _ in range(warmup - 1):
        fn()
    if cuda is not None:
        torch.cuda.synchronize(cuda)
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(iters):
        if cuda is not None:
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            fn()
            t1.record()
            t1.synchronize()
            times.append(t0.elapsed_time(t1))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        if max_seconds is not None and len(times) >= min_iters and time.perf_counter() - start > max_seconds:
            break
    return Timing(_pct(times, 50), _pct(times, 90), _pct(times, 99), sum(times) / len(times), min(times),
                  len(times), max(warmup, 1), "cuda-events" if cuda is not None else "perf_counter", first_ms)


#: Every backend ``bench`` knows, in table order.
BACKENDS = ("eager", "torch.compile", "onnxruntime", "onnxruntime-cuda", "trtmodule-tensorrt",
            "trtmodule-tensorrt_rtx", "trtmodule-onnxruntime")


@dataclass
class Candidate:
    """One backend to time: ``call(inputs)``, or ``reason`` why it cannot run here."""

    name: str
    device: torch.device
    call: Callable[[Mapping[str, torch.Tensor]], Any] | None = None
    reason: str | None = None


def make_candidates(backends: Sequence[str], *, model: torch.nn.Module | None, exported: Any,
                    device: torch.device, export_error: str | None = None) -> list[Candidate]:
    """Set up each backend for timing; one that cannot run gets a reason instead of a callable.
    ``exported`` (the ONNX graph) may be None if the export failed (``export_error`` says why)."""
    out = []
    for name in backends:
        if exported is None and name not in ("eager", "torch.compile"):
            out.append(Candidate(name, device, reason=f"no ONNX graph: the export failed ({export_error})"))
            continue
        try:
            out.append(_candidate(name, model, exported, device))
        except (BackendUnavailable, NotRunnable) as e:
            out.append(Candidate(name, device, reason=f"not runnable on this machine: {e}"))
        except Exception as e:  # noqa: BLE001 - one backend failing must not lose the others' rows
            out.append(Candidate(name, device, reason=f"failed to set up: {type(e).__name__}: {e}".splitlines()[0]))
    return out


class NotRunnable(Exception):
    pass


def _candidate(name: str, model: torch.nn.Module | None, exported: Any, device: torch.device) -> Candidate:
    from .backends import select_backend

    if name in ("eager", "torch.compile"):
        if model is None:
            raise NotRunnable("the model is an ONNX file; there is no PyTorch module to run")
        m = model.to(device)
        # One graph per batch size (dynamic=False): the fastest code, compiled at each size's first call.
        fn = torch.compile(m, dynamic=False) if name == "torch.compile" else m
        return Candidate(name, device, lambda kw: fn(**kw))
    if name in ("onnxruntime", "onnxruntime-cuda"):
        return _ort_candidate(name, exported, torch.device("cuda" if name.endswith("cuda") else "cpu"))
    if name.startswith("trtmodule-"):
        from ._build import build_engine
        from ._module import TRTModule

        backend = name.split("-", 1)[1]
        run_dev = device if backend != "onnxruntime" else _ort_device(device)
        select_backend(backend, run_dev)  # raises BackendUnavailable with the reason
        module = TRTModule(build_engine(exported, backend=backend, device=run_dev, progress=False), device=run_dev)
        if module.backend != backend:
            raise NotRunnable(f"the {backend} engine falls back to {module.backend} here")
        return Candidate(name, run_dev, lambda kw: module(**kw))
    raise UsageError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def _ort_device(device: torch.device) -> torch.device:
    import onnxruntime as ort

    cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    return device if device.type == "cuda" and cuda_ep else torch.device("cpu")


def _ort_candidate(name: str, exported: Any, device: torch.device) -> Candidate:
    import numpy as np
    import onnxruntime as ort

    from .backends._onnxruntime import _session_options

    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise NotRunnable("no CUDA GPU")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise NotRunnable("onnxruntime has no CUDA execution provider (pip install onnxruntime-gpu)")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(exported.onnx, _session_options(), providers=providers)
    ins = [i.name for i in sess.get_inputs()]
    outs = [o.name for o in sess.get_outputs()]
    np_types = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
                torch.int32: np.int32, torch.bool: np.bool_, torch.int8: np.int8, torch.uint8: np.uint8}
    where = "cuda" if device.type == "cuda" else "cpu"

    def call(kw: Mapping[str, torch.Tensor]) -> Any:
        binding = sess.io_binding()  # inputs bound to torch memory, outputs allocated by ORT
        for n in ins:
            t = kw[n]
            binding.bind_input(n, where, device.index or 0, np_types[t.dtype], tuple(t.shape), t.data_ptr())
        for n in outs:
            binding.bind_output(n, where)
        sess.run_with_iobinding(binding)
        return binding.get_outputs()

    return Candidate(name, device, call)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)
