"""Export: names, profiles, structure, exporter choice and its failure messages."""

from __future__ import annotations

import onnx
import pytest
import torch

import torch_trt_module as ttm

from harness.cases import KeywordArgs  # cases.md #11


def test_inputs_are_named_by_the_forward_signature_and_batch_is_dynamic() -> None:
    ex = ttm.export_onnx(KeywordArgs().eval(), ((), {"x": torch.randn(2, 32), "bias": torch.randn(2, 32)}))
    assert ex.input_names == ["x", "bias"]
    assert ex.inputs[0].min == (1, 32) and ex.inputs[0].opt == (2, 32) and ex.inputs[0].max == (32, 32)
    graph = onnx.load_from_string(ex.onnx).graph
    assert [i.name for i in graph.input] == ["x", "bias"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic, not specialised


def test_static_export_has_fixed_dims() -> None:
    ex = ttm.export_onnx(torch.nn.Linear(4, 2).eval(), torch.randn(3, 4), dynamic=None)
    assert ex.inputs[0].min == ex.inputs[0].max == (3, 4)
    assert ex.inputs[0].dims == (3, 4)


def test_example_batch_of_one_is_widened_so_batch_stays_dynamic() -> None:
    ex = ttm.export_onnx(torch.nn.Linear(4, 2).eval(), torch.randn(1, 4))
    assert isinstance(ex.inputs[0].dims[0], str)
    assert ex.inputs[0].opt == (1, 4)


def test_the_exporter_is_recorded_and_torchscript_can_be_forced() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    assert ttm.export_onnx(model, torch.randn(2, 4)).exporter == "dynamo"
    assert ttm.export_onnx(model, torch.randn(2, 4), exporter="torchscript").exporter == "torchscript"


class Branchy(torch.nn.Module):  # cases.md #19
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum().item() > 0:
            return x * 2
        return x - 1


@pytest.mark.parametrize("exporter", ["auto", "torchscript"])
def test_data_dependent_control_flow_is_a_clear_export_error(exporter: str) -> None:
    with pytest.raises(ttm.ExportError, match="data-dependent control flow.*Fix: "):
        ttm.export_onnx(Branchy().eval(), torch.randn(2, 4), exporter=exporter)


def test_unknown_dynamic_input_name_is_rejected() -> None:
    with pytest.raises(ttm.InputError, match=r"dynamic= names unknown input\(s\) \['y'\]; the model's tensor inputs are \['input'\]"):
        ttm.export_onnx(torch.nn.Linear(4, 2).eval(), torch.randn(2, 4), dynamic={"y": {0: (1, 2, 4)}})


def test_example_outside_its_dynamic_range_is_rejected() -> None:
    with pytest.raises(ttm.InputError, match="example size 9 outside its dynamic range 1..8"):
        ttm.export_onnx(torch.nn.Linear(4, 2).eval(), torch.randn(9, 4), dynamic={"input": {0: (1, 2, 8)}})


class FixedReshape(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(4, 8) + 1  # pins the batch to the example's


def test_a_specialised_dynamic_dim_is_reported() -> None:
    with pytest.raises(ttm.ExportError, match="specialised|specialized"):
        ttm.export_onnx(FixedReshape().eval(), torch.randn(4, 8))


class StrOut(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
        return x + 1, "label"


def test_non_tensor_outputs_are_rejected_with_the_reason() -> None:
    with pytest.raises(TypeError, match=r"output \[1\] is a str; expected tensors nested in tuples, lists and dicts \(or None\)"):
        ttm.export_onnx(StrOut().eval(), torch.randn(2, 3))


def test_fp16_precision_exports_a_half_graph_and_keeps_user_dtypes() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    ex = ttm.export_onnx(model, torch.randn(2, 3, 16, 16), precision="fp16")
    assert ex.inputs[0].dtype == "float16" and ex.outputs[0].dtype == "float16"
    assert ex.user_input_dtypes == ("float32",) and ex.user_output_dtypes == ("float32",)
    assert next(model.parameters()).dtype == torch.float32  # the user's model is untouched


# --------------------------------------------------------------------------- issue 20: what forward does with its inputs

class WritesItsInput(torch.nn.Module):
    """Preprocessing in place, as ``x.div_(255)`` does."""

    def __init__(self) -> None:
        super().__init__()
        self.l = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return self.l(x)


def test_a_forward_that_writes_to_its_input_leaves_the_caller_s_example_alone() -> None:
    # compile() ran eager three times on the caller's tensor (x8), then refused its own correct module.
    model = WritesItsInput().eval()
    x = torch.randn(4, 8)
    before = x.clone()
    fast = ttm.compile(model, x, backend="onnxruntime")
    assert torch.equal(x, before)
    assert isinstance(fast, ttm.TRTModule)
    y = torch.randn(6, 8)
    y_before = y.clone()
    with torch.no_grad():
        expected = model(y_before.clone())
        got = fast(y)
    assert torch.equal(y, y_before)  # the engine never writes to the caller's input
    torch.testing.assert_close(got, expected)


def test_on_the_pytorch_runtime_such_a_forward_writes_no_input_either() -> None:
    # The PyTorch runtime runs torch.export's program of the model: it copies the input it writes to.
    model = WritesItsInput().eval()
    x = torch.randn(4, 8)
    before = x.clone()
    fast = ttm.compile(model, x, runtime="torch")
    assert fast.backend == "torch" and torch.equal(x, before)
    y = torch.ones(3, 8)
    with torch.no_grad():
        got = fast(y)
        expected = model(torch.ones(3, 8))
    assert torch.equal(y, torch.ones(3, 8))
    torch.testing.assert_close(got, expected)


class ReturnsTwice(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.l(x)
        return y, y  # Hugging Face: last_hidden_state is hidden_states[-1]


def test_an_output_returned_twice_compiles_and_both_are_right() -> None:
    # A raw KeyError: 'output_0' from _export.py before: the exporter named one value twice.
    model = ReturnsTwice().eval()
    ex = ttm.export_onnx(model, torch.randn(4, 8))
    assert ex.output_names == ["output_0", "output_1"]
    fast = ttm.compile(model, torch.randn(4, 8), backend="onnxruntime")
    assert isinstance(fast, ttm.TRTModule)
    x = torch.randn(3, 8)
    with torch.no_grad():
        first, second = fast(x)
        expected = model(x)[0]
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)


class PassesMaskThrough(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.l(x) * mask, mask


def test_an_input_returned_as_an_output_compiles_to_one_engine() -> None:
    # It was called "input 'mask' is not used by the model" and silently became a PartitionedModule.
    model = PassesMaskThrough().eval()
    ex = ttm.export_onnx(model, (torch.randn(4, 8), torch.ones(4, 8)))
    assert ex.input_names == ["x", "mask"] and ex.output_names == ["output_0", "output_1"]
    fast = ttm.compile(model, (torch.randn(4, 8), torch.ones(4, 8)), backend="onnxruntime")
    assert isinstance(fast, ttm.TRTModule)
    x, mask = torch.randn(5, 8), (torch.rand(5, 8) > 0.5).float()
    with torch.no_grad():
        out, got_mask = fast(x, mask)
        expected = model(x, mask)[0]
    torch.testing.assert_close(out, expected)
    assert torch.equal(got_mask, mask) and got_mask is not mask


# --------------------------------------------------------------------------- issue 20: a batch-1 broadcast input

class AddsPositions(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.l(x + pos)


def test_a_batch_1_input_beside_a_batched_one_broadcasts_and_stays_static() -> None:
    # pos was grown to 2 rows for the export, which failed ("size of tensor a (s39) must match..."),
    # and the model silently became a PartitionedModule.
    model = AddsPositions().eval()
    ex = ttm.export_onnx(model, (torch.randn(4, 8), torch.randn(1, 8)))
    assert [s.profile_str() for s in ex.inputs] == ["(1..32, 8)", "(1, 8)"]
    fast = ttm.compile(model, (torch.randn(4, 8), torch.randn(1, 8)), backend="onnxruntime")
    assert isinstance(fast, ttm.TRTModule)
    x, pos = torch.randn(7, 8), torch.randn(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, pos), model(x, pos))
    with pytest.raises(ttm.InputError) as info:
        fast(x, torch.randn(7, 8))
    assert str(info.value) == (
        "input 'pos' has shape (7, 8) outside the engine's profile (1, 8) (dim 0 = 7 not in 1..1). Dim 0 is static: "
        "the module was compiled for size 1 there, the example's (not a dynamic dim; a size the weights fix, such "
        "as a Conv's channels, cannot be one). Pass a tensor of size 1 in dim 0.")


def test_when_every_input_has_batch_1_every_dim_0_is_dynamic() -> None:
    # The example cannot tell a batch from a broadcast: both stay dynamic (docs/api.md, "dynamic").
    model = AddsPositions().eval()
    ex = ttm.export_onnx(model, (torch.randn(1, 8), torch.randn(1, 8)))
    assert [s.profile_str() for s in ex.inputs] == ["(1..32, 8)", "(1..32, 8)"]
    fast = ttm.compile(model, (torch.randn(1, 8), torch.randn(1, 8)), backend="onnxruntime")
    x = torch.randn(5, 8)
    with torch.no_grad():
        for pos in (torch.randn(5, 8), torch.randn(1, 8)):  # the graph broadcasts as eager does
            torch.testing.assert_close(fast(x, pos), model(x, pos))


def test_a_static_input_under_an_explicit_dynamic_dict_is_kept_as_given() -> None:
    ex = ttm.export_onnx(AddsPositions().eval(), (torch.randn(4, 8), torch.randn(1, 8)),
                         dynamic={"x": {0: (1, 4, 16)}})
    assert [s.profile_str() for s in ex.inputs] == ["(1..16, 8)", "(1, 8)"]
