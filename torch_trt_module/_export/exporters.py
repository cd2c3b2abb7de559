"""The exporters, in order: ``torch.export`` capture then ONNX translation ("dynamo"), and the
TorchScript tracer as a fallback. Their errors are kept and reported truthfully.

The torch.export path comes first because it refuses data-dependent control flow instead of
silently baking one branch into the graph, and honours ``Dim`` ranges; its program is kept
(the PyTorch runtime runs it where no engine can). Attention is captured as its math
(``_lowering``). When it fails for any other reason the TorchScript tracer is tried; its warnings
that a traced value became a Python bool or number are errors, since the graph would hold only
the branch taken for the example. The tracer cannot tell a branch on data from a check on a shape,
so only torch.export's evidence (a guard on a data-dependent value) is ever called data-dependent
control flow. When every exporter fails, each one's error is reported, the first exporter's first,
and the first one's is chained.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .._core.quiet import quiet_torch
from .._core.settings import Settings
from .._errors import ExportError
from .lowering import lowered_attention
from .precision import low_precision_attention
from .verdicts import is_data_dependent, is_specialization, suggested_fixes, summary

__all__ = ["Exported", "run_exporters"]

log = logging.getLogger(__name__)
DEFAULT_OPSET = 18
_TRACER_FIX = ("Fix: compute it with tensor ops (torch.where, torch.cond), make the dimension it depends on static "
               "(dynamic=None), or fix what stops the dynamo exporter (exporter='dynamo' shows its error).")
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
    captured: tuple[Any, bool] | None = None  # torch.export's program where only its ONNX conversion failed
    for exporter in order[settings.exporter]:
        try:
            if exporter == "torchscript":
                onnx_bytes = _export_torchscript(wrapper, names, leaves, out_names, profiles, settings)
                return Exported(onnx_bytes, exporter, _beside_the_tracer(captured, wrapper, names, leaves, profiles,
                                                                         settings))
            lowered: list[int] = []
            with low_precision_attention(fused=False) as low:  # an fp16/bf16 model's attention: counted
                program = capture(wrapper, names, leaves, profiles, lowered=lowered)
            captured = program, bool((lowered and lowered[0]) or low[0])
            onnx_bytes = _to_onnx(program, leaves, names, out_names, settings)
            return Exported(onnx_bytes, exporter, _for_the_torch_runtime(*captured, wrapper, names, leaves, profiles,
                                                                         settings))
        except ExportError as e:
            if exporter == "torchscript" and not errors:
                e = _tracer_verdict(e, wrapper, names, leaves, profiles)
            errors.append((exporter, e))
            break  # our own verdict (data-dependent, specialised): no fallback may bake it in
        except Exception as e:  # noqa: BLE001 - every exporter failure is reported below
            log.info("%s exporter failed: %s", exporter, summary(e))
            errors.append((exporter, e))
    if len(errors) == 1 and isinstance(errors[0][1], ExportError):
        raise errors[0][1]
    detail = "; ".join(f"{name}: {summary(e)}" for name, e in errors)
    raise ExportError(f"could not export the model to ONNX ({detail}).{_hint(detail, names, profiles)}"
                      ) from errors[0][1]


def _for_the_torch_runtime(program: Any, attention: bool, wrapper: torch.nn.Module, names: Sequence[str],
                           leaves: Sequence[torch.Tensor], profiles: Profiles, settings: Settings) -> Any:
    """The program the PyTorch runtime runs: ``program``, or where its attention was lowered (or
    decomposed in fp16/bf16) for ONNX, the one with fused attention. That one serves the PyTorch
    runtime, which runs a module compiled on a GPU (or asked for): a CPU compile runs ONNX Runtime
    and would pay a second capture for nothing."""
    torch_runtime = settings.runtime == "torch" or any(t.is_cuda for t in leaves)
    if attention and torch_runtime:
        return fused_attention_program(wrapper, names, leaves, profiles, program, precision=settings.precision)
    return program


def _beside_the_tracer(captured: tuple[Any, bool] | None, wrapper: torch.nn.Module, names: Sequence[str],
                       leaves: Sequence[torch.Tensor], profiles: Profiles, settings: Settings) -> Any:
    """torch.export's program for an ONNX graph the tracer made, where the capture worked and only
    the conversion to ONNX failed (torch.onnx 2.11's type promotion fails on ``torch.where`` over an
    fp16 tensor and a Python float, as in T5's attention mask). The PyTorch runtime still runs the
    program; the export check covers the tracer's graph, not it, so it is kept only where it agrees
    with the model on the example (logged at INFO where not)."""
    if captured is None:
        return None
    program, attention = captured
    try:
        with torch.no_grad():
            # copies: a forward that writes to its inputs must not change what the other one reads
            got = _flat(program.module()(*[t.clone() for t in leaves]))
            want = _flat(wrapper(*[t.clone() for t in leaves]))
        tol = _AGREE.get(settings.precision, 1e-3)
        if len(got) != len(want) or not all(_agrees(a, b, tol) for a, b in zip(got, want)):
            raise ValueError("its outputs differ from the model's on the example")
    except Exception as e:  # noqa: BLE001 - the ONNX graph still serves every other runtime
        log.info("torch.export's program is not kept beside the tracer's ONNX graph: %s",
                 e if isinstance(e, ValueError) else summary(e))
        return None
    return _for_the_torch_runtime(program, attention, wrapper, names, leaves, profiles, settings)


def _tracer_verdict(refusal: ExportError, wrapper: torch.nn.Module, names: list[str], leaves: list[torch.Tensor],
                    profiles: Profiles) -> ExportError:
    """The tracer's refusal (a traced value became a Python value), judged with torch.export's evidence
    when the tracer ran alone (exporter="torchscript"): the tracer cannot tell a branch on data from a
    check on a shape, torch.export can. Only its verdict calls the model data-dependent."""
    text = str(refusal)
    if not text.endswith(_TRACER_FIX):
        return refusal  # not the tracer's refusal
    what = text[: -len(_TRACER_FIX)]
    try:
        capture(wrapper, names, leaves, profiles)
    except ExportError as probe:
        if probe.__cause__ is not None and is_data_dependent(probe.__cause__):
            found = ExportError(f"{what}torch.export confirms that the model has data-dependent control flow (a "
                                "Python branch or .item()/int() on a tensor value): "
                                f"{summary(probe.__cause__)}. {_FIX_BRANCH}")
            found.__cause__ = probe.__cause__
            return found
        return refusal
    except Exception:  # noqa: BLE001 - no evidence either way: the tracer's own words stand
        return refusal
    return ExportError(f"{what}torch.export traced the same model without finding a data-dependent branch, so the "
                       "value is likely a check on a shape. Fix: use exporter='dynamo' (or 'auto'), or make the "
                       "dimension it depends on static (dynamic=None).")


def capture(wrapper: torch.nn.Module, names: Sequence[str], leaves: Sequence[torch.Tensor],
            profiles: Profiles, *, lower_attention: bool = True, lowered: list[int] | None = None) -> Any:
    """torch.export's program of ``wrapper``, with a ``Dim`` for every dynamic dim; ExportError
    when the model's control flow depends on data or it fixes a declared-dynamic size.

    ``lower_attention``: capture ``scaled_dot_product_attention`` as its math (see below); then
    ``lowered``, if given, gets the number of calls that were lowered."""
    from torch.export import Dim

    dims = dynamic_dims(names, profiles)
    shapes: Any = (tuple({d: Dim(f"{sanitize(n)}_{d}", min=lo, max=hi) for d, (lo, hi) in dims[n].items()} or None
                         for n in names),)
    for attempt in range(6):
        try:
            # Attention is captured as its math (see _lowering): torch.onnx's own decomposition of
            # the fused op breaks the views that follow it in T5, Swin and MaxViT.
            # torch.export prints a failed trace's FX graph to stderr, and torch's loggers add theirs:
            # its exception, classified below, says it all (quiet_torch keeps the rest at DEBUG).
            lowering = lowered_attention() if lower_attention else contextlib.nullcontext()
            with warnings.catch_warnings(), lowering as mode, quiet_torch("torch.export"):
                warnings.simplefilter("ignore")
                program = torch.export.export(wrapper, tuple(leaves), dynamic_shapes=shapes, strict=False)
            if lowered is not None and mode is not None:
                lowered[:] = [mode.calls]
            return program
        except ExportError:
            raise  # our own verdict, made while tracing (e.g. the attention lowering's)
        except Exception as e:  # noqa: BLE001 - classified here, from torch.export's own evidence
            fixes = suggested_fixes(e)
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
                    f"a dynamic dimension was specialised by the model{what}: {summary(e).rstrip('.')}. The "
                    "model's weights or code fix that size (a Conv's or Linear's input channels, a view/reshape "
                    "with a hard-coded size). Fix: make that dimension static (dynamic=None, or leave it out of "
                    f"dynamic=), or compute the size from x.shape.{_recurrent_hint(wrapper)}"
                ) from e
            raise
    raise AssertionError("unreachable")


def _recurrent_hint(model: torch.nn.Module) -> str:
    """Why an RNN's time axis is fixed, where that is the cause: torch before 2.15 exports nn.LSTM,
    GRU and RNN through a Python loop over the time steps (torch._decomp's ``lstm_impl`` unbinds
    that axis), which fixes it to the example's length (all three, measured with torch 2.14.1);
    torch 2.15.0 kept an LSTM's symbolic (the conformance zoo's case 08)."""
    rnn = next((m for m in model.modules() if isinstance(m, torch.nn.RNNBase)), None)
    if rnn is None or torch.torch_version.TorchVersion(torch.__version__) >= (2, 15):
        return ""
    return (f" Here it is likely the model's {type(rnn).__name__}: torch {torch.__version__} exports it as a "
            "loop over its time steps, which fixes the sequence length to the example's. Keep that dimension "
            "static (pad to one length), or use torch >= 2.15.")


def fused_attention_program(wrapper: torch.nn.Module, names: Sequence[str], leaves: Sequence[torch.Tensor],
                            profiles: Profiles, lowered: Any, *, precision: str = "fp32") -> Any:
    """The program the PyTorch runtime runs, for a model whose attention was lowered for ONNX:
    captured again with ``scaled_dot_product_attention`` kept whole, so that its fused kernels
    (flash, memory-efficient) run, as they do in eager and under ``torch.compile``.

    The fused op's output strides are those of the kernel traced (see _lowering), so the program is
    run once on the example beside the lowered one, on the example's device: where it fails or
    differs, the lowered program is kept (logged at INFO). The ONNX graph always comes from the
    lowered capture."""
    try:
        with low_precision_attention(fused=True):  # fp16/bf16 attention too (precision.py)
            fused = capture(wrapper, names, leaves, profiles, lower_attention=False)
        with torch.no_grad():
            got = _flat(fused.module()(*leaves))
            want = _flat(lowered.module()(*leaves))
        tol = _AGREE.get(precision, 1e-3)
        if len(got) != len(want) or not all(_agrees(a, b, tol) for a, b in zip(got, want)):
            raise ValueError("its outputs differ from the lowered program's on the example")
    except Exception as e:  # noqa: BLE001 - the lowered program is correct; this one only faster
        log.info("the PyTorch runtime keeps attention as its math: the program with fused attention %s",
                 summary(e) if not isinstance(e, ValueError) else e)
        return lowered
    return fused


def _flat(out: Any) -> list[Any]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


#: How closely two forms of one model agree (fused and math attention; torch.export's program and
#: the model), as a fraction of the output's largest value, by the program's precision (1e-3 for
#: fp32): fp16 and bf16 programs compute at their own precision (eps 9.8e-4 and 7.8e-3), whatever
#: the dtype of their outputs (a final LayerNorm's fp32).
_AGREE = {"fp16": 1e-2, "bf16": 4e-2}


def _agrees(a: Any, b: Any, tol: float = 1e-3) -> bool:
    """Two forms of one model round differently: agree to ``tol`` of the output's largest value."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return bool(a == b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    scale = float(b.detach().abs().float().max()) if b.numel() else 0.0
    return bool(((a.float() - b.float()).abs() <= tol * scale + 1e-5).all())


