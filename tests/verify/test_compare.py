"""Tests for torch_trt_module._verify.compare: Polygraphy-style output comparison."""

from __future__ import annotations

import copy
import json
import math
from collections import namedtuple
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from torch_trt_module._verify.compare import OutputReport, ParityReport, compare_outputs
from torch_trt_module._verify.parity import assert_parity, verify
import torch_trt_module as ttm
from torch_trt_module._errors import VerificationError

INF, NAN = float("inf"), float("nan")


def t64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def only(report: ParityReport) -> OutputReport:
    assert len(report.outputs) == 1
    return report.outputs[0]


# ------------------------------------------------------------ tolerance semantics

def test_large_abs_error_with_small_rel_error_passes() -> None:
    o = only(compare_outputs(t64(1000.5), t64(1000.0), rtol=1e-3, atol=1e-5))
    assert o.passed
    assert o.max_abs == pytest.approx(0.5)


def test_or_semantics_differs_from_numpy_allclose() -> None:
    # |err| = 0.15 <= atol + rtol*|ref| = 0.2, so numpy accepts it; but 0.15 > atol
    # and 0.15 / 1.0 > rtol, so Polygraphy's OR rule rejects it.
    actual, ref = t64(1.15), t64(1.0)
    assert np.allclose(actual.numpy(), ref.numpy(), rtol=0.1, atol=0.1)
    o = only(compare_outputs(actual, ref, rtol=0.1, atol=0.1))
    assert not o.passed
    assert o.num_failed == 1
    assert o.reason == "1 of 1 elements (100.00%) exceed both atol=0.1 and rtol=0.1"


def test_each_element_may_pass_by_either_tolerance() -> None:
    # First element passes only by atol (ref 0 makes rel inf), second only by rtol.
    o = only(compare_outputs(t64(1e-6, 1001.0), t64(0.0, 1000.0), rtol=1e-3, atol=1e-5))
    assert o.passed
    assert o.max_rel == INF


@pytest.mark.parametrize("actual,ref", [(NAN, 1.0), (1.0, NAN), (NAN, NAN)])
def test_nan_never_passes(actual: float, ref: float) -> None:
    o = only(compare_outputs(t64(actual, 2.0), t64(ref, 2.0), rtol=1e9, atol=1e9))
    assert not o.passed
    assert o.num_failed == 1
    assert o.num_nan == int(math.isnan(actual))
    assert o.num_nan_reference == int(math.isnan(ref))
    assert o.min_atol == INF and o.min_rtol == INF
    assert o.reason is not None and o.reason.endswith("NaN never passes")
    assert o.max_abs == 0.0  # statistics leave the NaN element out


def test_nan_reason_names_both_sides() -> None:
    o = only(compare_outputs(t64(NAN, NAN), t64(NAN, 1.0), what="trt", reference_name="ort"))
    assert o.reason == "2 of 2 elements are NaN (2 in trt, 1 in ort); NaN never passes"


def test_equal_infinities_pass() -> None:
    o = only(compare_outputs(t64(INF, -INF, 1.0), t64(INF, -INF, 1.0), rtol=0.0, atol=0.0))
    assert o.passed
    assert (o.max_abs, o.max_rel, o.cosine) == (0.0, 0.0, 1.0)


@pytest.mark.parametrize("actual,ref", [(INF, -INF), (INF, 1e30), (1e30, INF), (-INF, 0.0)])
def test_mismatched_infinities_fail_at_any_finite_tolerance(actual: float, ref: float) -> None:
    o = only(compare_outputs(t64(actual), t64(ref), rtol=1e300, atol=1e300))
    assert not o.passed
    assert o.max_abs == INF and o.max_rel == INF


def test_per_output_tolerance_dict() -> None:
    ref = (t64(1.0), t64(1.0))
    actual = (t64(1.01), t64(1.01))
    report = compare_outputs(actual, ref, atol={"[1]": 0.02})
    assert [o.passed for o in report.outputs] == [False, True]
    assert [o.atol for o in report.outputs] == [1e-5, 0.02]
    assert [o.rtol for o in report.outputs] == [1e-3, 1e-3]
    assert not report.passed
    report = compare_outputs(actual, ref, atol={"[1]": 0.02}, rtol={"[0]": 0.02})
    assert report.passed


