"""torch_trt_module._build.build: an ExportedModel becomes an Engine. The metadata every engine carries
(specs, settings, backend and version, where it was built), an ONNX Runtime engine being the graph
itself, TensorRT-RTX targets (real builds on the CPU, which TensorRT-RTX can do ahead of time), and
failures of the native builder turned into BuildError."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module import BuildError
from torch_trt_module._build import build as _build
from torch_trt_module._build.build import build_with_choice, engine_targets
from torch_trt_module._core.settings import Settings
from torch_trt_module.backends import BackendChoice, _trt_build

ORT = BackendChoice("onnxruntime", "onnxruntime", "test")
RTX = BackendChoice("tensorrt_rtx", "onnxruntime", "test")
TRT = BackendChoice("tensorrt", "tensorrt", "test")


@pytest.fixture(scope="module")
def exported() -> ttm.ExportedModel:
    torch.manual_seed(0)
    return ttm.export_onnx(torch.nn.Linear(4, 3).eval(), torch.randn(2, 4), exporter="torchscript")


def test_an_onnxruntime_engine_is_the_graph_with_its_metadata(exported: ttm.ExportedModel) -> None:
    engine = ttm.build_engine(exported, backend="onnxruntime", device="cpu")
    assert engine.backend == "onnxruntime" and engine.plan is None and engine.onnx == exported.onnx
    meta = engine.meta
    assert meta["model"] == exported.to_meta() and meta["backend"] == "onnxruntime"
    assert meta["backend_version"] == __import__("onnxruntime").__version__
    assert meta["settings"] == Settings.from_options(precision="fp32").engine_fields()
    assert meta["device"] == "cpu" and meta["torch_version"] == torch.__version__
    assert meta["format"] == ttm.Engine.from_bytes(engine.to_bytes()).meta["format"]
    assert "targets" not in meta and "builder_flags" not in meta  # only for TensorRT builds


def test_build_engine_takes_the_precision_of_the_export(exported: ttm.ExportedModel) -> None:
    assert ttm.build_engine(exported, backend="onnxruntime").meta["settings"]["precision"] == "fp32"


def test_engine_targets() -> None:
    assert engine_targets(RTX, Settings()) is None  # RTX's own portable default
    assert engine_targets(RTX, Settings.from_options(targets=["SM89", "8.6"])) == ("sm86", "sm89")
    assert engine_targets(TRT, Settings()) is None
    with pytest.raises(BuildError) as info:
        engine_targets(TRT, Settings.from_options(targets=["sm86"]))
    assert str(info.value) == "targets= needs backend='tensorrt_rtx'; TensorRT builds for the GPU it runs on"


def test_targets_with_an_onnxruntime_build_are_refused(exported: ttm.ExportedModel) -> None:
    with pytest.raises(BuildError, match="targets= needs backend='tensorrt_rtx'"):
        ttm.build_engine(exported, backend="onnxruntime", targets=["sm86"])


# --------------------------------------------------------------------------- the native builder's failures

@pytest.fixture
def rtx_version(monkeypatch: pytest.MonkeyPatch) -> None:
    # The build itself is replaced below; its version is all the metadata needs from TensorRT-RTX.
    monkeypatch.setattr(_build, "backend_version", lambda name: "1.7.1.116")


@pytest.mark.usefixtures("rtx_version")
@pytest.mark.parametrize("error", [RuntimeError("std::bad_alloc"), TypeError("incompatible function arguments")])
def test_anything_the_builder_throws_is_a_build_error(exported: ttm.ExportedModel, monkeypatch: pytest.MonkeyPatch,
                                                      error: Exception) -> None:
    monkeypatch.setattr(_trt_build, "build_serialized", lambda *a, **k: (_ for _ in ()).throw(error))
    with pytest.raises(BuildError) as info:
        build_with_choice(exported, Settings(), RTX, torch.device("cpu"))
    assert str(info.value) == f"tensorrt_rtx build failed: {error}" and info.value.__cause__ is error


@pytest.mark.usefixtures("rtx_version")
@pytest.mark.parametrize("error", [BuildError("the parser said no"), KeyboardInterrupt("engine build cancelled"),
                                   MemoryError()])
def test_build_errors_interrupts_and_memory_errors_pass_through(exported: ttm.ExportedModel,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                error: BaseException) -> None:
    monkeypatch.setattr(_trt_build, "build_serialized", lambda *a, **k: (_ for _ in ()).throw(error))
    with pytest.raises(type(error)) as info:
        build_with_choice(exported, Settings(), RTX, torch.device("cpu"))
    assert info.value is error


@pytest.mark.usefixtures("rtx_version")
def test_what_reaches_the_builder_and_what_comes_back(exported: ttm.ExportedModel,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def build(onnx: bytes, inputs: Any, **kwargs: Any) -> tuple[bytes, dict[str, Any]]:
        seen.update(kwargs, onnx=onnx, inputs=inputs)
        return b"PLAN", {"timing_cache": b"cache", "progress_events": 7, "build_time_s": 0.5}

    monkeypatch.setattr(_trt_build, "build_serialized", build)
    settings = Settings.from_options(targets=["sm89"], workspace=1 << 20, optimization_level=2, tf32=False,
                                     cuda_graphs=True, progress=False)
    engine, facts = build_with_choice(exported, settings, RTX, torch.device("cpu"), timing_cache=b"old")
    assert seen == {"onnx": exported.onnx, "inputs": exported.inputs, "backend": "tensorrt_rtx", "workspace": 1 << 20,
                    "optimization_level": 2, "tf32": False, "targets": ("sm89",), "timing_cache": b"old",
                    "progress": False, "flags": ["REQUIRE_USER_ALLOCATION"]}
    assert engine.plan == b"PLAN" and engine.backend == "tensorrt_rtx"
    assert (engine.meta["targets"], engine.meta["gpu"], engine.meta["builder_flags"]) == \
        (["sm89"], None, ["REQUIRE_USER_ALLOCATION"])
    assert engine.meta["progress_events"] == 7 and engine.meta["build_time_s"] >= 0
    assert facts == {"timing_cache": b"cache"}  # kept by the cache beside the engine, not in it


# --------------------------------------------------------------------------- real TensorRT-RTX builds

@pytest.mark.usefixtures("rtx_required")
def test_a_real_rtx_build_for_targets(exported: ttm.ExportedModel) -> None:
    engine = ttm.build_engine(exported, backend="tensorrt_rtx", targets=["sm89", "sm86"])
    assert engine.backend == "tensorrt_rtx" and engine.plan and engine.onnx == exported.onnx
    assert engine.meta["targets"] == ["sm86", "sm89"] and engine.meta["settings"]["targets"] == ["sm86", "sm89"]
    assert engine.meta["backend_version"] == __import__("tensorrt_rtx").__version__
    assert engine.meta["gpu"] is None and engine.meta["builder_flags"] == [] and engine.meta["progress_events"] > 0
    assert "for=['sm86', 'sm89']" in repr(engine)
    portable = ttm.build_engine(exported, backend="tensorrt_rtx")
    assert portable.meta["targets"] is None and portable.plan