def _to_onnx(program: Any, leaves: Sequence[torch.Tensor], names: list[str], out_names: list[str],
             settings: Settings) -> bytes:
    sink = io.StringIO()
    # The exporter prints progress to stdout; a library must not, so it goes to DEBUG.
    with contextlib.redirect_stdout(sink), warnings.catch_warnings(), quiet_torch("torch.onnx.export"):
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
    caught: list[tuple[str, str]] = []  # (message, where) of each tracer warning that a value became Python

    def record(message: Warning | str, category: type[Warning], filename: str, lineno: int, *_: Any) -> None:
        if issubclass(category, torch.jit.TracerWarning) and re.search(r"Python (boolean|number|float|int)",
                                                                       str(message)):
            caught.append((str(message), _user_frame() or f"{filename}:{lineno}"))

    with warnings.catch_warnings(), quiet_torch("the TorchScript exporter"):
        warnings.simplefilter("always")
        warnings.showwarning = record  # restored by catch_warnings
        torch.onnx.export(wrapper, tuple(leaves), buf, dynamo=False, input_names=names, output_names=out_names,
                          dynamic_axes=dynamic_axes, opset_version=settings.opset or DEFAULT_OPSET)
    if caught:
        # The tracer cannot tell a branch on data from a check on a shape (timm's
        # ``_assert(H == self.img_size[0])``, an ``is_causal`` computed from a length): both are the
        # same warning. So this says what happened and where, and claims no data dependence; only
        # torch.export's own evidence diagnoses that (capture).
        message, where = caught[0]
        first = message.strip().split(". ")[0].rstrip(".")
        raise ExportError(
            f"the TorchScript tracer turned a traced value into a Python value ({first}.) at {where}. The trace "
            "keeps that value as a constant: if it decides a branch, an assert or a size, the graph would hold "
            f"only the branch taken for the example, so it is refused. {_TRACER_FIX}")
    return buf.getvalue()