def test_tolerance_for_unknown_output_is_an_error() -> None:
    with pytest.raises(ValueError) as e:
        compare_outputs({"a": t64(1.0)}, {"a": t64(1.0)}, rtol={"a": 0.1})
    assert str(e.value) == "rtol names unknown outputs ['a']; the outputs are [\"['a']\"]"


def test_negative_tolerance_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"^atol for output 'out' is -1.0; it must be a number >= 0$"):
        compare_outputs(t64(1.0), t64(1.0), atol=-1.0)


# ------------------------------------------------------------ dtypes and shapes

def test_integers_compare_exactly() -> None:
    ref = torch.tensor([1, 2, 3])
    assert compare_outputs(ref.clone(), ref).passed
    o = only(compare_outputs(torch.tensor([1, 2, 4]), ref, rtol=1.0, atol=1.0))
    assert not o.passed
    assert (o.rtol, o.atol) == (0.0, 0.0)  # tolerances do not apply to integers
    assert o.reason == "1 of 3 elements (33.33%) differ (exact comparison)"


def test_int64_difference_beyond_float64_precision_fails() -> None:
    big = 2**53
    assert float(big) == float(big + 1)
    o = only(compare_outputs(torch.tensor([big + 1]), torch.tensor([big])))
    assert not o.passed and o.num_failed == 1


def test_integer_dtype_mismatch_fails_even_with_equal_values() -> None:
    o = only(compare_outputs(torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1, 2])))
    assert not o.passed
    assert o.reason == "dtype int32 but reference has int64"
    assert (o.dtype, o.reference_dtype) == ("int32", "int64")


def test_bool_outputs() -> None:
    ref = torch.tensor([True, False, True])
    assert compare_outputs(ref.clone(), ref).passed
    o = only(compare_outputs(torch.tensor([True, True, True]), ref))
    assert o.reason == "1 of 3 elements (33.33%) differ (exact comparison)"
    o = only(compare_outputs(ref.to(torch.uint8), ref))
    assert o.reason == "dtype uint8 but reference has bool"


def test_float_dtype_mismatch_is_one_failure_reason_and_metrics_still_computed() -> None:
    ref = torch.tensor([1.0, 2.0, 3.5])
    o = only(compare_outputs(ref.half(), ref))
    assert not o.passed
    assert o.reason == "dtype float16 but reference has float32"
    assert o.max_abs == 0.0 and o.cosine == 1.0


def test_bfloat16_outputs_are_compared() -> None:
    ref = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    assert compare_outputs(ref.clone(), ref).passed


def test_shape_mismatch() -> None:
    o = only(compare_outputs(torch.zeros(2, 3), torch.zeros(3, 2)))
    assert not o.passed
    assert o.reason == "shape (2, 3) but reference has shape (3, 2)"
    assert math.isnan(o.max_abs)
    assert "(2, 3) vs (3, 2)" in str(compare_outputs(torch.zeros(2, 3), torch.zeros(3, 2)))


def test_empty_tensors_pass_with_zero_metrics() -> None:
    o = only(compare_outputs(torch.zeros(0, 3), torch.zeros(0, 3)))
    assert o.passed
    assert (o.max_abs, o.mean_abs, o.p99_abs, o.max_rel, o.fraction_failed) == (0.0, 0.0, 0.0, 0.0, 0.0)


# ------------------------------------------------------------ structure and names

def test_structure_mismatch_dict_vs_tuple() -> None:
    report = compare_outputs((t64(1.0), t64(2.0)), {"a": t64(1.0), "b": t64(2.0)})
    assert not report.passed
    assert report.structure_error == (
        "structure differs: compiled returns (tensor, tensor) (2 tensors) "
        "but eager returns {'a': tensor, 'b': tensor} (2 tensors)")
    assert all(o.passed for o in report.outputs)  # leaves still compared when they pair up
    assert report.structure_error in str(report)


def test_structure_mismatch_in_leaf_count_compares_nothing() -> None:
    report = compare_outputs((t64(1.0),), (t64(1.0), t64(2.0)))
    assert not report.passed and report.outputs == []
    assert "(1 tensors) but eager returns (tensor, tensor) (2 tensors)" in str(report.structure_error)


