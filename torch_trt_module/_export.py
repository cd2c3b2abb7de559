"""Stage 1: torch module -> ONNX graph with dynamic axes (an :class:`ExportedModel`).

The exporter is chosen deliberately: the torch.export-based exporter first,
because it refuses data-dependent control flow instead of silently baking one
branch into the graph, and it honours ``Dim`` ranges. If it fails for any other
reason, the TorchScript exporter is tried, with its tracer warnings about
data-dependent values promoted to errors for the same reason.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ._errors import ExportError, InputError
from ._numerics import Tolerance, policy_for, strict_fp32
from ._settings import Settings
from ._signature import Param, bind_call, params_of, split_inputs, to_call
from ._spec import TensorSpec, TreeSpec, dtype_name, flatten, unflatten

__all__ = ["ExportedModel", "export_onnx"]

log = logging.getLogger(__name__)

_PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DEFAULT_OPSET = 18


@dataclass(frozen=True)
class ExportedModel:
    """The result of :func:`export_onnx`: an ONNX graph and everything needed to call it.

    Attributes:
        onnx: the serialized ONNX ``ModelProto``.
        inputs / outputs: the engine's tensors, inputs with their profiles.
        call_tree: the structure of the call, ``{param: value}`` with tensor leaves.
        output_tree: the structure eager returns.
        params: the forward signature.
        exporter: ``"dynamo"`` or ``"torchscript"``.
        user_input_dtypes / user_output_dtypes: what the caller passes and gets back
            (they differ from the graph's dtypes under fp16/bf16 precision).
    """

    onnx: bytes
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    call_tree: TreeSpec
    output_tree: TreeSpec
    params: tuple[Param, ...]
    exporter: str
    precision: str
    user_input_dtypes: tuple[str, ...]
    user_output_dtypes: tuple[str, ...]
    export_time_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def to_meta(self) -> dict[str, Any]:
        """Everything but the graph, as JSON-able metadata."""
        return {
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "call_tree": self.call_tree.to_json(),
            "output_tree": self.output_tree.to_json(),
            "params": [p.to_json() for p in self.params],
            "exporter": self.exporter,
            "precision": self.precision,
            "user_input_dtypes": list(self.user_input_dtypes),
            "user_output_dtypes": list(self.user_output_dtypes),
        }

    @classmethod
    def from_meta(cls, onnx: bytes, meta: dict[str, Any]) -> "ExportedModel":
        return cls(
            onnx=onnx,
            inputs=tuple(TensorSpec.from_json(d) for d in meta["inputs"]),
            outputs=tuple(TensorSpec.from_json(d) for d in meta["outputs"]),
            call_tree=TreeSpec.from_json(meta["call_tree"]),
            output_tree=TreeSpec.from_json(meta["output_tree"]),
            params=tuple(Param.from_json(p) for p in meta["params"]),
            exporter=meta["exporter"],
            precision=meta["precision"],
            user_input_dtypes=tuple(meta["user_input_dtypes"]),
            user_output_dtypes=tuple(meta["user_output_dtypes"]),
        )


def export_onnx(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    dynamic: Any = "batch",
    precision: str = "fp32",
    exporter: str = "auto",
    opset: int | None = None,
    max_batch: int | None = None,
    verify: bool = True,
    keep_fp32: bool = True,
) -> ExportedModel:
    """Export ``model`` to ONNX with dynamic axes and check it against eager.

    Example:
        >>> exported = export_onnx(torch.nn.Linear(4, 2).eval(), torch.randn(3, 4))
        >>> exported.input_names, exported.inputs[0].profile_str()
        (['input'], '(1..32, 4)')
    """
    settings = Settings.from_options(dynamic=dynamic, precision=precision, exporter=exporter,
                                     opset=opset, max_batch=max_batch, verify=verify, keep_fp32=keep_fp32)
    args, kwargs = split_inputs(example_inputs)
    return export_with_settings(model, args, kwargs, settings)


# --------------------------------------------------------------------------- names and profiles

def _leaf_names(tree: TreeSpec, prefix: str) -> list[str]:
    """Readable, ONNX-safe names for the tensor leaves of ``tree``."""
    if tree.kind == "tensor":
        return [prefix]
    names: list[str] = []
    labels = tree.keys if tree.kind == "dict" else list(range(len(tree.children)))
    for label, child in zip(labels, tree.children):
        sub = f"{prefix}_{label}" if prefix else str(label)
        names.extend(_leaf_names(child, _sanitize(sub)))
    return names


def _sanitize(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


def _output_names(tree: TreeSpec) -> list[str]:
    if tree.kind == "tensor":
        return ["output"]
    names = _leaf_names(tree, "")
    if tree.kind in ("tuple", "list"):
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
    """min/opt/max per input from the ``dynamic`` setting and the example shapes."""
    dynamic = settings.dynamic_dict()
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

class _Flat(torch.nn.Module):
    """Takes the flat tensor leaves, calls the model, returns flat tensor outputs."""

    def __init__(self, model: torch.nn.Module, params: tuple[Param, ...], call_tree: TreeSpec) -> None:
        super().__init__()
        self.model = model
        self._params = params
        self._call_tree = call_tree

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        bound = unflatten(self._call_tree, flat)
        args, kwargs = to_call(self._params, bound)
        out, _ = flatten(self.model(*args, **kwargs), what="output", allow_const=False)
        return tuple(out)


# --------------------------------------------------------------------------- export

def export_with_settings(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                         settings: Settings) -> ExportedModel:
    """Export with already-validated settings (what compile() calls)."""
    t0 = time.perf_counter()
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    params = params_of(model.forward)
    bound = bind_call(params, args, kwargs)
    leaves, call_tree = flatten(bound, what="input")
    names = _dedupe(_leaf_names(call_tree, ""))
    for name, t in zip(names, leaves):
        dtype_name(t.dtype)  # raises a clear error for unsupported dtypes
        if t.is_complex():
            raise ExportError(f"input {name!r} is complex ({t.dtype}); engines take real dtypes only")

    target = _PRECISION_DTYPES[settings.precision]
    user_in_dtypes = tuple(dtype_name(t.dtype) for t in leaves)
    work_model, work_leaves = model, list(leaves)
    if target != torch.float32:
        # Strongly typed backends take precision from the graph itself, so the graph is
        # exported in that dtype; the user's model is left untouched.
        from ._precision import convert_model

        work_model = convert_model(model, settings.precision, keep_fp32=settings.keep_fp32)
        work_leaves = [t.to(target) if t.is_floating_point() else t for t in leaves]

    # The reference for the export check: ONNX Runtime computes in strict fp32, so eager does
    # too for this one call (on a CUDA GPU PyTorch runs cuDNN convolutions in TF32 by default).
    strict = _on_cuda(model, leaves)
    with torch.inference_mode(), (strict_fp32() if strict else contextlib.nullcontext()):
        eager_out = model(*args, **kwargs)
    out_leaves, out_tree = flatten(eager_out, what="output", allow_const=False)
    if not out_leaves:
        raise ExportError("the model returned no tensors; there is nothing to compile")
    user_out_dtypes = tuple(dtype_name(t.dtype) for t in out_leaves)

    shapes = [tuple(t.shape) for t in work_leaves]
    profiles = make_profiles(names, shapes, settings)
    export_leaves = _widen_example(names, work_leaves, profiles)
    out_names = _output_names(out_tree)
    wrapper = _Flat(work_model, params, call_tree).eval()

    onnx_bytes, exporter = _run_exporters(wrapper, names, export_leaves, out_names, profiles, settings)
    onnx_bytes = _normalize_einsum(onnx_bytes)
    model_proto = _check_graph(onnx_bytes, names, profiles, exporter)

    inputs = tuple(
        TensorSpec(n, dtype_name(t.dtype), _graph_dims(model_proto.graph.input, n, t.shape), *profiles[n])
        for n, t in zip(names, work_leaves)
    )
    graph_outputs = {o.name: o for o in model_proto.graph.output}
    outputs = tuple(
        TensorSpec(n, _graph_dtype(graph_outputs[n]), _graph_dims(model_proto.graph.output, n, None))
        for n in out_names
    )
    exported = ExportedModel(
        onnx=onnx_bytes, inputs=inputs, outputs=outputs, call_tree=call_tree, output_tree=out_tree,
        params=params, exporter=exporter, precision=settings.precision,
        user_input_dtypes=user_in_dtypes, user_output_dtypes=user_out_dtypes,
        export_time_s=time.perf_counter() - t0,
    )
    if settings.verify:
        _verify_with_onnxruntime(exported, work_leaves, work_model if target != torch.float32 else None,
                                 out_leaves, bound, params, settings, strict=strict)
    log.info("exported %s with the %s exporter in %.2f s (%d inputs, %d outputs)",
             type(model).__name__, exporter, exported.export_time_s, len(inputs), len(outputs))
    return exported


def _widen_example(names: list[str], leaves: list[torch.Tensor], profiles: dict[str, Any]) -> list[torch.Tensor]:
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


def _dynamic_dims(names: list[str], profiles: dict[str, Any]) -> dict[str, dict[int, tuple[int, int]]]:
    return {n: {d: (lo, hi) for d, (lo, hi) in enumerate(zip(profiles[n][0], profiles[n][2])) if lo != hi}
            for n in names}


def _run_exporters(wrapper: torch.nn.Module, names: list[str], leaves: list[torch.Tensor],
                   out_names: list[str], profiles: dict[str, Any], settings: Settings) -> tuple[bytes, str]:
    order = {"auto": ["dynamo", "torchscript"], "dynamo": ["dynamo"], "torchscript": ["torchscript"]}
    errors: list[tuple[str, BaseException]] = []
    for exporter in order[settings.exporter]:
        try:
            fn = _export_dynamo if exporter == "dynamo" else _export_torchscript
            return fn(wrapper, names, leaves, out_names, profiles, settings), exporter
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001 - every exporter failure is reported below
            if _is_data_dependent(e):
                raise ExportError(
                    "the model has data-dependent control flow (a Python branch or .item()/int() on a "
                    "tensor value), which cannot be captured in a static graph. "
                    f"Exporter said: {_summary(e)}. Fix: replace the branch with tensor ops "
                    "(torch.where, torch.cond) or move it outside the compiled module."
                ) from e
            if _is_specialization(e):
                # Falling back to TorchScript would bake the size in silently; say it instead.
                raise ExportError(
                    f"a dynamic dimension was specialised by the model: {_summary(e)}. The model's code "
                    "fixes that size (e.g. a view/reshape with a hard-coded size). Fix: make that dimension "
                    "static (dynamic=None, or leave it out of dynamic=), or compute the size from x.shape."
                ) from e
            log.info("%s exporter failed: %s", exporter, _summary(e))
            errors.append((exporter, e))
    detail = "; ".join(f"{name}: {_summary(e)}" for name, e in errors)
    hint = _hint(detail)
    raise ExportError(f"could not export the model to ONNX ({detail}).{hint}") from errors[-1][1]


def _export_dynamo(wrapper: torch.nn.Module, names: list[str], leaves: list[torch.Tensor],
                   out_names: list[str], profiles: dict[str, Any], settings: Settings) -> bytes:
    from torch.export import Dim

    dims = _dynamic_dims(names, profiles)
    shapes = tuple({d: Dim(f"{_sanitize(n)}_{d}", min=lo, max=hi) for d, (lo, hi) in dims[n].items()} or None
                   for n in names)
    sink = io.StringIO()
    # The exporter prints progress to stdout; a library must not, so it goes to DEBUG.
    with contextlib.redirect_stdout(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, tuple(leaves), None, dynamo=True, dynamic_shapes=(shapes,), input_names=names,
            output_names=out_names, opset_version=settings.opset or _DEFAULT_OPSET, verbose=False,
            optimize=True, external_data=False,
        )
    log.debug("dynamo exporter output:\n%s", sink.getvalue())
    assert program is not None
    return program.model_proto.SerializeToString()


def _export_torchscript(wrapper: torch.nn.Module, names: list[str], leaves: list[torch.Tensor],
                        out_names: list[str], profiles: dict[str, Any], settings: Settings) -> bytes:
    dims = _dynamic_dims(names, profiles)
    dynamic_axes = {n: {d: f"{_sanitize(n)}_{d}" for d in dims[n]} for n in names if dims[n]}
    buf = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(
            wrapper, tuple(leaves), buf, dynamo=False, input_names=names, output_names=out_names,
            dynamic_axes=dynamic_axes, opset_version=settings.opset or _DEFAULT_OPSET,
        )
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning) and "Python" in str(w.message):
            raise ExportError(
                "the model has data-dependent control flow: the TorchScript tracer converted a tensor "
                f"value to a Python value ({w.message}), so the graph would hold only the branch taken "
                "for the example. Fix: use tensor ops (torch.where, torch.cond) instead of Python branches."
            )
    return buf.getvalue()


def _is_data_dependent(e: BaseException) -> bool:
    seen = 0
    while e is not None and seen < 10:
        text = f"{type(e).__name__}: {e}"
        if ("GuardOnDataDependentSymNode" in text or "data-dependent" in text or "DataDependent" in text):
            return True
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
        seen += 1
    return False


def _is_specialization(e: BaseException) -> bool:
    text = f"{e} {e.__cause__}"
    return "Constraints violated" in text or "specialized" in text or "specialised" in text


def _summary(e: BaseException) -> str:
    text = str(e)
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    first = lines[0] if lines else type(e).__name__
    first = re.sub(r"\x1b\[[0-9;]*m", "", first)
    return first[:400]


def _hint(detail: str) -> str:
    if "specializ" in detail or "Constraints violated" in detail or "specialized" in detail:
        return (" A dynamic dimension was specialised by the model (its size is fixed by the code); "
                "make that dimension static with dynamic=None or a narrower dynamic= dict.")
    if "Unsupported" in detail or "not supported" in detail or "No decomposition" in detail:
        return " The model uses an operator the ONNX exporters cannot translate; replace it or register a custom translation."
    return ""


# --------------------------------------------------------------------------- checks

def _normalize_einsum(onnx_bytes: bytes) -> bytes:
    """Rewrite Einsum equations to lowercase letters without spaces.

    The exporters copy ``torch.einsum``'s equation verbatim (torchvision's MaxViT uses
    ``"B G H I D, B G H J D -> B G H I J"``). ONNX Runtime accepts that, but the TensorRT
    and TensorRT-RTX ONNX parsers reject anything but lowercase letters ("Invalid
    character(s) in Einsum equation"). Uppercase letters are renamed to lowercase ones
    the equation does not use, so the meaning is unchanged.
    """
    if b"Einsum" not in onnx_bytes:  # cheap: most graphs have none, and some are 500 MB
        return onnx_bytes
    import string

    import onnx

    model = onnx.load_from_string(onnx_bytes)
    changed = False

    def visit(nodes: Any) -> None:
        nonlocal changed
        for node in nodes:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g.node)
                for g in attr.graphs:
                    visit(g.node)
                if node.op_type == "Einsum" and attr.name == "equation":
                    eq = attr.s.decode()
                    letters = {c for c in eq if c.isalpha()}
                    if len(letters) > len(string.ascii_lowercase):
                        continue  # cannot be written in lowercase; the parser will say so
                    free = iter(c for c in string.ascii_lowercase if c not in letters)
                    rename = {c: next(free) for c in sorted(letters) if c.isupper()}
                    new = "".join(rename.get(c, c) for c in eq if not c.isspace())
                    if new != eq:
                        attr.s = new.encode()
                        changed = True

    visit(model.graph.node)
    for fn in model.functions:
        visit(fn.node)
    return model.SerializeToString() if changed else onnx_bytes


def _check_graph(onnx_bytes: bytes, names: list[str], profiles: dict[str, Any], exporter: str) -> Any:
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the {exporter} exporter produced an invalid ONNX graph: {e}") from e
    graph_inputs = {i.name: i for i in model.graph.input}
    for n in names:
        if n not in graph_inputs:
            raise ExportError(
                f"input {n!r} is not used by the model, so the exporter dropped it; remove it from the call"
            )
        lo, _, hi = profiles[n]
        gdims = graph_inputs[n].type.tensor_type.shape.dim
        for d, (dmin, dmax) in enumerate(zip(lo, hi)):
            if dmin != dmax and d < len(gdims) and not gdims[d].dim_param:
                raise ExportError(
                    f"dim {d} of input {n!r} was declared dynamic ({dmin}..{dmax}) but the {exporter} "
                    f"exporter specialised it to {gdims[d].dim_value}: the model fixes that size in its code. "
                    "Fix: make that dimension static (dynamic=None or leave it out of dynamic=)."
                )
    return model


def _graph_dims(values: Any, name: str, example_shape: Sequence[int] | None) -> tuple[int | str, ...]:
    for v in values:
        if v.name == name:
            dims = v.type.tensor_type.shape.dim
            return tuple(d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?")
                         for d in dims)
    return tuple(example_shape or ())


def _graph_dtype(value: Any) -> str:
    from ._dtypes import by_onnx

    elem = value.type.tensor_type.elem_type
    row = by_onnx(elem)
    if row is None or not row.io:
        raise ExportError(f"output {value.name!r} has ONNX element type {elem}, which engines do not support")
    return row.name


def _verify_with_onnxruntime(exported: ExportedModel, leaves: list[torch.Tensor],
                             cast_model: torch.nn.Module | None, eager_out: list[torch.Tensor],
                             bound: dict[str, Any], params: tuple[Param, ...], settings: Settings,
                             *, strict: bool) -> None:
    from ._compare import compare_outputs
    from .backends._onnxruntime import run_onnx_cpu

    if cast_model is not None:
        # Compare like with like: the graph against the model in the same precision.
        args, kwargs = to_call(params, unflatten(exported.call_tree, leaves))
        with torch.inference_mode():
            eager_out, _ = flatten(cast_model(*args, **kwargs), what="output", allow_const=False)
    try:
        got = run_onnx_cpu(exported.onnx, exported.input_names, exported.output_names, leaves,
                           half=exported.precision != "fp32")
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"ONNX Runtime could not run the exported graph: {e}") from e
    tolerance = check_tolerance(settings)
    report = compare_outputs(got, eager_out, tolerance=tolerance, names=exported.output_names,
                             what="onnxruntime", reference_name="eager")
    report.numerics = (("eager in strict fp32 (TF32 off for the reference call)" if strict else "eager")
                       + f"; {settings.precision} tolerance policy")
    exported.extra["export_report"] = report
    if not report.passed:
        raise ExportError(
            "the exported ONNX graph does not match eager on the example inputs "
            f"({_describe_tolerance(tolerance)}):\n{report}\nPass verify=False to skip this check, or "
            "report the model to us."
        )
    log.info("export check: onnxruntime vs eager passed (max abs err %.3g)",
             max((o.max_abs for o in report.outputs), default=0.0))


def check_tolerance(settings: Settings, numerics: str | None = None) -> Tolerance:
    """compile()'s own checks: the policy for ``numerics`` (default: the precision), with the
    user's ``rtol=``/``atol=`` turning it into the plain elementwise check."""
    return policy_for(numerics or settings.precision, rtol=settings.rtol, atol=settings.atol)


def _describe_tolerance(t: Tolerance) -> str:
    parts = [f"rtol={t.rtol:g}", f"atol={t.atol:g}" + (f" or {t.atol_rms:g} x the output's rms" if t.atol_rms else "")]
    if t.min_cosine:
        parts.append(f"cosine >= {t.min_cosine:g}")
    return ", ".join(parts)


def _on_cuda(model: torch.nn.Module, leaves: Sequence[torch.Tensor]) -> bool:
    for t in leaves:
        if t.is_cuda:
            return True
    return any(p.is_cuda for p in itertools.chain(model.parameters(), model.buffers()))