def _user_frame() -> str | None:
    """``file:line`` of the innermost frame outside torch, this package and the warnings machinery:
    the model's code that turned a traced value into a Python value (torch's own frame, such as
    ``torch._assert``'s, is what the warning itself names)."""
    import traceback

    skip = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith(skip) and frame.filename != warnings.__file__ \
                and not frame.filename.startswith("<"):
            return f"{frame.filename}:{frame.lineno}"
    return None


def _hint(detail: str, names: Sequence[str] = (), profiles: Profiles | None = None) -> str:
    dims = dynamic_dims(names, profiles) if profiles else {}
    if "must match the size of tensor" in detail and sum(bool(d) for d in dims.values()) > 1:
        # Two inputs meet elementwise in dims that are dynamic each on its own (dynamic="batch" makes
        # dim 0 of every input dynamic): one of them is not batched (a table, a broadcast operand).
        first = next(n for n in names if dims[n])
        ranges = {d: (lo, profiles[first][1][d], hi) for d, (lo, hi) in dims[first].items()}  # type: ignore[index]
        return (f" The inputs {[n for n in names if dims[n]]} each have dynamic dims of their own, and the model "
                "combines them elementwise: an input that is not batched (a table, an operand that broadcasts) "
                "must keep a static size there. Fix: name only the batched inputs' dims in dynamic=, e.g. "
                f"dynamic={{{first!r}: {ranges}}}.")
    if "specializ" in detail or "Constraints violated" in detail or "specialized" in detail:
        return (" A dynamic dimension was specialised by the model (its size is fixed by the code); "
                "make that dimension static with dynamic=None or a narrower dynamic= dict.")
    if "Unsupported" in detail or "not supported" in detail or "No decomposition" in detail:
        return (" The model uses an operator the ONNX exporters cannot translate; replace it or register a custom "
                "translation.")
    return ""
