"""What the command line reads: model specs (a factory or an ``.onnx`` file), trtexec-style
shapes, dtypes, example inputs, and the export and build steps the commands share."""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .._build.build import build_engine
from .._cache.cache import parse_size
from .._core.dtypes import TEXT_NAMES, by_text
from .._core.signature import params_of
from .._errors import BackendUnavailable, InputError, UsageError
from .._formats.onnx import exported_from_onnx, onnx_io
from .._pipeline.compile import export_onnx
from ..backends import usable_device

__all__ = ["ModelSource", "Profile", "build", "device_of", "dynamic_of", "example_inputs", "export", "input_plan",
           "load", "load_model", "parse_dtypes", "parse_shapes"]

Shape = tuple[int, ...]
Profile = tuple[Shape, Shape, Shape]  # (min, opt, max)



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
    row = by_text(text)  # the one dtype table (_core.dtypes), with the names people type
    if row is None:
        raise UsageError(f"dtype {text!r} is not one of {', '.join(TEXT_NAMES)}")
    return row.torch


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
    #: --shapes when none are given, where the factory's docs make them knowable (torchvision
    #: classifiers: the crop size of their weights' transforms, batch 1/8/32).
    default_shapes: dict[str | None, Profile] | None = None

    @property
    def input_names(self) -> list[str]:
        if self.module is not None:
            return [p.name for p in params_of(self.module.forward) if p.kind in ("positional_only",
                                                                                "positional_or_keyword")]
        return [i[0] for i in self.onnx_io()[0]]

    def onnx_io(self) -> tuple[Any, Any]:
        assert self.onnx_path is not None
        with open(self.onnx_path, "rb") as f:
            return _usage(lambda: onnx_io(f.read(), self.onnx_path))  # type: ignore[arg-type]


def _usage(fn: Any) -> Any:
    """Run ``fn``; an InputError about the user's files or options is a usage error (exit code 2)."""
    try:
        return fn()
    except InputError as e:
        raise UsageError(str(e)) from e


def _torchvision_default(mod_name: str, attr: str) -> dict[str | None, Profile] | None:
    """torchvision's classification builders document their input through their weights: the
    transforms' crop size (224 for most, 299 for inception_v3, ...)."""
    if mod_name != "torchvision.models":
        return None
    try:
        import torchvision

        weights = torchvision.models.get_model_weights(attr)
        crop = weights.DEFAULT.transforms().crop_size
        size = int(crop[0] if isinstance(crop, (list, tuple)) else crop)
    except Exception:  # noqa: BLE001 - not a classifier with documented weights: no default
        return None
    return {None: ((1, 3, size, size), (8, 3, size, size), (32, 3, size, size))}


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
    return ModelSource(spec, module=model.eval(), default_shapes=_torchvision_default(mod_name, attr))


def input_plan(source: ModelSource, shapes: Mapping[str | None, Profile],
               dtypes: Mapping[str | None, torch.dtype]) -> list[tuple[str, torch.dtype, Profile]]:
    """(name, dtype, profile) of each model input, from --shapes and --dtype."""
    names = source.input_names
    if source.onnx_path is not None:
        if dtypes:
            raise UsageError(f"{source.spec}: an ONNX file's input dtypes come from the graph; drop --dtype")
        graph = {n: (dt, dims) for n, dt, dims in source.onnx_io()[0]}
        profiles = _onnx_profiles(graph, _named(shapes, list(graph)), source.spec)
        return [(n, graph[n][0], p) for n, p in zip(graph, profiles)]
    shapes = shapes or source.default_shapes or {}
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
    """--device, or cuda where a GPU is usable and cpu elsewhere; UsageError for a GPU this machine lacks."""

    if not args.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return usable_device(args.device, what="--device ", fix="pass --device cpu, or leave --device out")
    except BackendUnavailable as e:
        raise UsageError(str(e)) from None
    except RuntimeError as e:  # torch.device's own: not a device name
        raise UsageError(f"--device {args.device!r} is not a device (expected cpu, cuda or cuda:N): {e}") from None


def load(args: Any, batches: Sequence[int] = ()) -> tuple[ModelSource, list[tuple[str, torch.dtype, Profile]], Any]:
    """(source, input plan, exported model): an ONNX file is "exported" here; a factory's is None
    (it is exported later, by the command). ``batches`` widen dim 0 of every profile."""
    torch.manual_seed(args.seed)
    source = load_model(args.model)
    plan = input_plan(source, parse_shapes(args.shapes), parse_dtypes(args.dtype))
    plan = [(n, dt, with_batch(p, batches)) for n, dt, p in plan]
    exported = None
    if source.onnx_path is not None:
        with open(source.onnx_path, "rb") as f:
            data = f.read()
        exported = _usage(lambda: exported_from_onnx(data, {n: p for n, _, p in plan}, source.onnx_path))
        if args.precision not in (None, exported.precision):
            raise UsageError(f"{args.model} is a {exported.precision} graph; its precision comes from its dtypes, "
                             f"so --precision {args.precision} cannot apply (export it in that precision)")
    return source, plan, exported


def export(source: ModelSource, plan: list[tuple[str, torch.dtype, Profile]], args: Any, verify: bool = True) -> Any:
    assert source.module is not None, "an ONNX file needs no export"
    return export_onnx(source.module, ((), example_inputs(plan)), dynamic=dynamic_of(plan),
                       precision=args.precision or "fp32", verify=verify)


def build(args: Any, source: ModelSource, plan: list[tuple[str, torch.dtype, Profile]], exported: Any) -> Any:
    """The engine ``build`` and ``export-triton`` make: --backend, --target, --workspace, --opt-level."""

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