def test_names_from_paths() -> None:
    x = t64(1.0)
    report = compare_outputs({"a": x, "b": [x, (x,)]}, {"a": x, "b": [x, (x,)]})
    assert [o.name for o in report.outputs] == ["['a']", "['b'][0]", "['b'][1][0]"]
    assert only(compare_outputs(x, x)).name == "out"
    assert [o.name for o in compare_outputs([x, x], [x, x]).outputs] == ["[0]", "[1]"]


def test_namedtuple_fields_name_outputs() -> None:
    Out = namedtuple("Out", ["logits", "hidden"])
    x = t64(1.0)
    assert [o.name for o in compare_outputs(Out(x, x), Out(x, x)).outputs] == ["logits", "hidden"]


def test_explicit_names() -> None:
    x = t64(1.0)
    report = compare_outputs((x, x), (x, x), names=["logits", "probs"], atol={"probs": 0.5})
    assert [(o.name, o.atol) for o in report.outputs] == [("logits", 1e-5), ("probs", 0.5)]
    with pytest.raises(ValueError, match=r"^names has 1 entries but eager has 2 outputs$"):
        compare_outputs((x, x), (x, x), names=["a"])


# ------------------------------------------------------------ statistics

def _noisy(seed: int = 0, n: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, generator=g, dtype=torch.float64)
    actual = ref + 1e-3 * torch.randn(n, generator=g, dtype=torch.float64)
    return actual, ref


def test_statistics_match_numpy() -> None:
    actual, ref = _noisy()
    a, r = actual.numpy(), ref.numpy()
    abs_err = np.abs(a - r)
    rel_err = abs_err / np.abs(r)
    o = only(compare_outputs(actual, ref))
    assert o.max_abs == pytest.approx(abs_err.max())
    assert o.mean_abs == pytest.approx(abs_err.mean())
    assert o.median_abs == pytest.approx(np.median(abs_err))
    assert o.p99_abs == pytest.approx(np.percentile(abs_err, 99))
    assert o.max_rel == pytest.approx(rel_err.max())
    assert o.mean_rel == pytest.approx(rel_err.mean())
    assert o.p99_rel == pytest.approx(np.percentile(rel_err, 99))
    assert o.cosine == pytest.approx(np.dot(a, r) / (np.linalg.norm(a) * np.linalg.norm(r)), abs=1e-12)
    assert o.cosine < 1.0
    failing = (abs_err > o.atol) & (rel_err > o.rtol)
    assert o.num_failed == failing.sum() > 0
    assert o.fraction_failed == pytest.approx(failing.mean())


def test_p99_and_cosine_on_a_small_example() -> None:
    # Errors 0..99 over 100 elements: numpy's linear p99 is 98.01.
    ref = torch.full((100,), 1000.0, dtype=torch.float64)
    actual = ref + torch.arange(100, dtype=torch.float64)
    o = only(compare_outputs(actual, ref))
    assert o.p99_abs == pytest.approx(98.01)
    assert o.median_abs == pytest.approx(49.5)
    o = only(compare_outputs(t64(1.0, 0.0), t64(1.0, 1.0)))
    assert o.cosine == pytest.approx(1 / math.sqrt(2))
    assert only(compare_outputs(t64(1.0, 2.0), t64(-1.0, -2.0))).cosine == pytest.approx(-1.0)


def test_cosine_of_zero_vectors() -> None:
    assert only(compare_outputs(t64(0.0, 0.0), t64(0.0, 0.0))).cosine == 1.0
    assert only(compare_outputs(t64(0.0, 0.0), t64(0.0, 1e-3), atol=1.0)).cosine == 0.0


def test_min_atol_is_the_smallest_passing_atol() -> None:
    actual, ref = _noisy(1)
    o = only(compare_outputs(actual, ref, rtol=1e-3))
    a, r = actual.numpy(), ref.numpy()
    abs_err = np.abs(a - r)
    assert o.min_atol == pytest.approx(abs_err[abs_err / np.abs(r) > 1e-3].max())
    assert not o.passed
    assert compare_outputs(actual, ref, rtol=1e-3, atol=o.min_atol).passed
    assert not compare_outputs(actual, ref, rtol=1e-3, atol=o.min_atol * 0.999).passed


def test_min_rtol_is_the_smallest_passing_rtol() -> None:
    actual, ref = _noisy(2)
    o = only(compare_outputs(actual, ref, atol=1e-4))
    assert o.min_rtol > 0
    assert compare_outputs(actual, ref, atol=1e-4, rtol=o.min_rtol).passed
    assert not compare_outputs(actual, ref, atol=1e-4, rtol=o.min_rtol * 0.999).passed


