"""torch_trt_module.backends._trt_build: real TensorRT-RTX builds from hand-made ONNX graphs, on the
CPU (TensorRT-RTX builds ahead of time without a GPU). A profile the builder rejects, a graph the
profile cannot work for (the builder's "not self-consistent" warning is made a BuildError),
targets, builder flags, and what a build reports."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import onnx.helper as oh
import pytest
import torch
from onnx import TensorProto as TP
from onnx import numpy_helper

from torch_trt_module import BuildError
from torch_trt_module._core.spec import TensorSpec
from torch_trt_module.backends._trt_build import build_serialized, builder_flags

pytestmark = pytest.mark.usefixtures("rtx_required")


def graph(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: Sequence[Any] = ()) -> bytes:
    g = oh.make_graph(nodes, "g", inputs, outputs, list(inits))
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 18)]).SerializeToString()


def vi(name: str, dims: Sequence[Any]) -> Any:
    return oh.make_tensor_value_info(name, TP.FLOAT, list(dims))


RELU = graph([oh.make_node("Relu", ["x"], ["y"])], [vi("x", ["b", 4])], [vi("y", ["b", 4])])
# Reshapes to a fixed (2, 4): only batch 2 can work, whatever the profile says.
FIXED_RESHAPE = graph([oh.make_node("Reshape", ["x", "shape"], ["y"])], [vi("x", ["b", 4])], [vi("y", [2, 4])],
                      [oh.make_tensor("shape", TP.INT64, [2], [2, 4])])


# x @ w with a (4, 3) weight: refit has something to replace
WEIGHTED = graph([oh.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", ["b", 4])], [vi("y", ["b", 3])],
                 [numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "w")])


def x_spec(lo: int = 1, opt: int = 2, hi: int = 8, width: int = 4) -> TensorSpec:
    return TensorSpec("x", "float32", ("b", width), (lo, width), (opt, width), (hi, width))


def build(onnx: bytes, specs: Sequence[TensorSpec] = (), **kwargs: Any) -> tuple[bytes, dict[str, Any]]:
    return build_serialized(onnx, list(specs) or [x_spec()], backend="tensorrt_rtx", progress=False, **kwargs)


def test_a_build_returns_the_plan_and_its_facts() -> None:
    plan, facts = build(RELU)
    assert isinstance(plan, bytes) and len(plan) > 1000
    assert facts["build_time_s"] > 0 and facts["progress_events"] > 0
    assert "timing_cache" not in facts  # TensorRT-RTX has none (it raises on timing-cache calls)


def test_a_profile_the_builder_rejects_is_a_build_error_with_its_message() -> None:
    with pytest.raises(BuildError) as info:
        build(RELU, [x_spec(lo=4, opt=2, hi=8)])  # min > opt
    msg = str(info.value)
    assert msg.startswith("tensorrt_rtx rejected the optimization profile x: (4..8, 4): ")
    assert "please ensure that the optimization profiles satisfy MIN<=OPT<=MAX" in msg  # TensorRT's own words


def test_a_profile_that_does_not_fit_the_graph_fails_the_build() -> None:
    with pytest.raises(BuildError) as info:
        build(RELU, [x_spec(width=5)])
    msg = str(info.value)
    assert msg.startswith("tensorrt_rtx failed to build the engine: ")
    assert "Dimension mismatch for tensor x and profile 0" in msg


def test_an_inconsistent_profile_warning_is_a_build_error(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="torch_trt_module"), pytest.raises(BuildError) as info:
        build(FIXED_RESHAPE)
    msg = str(info.value)
    assert msg.startswith("tensorrt_rtx says the optimization profile is not consistent at some of its shapes, so the "
                          "engine would fail inside the profile: Profile kM")
    assert "values are not self-consistent" in msg and "reshape would change volume" in msg
    assert msg.endswith("Fix: narrow that dim in dynamic= (or make it static), or remove the specialisation from "
                        "the model")
    assert "not self-consistent" in caplog.text  # TensorRT said it as a warning; the build turned it into an error
    plan, _ = build(FIXED_RESHAPE, [x_spec(lo=2, opt=2, hi=2)])  # the one batch it works for builds
    assert plan


def test_targets() -> None:
    plan, _ = build(RELU, targets=["sm86", "sm89"])
    assert plan
    with pytest.raises(BuildError) as info:
        build(RELU, targets=["sm86", "sm999"])
    msg = str(info.value)
    assert msg.startswith("target 'sm999' is not a TensorRT-RTX compute capability; expected one of [")
    assert "'sm86'" in msg and "'sm89'" in msg


def test_builder_flags() -> None:
    assert builder_flags("tensorrt_rtx") == []
    # RTX contexts allocate while they run unless told not to, which CUDA graph capture cannot take.
    assert builder_flags("tensorrt_rtx", cuda_graphs=True) == ["REQUIRE_USER_ALLOCATION"]
    # "auto" (the default) never captures an RTX engine built without it: no default build changes.
    assert builder_flags("tensorrt_rtx", cuda_graphs="auto") == []
    assert builder_flags("tensorrt", cuda_graphs=True) == []
    assert builder_flags("tensorrt_rtx", cuda_graphs=True, refit=True) == ["REQUIRE_USER_ALLOCATION", "REFIT"]
    assert builder_flags("tensorrt", refit=True) == ["REFIT"]


@pytest.mark.parametrize("flags", [["REQUIRE_USER_ALLOCATION"], ["REFIT"], ["REQUIRE_USER_ALLOCATION", "REFIT"]])
def test_every_flag_builder_flags_can_give_exists_and_builds(flags: list[str]) -> None:
    plan, _ = build(RELU, flags=flags)
    assert plan


@pytest.mark.parametrize("flags", [[], ["REQUIRE_USER_ALLOCATION"]])
def test_a_graph_with_weights_builds_with_each_flag(flags: list[str]) -> None:
    plan, _ = build(WEIGHTED, flags=flags)
    assert plan


@pytest.mark.parametrize("flags", [["REFIT"], ["REQUIRE_USER_ALLOCATION", "REFIT"]])
def test_refit_of_a_graph_with_weights_needs_a_gpu(flags: list[str]) -> None:
    # TensorRT-RTX 1.7 takes the flag without a GPU, then fails in its code generator; compile() therefore
    # asks for REFIT only where a CUDA device exists (_build.engine_flags). Pinned as TensorRT-RTX does it.
    if torch.cuda.is_available():
        assert build(WEIGHTED, flags=flags)[0]
        return
    with pytest.raises(BuildError) as info:
        build(WEIGHTED, flags=flags)
    assert str(info.value).startswith("tensorrt_rtx failed to build the engine: ")
    assert "MyelinCheckException" in str(info.value) and "CUDA_SUCCESS" in str(info.value)


def test_every_option_is_accepted_by_the_real_builder_api() -> None:
    # The calls (set_memory_pool_limit, builder_optimization_level, clear_flag(TF32)) exist and take these values.
    plan, _ = build(RELU, workspace=1 << 24, optimization_level=0, tf32=False)
    assert plan


def test_a_parser_error_names_the_node_and_the_fix() -> None:
    bad = graph([oh.make_node("NoSuchOp", ["x"], ["y"], name="the_node", domain="com.example")],
                [vi("x", ["b", 4])], [vi("y", ["b", 4])])
    with pytest.raises(BuildError) as info:
        build(bad)
    msg = str(info.value)
    assert msg.startswith("tensorrt_rtx's ONNX parser rejected the graph:\n  node 0 (the_node, op NoSuchOp): ")
    assert msg.endswith("Fix: replace the unsupported op in the model, or use backend='onnxruntime'.")
