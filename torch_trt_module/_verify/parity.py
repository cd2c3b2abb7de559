"""``verify()`` and ``assert_parity()``: a compiled module against its model, on the same inputs,
each in its inference semantics; the comparison itself is :mod:`.compare`'s."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import torch

from .._core.modes import eval_semantics
from .._core.numerics import POLICY, eager_uses_tf32, numerics_of, strict_fp32
from .._core.signature import split_inputs
from .compare import REFERENCES, ParityReport, PerOutput, compare_outputs

__all__ = ["assert_parity", "reference_numerics", "verify"]


def verify(model: Callable[..., Any], compiled: Any, inputs: Any, *, rtol: PerOutput = None,
           atol: PerOutput = None, reference: str = "eager", strict_fp32: bool = False) -> ParityReport:
    """Run ``compiled`` and a reference on ``inputs`` and compare their outputs.

    ``reference`` is ``"eager"`` (``model`` itself), ``"onnxruntime"`` (the
    compiled module's ONNX graph on ONNX Runtime's CPU provider, through its
    ``run_reference`` method) or ``"both"`` (rows named ``eager:...`` then
    ``onnxruntime:...``). ``model`` is run as it is, so put it in eval mode first.

    Tolerances: without ``rtol``/``atol``, the policy of the computation's numerics
    (:data:`~torch_trt_module._core.numerics.POLICY`): the compiled module's precision, and
    ``"tf32"`` for fp32 where either side may use TF32 (eager on a CUDA GPU with PyTorch's
    default cuDNN flags, or a TensorRT engine built with ``tf32=True``). With ``rtol``
    and/or ``atol``, the plain elementwise check with those values. ``strict_fp32=True``
    runs the eager reference with TF32 off (restored after the call). The report's
    ``numerics`` line says which reference numerics and which policy were used.

    Example:
        >>> report = verify(model, torch_trt_module.compile(model, x), x, atol=1e-4)  # doctest: +SKIP
        >>> print(report)  # doctest: +SKIP
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference={reference!r} is not one of {', '.join(map(repr, REFERENCES))}")
    args, kwargs = split_inputs(inputs)
    refs = ["eager", "onnxruntime"] if reference == "both" else [reference]
    run_ort = getattr(compiled, "run_reference", None)
    if "onnxruntime" in refs and not callable(run_ort):
        raise TypeError(f"reference={reference!r} needs a compiled module with a run_reference() method, "
                        f"but {type(compiled).__name__} has none; use reference='eager' or compile "
                        f"the model with torch_trt_module")
    with torch.inference_mode():
        actual = compiled(*args, **kwargs)  # first: a lazy module knows its numerics once built
        on_tf32 = eager_uses_tf32(_device_of(model, args, kwargs))
        numerics, how = reference_numerics(getattr(compiled, "numerics", "fp32"),
                                           eager_tf32="eager" in refs and on_tf32 and not strict_fp32,
                                           strict=strict_fp32 and on_tf32)
        tolerance = POLICY[numerics] if rtol is None and atol is None else None
        note = how + (f"; {numerics} tolerance policy" if tolerance is not None else "; rtol/atol as given")
        reports = []
        for ref in refs:
            if ref == "eager":
                # A compiled module computes inference: compare with the model's inference semantics
                # too, whatever mode it is in (compile(resnet18()) leaves it training); modes restored.
                modes = eval_semantics(model) if isinstance(model, torch.nn.Module) else contextlib.nullcontext()
                with _strict_if(strict_fp32), modes:
                    expected = model(*args, **kwargs)
            else:
                expected = run_ort(*args, **kwargs)
            reports.append(compare_outputs(actual, expected, rtol=rtol, atol=atol, tolerance=tolerance,
                                           reference_name=ref))
            reports[-1].numerics = note
    if len(reports) == 1:
        return reports[0]
    errors = [f"{rep.reference_name}: {rep.structure_error}" for rep in reports if rep.structure_error]
    return ParityReport(
        outputs=[dataclasses.replace(o, name=f"{rep.reference_name}:{o.name}")
                 for rep in reports for o in rep.outputs],
        what="compiled", reference_name="eager+onnxruntime", structure_error="; ".join(errors) or None,
        numerics=note)


def reference_numerics(compiled_numerics: str, *, eager_tf32: bool, strict: bool) -> tuple[str, str]:
    """The tolerance policy name for comparing a compiled module with eager, and how eager computed."""
    precision = compiled_numerics if compiled_numerics in ("fp16", "bf16") else "fp32"
    numerics = numerics_of(precision, tf32=eager_tf32 or compiled_numerics == "tf32")
    if strict:
        how = "eager in strict fp32 (TF32 off for the reference call)"
    elif eager_tf32:
        how = "eager with TF32 (PyTorch's default for cuDNN convolutions on CUDA)"
    else:
        how = "eager as configured (no TF32)"
    if compiled_numerics == "tf32":
        how += ("; the compiled module computes fp32 in TF32 (a TensorRT engine built with tf32=True, or the "
                "PyTorch runtime under TF32 flags)")
    return numerics, how


def _strict_if(flag: bool) -> Any:
    return strict_fp32() if flag else contextlib.nullcontext()


def _device_of(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device | None:
    if isinstance(model, torch.nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    leaves = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    return leaves[0].device if leaves else None


def assert_parity(model: Callable[..., Any], compiled: Any, inputs: Any, **kwargs: Any) -> ParityReport:
    """:func:`verify`, then raise :class:`VerificationError` (an AssertionError) with the table on failure.

    Example:
        >>> assert_parity(model, compiled, (x,), rtol=1e-2)  # doctest: +SKIP
    """
    return verify(model, compiled, inputs, **kwargs).raise_for_failure()