def test_min_tolerances_are_zero_when_everything_passes_by_the_other() -> None:
    o = only(compare_outputs(t64(1000.5), t64(1000.0)))
    assert o.min_atol == 0.0
    assert o.min_rtol == pytest.approx(5e-4)


def test_min_tolerances_ignore_elements_the_other_tolerance_passes() -> None:
    # Element 0 passes by atol only (its rel err is inf), element 1 by rtol only (abs err 0.5).
    actual, ref = t64(1e-6, 1000.5, 1.002), t64(0.0, 1000.0, 1.0)
    o = only(compare_outputs(actual, ref, rtol=1e-3, atol=1e-5))
    assert o.min_rtol == pytest.approx(0.002)
    assert o.min_atol == pytest.approx(0.002)
    assert compare_outputs(actual, ref, rtol=1e-3, atol=o.min_atol).passed
    assert compare_outputs(actual, ref, rtol=o.min_rtol, atol=1e-5).passed


# ------------------------------------------------------------ rendering

def test_str_renders_a_table() -> None:
    x = t64(1.0, 2.0)
    report = compare_outputs({"ok": x, "bad": x + 1}, {"ok": x, "bad": x})
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == "parity: compiled vs eager: FAIL (1/2 outputs pass)"
    assert lines[1].split() == ["output", "dtype", "shape", "max", "abs", "mean", "abs", "p99", "abs",
                                "max", "rel", "p99", "rel", "cosine", "min", "atol", "min", "rtol", "result"]
    assert lines[2].startswith("['ok']") and lines[2].endswith("PASS")
    assert lines[3].startswith("['bad']")
    assert lines[3].endswith("FAIL: 2 of 2 elements (100.00%) exceed both atol=1e-05 and rtol=0.001")
    assert len(lines) == 4
    # Columns line up: "dtype" starts at the same offset in every row.
    assert lines[2].index("float64") == lines[1].index("dtype") == lines[3].index("float64")


def test_str_first_line_when_passing_and_compact_floats() -> None:
    ref = t64(1.0, 2.0, 3.0)
    report = compare_outputs((ref + 4.77e-6, ref, ref), (ref, ref, ref))
    assert str(report).splitlines()[0] == "parity: compiled vs eager: PASS (3/3 outputs)"
    assert "4.77e-06" in str(report)


def test_raise_for_failure() -> None:
    good = compare_outputs(t64(1.0), t64(1.0))
    assert good.raise_for_failure() is good
    bad = compare_outputs(t64(2.0), t64(1.0))
    with pytest.raises(VerificationError) as e:
        bad.raise_for_failure()
    assert isinstance(e.value, AssertionError)
    assert str(e.value) == str(bad)
    assert "max abs" in str(e.value) and "FAIL" in str(e.value)
    assert e.value.report is bad


def test_to_json_is_strict_json() -> None:
    report = compare_outputs((t64(NAN), t64(1.0, INF), torch.zeros(2)), (t64(1.0), t64(1.0, 1.0), torch.zeros(3)))
    d = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert d["passed"] is False and d["structure_error"] is None
    assert [o["name"] for o in d["outputs"]] == ["[0]", "[1]", "[2]"]
    assert d["outputs"][0]["min_atol"] == "inf"
    assert d["outputs"][2]["max_abs"] == "nan"
    assert d["outputs"][2]["shape"] == [2]


# ------------------------------------------------------------ verify / assert_parity

def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _perturbed(model: nn.Module, scale: float) -> nn.Module:
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale)
    return other


def test_verify_eager_reference() -> None:
    model = _mlp()
    x = torch.randn(3, 8)
    assert verify(model, copy.deepcopy(model), x).passed
    report = verify(model, _perturbed(model, 1e-2), x)
    assert not report.passed
    assert report.reference_name == "eager" and report.what == "compiled"
    assert verify(model, _perturbed(model, 1e-2), (x,), atol=1.0).passed


class _WithKwargs(nn.Module):
    def forward(self, x: torch.Tensor, scale: float = 1.0) -> dict[str, torch.Tensor]:
        return {"y": x * scale}


