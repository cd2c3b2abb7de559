"""The exporters, in order: ``torch.export`` capture then ONNX translation ("dynamo"), and the
TorchScript tracer as a fallback. Their errors are kept and reported truthfully.

The torch.export path comes first because it refuses data-dependent control flow instead of
silently baking one branch into the graph, and honours ``Dim`` ranges; its program is kept
(the PyTorch runtime runs it where no engine can). When it fails for any other reason the
TorchScript tracer is tried; its warnings that a traced value became a Python bool or number
are errors, since the graph would hold only the branch taken for the example. When every
exporter fails, each one's error is reported, the first exporter's first.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ._errors import ExportError
from ._settings import Settings

__all__ = ["Exported", "run_exporters"]

log = logging.getLogger(__name__)
DEFAULT_OPSET = 18
_DATA_DEPENDENT = ("GuardOnDataDependentSymNode", "data-dependent", "DataDependent",
                   "Could not guard on data-dependent", "Could not extract specialized integer from data-dependent")
_FIX_BRANCH = ("Fix: replace the branch with tensor ops (torch.where, torch.cond) or move it outside the compiled "
               "module.")


@dataclass
class Exported:
    """What the exporters made: the ONNX graph, which exporter made it, and torch.export's program."""

    onnx: bytes
    exporter: str
    program: Any | None = None


Profiles = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def dynamic_dims(names: Sequence[str], profiles: Profiles) -> dict[str, dict[int, tuple[int, int]]]:
    return {n: {d: (lo, hi) for d, (lo, hi) in enumerate(zip(profiles[n][0], profiles[n][2])) if lo != hi}
            for n in names}


