"""export_triton: Triton model repositories from real engines, checked with Triton's own schema.

Every config.pbtxt is parsed with ``tritonclient.grpc.model_config_pb2.ModelConfig`` (the
protobuf Triton itself loads configs with) through ``google.protobuf.text_format``; a
field name, enum or structure Triton would reject fails the parse. What this does NOT
show: that a Triton server loads and serves the plan (no server or TensorRT runtime here).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module._build.build import Engine
from torch_trt_module._errors import TorchTRTError
from torch_trt_module._tools.triton import TritonExportError, TritonRepoExists, export_triton, triton_config

from harness.models import Conv

from .._support import require_rtx

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="pip install 'torch_trt_module[triton]' (tritonclient[grpc])")
text_format = pytest.importorskip("google.protobuf.text_format")


def parse(path: Path) -> Any:
    """config.pbtxt -> ModelConfig, with Triton's schema (raises on anything it does not know)."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def dtype_name(value: int) -> str:
    return model_config_pb2.DataType.Name(value)


class TwoInputs(torch.nn.Module):
    """x (B, 8) float, ids (B, 5) int64 -> (B, 4) float, (B,) int64, (B, 4) bool."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.proj(x + self.embed(ids).mean(1))
        return h, h.argmax(-1), h > 0


def _compile(model: torch.nn.Module, example: Any, **options: Any) -> ttm.TRTModule:
    return ttm.compile(model.eval(), example, cache=False, verify=False, **options)


@pytest.fixture(scope="module")
def two_inputs() -> ttm.TRTModule:
    """A TensorRT-RTX engine (built on the CPU) with two inputs sharing a dynamic batch 1..8, opt 4."""
    require_rtx()  # no plan to export without it
    torch.manual_seed(0)
    dyn = {"x": {0: (1, 4, 8)}, "ids": {0: (1, 4, 8)}}
    mod = _compile(TwoInputs(), (torch.randn(4, 8), torch.randint(0, 50, (4, 5))), dynamic=dyn)
    assert mod.engine is not None and mod.engine.backend == "tensorrt_rtx" and mod.engine.plan
    return mod


@pytest.fixture(scope="module")
def conv_ort() -> ttm.TRTModule:
    """An ONNX Runtime engine (no plan): batch 1..6 opt 3, H and W dynamic 8..32."""
    torch.manual_seed(0)
    dyn = {"x": {0: (1, 3, 6), 2: (8, 16, 32), 3: (8, 16, 32)}}
    return _compile(Conv(), torch.randn(3, 3, 16, 16), dynamic=dyn, backend="onnxruntime")


# --------------------------------------------------------------------------- plan repositories

def test_plan_repository_layout_and_config(two_inputs: ttm.TRTModule, tmp_path: Path) -> None:
    engine = two_inputs.engine
    assert engine is not None and engine.plan is not None
    model_dir = export_triton(two_inputs, tmp_path, "two_inputs")

    assert model_dir == tmp_path / "two_inputs"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt"]
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model.plan"]
    assert (model_dir / "1" / "model.plan").read_bytes() == engine.plan

    cfg = parse(model_dir / "config.pbtxt")
    assert cfg.name == "two_inputs"
    assert cfg.platform == "tensorrt_plan"
    assert cfg.max_batch_size == 8  # the profile's max batch
    ins = {i.name: i for i in cfg.input}
    assert set(ins) == {"x", "ids"}
    # Batch dim stripped from every input; the rest as in the engine.
    assert list(ins["x"].dims) == [8] and dtype_name(ins["x"].data_type) == "TYPE_FP32"
    assert list(ins["ids"].dims) == [5] and dtype_name(ins["ids"].data_type) == "TYPE_INT64"
    outs = {o.name: o for o in cfg.output}
    assert [dtype_name(outs[n].data_type) for n in two_inputs.output_names] == ["TYPE_FP32", "TYPE_INT64",
                                                                               "TYPE_BOOL"]
    assert list(outs[two_inputs.output_names[0]].dims) == [4]
    # A [batch]-only output: Triton needs dims [1] reshaped to [].
    argmax = outs[two_inputs.output_names[1]]
    assert list(argmax.dims) == [1] and argmax.HasField("reshape") and list(argmax.reshape.shape) == []
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 4, 8]
    (group,) = cfg.instance_group
    assert group.count == 1
    assert group.kind == model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_GPU")
    assert list(group.profile) == ["0"]


def test_plan_options_max_batch_instances_no_batching(two_inputs: ttm.TRTModule, tmp_path: Path) -> None:
    cfg = parse(export_triton(two_inputs, tmp_path, "small", max_batch_size=4, instance_count=3) / "config.pbtxt")
    assert cfg.max_batch_size == 4
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 4]  # nothing above max_batch_size
    assert cfg.instance_group[0].count == 3

    cfg = parse(export_triton(two_inputs, tmp_path, "nobatch", max_batch_size=0) / "config.pbtxt")
    assert cfg.max_batch_size == 0
    assert not cfg.HasField("dynamic_batching")
    # Without batching the batch dim stays in dims, as -1.
    assert {i.name: list(i.dims) for i in cfg.input} == {"x": [-1, 8], "ids": [-1, 5]}

    cfg = parse(export_triton(two_inputs, tmp_path, "nodyn", dynamic_batching=False) / "config.pbtxt")
    assert cfg.max_batch_size == 8 and not cfg.HasField("dynamic_batching")


def test_engine_object_and_onnx_of_a_plan_engine(two_inputs: ttm.TRTModule, tmp_path: Path) -> None:
    engine = two_inputs.engine
    assert engine is not None
    # The ONNX graph of the same engine, for a Triton without this TensorRT version.
    model_dir = export_triton(engine, tmp_path, "as_onnx", platform="onnxruntime_onnx")
    assert (model_dir / "1" / "model.onnx").read_bytes() == engine.onnx
    assert not (model_dir / "1" / "model.plan").exists()
    cfg = parse(model_dir / "config.pbtxt")
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_CPU")
    assert list(cfg.instance_group[0].profile) == []  # profiles are a TensorRT notion


# --------------------------------------------------------------------------- ONNX Runtime repositories

def test_onnx_repository_dynamic_dims_and_preferred_sizes(conv_ort: ttm.TRTModule, tmp_path: Path) -> None:
    engine = conv_ort.engine
    assert engine is not None and engine.plan is None
    model_dir = export_triton(conv_ort, tmp_path, "conv")
    assert (model_dir / "1" / "model.onnx").read_bytes() == engine.onnx
    cfg = parse(model_dir / "config.pbtxt")
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 6
    (x,) = cfg.input
    assert list(x.dims) == [3, -1, -1]  # batch stripped, H and W dynamic
    (out,) = cfg.output
    assert list(out.dims) == [4, -1, -1]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 3, 4, 6]  # powers of 2, opt 3, max 6
    # A module on the CPU: its ONNX runs on CPU instances.
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_CPU")


def test_fp16_engine_types(tmp_path: Path) -> None:
    mod = _compile(torch.nn.Linear(8, 3), torch.randn(2, 8), precision="fp16", backend="onnxruntime")
    cfg = parse(export_triton(mod, tmp_path, "half") / "config.pbtxt")
    # The engine's own I/O dtypes: a Triton client sends and receives fp16.
    assert [dtype_name(t.data_type) for t in list(cfg.input) + list(cfg.output)] == ["TYPE_FP16", "TYPE_FP16"]


def test_static_engine_has_no_batching(tmp_path: Path) -> None:
    mod = _compile(Conv(), torch.randn(2, 3, 8, 8), dynamic=None, backend="onnxruntime")
    cfg = parse(export_triton(mod, tmp_path, "static") / "config.pbtxt")
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [2, 3, 8, 8]
    with pytest.raises(TritonExportError, match=r"static dim 0.*max_batch_size=0"):
        export_triton(mod, tmp_path, "static2", max_batch_size=2)


# --------------------------------------------------------------------------- repository files

def test_existing_version_is_refused_then_overwritten(conv_ort: ttm.TRTModule, tmp_path: Path) -> None:
    export_triton(conv_ort, tmp_path, "m")
    with pytest.raises(TritonRepoExists, match=r"not empty.*overwrite=True.*version=2") as info:
        export_triton(conv_ort, tmp_path, "m")
    assert isinstance(info.value, (FileExistsError, TorchTRTError))
    # A new version of the same model shares the (identical) config.
    export_triton(conv_ort, tmp_path, "m", version=2)
    assert (tmp_path / "m" / "2" / "model.onnx").exists()
    # A different config for the same model is refused too...
    with pytest.raises(TritonRepoExists, match="different config"):
        export_triton(conv_ort, tmp_path, "m", version=3, max_batch_size=2)
    # ...unless asked for.
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(b"stale")
    export_triton(conv_ort, tmp_path, "m", max_batch_size=2, overwrite=True)
    assert parse(tmp_path / "m" / "config.pbtxt").max_batch_size == 2
    assert (tmp_path / "m" / "1" / "model.onnx").read_bytes() == conv_ort.engine.onnx  # type: ignore[union-attr]
    # Atomic writes leave no temp files behind.
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []


def test_overwrite_replaces_the_other_model_file(two_inputs: ttm.TRTModule, tmp_path: Path) -> None:
    export_triton(two_inputs, tmp_path, "m", platform="onnxruntime_onnx")
    export_triton(two_inputs, tmp_path, "m", overwrite=True)
    # A stale model.onnx next to model.plan would confuse anyone reading the repository.
    assert sorted(p.name for p in (tmp_path / "m" / "1").iterdir()) == ["model.plan"]


def test_empty_version_dir_is_fine(conv_ort: ttm.TRTModule, tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    export_triton(conv_ort, tmp_path, "m")
    assert (tmp_path / "m" / "1" / "model.onnx").exists()


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("name", ["my model", "../evil", "a/b", ".hidden", "-x", "", "naïve"])
def test_bad_model_names(conv_ort: ttm.TRTModule, tmp_path: Path, name: str) -> None:
    with pytest.raises(TritonExportError, match="not a valid Triton model name") as info:
        export_triton(conv_ort, tmp_path, name)
    assert "Fix: rename it" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_max_batch_larger_than_profile(two_inputs: ttm.TRTModule, tmp_path: Path) -> None:
    with pytest.raises(TritonExportError) as info:
        export_triton(two_inputs, tmp_path, "m", max_batch_size=16)
    msg = str(info.value)
    assert "max_batch_size=16" in msg and "1..8" in msg and "max_batch_size <= 8" in msg


def test_inputs_without_a_shared_batch_dim(tmp_path: Path) -> None:
    class Two(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x * 2 + y.sum()

    example = (torch.randn(4, 3), torch.randn(5, 3))
    only_x = _compile(Two(), example, dynamic={"x": {0: (1, 4, 8)}}, backend="onnxruntime")
    with pytest.raises(TritonExportError, match=r"input 'y' has a static dim 0.*Fix: pass max_batch_size=0"):
        export_triton(only_x, tmp_path, "m", max_batch_size=4)
    # Left to its default, batching is simply off, with full shapes.
    cfg = parse(export_triton(only_x, tmp_path, "m") / "config.pbtxt")
    assert cfg.max_batch_size == 0 and [list(i.dims) for i in cfg.input] == [[-1, 3], [5, 3]]

    differ = _compile(Two(), example, dynamic={"x": {0: (1, 4, 8)}, "y": {0: (1, 5, 16)}}, backend="onnxruntime")
    with pytest.raises(TritonExportError, match=r"dim 0 ranges differ \(x: 1\.\.8, y: 1\.\.16\)"):
        export_triton(differ, tmp_path, "d", max_batch_size=4)


def test_output_that_does_not_follow_the_batch(tmp_path: Path) -> None:
    class Pool(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x * 2, x.sum(0)  # the second output mixes the batch: Triton must not split it

    mod = _compile(Pool(), torch.randn(4, 3), backend="onnxruntime")
    with pytest.raises(TritonExportError, match=r"output 'output_1' has a static dim 0 \(3\)"):
        export_triton(mod, tmp_path, "m", max_batch_size=4)


def test_profile_not_starting_at_one(tmp_path: Path) -> None:
    mod = _compile(torch.nn.Linear(3, 2), torch.randn(4, 3), dynamic={"input": {0: (2, 4, 8)}},
                   backend="onnxruntime")
    with pytest.raises(TritonExportError, match=r"starts at batch 2.*\(1, opt, max\)"):
        export_triton(mod, tmp_path, "m")
    assert parse(export_triton(mod, tmp_path, "m", max_batch_size=0) / "config.pbtxt").max_batch_size == 0


def test_other_argument_errors(conv_ort: ttm.TRTModule, tmp_path: Path) -> None:
    engine = conv_ort.engine
    assert isinstance(engine, Engine)
    with pytest.raises(TritonExportError, match=r"platform='tensorrt_plan' needs a TensorRT engine.*onnxruntime"):
        export_triton(engine, tmp_path, "m", platform="tensorrt_plan")
    with pytest.raises(TritonExportError, match=r"instance_count got 0"):
        export_triton(engine, tmp_path, "m", instance_count=0)
    with pytest.raises(TritonExportError, match=r"version got 0"):
        export_triton(engine, tmp_path, "m", version=0)
    with pytest.raises(TritonExportError, match=r"max_batch_size got -1"):
        export_triton(engine, tmp_path, "m", max_batch_size=-1)
    with pytest.raises(TritonExportError, match=r"takes a TRTModule or an Engine; got Linear"):
        export_triton(torch.nn.Linear(2, 2), tmp_path, "m")
    lazy = ttm.compile(torch.nn.Linear(2, 2).eval(), None, cache=False)
    with pytest.raises(TritonExportError, match="no engine yet"):
        export_triton(lazy, tmp_path, "m")
    assert not (tmp_path / "m").exists()


def test_config_text_is_what_export_writes(conv_ort: ttm.TRTModule, tmp_path: Path) -> None:
    assert conv_ort.engine is not None
    text = triton_config(conv_ort.engine, "conv")
    model_dir = export_triton(conv_ort.engine, tmp_path, "conv")
    assert (model_dir / "config.pbtxt").read_text() == text
    assert os.stat(model_dir / "config.pbtxt").st_size == len(text.encode())
