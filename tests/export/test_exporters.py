"""torch_trt_module._export.exporters: the exporters in order (torch.export then the TorchScript tracer) and
how their failures are judged. Data-dependent control flow is recognised only from torch.export's
own evidence (its exception chain), dims the model ties together are refined into one, a dim the
model fixes is an ExportError with no fallback, and when every exporter fails each one's error is
reported, the first exporter's first."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from torch_trt_module import ExportError
from torch_trt_module._export import exporters as _exporters
from torch_trt_module._export.exporters import capture, dynamic_dims, is_data_dependent, run_exporters, sanitize, summary
from torch_trt_module._core.settings import Settings

# The wrapper _export hands the exporters takes flat tensors and returns a tuple of tensors.
BATCH = ((1, 4), (2, 4), (8, 4))


class Add(torch.nn.Module):
    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (xs[0] + xs[1],)


class Double(torch.nn.Module):
    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (xs[0] * 2,)


class Branch(torch.nn.Module):
    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if xs[0].sum() > 0:  # a Python branch on a tensor's value
            return (xs[0] * 2,)
        return (xs[0],)


class Where(torch.nn.Module):
    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (torch.where(xs[0].sum() > 0, xs[0] * 2, xs[0]),)  # the same, in tensor ops


class FixedBatch(torch.nn.Module):
    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (xs[0].view(2, -1),)  # hard-codes the batch size


def export(model: torch.nn.Module, exporter: str = "auto", n: int = 1) -> _exporters.Exported:
    names = ["x", "y"][:n]
    return run_exporters(model, names, [torch.randn(2, 4) for _ in names], ["out"], dict.fromkeys(names, BATCH),
                         Settings.from_options(exporter=exporter))


def test_torch_export_comes_first_and_its_program_is_kept() -> None:
    made = export(Double())
    assert made.exporter == "dynamo" and made.program is not None and made.onnx.startswith(b"\x08")
    forced = export(Double(), exporter="torchscript")
    assert forced.exporter == "torchscript" and forced.program is None


def test_helpers() -> None:
    assert sanitize("input.0/a b") == "input_0_a_b"
    assert dynamic_dims(["x", "s"], {"x": ((1, 3), (4, 3), (8, 3)), "s": ((2,), (2,), (2,))}) == \
        {"x": {0: (1, 8)}, "s": {}}


# --------------------------------------------------------------------------- data-dependent control flow

def test_a_branch_on_a_value_is_an_export_error_with_torch_export_s_words() -> None:
    with pytest.raises(ExportError) as info:
        capture(Branch(), ["x"], [torch.randn(2, 4)], {"x": BATCH})
    msg = str(info.value)
    assert msg.startswith("the model has data-dependent control flow (a Python branch or .item()/int() on a tensor "
                          "value), which cannot be captured in a static graph. torch.export said: Could not guard on "
                          "data-dependent expression")
    assert msg.endswith("Fix: replace the branch with tensor ops (torch.where, torch.cond) or move it outside the "
                        "compiled module.")
    assert is_data_dependent(info.value.__cause__)  # the verdict came from torch.export's exception


def test_the_same_computation_in_tensor_ops_is_captured() -> None:
    program = capture(Where(), ["x"], [torch.randn(2, 4)], {"x": BATCH})
    x = -torch.rand(3, 4)
    torch.testing.assert_close(program.module()(x)[0], x)  # both branches are in the graph
    torch.testing.assert_close(program.module()(-x)[0], -2 * x)


def test_data_dependence_found_by_torch_export_is_never_retried_with_the_tracer(monkeypatch: pytest.MonkeyPatch
                                                                               ) -> None:
    traced: list[str] = []
    monkeypatch.setattr(_exporters, "_export_torchscript", lambda *a, **k: traced.append("tracer") or b"graph")
    with pytest.raises(ExportError, match="data-dependent control flow"):
        export(Branch())  # the tracer would bake in the branch taken for the example
    assert traced == []


@pytest.mark.parametrize("error,data_dependent", [
    (RuntimeError("Could not guard on data-dependent expression u0 > 0"), True),
    (type("GuardOnDataDependentSymNode", (RuntimeError,), {})("guard"), True),
    (RuntimeError("Could not extract specialized integer from data-dependent expression u0"), True),
    (RuntimeError("aten::nonzero is not supported by the exporter"), False),
    (ValueError("shape mismatch: 3 vs 4"), False),
])
def test_is_data_dependent_reads_the_exception_chain(error: BaseException, data_dependent: bool) -> None:
    assert is_data_dependent(error) is data_dependent
    try:
        try:
            raise error
        except BaseException as inner:
            raise RuntimeError("export failed") from inner
    except RuntimeError as outer:
        assert is_data_dependent(outer) is data_dependent  # found through __cause__ as well


def test_another_torch_export_failure_falls_back_to_the_tracer(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    def fails(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("torch.export does not support this module")

    monkeypatch.setattr(torch.export, "export", fails)
    with caplog.at_level(logging.INFO, logger="torch_trt_module"):
        made = export(Double())
    assert made.exporter == "torchscript" and made.program is None
    assert "dynamo exporter failed: torch.export does not support this module" in caplog.text


def _conversion_fails(*args: Any, **kwargs: Any) -> Any:
    """A double of torch.onnx failing after torch.export succeeded, as torch.onnx 2.11's type
    promotion does on T5's fp16 attention mask (``torch.where`` over an fp16 tensor and a float)."""
    raise RuntimeError("Failed to decompose the FX graph for ONNX compatibility: Expected same OpOverload "
                       "packet, got prim.device != aten.where")


