"""torch_trt_module._verify.checks: compile()'s own checks. check_export runs the exported graph on ONNX
Runtime at the example and at the profile's corners and names the point that fails (a graph
specialised for part of the range fails at a corner, not at the example); check_compiled compares
the compiled module with eager; both say the tolerance they used and how to get past the check."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module import ExportError, VerificationError
from torch_trt_module._verify.checks import check_compiled, check_export, check_tolerance, describe
from torch_trt_module._export.export import ExportCheck, export_with_settings
from torch_trt_module._core.numerics import POLICY
from torch_trt_module._core.settings import Settings

HINT = (" It matches at the example, so the graph was specialised for part of the declared range (an axis-less "
        "squeeze(), a size-dependent branch). Fix: narrow that dim in dynamic= (or make it static), or remove the "
        "specialisation from the model.")
FP32 = "rtol=0.001, atol=1e-05 or 0.001 x the output's rms, cosine >= 0.99999"


class LastIntoFirst(torch.nn.Module):
    """Copies the last column into the first. ``squeeze()`` without an axis drops the batch dim too
    when the batch is 1, so torch.export's graph (which assumes batch != 1) only holds for batch >= 2."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = ids.clone()
        out[:, 0] = ids[:, -1:].squeeze()
        return out


def exported(model: torch.nn.Module, *args: torch.Tensor, **options: Any) -> tuple[ttm.ExportedModel, ExportCheck,
                                                                                   Settings]:
    settings = Settings.from_options(**options)
    ex, check = export_with_settings(model.eval(), args, {}, settings)
    return ex, check, settings


@pytest.fixture(scope="module")
def linear() -> tuple[ttm.ExportedModel, ExportCheck, Settings]:
    torch.manual_seed(0)
    return exported(torch.nn.Linear(4, 3), torch.randn(2, 4), exporter="torchscript")


def test_a_good_graph_passes_at_every_point(linear: tuple[ttm.ExportedModel, ExportCheck, Settings]) -> None:
    ex, check, settings = linear
    assert {label: tuple(p[0][0].shape) for label, p in check.points.items()} == \
        {"example": (2, 4), "min": (1, 4), "max": (32, 4), "off": (17, 4)}
    check_export(ex, check, settings)
    reports = ex.extra["export_reports"]
    assert list(reports) == ["example", "min", "max", "off"] and all(r.passed for r in reports.values())
    assert ex.extra["export_report"] is reports["example"]
    assert reports["min"].numerics == "eager; fp32 tolerance policy"  # eager on the CPU: no TF32 to turn off


def test_the_graph_specialised_for_part_of_the_range_fails_at_the_corner() -> None:
    ids = torch.randint(0, 100, (2, 5), dtype=torch.int64)
    ex, check, settings = exported(LastIntoFirst(), ids, exporter="dynamo")
    assert ex.exporter == "dynamo" and ex.inputs[0].min == (1, 5)  # the default batch profile: 1..32
    with pytest.raises(ExportError) as info:
        check_export(ex, check, settings)
    msg = str(info.value)
    # What happens: at batch 1 the graph's Unsqueeze gets a rank-0 tensor, and ONNX Runtime refuses it.
    assert msg.startswith("ONNX Runtime could not run the exported graph at the profile's min (ids=(1, 5)): ")
    assert "Unsqueeze" in msg and msg.endswith(HINT)
    assert list(ex.extra.get("export_reports", {})) in ([], ["example"])  # the example itself passed


def test_the_tracer_s_graph_of_the_same_model_holds_at_every_corner() -> None:
    # TorchScript's Squeeze is computed at run time, so the same model exports correctly that way.
    ids = torch.randint(0, 100, (2, 5), dtype=torch.int64)
    ex, check, settings = exported(LastIntoFirst(), ids, exporter="torchscript")
    check_export(ex, check, settings)
    assert list(ex.extra["export_reports"]) == ["example", "min", "max", "off"]


def test_a_wrong_result_at_a_corner_names_the_point_the_tolerance_and_the_fix(
        linear: tuple[ttm.ExportedModel, ExportCheck, Settings]) -> None:
    ex, check, settings = linear
    points = dict(check.points)
    inputs, outputs = points["max"]
    points["max"] = (inputs, [outputs[0] + 1])  # what eager would say if the graph were wrong at batch 32
    with pytest.raises(ExportError) as info:
        check_export(ex, ExportCheck(points=points), settings)
    msg = str(info.value)
    assert msg.startswith(f"the exported ONNX graph does not match eager at the profile's max (input=(32, 4)) "
                          f"({FP32}):\nparity: onnxruntime vs eager: FAIL (0/1 outputs pass)\n")
    assert msg.endswith("\nPass verify=False to skip this check, or report the model to us." + HINT)
    assert [(k, r.passed) for k, r in ex.extra["export_reports"].items()] == \
        [("example", True), ("min", True), ("max", False)]  # kept for the caller, up to the failing point