def sanitize(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


def run_exporters(wrapper: torch.nn.Module, names: list[str], leaves: list[torch.Tensor], out_names: list[str],
                  profiles: Profiles, settings: Settings) -> Exported:
    """Export ``wrapper`` (flat tensors in, flat tensors out) with the exporters ``settings`` allows."""
    order = {"auto": ["dynamo", "torchscript"], "dynamo": ["dynamo"], "torchscript": ["torchscript"]}
    errors: list[tuple[str, BaseException]] = []
    for exporter in order[settings.exporter]:
        try:
            if exporter == "torchscript":
                return Exported(_export_torchscript(wrapper, names, leaves, out_names, profiles, settings), exporter)
            program = capture(wrapper, names, leaves, profiles)
            return Exported(_to_onnx(program, leaves, names, out_names, settings), exporter, program)
        except ExportError as e:
            errors.append((exporter, e))
            break  # our own verdict (data-dependent, specialised): no fallback may bake it in
        except Exception as e:  # noqa: BLE001 - every exporter failure is reported below
            log.info("%s exporter failed: %s", exporter, summary(e))
            errors.append((exporter, e))
    if len(errors) == 1 and isinstance(errors[0][1], ExportError):
        raise errors[0][1]
    detail = "; ".join(f"{name}: {summary(e)}" for name, e in errors)
    raise ExportError(f"could not export the model to ONNX ({detail}).{_hint(detail)}") from errors[0][1]


def capture(wrapper: torch.nn.Module, names: Sequence[str], leaves: Sequence[torch.Tensor],
            profiles: Profiles) -> Any:
    """torch.export's program of ``wrapper``, with a ``Dim`` for every dynamic dim; ExportError
    when the model's control flow depends on data or it fixes a declared-dynamic size."""
    from torch.export import Dim

    dims = dynamic_dims(names, profiles)
    shapes: Any = (tuple({d: Dim(f"{sanitize(n)}_{d}", min=lo, max=hi) for d, (lo, hi) in dims[n].items()} or None
                         for n in names),)
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.export.export(wrapper, tuple(leaves), dynamic_shapes=shapes, strict=False)
        except Exception as e:  # noqa: BLE001 - classified here, from torch.export's own evidence
            fixes = _suggested_fixes(e)
            fixed = [f for f in fixes if re.fullmatch(r"\w+ = -?\d+", f)]
            if fixes and not fixed and attempt < 5:
                # Dims the model ties together (inputs that share a batch dim): one Dim for them.
                from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

                shapes = refine_dynamic_shapes_from_suggested_fixes(
                    "Suggested fixes:\n" + "\n".join(f"  {f}" for f in fixes), shapes)
                log.debug("torch.export: tied dynamic dims %s", ", ".join(fixes))
                continue
            if is_data_dependent(e):
                raise ExportError(
                    "the model has data-dependent control flow (a Python branch or .item()/int() on a tensor value), "
                    f"which cannot be captured in a static graph. torch.export said: {summary(e)}. {_FIX_BRANCH}"
                ) from e
            if fixed or is_specialization(e):
                # Falling back to TorchScript would bake the size in silently; say it instead.
                what = f" ({', '.join(fixed)})" if fixed else ""
                raise ExportError(
                    f"a dynamic dimension was specialised by the model{what}: {summary(e)}. The model's code fixes "
                    "that size (e.g. a view/reshape with a hard-coded size). Fix: make that dimension static "
                    "(dynamic=None, or leave it out of dynamic=), or compute the size from x.shape."
                ) from e
            raise
    raise AssertionError("unreachable")


def _suggested_fixes(e: BaseException) -> list[str]:
    """torch.export's "Suggested fixes" for a constraint violation, as ``name = expr`` lines."""
    for x in _chain(e):
        text = str(x)
        if "Suggested fixes:" in text:
            block = text.split("Suggested fixes:", 1)[1].split("\n\n")[0]
            return [ln.strip() for ln in block.splitlines() if " = " in ln]
    return []


def _to_onnx(program: Any, leaves: Sequence[torch.Tensor], names: list[str], out_names: list[str],
             settings: Settings) -> bytes:
    sink = io.StringIO()
    # The exporter prints progress to stdout; a library must not, so it goes to DEBUG.
    with contextlib.redirect_stdout(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            program, tuple(leaves), None, dynamo=True, input_names=names, output_names=out_names,
            opset_version=settings.opset or DEFAULT_OPSET, verbose=False, optimize=False, external_data=False)
        assert onnx_program is not None
        onnx_program.model = _optimize_keeping_weights(onnx_program.model, weight_names(program))
    log.debug("ONNX translation output:\n%s", sink.getvalue())
    return onnx_program.model_proto.SerializeToString()  # type: ignore[no-any-return]


def weight_names(program: Any) -> set[str]:
    """The program's parameters and buffers, by fully qualified name (the names their ONNX
    initializers get)."""
    sig = program.graph_signature
    return set(sig.inputs_to_parameters.values()) | set(sig.inputs_to_buffers.values())


def _optimize_keeping_weights(model: Any, weights: set[str]) -> Any:
    """The ONNX optimizer (constant folding, fusions, dead code) with the model's weights hidden from
    it: each stays an initializer of its own, under its own name, holding exactly the weight's
    values. Folding a weight into another constant (BatchNorm into the Conv before it, or a zero
    bias dropped) would tie the graph's structure and constants to the weights' values; TensorRT
    and ONNX Runtime make those fusions themselves, and a refit can then replace any weight by name."""
    from onnxscript import optimizer

    hidden = {}
    for name in list(model.graph.initializers):
        if name in weights:
            value = model.graph.initializers[name]
            hidden[name] = value.const_value
            value.const_value = None
            del model.graph.initializers[name]
            model.graph.inputs.append(value)
    model = optimizer.optimize(model)
    by_name = {v.name: v for v in model.graph.inputs}
    for name, tensor in hidden.items():
        value = by_name.get(name)
        if value is None:
            continue  # a weight the graph does not use
        model.graph.inputs.remove(value)
        value.const_value = tensor
        model.graph.register_initializer(value)
    return model


def _export_torchscript(wrapper: torch.nn.Module, names: list[str], leaves: list[torch.Tensor],
                        out_names: list[str], profiles: Profiles, settings: Settings) -> bytes:
    dims = dynamic_dims(names, profiles)
    dynamic_axes = {n: {d: f"{sanitize(n)}_{d}" for d in dims[n]} for n in names if dims[n]}
    buf = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(wrapper, tuple(leaves), buf, dynamo=False, input_names=names, output_names=out_names,
                          dynamic_axes=dynamic_axes, opset_version=settings.opset or DEFAULT_OPSET)
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning) and re.search(r"Python (boolean|number|float|int)",
                                                                         str(w.message)):
            raise ExportError(
                f"the TorchScript tracer turned a traced value into a Python value ({str(w.message).strip()}). "
                "If that value decides a branch (data-dependent control flow, or a check on a shape), the graph "
                f"would hold only the branch taken for the example, so it is refused. {_FIX_BRANCH}")
    return buf.getvalue()


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and len(out) < 10:
        out.append(e)
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return out


def is_data_dependent(e: BaseException) -> bool:
    return any(any(m in f"{type(x).__name__}: {x}" for m in _DATA_DEPENDENT) for x in _chain(e))


def is_specialization(e: BaseException) -> bool:
    text = " ".join(str(x) for x in _chain(e)[:2])
    return "Constraints violated" in text or "specialized" in text or "specialised" in text


def summary(e: BaseException) -> str:
    """The first meaningful line of an exporter's error (their messages run to pages)."""
    text = str(e)
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    first = lines[0] if lines else type(e).__name__
    return re.sub(r"\x1b\[[0-9;]*m", "", first)[:400]


def _hint(detail: str) -> str:
    if "specializ" in detail or "Constraints violated" in detail or "specialized" in detail:
        return (" A dynamic dimension was specialised by the model (its size is fixed by the code); "
                "make that dimension static with dynamic=None or a narrower dynamic= dict.")
    if "Unsupported" in detail or "not supported" in detail or "No decomposition" in detail:
        return (" The model uses an operator the ONNX exporters cannot translate; replace it or register a custom "
                "translation.")
    return ""