def test_a_failed_onnx_conversion_keeps_the_captured_program_beside_the_tracer_s_graph(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_exporters, "_to_onnx", _conversion_fails)
    x = torch.randn(3, 4)
    made = run_exporters(Add(), ["x", "y"], [x, x + 1], ["out"], {"x": BATCH, "y": BATCH}, Settings.from_options())
    assert made.exporter == "torchscript" and made.onnx.startswith(b"\x08")
    assert made.program is not None  # the PyTorch runtime still has its program
    y = torch.randn(5, 4)  # another batch: the program kept its dynamic dim
    torch.testing.assert_close(made.program.module()(y, y * 3)[0], y * 4)


def test_a_captured_program_that_differs_from_the_model_is_not_kept(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(_exporters, "_to_onnx", _conversion_fails)
    real = _exporters.capture
    monkeypatch.setattr(_exporters, "capture", lambda wrapper, *a, **k: real(Double(), *a, **k))  # not Add
    with caplog.at_level(logging.INFO, logger="torch_trt_module"):
        made = export(Add(), n=2)
    assert made.exporter == "torchscript" and made.program is None
    assert ("torch.export's program is not kept beside the tracer's ONNX graph: its outputs differ from the "
            "model's on the example") in caplog.text


def test_a_model_whose_onnx_conversion_fails_still_runs_its_program_on_the_torch_runtime(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import torch_trt_module as ttm

    monkeypatch.setattr(_exporters, "_to_onnx", _conversion_fails)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    fast = ttm.compile(model, x, cache=False, runtime="torch")
    assert fast.engine.exported.exporter == "torchscript"
    torch.testing.assert_close(fast(x), model(x))
    # The tracer's graph folds its weights: no map, so following the source rebuilds, never refits
    # half of them; the rebuilt module runs its program again and matches the new weights.
    assert fast.engine.exported.weights == {}
    with torch.no_grad():
        model[0].weight.mul_(-1)
    torch.testing.assert_close(fast(x), model(x))


# --------------------------------------------------------------------------- dims tied or fixed by the model

def test_dims_the_model_ties_together_are_refined_into_one(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="torch_trt_module"):
        program = capture(Add(), ["x", "y"], [torch.randn(2, 4), torch.randn(2, 4)], {"x": BATCH, "y": BATCH})
    dims = [n.meta["val"].shape[0] for n in program.graph.nodes if n.op == "placeholder"]
    assert len(dims) == 2 and str(dims[0]) == str(dims[1]) and not isinstance(dims[0], int)  # one symbol
    (constraint,) = program.range_constraints.values()
    assert (constraint.lower, constraint.upper) == (1, 8)  # the profile's range survives the refinement
    assert "torch.export: tied dynamic dims" in caplog.text


def test_a_dim_the_model_fixes_is_an_export_error_not_a_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    traced: list[str] = []
    monkeypatch.setattr(_exporters, "_export_torchscript", lambda *a, **k: traced.append("tracer") or b"graph")
    with pytest.raises(ExportError) as info:
        export(FixedBatch())
    assert str(info.value).startswith("a dynamic dimension was specialised by the model (x_0 = 2): ")
    assert "Fix: make that dimension static (dynamic=None, or leave it out of dynamic=), or compute the size from " \
           "x.shape." in str(info.value)
    assert traced == []  # the tracer would bake the size in silently


def test_the_tracer_refuses_a_branch_it_would_bake_in() -> None:
    with pytest.raises(ExportError) as info:
        export(Branch(), exporter="torchscript")
    msg = str(info.value)
    assert msg.startswith("the TorchScript tracer turned a traced value into a Python value (Converting a tensor to a "
                          "Python boolean")
    assert "the graph would hold only the branch taken for the example, so it is refused" in msg


# --------------------------------------------------------------------------- every exporter fails

def test_every_exporter_s_error_is_reported_the_first_exporter_s_first(monkeypatch: pytest.MonkeyPatch) -> None:
    first = RuntimeError("dynamo broke\nwith a long second line")
    monkeypatch.setattr(_exporters, "capture", lambda *a, **k: (_ for _ in ()).throw(first))
    monkeypatch.setattr(_exporters, "_export_torchscript",
                        lambda *a, **k: (_ for _ in ()).throw(TypeError("tracer broke")))
    with pytest.raises(ExportError) as info:
        export(Double())
    assert str(info.value) == "could not export the model to ONNX (dynamo: dynamo broke; torchscript: tracer broke)."
    assert info.value.__cause__ is first


@pytest.mark.parametrize("detail,hint", [
    ("aten::foo is not supported", "The model uses an operator the ONNX exporters cannot translate"),
    ("No decomposition for aten::bar", "The model uses an operator the ONNX exporters cannot translate"),
    ("Constraints violated (x_0)", "A dynamic dimension was specialised by the model"),
])
def test_a_hint_follows_the_reported_errors(monkeypatch: pytest.MonkeyPatch, detail: str, hint: str) -> None:
    monkeypatch.setattr(_exporters, "capture", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(detail)))
    with pytest.raises(ExportError) as info:
        export(Double(), exporter="dynamo")
    assert str(info.value).startswith(f"could not export the model to ONNX (dynamo: {detail}). {hint}")


def test_summary_keeps_the_first_meaningful_line() -> None:
    assert summary(RuntimeError("\n\n  first line  \nsecond")) == "first line"
    assert summary(RuntimeError("preamble\n## Exception summary\n\n\x1b[31mthe cause\x1b[0m\nmore")) == "the cause"
    assert summary(KeyError()) == "KeyError"
    assert len(summary(RuntimeError("x" * 1000))) == 400


# --------------------------------------------------------------------------- issue 20: dims each dynamic on their own

class Adds(torch.nn.Module):
    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return x + pos


def test_inputs_combined_in_dims_dynamic_each_on_their_own_get_the_dynamic_fix() -> None:
    import torch_trt_module as ttm

    with pytest.raises(ttm.ExportError) as info:
        ttm.export_onnx(Adds(), (torch.randn(4, 8), torch.randn(1, 8)),
                        dynamic={"x": {0: (1, 4, 32)}, "pos": {0: (1, 1, 32)}})
    assert str(info.value).endswith(
        " The inputs ['x', 'pos'] each have dynamic dims of their own, and the model combines them elementwise: an "
        "input that is not batched (a table, an operand that broadcasts) must keep a static size there. Fix: name "
        "only the batched inputs' dims in dynamic=, e.g. dynamic={'x': {0: (1, 4, 32)}}.")


def test_a_channel_dim_declared_dynamic_names_the_weights_whole(caplog: pytest.LogCaptureFixture) -> None:
    # Issue 20: following the old out-of-profile hint (make the Conv's channel dim dynamic) gave a
    # PartitionedModule and a warning cut off mid-sentence. The warning is whole, and names the weights.
    import torch_trt_module as ttm

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    with pytest.raises(ExportError) as info:
        ttm.export_onnx(model, torch.randn(2, 3, 16, 16), dynamic={"input": {1: (3, 3, 4)}})
    msg = str(info.value)
    assert msg.startswith("a dynamic dimension was specialised by the model (input_1 = 3): ")
    assert msg.endswith(
        "\". The model's weights or code fix that size (a Conv's or Linear's input channels, a view/reshape with a "
        "hard-coded size). Fix: make that dimension static (dynamic=None, or leave it out of dynamic=), or compute "
        "the size from x.shape.")  # one period after torch's own words, not two
    with caplog.at_level(logging.WARNING, logger="torch_trt_module"):
        fast = ttm.compile(model, torch.randn(2, 3, 16, 16), backend="onnxruntime",
                           dynamic={"input": {1: (3, 3, 4)}})
    assert isinstance(fast, ttm.PartitionedModule)
    assert "or compute the size from x.shape.). partition='auto'" in caplog.text


def test_an_lstm_whose_time_dim_torch_fixes_is_named_with_its_fix() -> None:
    # torch before 2.15 exports nn.LSTM as a loop over its time steps (the slow zoo's case 08 under
    # torch 2.14.1): the error names the LSTM, not only a Conv's channels; torch 2.15 keeps the dim.
    import torch_trt_module as ttm

    model = torch.nn.LSTM(4, 8, batch_first=True).eval()
    old = torch.torch_version.TorchVersion(torch.__version__) < (2, 15)
    if not old:
        ttm.export_onnx(model, torch.randn(2, 5, 4), dynamic={"input": {1: (1, 5, 16)}})
        return
    with pytest.raises(ExportError) as info:
        ttm.export_onnx(model, torch.randn(2, 5, 4), dynamic={"input": {1: (1, 5, 16)}})
    assert str(info.value).startswith("a dynamic dimension was specialised by the model (input_1 = 5): ")
    assert str(info.value).endswith(
        f" Here it is likely the model's LSTM: torch {torch.__version__} exports it as a loop over its time "
        "steps, which fixes the sequence length to the example's. Keep that dimension static (pad to one "
        "length), or use torch >= 2.15.")
    fast = ttm.compile(model, torch.randn(2, 5, 4), backend="onnxruntime", dynamic={"input": {1: (1, 5, 16)}})
    assert isinstance(fast, ttm.PartitionedModule)  # partition="auto": runs at every length, as limits.md says
    for length in (1, 16):
        x = torch.randn(3, length, 4)
        torch.testing.assert_close(fast(x), model(x))
