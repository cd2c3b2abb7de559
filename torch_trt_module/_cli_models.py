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
           "load_model", "make_candidates", "measure", "parse_dtypes", "parse_shapes", "time_candidates"]

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
                label, _, part = part.rpartition(":")
                groups.append((label, [], item))
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


# --------------------------------------------------------------------------- steps shared by the commands

def device_of(args: Any) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load(args: Any, batches: Sequence[int] = ()) -> tuple[ModelSource, list[tuple[str, torch.dtype, Profile]], Any]:
    """(source, input plan, exported model): an ONNX file is "exported" here; a factory's is None
    (it is exported later, by the command). ``batches`` widen dim 0 of every profile."""
    torch.manual_seed(args.seed)
    source = load_model(args.model)
    plan = input_plan(source, parse_shapes(args.shapes), parse_dtypes(args.dtype))
    plan = [(n, dt, with_batch(p, batches)) for n, dt, p in plan]
    exported = None
    if source.onnx_path is not None:
        exported = exported_from_onnx(source.onnx_path, {n: p for n, _, p in plan})
        if args.precision not in (None, exported.precision):
            raise UsageError(f"{args.model} is a {exported.precision} graph; its precision comes from its dtypes, "
                             f"so --precision {args.precision} cannot apply (export it in that precision)")
    return source, plan, exported


def export(source: ModelSource, plan: list[tuple[str, torch.dtype, Profile]], args: Any, verify: bool = True) -> Any:
    from ._export import export_onnx

    assert source.module is not None, "an ONNX file needs no export"
    return export_onnx(source.module, ((), example_inputs(plan)), dynamic=dynamic_of(plan),
                       precision=args.precision or "fp32", verify=verify)


def build(args: Any, source: ModelSource, plan: list[tuple[str, torch.dtype, Profile]], exported: Any) -> Any:
    """The engine ``build`` and ``export-triton`` make: --backend, --target, --workspace, --opt-level."""
    from ._build import build_engine
    from ._cache import parse_size

    backend, targets = args.backend, args.target
    if targets and backend == "auto":
        backend = "tensorrt_rtx"  # targets only mean something to RTX's ahead-of-time build
    if targets and backend != "tensorrt_rtx":
        raise UsageError(f"--target needs --backend tensorrt_rtx; {backend} builds for the GPU it runs on")
    try:
        workspace = parse_size(args.workspace) if args.workspace else None
    except ValueError as e:
        raise UsageError(f"--workspace: {e}") from None
    if exported is None:
        exported = export(source, plan, args, verify=not getattr(args, "no_verify", False))
    return build_engine(exported, backend=backend, targets=targets.split(",") if targets else None,
                        device=device_of(args), workspace=workspace, optimization_level=args.opt_level,
                        progress=False if args.no_progress else None)


# --------------------------------------------------------------------------- ONNX files

def onnx_io(path: str | None, data: bytes | None = None) -> tuple[list[tuple[str, torch.dtype, tuple[Any, ...]]],
                                                                    list[tuple[str, torch.dtype, tuple[Any, ...]]]]:
    """(name, dtype, dims) of the graph's real inputs (not initializers) and outputs."""
    import onnx

    from ._dtypes import by_onnx

    try:
        proto = onnx.load_from_string(data) if data is not None else onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf decode errors have no common base
        raise UsageError(f"{path or 'the data'} is not a readable ONNX model: {e}") from e
    inits = {i.name for i in proto.graph.initializer}

    def io(values: Any) -> list[tuple[str, torch.dtype, tuple[Any, ...]]]:
        rows = []
        for v in values:
            if v.name in inits:
                continue
            elem = v.type.tensor_type.elem_type
            row = by_onnx(elem)
            if row is None or not row.io:
                raise UsageError(f"{path}: tensor {v.name!r} has ONNX element type {elem}, which engines cannot take")
            dims = tuple(d.dim_param or (d.dim_value if d.HasField("dim_value") else "?")
                         for d in v.type.tensor_type.shape.dim)
            rows.append((v.name, row.torch, dims))
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
                like = "x".join(str(d) if isinstance(d, int) else "N" for d in dims)
                raise UsageError(f"{spec}: input {name!r} has dynamic dims {dims}; give its range with --shapes "
                                 f"{name}:MIN,OPT,MAX (each like {like})")
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


# --------------------------------------------------------------------------- engine files and reports

def read_engine(path: str) -> tuple[Any, str]:
    """An :class:`~torch_trt_module.Engine` from an engine file or a saved TRTModule, and which it was."""
    import json

    from ._build import Engine
    from ._module import _from_u8

    with open(path, "rb") as f:
        if f.read(8) == b"TTMENG01":
            return Engine.load(path), "engine file"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
    except Exception:  # noqa: BLE001 - anything unreadable is answered below
        state = None
    for key, value in (state.items() if isinstance(state, dict) else ()):
        if key.endswith("_extra_state") and isinstance(value, dict) and "plan" in value:
            plan = _from_u8(value["plan"])
            return Engine(value["backend"], plan or None, _from_u8(value["onnx"]), json.loads(value["meta"])), \
                "saved TRTModule"
    raise UsageError(f"{path} is not an engine file, a saved TRTModule or an .onnx file")


