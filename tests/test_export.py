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
