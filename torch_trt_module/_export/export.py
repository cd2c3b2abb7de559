"""Stage 1: torch module -> ONNX graph with dynamic axes (an :class:`ExportedModel`).

The model is wrapped to take flat tensors and return flat tensors, named by ``forward``'s
parameters, given an optimization profile per input, and exported (:mod:`torch_trt_module._export.exporters`
says how). The result carries what the export check needs (:class:`ExportCheck`): eager's
outputs at the example and at the profile's corners, computed here, where the model is.
The check itself is the compare stage's (``_compare.check_export``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .._core.numerics import strict_fp32
from .._core.settings import Settings
from .._core.signature import Param, bind_call, copy_call, params_of, to_call
from .._core.spec import ExportedModel, TensorSpec, TreeSpec, dtype_name, flatten, unflatten
from .._core.tree import leaf_paths
from .._errors import ExportError, InputError, UnsupportedOutput
from .._formats.onnx import check_graph, graph_dims, graph_dtype, normalize_einsum
from .._formats.program import store_program
from .exporters import run_exporters, sanitize
from .precision import convert_model
from .weights_map import aliases, unsaved, weight_map

__all__ = ["ExportCheck", "Flat", "eager_on_copies", "export_with_settings", "flat_inputs", "make_profiles",
           "widen_example"]

log = logging.getLogger(__name__)

PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
Profiles = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


@dataclass
class ExportCheck:
    """Inputs (in the graph's dtypes) and eager's outputs for them, per point of the profile:
    ``example``, and where they differ from it ``min``, ``max`` and ``off`` (neither opt nor a
    bound). ``strict``: eager ran with TF32 off (a CUDA model). ``errors``: points where eager
    itself failed, with the error."""

    points: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    strict: bool = False
    #: The flat eager model the points ran on (fp32 exports only): the check runs it in float64
    #: for a second opinion when the graph misses eager's fp32 (see ``_checks``).
    model: torch.nn.Module | None = None


def _leaf_names(tree: TreeSpec) -> list[str]:
    """Readable, ONNX-safe names for the tensor leaves of ``tree``: the path's labels joined by ``_``."""
    names = []
    for path in leaf_paths(tree):
        labels = [str(label[0] if kind == "field" else label) for kind, label in path]
        names.append(sanitize("_".join(labels)))
    return names


def _output_names(tree: TreeSpec) -> list[str]:
    if tree.kind == "tensor":
        return ["output"]
    names = _leaf_names(tree)
    if tree.kind in ("tuple", "list") or (tree.kind == "node" and not tree.keys):
        names = [f"output_{n}" for n in names]
    return _dedupe(names)


def _dedupe(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            n = f"{n}_{seen[n]}"
        seen.setdefault(n, 0)
        out.append(n)
    return out


def make_profiles(names: Sequence[str], shapes: Sequence[tuple[int, ...]], settings: Settings
                  ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """min/opt/max per input from the ``dynamic`` setting and the example shapes.

    Under ``dynamic="batch"`` dim 0 of every input is dynamic, except an input whose dim 0 is 1
    while another input's is larger: that one broadcasts over the batch (a ``(1, 8)`` position
    table next to ``x: (4, 8)``), so it stays static. Where every input's dim 0 is 1 the example
    cannot tell a batch from a broadcast, and every dim 0 is dynamic."""
    dynamic = settings.dynamic_dict()
    batched = dynamic == "batch" and any(len(s) >= 1 and s[0] > 1 for s in shapes)
    profiles = {}
    if isinstance(dynamic, dict):
        unknown = sorted(set(dynamic) - set(names))
        if unknown:
            raise InputError(
                f"dynamic= names unknown input(s) {unknown}; the model's tensor inputs are {list(names)}"
            )
    for name, shape in zip(names, shapes):
        lo, opt, hi = list(shape), list(shape), list(shape)
        if dynamic == "batch" and len(shape) >= 1:
            if batched and shape[0] == 1:
                log.info("input %r has size 1 in dim 0 while other inputs have a batch: it is taken to broadcast "
                         "over the batch, and its dim 0 stays static (1); name the batched dims in dynamic= to "
                         "say otherwise", name)
                profiles[name] = (tuple(lo), tuple(opt), tuple(hi))
                continue
            lo[0], hi[0] = 1, max(settings.max_batch, shape[0])
        elif isinstance(dynamic, dict):
            for dim, (dmin, dopt, dmax) in dynamic.get(name, {}).items():
                if not -len(shape) <= dim < len(shape):
                    raise InputError(
                        f"dynamic= for input {name!r} names dim {dim}, but the example has rank "
                        f"{len(shape)} (shape {tuple(shape)})"
                    )
                if not dmin <= shape[dim] <= dmax:
                    raise InputError(
                        f"input {name!r} dim {dim} has example size {shape[dim]} outside its dynamic range "
                        f"{dmin}..{dmax}; give an example inside the range"
                    )
                lo[dim], opt[dim], hi[dim] = dmin, dopt, dmax
        profiles[name] = (tuple(lo), tuple(opt), tuple(hi))
    return profiles


# --------------------------------------------------------------------------- the flat wrapper

class Flat(torch.nn.Module):
    """Takes the flat tensor leaves, calls the model, returns flat tensor outputs.

    ``written``: the positions of inputs that ``forward`` writes to in place (``x.div_(255)``).
    They are copied first, so the captured program computes the same outputs without writing to
    its inputs: no runtime (TensorRT, ONNX Runtime, the PyTorch program) writes to a caller's tensor.
    """

    def __init__(self, model: torch.nn.Module, params: tuple[Param, ...], call_tree: TreeSpec,
                 written: Sequence[int] = ()) -> None:
        super().__init__()
        self.model = model
        self.params = params
        self.call_tree = call_tree
        self.written = frozenset(written)

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.written:
            flat = tuple(t.clone() if i in self.written else t for i, t in enumerate(flat))
        bound = unflatten(self.call_tree, flat)
        args, kwargs = to_call(self.params, bound)
        out, _ = flatten(self.model(*args, **kwargs), what="output", allow_const=False, error=UnsupportedOutput)
        return _distinct(out, flat)


def _distinct(outs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Each output a tensor of its own. An ONNX value has one name: an output returned twice
    (``return y, y``; Hugging Face's ``last_hidden_state is hidden_states[-1]``) or an input returned
    as it is (``return out, mask``) would leave an output, or the input, without its name. A copy
    (an Identity in the graph) gives each its own; eager's values are unchanged."""
    seen = {id(t) for t in inputs}
    out = []
    for t in outs:
        if id(t) in seen:
            t = t.clone()
        seen.add(id(t))
        out.append(t)
    return tuple(out)


# --------------------------------------------------------------------------- export

def flat_inputs(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> tuple[tuple[Param, ...], TreeSpec, list[str], list[torch.Tensor]]:
    """The model's call as flat tensor leaves: its parameters, the call's structure, the leaves'
    names and the leaves (ExportError for a dtype no engine takes)."""
    params = params_of(model.forward)
    bound = bind_call(params, args, kwargs)
    # Inputs stay tuples, lists and dicts: the call-time checks (_inputs.match_inputs) know only those.
    leaves, call_tree = flatten(bound, what="input", nodes=False)
    names = _dedupe(_leaf_names(call_tree))
    for name, t in zip(names, leaves):
        dtype_name(t.dtype)  # raises a clear error for unsupported dtypes
        if t.is_complex():
            raise ExportError(f"input {name!r} is complex ({t.dtype}); engines take real dtypes only")
    return params, call_tree, names, leaves


def eager_on_copies(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                    ) -> tuple[Any, list[int]]:
    """``model``'s output for a copy of the call, and the positions (among the flat inputs) of the
    inputs it wrote to in place (for :class:`Flat`'s ``written``). The caller's tensors are never
    written: a forward may preprocess in place (``x.div_(255)``), and every later run must see the
    example's values."""
    with torch.inference_mode(False):  # copies that count their writes, even under inference_mode
        copy_args, copy_kwargs = copy_call(args, kwargs)
    _, _, names, copies = flat_inputs(model, copy_args, copy_kwargs)
    versions = [t._version for t in copies]
    out = model(*copy_args, **copy_kwargs)
    written = [i for i, (t, v) in enumerate(zip(copies, versions)) if t._version != v]
    if written:
        log.info("%s.forward writes to input(s) %s in place: the compiled module computes the same outputs from "
                 "a copy, and never writes to the caller's tensors", type(model).__name__,
                 ", ".join(repr(names[i]) for i in written))
    return out, written


def export_with_settings(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                         settings: Settings) -> tuple[ExportedModel, ExportCheck]:
    """Export with already-validated settings; the check data is empty unless ``settings.verify``."""
    t0 = time.perf_counter()
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    params, call_tree, names, leaves = flat_inputs(model, args, kwargs)

    target = PRECISION_DTYPES[settings.precision]
    user_in_dtypes = tuple(dtype_name(t.dtype) for t in leaves)
    work_model, work_leaves = model, list(leaves)
    if target != torch.float32:
        # Strongly typed backends take precision from the graph itself, so the graph is
        # exported in that dtype; the user's model is left untouched.

        work_model = convert_model(model, settings.precision, keep_fp32=settings.keep_fp32)
        work_leaves = [t.to(target) if t.is_floating_point() else t for t in leaves]

    # The reference for the export check: ONNX Runtime computes in strict fp32, so eager does
    # too (on a CUDA GPU PyTorch runs cuDNN convolutions in TF32 by default).
    strict = _on_cuda(model, leaves)
    # Eager runs on a copy of the example: a forward that writes to its input (x.div_(255)) must
    # leave the caller's tensor as it was, and every later run must see the same values.
    with torch.inference_mode(), (strict_fp32() if strict else contextlib.nullcontext()):
        eager_out, written = eager_on_copies(model, args, kwargs)
    out_leaves, out_tree = flatten(eager_out, what="output", allow_const=False, error=UnsupportedOutput)
    if not out_leaves:
        raise ExportError("the model returned no tensors; there is nothing to compile")
    user_out_dtypes = tuple(dtype_name(t.dtype) for t in out_leaves)

    profiles = make_profiles(names, [tuple(t.shape) for t in work_leaves], settings)
    out_names = _output_names(out_tree)
    wrapper = Flat(work_model, params, call_tree, written).eval()
    made = run_exporters(wrapper, names, widen_example(names, [t.clone() for t in work_leaves], profiles),
                         out_names, profiles, settings)
    onnx_bytes = normalize_einsum(made.onnx)
    model_proto = check_graph(onnx_bytes, names, profiles, made.exporter)

    inputs = tuple(
        TensorSpec(n, dtype_name(t.dtype), graph_dims(model_proto.graph.input, n, t.shape), *profiles[n])
        for n, t in zip(names, work_leaves))
    graph_outputs = {o.name: o for o in model_proto.graph.output}
    if list(graph_outputs) != out_names:
        raise ExportError(f"the {made.exporter} exporter named the graph's outputs {list(graph_outputs)} instead of "
                          f"{out_names} (an output that is another output or an input under another name): "
                          "return distinct tensors (y.clone()) from forward")
    outputs = tuple(TensorSpec(n, graph_dtype(graph_outputs[n]), graph_dims(model_proto.graph.output, n, None))
                    for n in out_names)
    program = None
    if made.program is not None:
        program = store_program(made.program)  # None (one WARNING) where torch cannot store it
    exported = ExportedModel(
        onnx=onnx_bytes, inputs=inputs, outputs=outputs, call_tree=call_tree, output_tree=out_tree,
        params=params, exporter=made.exporter, precision=settings.precision,
        user_input_dtypes=user_in_dtypes, user_output_dtypes=user_out_dtypes,
        export_time_s=time.perf_counter() - t0, program=program,
        # The tracer's graph folds its weights: no map, whatever program stands beside it, so a
        # module that follows its source rebuilds on a change rather than refit half of them.
        weights=(weights := weight_map(model_proto, made.program if made.exporter == "dynamo" else None,
                                       work_model, model)),
        unsaved=unsaved(model, {src for src, _, _ in weights.values()}),
        aliases=aliases(model, {src for src, _, _ in weights.values()}))
    check = ExportCheck(strict=strict)
    if settings.verify:
        reference = work_model if target != torch.float32 else model
        expected = out_leaves if target == torch.float32 else None
        check = _check_points(reference, wrapper, names, work_leaves, expected, profiles, strict)
    log.info("exported %s with the %s exporter in %.2f s (%d inputs, %d outputs)",
             type(model).__name__, made.exporter, exported.export_time_s, len(inputs), len(outputs))
    return exported, check


def _check_points(reference: torch.nn.Module, wrapper: "Flat", names: list[str], leaves: list[torch.Tensor],
                  example_out: list[torch.Tensor] | None, profiles: Profiles, strict: bool) -> ExportCheck:
    """Eager's outputs at the example and at the profile's min, max and an off-opt point."""
    flat = Flat(reference, wrapper.params, wrapper.call_tree, wrapper.written).eval()
    check = ExportCheck(strict=strict, model=flat if example_out is not None else None)
    seen: set[tuple[tuple[int, ...], ...]] = set()
    for label in ("example", "min", "max", "off"):
        point = leaves if label == "example" else corner(names, leaves, profiles, label)
        key = tuple(tuple(t.shape) for t in point)
        if key in seen:
            continue
        seen.add(key)
        if label == "example" and example_out is not None:
            check.points[label] = (point, [t.detach() for t in example_out])
            continue
        try:
            with torch.inference_mode(), (strict_fp32() if strict else contextlib.nullcontext()):
                outs = list(flat(*[t.clone() for t in point]))  # a point may share the example's memory
        except Exception as e:  # noqa: BLE001 - eager itself cannot run there: the check says so
            check.errors[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            continue
        check.points[label] = (point, outs)
    return check


def corner(names: Sequence[str], leaves: Sequence[torch.Tensor], profiles: Profiles,
           which: str) -> list[torch.Tensor]:
    """The example inputs resized to the profile's ``min``, ``max`` or ``off`` point (neither opt nor a
    bound where the range allows). Values come from the example (sliced, or tiled to grow), so
    token ids stay in their vocabulary and masks stay masks."""
    out = []
    for name, t in zip(names, leaves):
        lo, opt, hi = profiles[name]
        for d, (a, o, b) in enumerate(zip(lo, opt, hi)):
            if a == b:
                continue
            size = a if which == "min" else b if which == "max" else _off(a, o, b)
            t = _resize(t, d, size)
        out.append(t)
    return out


def _off(lo: int, opt: int, hi: int) -> int:
    for candidate in ((opt + hi) // 2, (lo + opt) // 2, opt + 1, opt - 1):
        if lo < candidate < hi and candidate != opt:
            return candidate
    return opt


def _resize(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    have = t.shape[dim]
    if size <= have:
        return t.narrow(dim, 0, size).contiguous()
    if have == 0:
        shape = list(t.shape)
        shape[dim] = size
        return torch.zeros(shape, dtype=t.dtype, device=t.device)
    reps = [1] * t.dim()
    reps[dim] = -(-size // have)
    return t.repeat(*reps).narrow(dim, 0, size).contiguous()


def widen_example(names: list[str], leaves: list[torch.Tensor], profiles: dict[str, Any]) -> list[torch.Tensor]:
    """Exporters specialise a dimension whose example is 0 or 1; grow such dims to 2."""
    out = []
    for name, t in zip(names, leaves):
        lo, _, hi = profiles[name]
        for dim, (dmin, dmax) in enumerate(zip(lo, hi)):
            if dmin != dmax and t.shape[dim] < 2 <= dmax:
                reps = [1] * t.dim()
                reps[dim] = 2 if t.shape[dim] == 1 else 1
                t = t.repeat(*reps) if t.shape[dim] == 1 else torch.cat([t] * 2, dim=dim)
                if t.shape[dim] < 2:  # a zero-size example cannot be grown by repetition
                    raise ExportError(
                        f"input {name!r} has size 0 in dynamic dim {dim}; give an example of size >= 2 there"
                    )
                log.info("input %r: exporting with size 2 in dynamic dim %d (the example has 1)", name, dim)
        out.append(t)
    return out


def _on_cuda(model: torch.nn.Module, leaves: Sequence[torch.Tensor]) -> bool:
    for t in leaves:
        if t.is_cuda:
            return True
    return any(p.is_cuda for p in itertools.chain(model.parameters(), model.buffers()))