def layer_info(engine: Any) -> tuple[list[str], str | None]:
    """TensorRT's per-layer information (it needs a deserialized engine, so a GPU runtime), or why none."""
    from ._module import _can_run
    from .backends import select_backend

    if engine.plan is None:
        return [], "none: ONNX Runtime runs the graph's ops"
    if not _can_run(engine, "cuda"):
        try:
            select_backend(engine.backend, "cuda")
            why = "the engine was built for another GPU"
        except TorchTRTError as e:
            why = str(e).split(". ")[0]
        return [], f"layer information needs a GPU runtime ({why})"
    from .backends._trt_loader import deserialize, import_runtime

    trt = import_runtime(engine.backend)[1]
    inspector = deserialize(engine.plan, backend=engine.backend, device="cuda").create_engine_inspector()
    info = inspector.get_engine_information(trt.LayerInformationFormat.ONELINE)
    return [ln for ln in str(info).splitlines() if ln.strip()], None


def op_summary(onnx_bytes: bytes) -> str:
    import collections

    import onnx

    graph = onnx.load_from_string(onnx_bytes).graph
    count = collections.Counter(n.op_type for n in graph.node)
    return f"{len(graph.node)} nodes: " + ", ".join(f"{op} {n}" for op, n in count.most_common())


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**17 else f"{n / 1024:.1f} KiB"


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> str:
    cells = [list(map(str, headers))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def io_tables(model_meta: Mapping[str, Any]) -> list[str]:
    def shape(v: Any) -> Any:
        return "-" if v is None else tuple(v)

    ins = [[s["name"], s["dtype"], tuple(s["dims"]), shape(s.get("min")), shape(s.get("opt")), shape(s.get("max"))]
           for s in model_meta.get("inputs", [])]
    outs = [[s["name"], s["dtype"], tuple(s["dims"])] for s in model_meta.get("outputs", [])]
    return ["inputs", text_table(["name", "dtype", "dims", "min", "opt", "max"], ins),
            "outputs", text_table(["name", "dtype", "dims"], outs)]


def built_for(meta: Mapping[str, Any]) -> str:
    if meta.get("targets"):
        return "targets " + ", ".join(meta["targets"])
    if meta.get("gpu"):
        return f"GPU {meta['gpu']['name']} (compute capability {meta['gpu']['compute_capability']})"
    return "RTX's default targets" if meta.get("backend") == "tensorrt_rtx" else "ONNX Runtime (any machine)"


def describe(meta: Mapping[str, Any], plan_size: int, onnx_size: int) -> list[str]:
    """Lines describing an engine's metadata (build, inspect and ``cache info`` print these)."""
    import json

    model = meta.get("model") or {}
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(meta["created"])) if "created" in meta else "?"
    return [f"  backend    {meta.get('backend', '?')} {meta.get('backend_version', '')} for {built_for(meta)}",
            f"  precision  {model.get('precision', '?')}, exporter {model.get('exporter', '?')}, "
            f"torch {meta.get('torch_version', '?')}",
            f"  size       engine {mib(plan_size)}, ONNX graph {mib(onnx_size)}",
            f"  created    {created}; export {meta.get('export_time_s', 0):.2f} s, "
            f"build {meta.get('build_time_s', 0):.2f} s",
            f"  settings   {json.dumps(meta.get('settings', {}), sort_keys=True)}", *io_tables(model)]


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


def _timed(fn: Callable[[], Any], cuda: torch.device | None) -> float:
    if cuda is None:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    fn()
    t1.record()
    t1.synchronize()
    return float(t0.elapsed_time(t1))