def test_a_wrong_result_at_the_example_has_no_specialisation_hint(
        linear: tuple[ttm.ExportedModel, ExportCheck, Settings]) -> None:
    ex, check, settings = linear
    inputs, outputs = check.points["example"]
    with pytest.raises(ExportError) as info:
        check_export(ex, ExportCheck(points={"example": (inputs, [outputs[0] * 2])}), settings)
    assert str(info.value).startswith("the exported ONNX graph does not match eager at the example inputs (input=(2, 4))")
    assert str(info.value).endswith("or report the model to us.")


def test_a_point_where_eager_itself_fails_is_logged_not_raised(linear: tuple[ttm.ExportedModel, ExportCheck, Settings],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    ex, check, settings = linear
    with caplog.at_level(logging.WARNING, logger="torch_trt_module"):
        check_export(ex, ExportCheck(points={"example": check.points["example"]},
                                     errors={"max": "RuntimeError: out of memory"}), settings)
    assert ("export check: eager itself fails at the profile's max, so the graph is not checked there: "
            "RuntimeError: out of memory") in caplog.text


def test_the_user_s_tolerances_make_the_plain_check(linear: tuple[ttm.ExportedModel, ExportCheck, Settings]) -> None:
    ex, check, _ = linear
    assert check_tolerance(Settings()) is POLICY["fp32"]
    assert check_tolerance(Settings(), "tf32") is POLICY["tf32"]
    loose = Settings.from_options(rtol=2.0, atol=2.0)
    assert describe(check_tolerance(loose)) == "rtol=2, atol=2"
    assert describe(check_tolerance(Settings())) == FP32
    inputs, outputs = check.points["max"]
    check_export(ex, ExportCheck(points={"max": (inputs, [outputs[0] + 1])}), loose)  # within atol=2: passes


class Times(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, k: float) -> None:
        super().__init__()
        self.inner, self.k = inner, k

    def forward(self, *args: torch.Tensor) -> Any:
        return [o * self.k for o in self.inner(*args)]


class Fp32Only(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: torch.Tensor) -> Any:
        if args[0].dtype != torch.float32:
            raise TypeError("this model has no float64 kernel")
        return self.inner(*args)


def test_a_graph_as_close_to_float64_as_eager_s_fp32_passes_against_float64(
        linear: tuple[ttm.ExportedModel, ExportCheck, Settings]) -> None:
    # Eager's fp32 is itself off the exact result (rounding piling up through deep BatchNorm stacks);
    # here eager is made off by 5e-3, the graph is not: against float64 the graph is the better one.
    ex, check, settings = linear
    assert check.model is not None
    inputs, outputs = check.points["example"]
    off = [outputs[0] + 5e-3]
    with pytest.raises(ExportError):  # without the model, the plain verdict: refused
        check_export(ex, ExportCheck(points={"example": (inputs, off)}), settings)
    check_export(ex, ExportCheck(points={"example": (inputs, off)}, model=check.model), settings)
    report = ex.extra["export_report"]
    assert report.passed and report.reference_name == "eager in float64"
    assert report.numerics is not None and report.numerics.startswith("eager in float64: the graph missed")
    assert report.outputs[0].atol == pytest.approx(2 * 5e-3, rel=1e-3)  # twice eager's own error


def test_a_wrong_graph_is_still_refused_against_float64(linear: tuple[ttm.ExportedModel, ExportCheck, Settings]) -> None:
    ex, check, settings = linear
    assert check.model is not None
    inputs, outputs = check.points["example"]
    doubled = Times(check.model, 2.0)  # eager (and its float64) say 2x: the graph is wrong for this model
    with pytest.raises(ExportError, match="does not match eager at the example inputs"):
        check_export(ex, ExportCheck(points={"example": (inputs, [outputs[0] * 2])}, model=doubled), settings)


def test_without_a_float64_run_the_first_verdict_stands(linear: tuple[ttm.ExportedModel, ExportCheck, Settings]) -> None:
    ex, check, settings = linear
    assert check.model is not None
    inputs, outputs = check.points["example"]
    with pytest.raises(ExportError, match="does not match eager"):
        check_export(ex, ExportCheck(points={"example": (inputs, [outputs[0] + 5e-3])}, model=Fp32Only(check.model)),
                     settings)
    loose = Settings.from_options(rtol=1e-4, atol=1e-4)  # the user's own tolerances: no second opinion
    with pytest.raises(ExportError, match="does not match eager"):
        check_export(ex, ExportCheck(points={"example": (inputs, [outputs[0] + 5e-3])}, model=check.model), loose)


# --------------------------------------------------------------------------- the compiled module

@pytest.fixture(scope="module")
def compiled() -> tuple[torch.nn.Module, ttm.TRTModule]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).eval()
    return model, ttm.compile(model, torch.randn(2, 4), backend="onnxruntime", cache=False, exporter="torchscript")


