"""torch_trt_module._core.spec: TensorSpec's shape check and profile text (the words of every
out-of-profile InputError), its JSON, and ExportedModel's metadata round trip (to_meta/from_meta),
which is what engine files, cache entries and saved modules carry."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module._core.spec import ExportedModel, TensorSpec

X = TensorSpec("x", "float32", dims=("batch", 3), min=(1, 3), opt=(4, 3), max=(8, 3))
OUT = TensorSpec("y", "int64", dims=("batch", "2*s1", 5))


def test_properties() -> None:
    assert X.torch_dtype is torch.float32 and OUT.torch_dtype is torch.int64
    assert X.rank == 2 and OUT.rank == 3
    assert X.is_dynamic and OUT.is_dynamic and not TensorSpec("z", "bool", dims=(2, 3)).is_dynamic


def test_profile_str() -> None:
    assert X.profile_str() == "(1..8, 3)"
    assert OUT.profile_str() == "batch x 2*s1 x 5"  # an output: its symbolic dims
    assert TensorSpec("s", "float32", dims=(), min=(), opt=(), max=()).profile_str() == "()"


@pytest.mark.parametrize("shape", [(1, 3), (8, 3), [4, 3], torch.Size([5, 3])])
def test_shapes_inside_the_profile_fit(shape: tuple[int, ...]) -> None:
    assert X.check_shape(shape) is None


@pytest.mark.parametrize("shape,why", [
    ((9, 3), "has shape (9, 3) outside the engine's profile (1..8, 3) (dim 0 = 9 not in 1..8)"),
    ((0, 2), "has shape (0, 2) outside the engine's profile (1..8, 3) (dim 0 = 0 not in 1..8, dim 1 = 2 not in 3..3)"),
    ((1, 3, 1), "has rank 3 (shape (1, 3, 1)) but the engine expects rank 2"),
    ((), "has rank 0 (shape ()) but the engine expects rank 2"),
])
def test_shapes_outside_the_profile_say_which_dim_and_range(shape: tuple[int, ...], why: str) -> None:
    assert X.check_shape(shape) == why


def test_an_output_checks_only_the_rank() -> None:
    assert OUT.check_shape((100, 7, 1)) is None
    assert OUT.check_shape((1, 2)) == "has rank 2 (shape (1, 2)) but the engine expects rank 3"


@pytest.mark.parametrize("spec", [X, OUT, TensorSpec("s", "bool", dims=())])
def test_tensor_spec_json_round_trip(spec: TensorSpec) -> None:
    data = json.loads(json.dumps(spec.to_json()))
    assert TensorSpec.from_json(data) == spec
    assert data["min"] == (None if spec.min is None else list(spec.min))


def test_from_json_takes_ints_from_json_numbers() -> None:
    spec = TensorSpec.from_json({"name": "x", "dtype": "float32", "dims": ["b", 3], "min": [1.0, 3], "max": [8, 3]})
    assert spec.min == (1, 3) and all(type(v) is int for v in spec.min) and spec.opt is None


def test_tensor_spec_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        X.name = "y"  # type: ignore[misc]


# --------------------------------------------------------------------------- ExportedModel

class TwoOutputs(torch.nn.Module):
    def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> dict[str, object]:
        return {"sum": x.sum(-1), "pair": (x * scale, None)}


@pytest.fixture(scope="module")
def exported() -> ExportedModel:
    x, s = torch.randn(2, 4), torch.randn(2, 4)
    return ttm.export_onnx(TwoOutputs().eval(), ((x,), {"scale": s}), exporter="torchscript")


def test_to_meta_is_json_and_from_meta_gives_the_model_back(exported: ExportedModel) -> None:
    meta = json.loads(json.dumps(exported.to_meta()))
    assert "onnx" not in meta and "program" not in meta  # the graph and program are blobs, not metadata
    back = ExportedModel.from_meta(exported.onnx, meta, program=exported.program)
    # Only the export's timing and in-process extras are left out of the metadata.
    assert back == dataclasses.replace(exported, export_time_s=0.0, extra={})
    assert back.input_names == ["x", "scale"] and back.params == exported.params
    assert back.output_tree == exported.output_tree and back.call_tree == exported.call_tree


def test_from_meta_takes_the_program_given(exported: ExportedModel) -> None:
    back = ExportedModel.from_meta(exported.onnx, exported.to_meta(), program=b"program bytes")
    assert back.program == b"program bytes"
    assert ExportedModel.from_meta(exported.onnx, exported.to_meta()).program is None


def test_from_meta_of_incomplete_metadata_raises_key_error(exported: ExportedModel) -> None:
    # Engine.from_bytes turns this into an EngineLoadError ("malformed engine").
    meta = exported.to_meta()
    del meta["output_tree"]
    with pytest.raises(KeyError, match="output_tree"):
        ExportedModel.from_meta(exported.onnx, meta)