def measure(fns: Mapping[str, Callable[[], Any]], *, warmup: int = 5, iters: int = 50,
            max_seconds: float | None = None, min_iters: int = 5,
            cuda: Mapping[str, torch.device | None] | None = None) -> dict[str, Timing | str]:
    """Time several callables side by side, in rounds, so background load hits them alike.

    Each callable: its first call timed alone (torch.compile compiles there), ``warmup - 1``
    more calls, then up to 5 rounds in turn; a round is one untimed call (other backends'
    thread pools settle) and a block of timed calls, until ``iters`` are timed, or until
    ``max_seconds`` per callable have passed and ``min_iters`` are done. ``cuda[name]``:
    time that callable with CUDA events on its device's current stream, else perf_counter.
    A callable that raises gets its error message instead of a :class:`Timing`.

    Example:
        >>> measure({"sum": lambda: sum(range(100))}, warmup=1, iters=10)["sum"].iters
        10
    """
    cuda = cuda or {}
    out: dict[str, Timing | str] = {}
    times: dict[str, list[float]] = {}
    first: dict[str, float] = {}
    for name, fn in fns.items():
        try:
            first[name] = _timed(fn, cuda.get(name))
            for _ in range(warmup - 1):
                fn()
            times[name] = []
        except Exception as e:  # noqa: BLE001 - reported in its row
            out[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    rounds = max(1, min(5, iters // 4))
    per_round = -(-iters // rounds)
    start = time.perf_counter()
    budget = None if max_seconds is None else max_seconds * max(len(times), 1)
    while times and any(len(v) < iters for v in times.values()):
        for name in list(times):
            try:
                fns[name]()
                for _ in range(min(per_round, iters - len(times[name]))):
                    times[name].append(_timed(fns[name], cuda.get(name)))
            except Exception as e:  # noqa: BLE001
                out[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                del times[name]
        if budget is not None and time.perf_counter() - start > budget and \
                all(len(v) >= min(min_iters, iters) for v in times.values()):
            break
    for name, ts in times.items():
        out[name] = Timing(_pct(ts, 50), _pct(ts, 90), _pct(ts, 99), sum(ts) / len(ts), min(ts), len(ts),
                           max(warmup, 1), "cuda-events" if cuda.get(name) is not None else "perf_counter",
                           first[name])
    return {name: out[name] for name in fns}


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
                    device: torch.device, export_error: str | None = None,
                    ort_threads: int | None = None) -> list[Candidate]:
    """Set up each backend for timing; one that cannot run gets a reason instead of a callable.
    ``exported`` (the ONNX graph) may be None if the export failed (``export_error`` says why).
    ``ort_threads`` sets ONNX Runtime's intra-op threads (raw and TRTModule) instead of its default."""
    out = []
    for name in backends:
        if exported is None and name not in ("eager", "torch.compile"):
            out.append(Candidate(name, device, reason=f"no ONNX graph: the export failed ({export_error})"))
            continue
        try:
            out.append(_candidate(name, model, exported, device, ort_threads))
        except (BackendUnavailable, NotRunnable) as e:
            out.append(Candidate(name, device, reason=f"not runnable on this machine: {e}"))
        except Exception as e:  # noqa: BLE001 - one backend failing must not lose the others' rows
            out.append(Candidate(name, device, reason=f"failed to set up: {type(e).__name__}: {e}".splitlines()[0]))
    return out


class NotRunnable(Exception):
    pass


def _candidate(name: str, model: torch.nn.Module | None, exported: Any, device: torch.device,
               ort_threads: int | None) -> Candidate:
    from .backends import select_backend

    if name in ("eager", "torch.compile"):
        if model is None:
            raise NotRunnable("the model is an ONNX file; there is no PyTorch module to run")
        m = model.to(device)
        # One graph per batch size (dynamic=False): the fastest code, compiled at each size's first call.
        fn = torch.compile(m, dynamic=False) if name == "torch.compile" else m
        return Candidate(name, device, lambda kw: fn(**kw))
    if name in ("onnxruntime", "onnxruntime-cuda"):
        return _ort_candidate(name, exported, torch.device("cuda" if name.endswith("cuda") else "cpu"), ort_threads)
    if name.startswith("trtmodule-"):
        from ._build import build_engine
        from ._module import TRTModule

        backend = name.split("-", 1)[1]
        run_dev = device if backend != "onnxruntime" else _ort_device(device)
        select_backend(backend, run_dev)  # raises BackendUnavailable with the reason
        module = TRTModule(build_engine(exported, backend=backend, device=run_dev, progress=False), device=run_dev)
        if module.backend != backend:
            raise NotRunnable(f"the {backend} engine falls back to {module.backend} here")
        if ort_threads and backend == "onnxruntime":  # TRTModule has no option for it: swap in a runner
            from .backends._onnxruntime import OnnxRuntimeRunner

            engine = module.engine
            assert engine is not None
            module._runner = OnnxRuntimeRunner(engine.onnx, engine.exported.inputs, engine.exported.outputs, run_dev,
                                               threads=ort_threads)
        return Candidate(name, run_dev, lambda kw: module(**kw))
    raise UsageError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def _ort_device(device: torch.device) -> torch.device:
    import onnxruntime as ort

    cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    return device if device.type == "cuda" and cuda_ep else torch.device("cpu")


def _ort_candidate(name: str, exported: Any, device: torch.device, threads: int | None) -> Candidate:
    import numpy as np
    import onnxruntime as ort

    from .backends._onnxruntime import _session_options

    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise NotRunnable("no CUDA GPU")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise NotRunnable("onnxruntime has no CUDA execution provider (pip install onnxruntime-gpu)")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(exported.onnx, _session_options(threads), providers=providers)
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


def time_candidates(cands: Sequence[Candidate], inputs: Mapping[str, torch.Tensor], **options: Any
                    ) -> dict[str, Timing | str]:
    """:func:`measure` every runnable candidate on ``inputs`` (moved to its device), under inference mode."""
    runnable = [c for c in cands if c.call is not None]
    kws = {c.name: {k: v.to(c.device) for k, v in inputs.items()} for c in runnable}
    fns = {c.name: (lambda c=c: c.call(kws[c.name])) for c in runnable}  # type: ignore[misc]
    with torch.inference_mode():
        return measure(fns, cuda={c.name: c.device if c.device.type == "cuda" else None for c in runnable},
                       **options)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)