def test_check_compiled_passes_and_returns_its_report(compiled: tuple[torch.nn.Module, ttm.TRTModule]) -> None:
    model, module = compiled
    report = check_compiled(module, model, (torch.randn(3, 4),), {}, Settings(), torch.device("cpu"))
    assert report.passed and report.numerics == "eager as configured (no TF32); fp32 tolerance policy"


def test_check_compiled_raises_with_the_report_when_they_differ(compiled: tuple[torch.nn.Module, ttm.TRTModule]
                                                                 ) -> None:
    model, module = compiled
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.weight.add_(0.5)  # other weights: what a stale engine would be checked against
    with pytest.raises(VerificationError) as info:
        check_compiled(module, other, (torch.randn(3, 4),), {}, Settings(), torch.device("cpu"))
    msg = str(info.value)
    assert msg.startswith("the compiled module does not match eager on the example inputs:\n"
                          "parity: compiled (onnxruntime) vs eager: FAIL")
    assert msg.endswith("\nLoosen rtol=/atol=, or pass verify=False to skip this check.")
    assert info.value.report is not None and not info.value.report.passed


# --------------------------------------------------------------------------- issue 20: the check after the build

class Cancels(torch.nn.Module):
    """Large partial results that cancel: eager's fp32 is off the exact result by up to 1.5e-4 at an
    output rms of 8e-3 (44% of the elements outside rtol 1e-3 / atol 1e-5), cosine 0.999997."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(64, 256) * 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.w
        return y - y * 0.99999


class Exact:
    """A compiled module that computes the exact (float64) result, rounded to fp32, plus ``shift``:
    what a correct engine whose rounding differs from eager's looks like (shift 0), or a wrong one."""

    numerics = "fp32"
    backend = "onnxruntime"

    def __init__(self, model: torch.nn.Module, shift: float = 0.0) -> None:
        self.model64, self.shift = copy.deepcopy(model).double(), shift

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model64(x.double()) + self.shift).float()


@pytest.fixture
def cancels() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = Cancels().eval()
    return model, torch.randn(8, 64)


def test_check_compiled_takes_the_float64_second_opinion(cancels: tuple[torch.nn.Module, torch.Tensor]) -> None:
    # A correct fp32 module was refused after the build (the export check had the second opinion, this
    # one did not): max abs 1.5e-4 at rms 8e-3, cosine 0.999997.
    model, x = cancels
    report = check_compiled(Exact(model), model, (x,), {}, Settings(), torch.device("cpu"))
    assert report.passed and report.reference_name == "eager in float64"
    assert report.numerics == ("eager in float64: the compiled module missed eager's fp32 outputs, but is within "
                               "twice eager's own fp32 error of the float64 result; fp32 tolerance policy with that "
                               "absolute bar")
    assert report.what == "compiled (onnxruntime)" and report.outputs[0].name == "out"


def test_check_compiled_still_refuses_a_wrong_module_against_float64(
        cancels: tuple[torch.nn.Module, torch.Tensor]) -> None:
    model, x = cancels
    with pytest.raises(VerificationError) as info:
        check_compiled(Exact(model, shift=1e-3), model, (x,), {}, Settings(), torch.device("cpu"))
    msg = str(info.value)
    assert msg.startswith("the compiled module does not match eager on the example inputs:\n"
                          "parity: compiled (onnxruntime) vs eager: FAIL (0/1 outputs pass)")
    assert "reference numerics: eager as configured (no TF32); fp32 tolerance policy" in msg


def test_check_compiled_with_the_user_s_tolerances_takes_no_second_opinion(
        cancels: tuple[torch.nn.Module, torch.Tensor]) -> None:
    model, x = cancels
    with pytest.raises(VerificationError, match="^the compiled module does not match eager on the example inputs"):
        check_compiled(Exact(model), model, (x,), {}, Settings.from_options(rtol=1e-4, atol=1e-5), torch.device("cpu"))


def test_check_compiled_runs_eager_and_the_module_on_copies() -> None:
    class Doubles(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mul_(2) + 1

    class Module:  # what a compiled module computes: Doubles' outputs, without writing to its input
        numerics, backend = "fp32", "onnxruntime"

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 + 1

    x = torch.randn(3, 4)
    before = x.clone()
    check_compiled(Module(), Doubles(), (x,), {}, Settings(), torch.device("cpu"))
    assert torch.equal(x, before)
