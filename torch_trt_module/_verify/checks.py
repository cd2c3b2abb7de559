"""compile()'s own checks (``verify=True``): the exported graph against eager, at the example and
at the profile's corners, and the compiled module against eager on the example inputs.

Both use the tolerance policy of :mod:`torch_trt_module._core.numerics` for what is compared (the user's
``rtol=``/``atol=`` turn it into the plain elementwise check), and eager in strict fp32
where it runs on a CUDA GPU (ONNX Runtime computes strict fp32).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any

import torch

from .._core.numerics import Tolerance, policy_for, strict_fp32
from .._core.settings import Settings
from .._core.signature import copy_call
from .._core.spec import ExportedModel
from .._core.tree import flatten
from .._errors import ExportError, VerificationError
from .._export.export import ExportCheck
from ..backends._onnxruntime import run_onnx_cpu
from .compare import ParityReport, compare_outputs
from .parity import reference_numerics

__all__ = ["check_compiled", "check_export", "check_tolerance"]

log = logging.getLogger(__name__)

_WHERE = {"example": "the example inputs", "min": "the profile's min", "max": "the profile's max",
          "off": "a shape inside the profile (neither opt nor a bound)"}


def check_tolerance(settings: Settings, numerics: str | None = None) -> Tolerance:
    """The policy for ``numerics`` (default: the precision), with the user's ``rtol=``/``atol=``
    turning it into the plain elementwise check."""
    return policy_for(numerics or settings.precision, rtol=settings.rtol, atol=settings.atol)


def describe(t: Tolerance) -> str:
    parts = [f"rtol={t.rtol:g}", f"atol={t.atol:g}" + (f" or {t.atol_rms:g} x the output's rms" if t.atol_rms else "")]
    if t.min_cosine:
        parts.append(f"cosine >= {t.min_cosine:g}")
    return ", ".join(parts)


def _shapes(exported: ExportedModel, inputs: list[torch.Tensor]) -> str:
    return ", ".join(f"{s.name}={tuple(t.shape)}" for s, t in zip(exported.inputs, inputs))


def check_export(exported: ExportedModel, check: ExportCheck, settings: Settings) -> None:
    """ONNX Runtime (CPU, strict fp32) on the graph against eager at every point of ``check``;
    ExportError naming the point and its shapes if one differs or cannot run."""

    tolerance = check_tolerance(settings)
    numerics = (("eager in strict fp32 (TF32 off for the reference call)" if check.strict else "eager")
                + f"; {settings.precision} tolerance policy")
    reports: dict[str, ParityReport] = {}
    for label, (inputs, expected) in check.points.items():
        where = f"{_WHERE[label]} ({_shapes(exported, inputs)})"
        try:
            got = run_onnx_cpu(exported.onnx, exported.input_names, exported.output_names, inputs,
                               half=exported.precision != "fp32")
        except Exception as e:  # noqa: BLE001
            if exported.precision == "bf16" and ("bfloat16" in str(e) or "NOT_IMPLEMENTED" in str(e)):
                # ONNX Runtime's CPU provider has bf16 kernels for few ops (no Conv, no MatMul): the
                # graph cannot be checked here. The built module is, against eager, after the build.
                log.warning("export check skipped: ONNX Runtime's CPU provider cannot run this bf16 graph (%s); "
                            "the compiled module is checked against eager after the build instead",
                            str(e).splitlines()[0][:200])
                return
            raise ExportError(f"ONNX Runtime could not run the exported graph at {where}: {e}"
                              + _specialised_hint(label)) from e
        report = compare_outputs(got, expected, tolerance=tolerance, names=exported.output_names,
                                 what="onnxruntime", reference_name="eager")
        report.numerics = numerics
        if not report.passed and check.model is not None and settings.rtol is None and settings.atol is None:
            report = _against_float64(check.model, inputs, expected, got, tolerance, exported.output_names) or report
        reports[label] = report
        if not report.passed:
            exported.extra["export_reports"] = reports
            raise ExportError(f"the exported ONNX graph does not match eager at {where} ({describe(tolerance)}):\n"
                              f"{report}\nPass verify=False to skip this check, or report the model to us."
                              + _specialised_hint(label))
    exported.extra["export_reports"] = reports
    if "example" in reports:
        exported.extra["export_report"] = reports["example"]
    for label, error in check.errors.items():
        log.warning("export check: eager itself fails at %s, so the graph is not checked there: %s",
                    _WHERE[label], error)
    worst = max((o.max_abs for r in reports.values() for o in r.outputs), default=0.0)
    log.info("export check: onnxruntime vs eager passed at %s (max abs err %.3g)", ", ".join(reports), worst)


def _against_float64(model: torch.nn.Module, inputs: list[torch.Tensor], eager: list[torch.Tensor],
                     got: list[torch.Tensor], tolerance: Tolerance, names: list[str], *,
                     kwargs: dict[str, Any] | None = None, what: str = "onnxruntime", stage: str = "export check"
                     ) -> ParityReport | None:
    """A second opinion for an fp32 result that misses eager's fp32 outputs: both against the model
    run in float64. Eager's fp32 is itself only an approximation; where rounding errors pile up
    (deep stacks of BatchNorm with measured statistics), a correct graph ends as far from eager as
    eager is from the exact result. It passes when it is within twice eager's own fp32 error of
    float64, output by output (with the policy's rtol, rms bar and cosine bound). None where
    the model cannot run in float64 (an op without a float64 kernel, no memory for the copy): then
    the first verdict stands. Costs a copy of the model and one call, only on this path.

    ``model`` is called as ``model(*inputs, **kwargs)`` (nested inputs allowed); its output's tensor
    leaves pair up with ``eager`` and ``got``, which are flat."""
    try:
        exact_model = copy.deepcopy(model).double()
        args64, kwargs64 = copy_call(*_as_float64(tuple(inputs), kwargs or {}))
        with torch.inference_mode():
            exact = [t.detach() for t in flatten(exact_model(*args64, **kwargs64), what="output")[0]]
    except Exception:  # noqa: BLE001 - no second opinion; the result stays refused
        log.debug("%s: the float64 reference could not run", stage, exc_info=True)
        return None
    del exact_model  # free the copy before the comparison
    if len(exact) != len(eager):
        return None
    atol: dict[str, float] = {}
    for name, e, x in zip(names, eager, exact):
        own = (e.double() - x.to(e.device)).abs().max().item() if e.is_floating_point() and e.numel() else 0.0
        atol[name] = max(tolerance.atol, 2.0 * own)
    report = compare_outputs([g.double() if g.is_floating_point() else g for g in got], [x.cpu() for x in exact],
                             tolerance=tolerance, atol=atol, names=names, what=what,
                             reference_name="eager in float64")
    if not report.passed:
        return None
    report.numerics = (f"eager in float64: the {'graph' if stage == 'export check' else 'compiled module'} missed "
                       "eager's fp32 outputs, but is within twice eager's own fp32 error of the float64 result; "
                       "fp32 tolerance policy with that absolute bar")
    log.info("%s: %s differs from eager's fp32 outputs by as much as eager's fp32 differs from float64 (bars %s); "
             "accepted against float64", stage, what, {n: f"{a:.3g}" for n, a in atol.items()})
    return report


def _as_float64(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    import torch.utils._pytree as pytree

    def to64(t: torch.Tensor) -> torch.Tensor:
        return t.double() if t.is_floating_point() else t

    return pytree.tree_map_only(torch.Tensor, to64, (args, kwargs))  # type: ignore[no-any-return]


def _specialised_hint(label: str) -> str:
    if label == "example":
        return ""
    return (" It matches at the example, so the graph was specialised for part of the declared range (an axis-less "
            "squeeze(), a size-dependent branch). Fix: narrow that dim in dynamic= (or make it static), or remove "
            "the specialisation from the model.")


def check_compiled(module: Any, model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                   settings: Settings, device: torch.device) -> ParityReport:
    """The compiled module against eager on the example inputs; VerificationError if it differs.

    The same tolerance policy as the export check, and for fp32 the same second opinion: a module
    that misses eager's fp32 outputs passes when it is within twice eager's own fp32 error of the
    model run in float64 (see ``_against_float64``), unless ``rtol=``/``atol=`` were given. Both
    run on copies of the example: a forward that writes to its inputs leaves the caller's as they were."""
    strict = device.type == "cuda"
    eager_args, eager_kwargs = copy_call(args, kwargs)
    module_args, module_kwargs = copy_call(args, kwargs)
    with torch.inference_mode():
        with strict_fp32() if strict else contextlib.nullcontext():
            ref = model(*eager_args, **eager_kwargs)
        got = module(*module_args, **module_kwargs)
    numerics, how = reference_numerics(module.numerics, eager_tf32=False, strict=strict)
    tolerance = check_tolerance(settings, numerics)
    what = f"compiled ({module.backend})"
    report = compare_outputs(got, ref, tolerance=tolerance, what=what, reference_name="eager")
    report.numerics = f"{how}; {numerics} tolerance policy"
    if (not report.passed and report.structure_error is None and numerics == "fp32"
            and settings.rtol is None and settings.atol is None):
        second = _against_float64(model, list(args), flatten(ref, what="eager")[0], flatten(got, what=what)[0],
                                  tolerance, [o.name for o in report.outputs], kwargs=kwargs, what=what,
                                  stage="check after the build")
        report = second or report
    if not report.passed:
        raise VerificationError(f"the compiled module does not match eager on the example inputs:\n{report}\n"
                                "Loosen rtol=/atol=, or pass verify=False to skip this check.", report)
    log.info("%s", str(report).splitlines()[0])
    return report