def test_verify_passes_kwargs() -> None:
    model = _WithKwargs()
    x = torch.ones(2)

    def compiled(x: torch.Tensor, scale: float = 1.0) -> dict[str, torch.Tensor]:
        return {"y": x * 3.0}

    assert verify(model, compiled, ((x,), {"scale": 3.0})).passed
    assert not verify(model, compiled, (x,)).passed


class _FakeCompiled:
    """Test double for a compiled module: only ``__call__`` and ``run_reference``.

    The real ``run_reference`` (ONNX Runtime on CPU) is tested with the runtime.
    """

    def __init__(self, model: nn.Module, ort_offset: float) -> None:
        self.model = model
        self.ort_offset = ort_offset

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def run_reference(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs) + self.ort_offset


def test_verify_onnxruntime_reference_uses_run_reference() -> None:
    model = _mlp()
    x = torch.randn(3, 8)
    compiled = _FakeCompiled(_perturbed(model, 1e-2), ort_offset=0.0)
    # Compiled agrees with its ONNX graph but not with eager: each reference must be the one asked for.
    assert verify(model, compiled, x, reference="onnxruntime").passed
    assert not verify(model, compiled, x, reference="eager").passed
    assert not verify(model, _FakeCompiled(model, ort_offset=1.0), x, reference="onnxruntime").passed


def test_verify_both_references() -> None:
    model = _mlp()
    x = torch.randn(3, 8)
    report = verify(model, _FakeCompiled(_perturbed(model, 1e-2), ort_offset=0.0), x, reference="both")
    assert report.reference_name == "eager+onnxruntime"
    assert [(o.name, o.passed) for o in report.outputs] == [("eager:out", False), ("onnxruntime:out", True)]
    assert not report.passed
    assert verify(model, _FakeCompiled(model, ort_offset=0.0), x, reference="both").passed


def test_verify_onnxruntime_without_run_reference() -> None:
    model = _mlp()
    with pytest.raises(TypeError) as e:
        verify(model, copy.deepcopy(model), torch.randn(1, 8), reference="onnxruntime")
    assert str(e.value).startswith(
        "reference='onnxruntime' needs a compiled module with a run_reference() method, but Sequential has none")


def test_verify_rejects_unknown_reference() -> None:
    with pytest.raises(ValueError) as e:
        verify(_mlp(), _mlp(), torch.randn(1, 8), reference="tensorrt")
    assert str(e.value) == "reference='tensorrt' is not one of 'eager', 'onnxruntime', 'both'"


def test_assert_parity() -> None:
    model = _mlp()
    x = torch.randn(3, 8)
    report = assert_parity(model, copy.deepcopy(model), x)
    assert report.passed
    with pytest.raises(AssertionError) as e:
        assert_parity(model, _perturbed(model, 1e-2), x, rtol=1e-6)
    assert isinstance(e.value, VerificationError)
    assert str(e.value).startswith("parity: compiled vs eager: FAIL (0/1 outputs pass)\noutput")


def test_verify_compares_with_the_inference_semantics_of_a_training_model() -> None:
    """compile(resnet18()) leaves the model in training mode; verify() compares the compiled module
    (which computes inference) with the model's inference semantics, and leaves its modes alone."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    fast = ttm.compile(model, torch.randn(4, 8), cache=False)
    assert model.training and all(m.training for m in model)
    report = ttm.verify(model, fast, torch.randn(6, 8))
    assert report.passed, str(report)
    assert model.training and all(m.training for m in model)


def test_the_cosine_bound_waits_for_a_reference_above_the_absolute_floor() -> None:
    # Random-init mobilenet_v3_small's logits are ~2e-9; fp16 rounds them to 0 (cosine 0). Every
    # element is within atol, so the output passes (it failed compile()'s check on the H100).
    from torch_trt_module._core.numerics import POLICY

    tiny = torch.full((2, 1000), 2e-9, dtype=torch.float64)
    report = compare_outputs(torch.zeros_like(tiny), tiny, tolerance=POLICY["fp16"])
    assert report.passed and only(report).cosine == 0.0
    # Above the floor the bound still applies: a reversed output at rms 1 fails on it.
    big = torch.linspace(-1.0, 1.0, 100, dtype=torch.float64)
    report = compare_outputs(-big * 1e-4 + big, big, tolerance=POLICY["fp16"])
    assert report.passed
    bad = compare_outputs(big.roll(1), big, rtol=2.0, tolerance=POLICY["fp16"])  # elementwise passes
    assert "cosine similarity" in only(bad).reason
