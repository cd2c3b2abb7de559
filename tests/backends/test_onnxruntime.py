"""torch_trt_module.backends._onnxruntime: the ONNX Runtime runner on hand-made graphs, on the CPU.
Output shapes predicted from the graph's symbolic dims (a safe evaluator: metadata can come from
disk), outputs ONNX Runtime must allocate (data-dependent), empty tensors, dropped inputs,
per-thread bindings, ONNX Runtime's optimized copy of a graph, and the errors of each failure."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import onnx.helper as oh
import pytest
import torch
from onnx import TensorProto as TP

from torch_trt_module import BackendUnavailable, RuntimeFailure
from torch_trt_module._core.spec import TensorSpec
from torch_trt_module.backends import _onnxruntime, _ort_shapes
from torch_trt_module.backends._onnxruntime import (
    OnnxRuntimeRunner,
    optimized_graph_name,
    run_onnx_cpu,
    session_options,
    shape_function,
)

from .._support import in_threads, onnx_model as graph, onnx_vi as vi


def spec(name: str, dims: tuple[Any, ...], dtype: str = "float32", lo: tuple[int, ...] | None = None,
         hi: tuple[int, ...] | None = None) -> TensorSpec:
    return TensorSpec(name, dtype, dims, lo, lo, hi)


# y = x * 2 + 1 ; (b, 3) -> (b, 3)
AFFINE = graph([oh.make_node("Mul", ["x", "two"], ["t"]), oh.make_node("Add", ["t", "one"], ["y"])],
               [vi("x", TP.FLOAT, ["b", 3])], [vi("y", TP.FLOAT, ["b", 3])],
               [oh.make_tensor("two", TP.FLOAT, [], [2.0]), oh.make_tensor("one", TP.FLOAT, [], [1.0])])
AFFINE_IN = [spec("x", ("b", 3), lo=(0, 3), hi=(64, 3))]
AFFINE_OUT = [spec("y", ("b", 3))]
# the indices of the positive elements: (n,) -> (1, data-dependent)
NONZERO = graph([oh.make_node("Greater", ["x", "zero"], ["m"]), oh.make_node("NonZero", ["m"], ["idx"])],
                [vi("x", TP.FLOAT, ["n"])], [vi("idx", TP.INT64, [1, "u0"])],
                [oh.make_tensor("zero", TP.FLOAT, [], [0.0])])


# --------------------------------------------------------------------------- shapes from symbolic dims

@pytest.mark.parametrize("expr,value", [("2*s0", 14), ("(s1 - 1)//2 + 1", 5), ("Max(s0, 4)", 7), ("Min(s0, s1)", 7),
                                        ("-s0 + 10", 3), ("s0 % 3", 1), ("FloorDiv(s1, 2)", 4), ("ceiling(s0)", 7)])
def test_dim_expressions_are_evaluated(expr: str, value: int) -> None:
    fn = _ort_shapes._compile_dim(expr)
    assert fn is not None and fn({"s0": 7, "s1": 9}) == value


@pytest.mark.parametrize("expr", ["__import__('os').system('touch x')", "s0.real", "s0 ** 2", "1.5*s0", "s0 +",
                                  "[s0]", "lambda: 1", "'s0'", "s0 if s0 else 1", "CeilToInt(s0/2)"])
def test_anything_but_integer_arithmetic_is_refused_without_evaluating_it(expr: str) -> None:
    assert _ort_shapes._compile_dim(expr) is None


def test_shape_function_resolves_what_it_can_and_leaves_the_rest_to_ort() -> None:
    ins = [spec("x", ("b", 3)), spec("y", ("b", "n"))]
    outs = [spec("o1", ("b", "2*n")), spec("o2", ("u0",)), spec("o3", (4, "n//(b-b)")), spec("o4", ("unknown(b)",)),
            spec("o5", (5, 6))]
    resolve = shape_function(ins, outs)
    assert resolve([(3, 3), (3, 5)]) == [(3, 10), None, None, None, (5, 6)]
    assert resolve([(1, 3), (1, 2)])[0] == (1, 4)


# --------------------------------------------------------------------------- the runner

def test_runs_and_matches_and_plans_the_repeated_shape() -> None:
    runner = OnnxRuntimeRunner(AFFINE, AFFINE_IN, AFFINE_OUT)
    x = torch.randn(4, 3)
    (y,) = runner.run([x])
    torch.testing.assert_close(y, x * 2 + 1)
    assert runner.call_for(((4, 3),)) is not runner.run  # a plan for this shape now exists
    x2 = torch.randn(4, 3)
    (y2,) = runner.call_for(((4, 3),))([x2])
    torch.testing.assert_close(y2, x2 * 2 + 1)
    assert y2.data_ptr() != y.data_ptr()  # fresh outputs every call
    assert runner.call_for(((5, 3),)) == runner.run  # no plan for a shape not yet run


def test_empty_inputs_are_never_bound_as_null() -> None:
    runner = OnnxRuntimeRunner(AFFINE, AFFINE_IN, AFFINE_OUT)
    (y,) = runner.run([torch.empty(0, 3)])
    assert y.shape == (0, 3) and y.dtype == torch.float32


def test_data_dependent_outputs_are_allocated_by_ort() -> None:
    runner = OnnxRuntimeRunner(NONZERO, [spec("x", ("n",))], [spec("idx", (1, "u0"), dtype="int64")])
    x = torch.tensor([1.0, -1.0, 2.0, 0.0, 3.0])
    (idx,) = runner.run([x])
    assert idx.dtype == torch.int64 and torch.equal(idx, torch.tensor([[0, 2, 4]]))
    (none,) = runner.run([-x.abs()])
    assert none.shape == (1, 0)
    assert runner.call_for(((5,),)) == runner.run  # outputs ORT allocates are never planned


def test_inputs_the_graph_dropped_are_skipped() -> None:
    # An exporter may drop an input the model ignores; the engine's specs still list it.
    runner = OnnxRuntimeRunner(AFFINE, [AFFINE_IN[0], spec("unused", (2,))], AFFINE_OUT)
    x = torch.randn(2, 3)
    torch.testing.assert_close(runner.run([x, torch.zeros(2)])[0], x * 2 + 1)
    (y,) = run_onnx_cpu(AFFINE, ["x", "unused"], ["y"], [x, torch.zeros(2)])
    torch.testing.assert_close(y, x * 2 + 1)


def test_an_ort_failure_is_a_runtime_failure() -> None:
    gather = graph([oh.make_node("Gather", ["x", "i"], ["y"], axis=0)],
                   [vi("x", TP.FLOAT, [4]), vi("i", TP.INT64, [1])], [vi("y", TP.FLOAT, [1])])
    runner = OnnxRuntimeRunner(gather, [spec("x", (4,)), spec("i", (1,), dtype="int64")], [spec("y", (1,))])
    assert runner.run([torch.arange(4.0), torch.tensor([2])])[0].item() == 2.0
    with pytest.raises(RuntimeFailure, match=r"^onnxruntime failed to run the graph: "):
        runner.run([torch.arange(4.0), torch.tensor([9])])  # out of range: ORT refuses
    assert runner.run([torch.arange(4.0), torch.tensor([3])])[0].item() == 3.0  # and the runner still works


def test_bfloat16_cannot_be_bound() -> None:
    with pytest.raises(BackendUnavailable) as info:
        OnnxRuntimeRunner(AFFINE, [spec("x", ("b", 3), dtype="bfloat16")], AFFINE_OUT)
    assert str(info.value) == ("ONNX Runtime's Python binding cannot bind torch.bfloat16 tensors; use precision='fp16' "
                               "or 'fp32', or a TensorRT backend")


def test_each_thread_binds_its_own_inputs() -> None:
    runner = OnnxRuntimeRunner(AFFINE, AFFINE_IN, AFFINE_OUT, threads=1)
    errors: list[str] = []

    def work(i: int) -> None:
        batch = i + 1
        for _ in range(200):
            x = torch.full((batch, 3), float(batch))
            (y,) = runner.run([x])
            if y.shape != (batch, 3) or not torch.all(y == 2 * batch + 1):
                errors.append(f"batch {batch}: {y}")
                return

    in_threads(work, 4)
    assert errors == []


# --------------------------------------------------------------------------- ONNX Runtime's optimized graph

def test_the_optimized_copy_is_saved_and_loaded_without_optimizing_again(tmp_path: Path) -> None:
    path = tmp_path / "optimized.onnx"
    OnnxRuntimeRunner(AFFINE, AFFINE_IN, AFFINE_OUT, save_optimized=path)
    assert path.stat().st_size > 0
    runner = OnnxRuntimeRunner(AFFINE, AFFINE_IN, AFFINE_OUT, optimized=path.read_bytes())
    assert runner.used_optimized
    x = torch.randn(3, 3)
    torch.testing.assert_close(runner.run([x])[0], x * 2 + 1)


def test_an_optimized_copy_ort_cannot_load_falls_back_to_the_graph(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="torch_trt_module"):
        runner = OnnxRuntimeRunner(AFFINE, AFFINE_IN, AFFINE_OUT, optimized=b"not a graph")
    assert not runner.used_optimized
    assert "onnxruntime could not load its optimized copy of the graph" in caplog.text and "using the original" in caplog.text
    x = torch.randn(2, 3)
    torch.testing.assert_close(runner.run([x])[0], x * 2 + 1)


def test_optimized_graph_names_hold_the_version_the_level_and_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    full, half = optimized_graph_name(half=False), optimized_graph_name(half=True)
    if full is None:
        pytest.skip("this machine's CPU cannot be identified (no /proc/cpuinfo)")
    assert full.startswith(f"ort-{onnxruntime.__version__}-all-cpu-") and len(full.rsplit("-", 1)[1]) == 16
    assert half == full.replace("-all-", "-extended-")
    monkeypatch.setattr(_onnxruntime, "_cpu_identity", lambda: None)
    assert optimized_graph_name(half=False) is None  # no copy is made or used where the CPU is unknown


def test_session_options() -> None:
    import onnxruntime as ort

    assert session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # fp16 graphs: ORT 1.32's layout optimizer crashes the process on some, so it is skipped.
    assert session_options(half=True).graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert session_options(threads=3).intra_op_num_threads == 3
    assert session_options().log_severity_level == 4  # fatal only: errors are the exception's text


def test_a_missing_onnxruntime_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(BackendUnavailable) as info:
        _onnxruntime.ort_version()
    assert str(info.value) == ("backend 'onnxruntime' needs the onnxruntime package: pip install onnxruntime "
                               "(or onnxruntime-gpu for CUDA)")


def test_run_onnx_cpu_takes_any_layout_and_returns_torch_tensors() -> None:
    x = torch.randn(3, 3).t()  # not contiguous: copied, never misread
    assert not x.is_contiguous()
    (y,) = run_onnx_cpu(AFFINE, ["x"], ["y"], [x])
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    torch.testing.assert_close(y, x * 2 + 1)
