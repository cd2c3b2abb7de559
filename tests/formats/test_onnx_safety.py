"""torch_trt_module._formats.onnx_safety (issue 24): a stored ONNX graph that names a file is refused, wherever the
tensor is (an initializer, a sparse initializer, a node attribute, a subgraph, a local function, a
training graph), and graphs the exporters write pass."""

from __future__ import annotations

import time
from typing import Any

import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import torch_trt_module as ttm
from torch_trt_module import EngineLoadError
from torch_trt_module._formats.onnx_safety import check_self_contained


def _tensor(name: str = "w", external: bool = True) -> TensorProto:
    t = numpy_helper.from_array(torch.ones(2, 2).numpy(), name)
    if external:
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key, entry.value = "location", "secret.bin"
    return t


def _model(graph: Any, **kw: Any) -> bytes:
    return helper.make_model(graph, **kw).SerializeToString()  # type: ignore[no-any-return]


def _graph(nodes: list[Any] = (), inits: list[Any] = (), sparse: list[Any] = ()) -> Any:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    nodes = list(nodes) or [helper.make_node("Identity", ["x"], ["y"])]
    return helper.make_graph(nodes, "g", [x], [y], initializer=list(inits), sparse_initializer=list(sparse))


def _sparse() -> Any:
    return helper.make_sparse_tensor(_tensor("v"), numpy_helper.from_array(torch.tensor([0]).numpy(), "i"), [4])


def cases() -> dict[str, bytes]:
    const = helper.make_node("Constant", [], ["c"], value=_tensor("c"))
    then = _graph([const, helper.make_node("Identity", ["x"], ["y"])])
    branch = helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=_graph())
    fn = helper.make_function("local", "f", ["x"], ["y"], [const, helper.make_node("Identity", ["x"], ["y"])],
                              [helper.make_opsetid("", 17)])
    ep = helper.make_node("EPContext", ["x"], ["y"], domain="com.microsoft", ep_cache_context="model.engine")
    return {
        "initializer": _model(_graph(inits=[_tensor()])),
        "sparse initializer": _model(_graph(sparse=[_sparse()])),
        "attribute": _model(_graph([const, helper.make_node("Identity", ["x"], ["y"])])),
        "subgraph": _model(_graph([branch])),
        "function": _model(_graph(), functions=[fn]),
        "EPContext": _model(_graph([ep])),
        "external_data only": _model(_graph(inits=[_strip_location(_tensor())])),
    }


def _strip_location(t: TensorProto) -> TensorProto:
    t.data_location = TensorProto.DEFAULT  # only the external_data entry names the file
    return t


@pytest.mark.parametrize("where", list(cases()))
def test_a_graph_that_names_a_file_is_refused(where: str) -> None:
    with pytest.raises(EngineLoadError, match="refused the stored ONNX graph") as info:
        check_self_contained(cases()[where], source="model.pt")
    said = str(info.value)
    assert said.startswith("model.pt: refused the stored ONNX graph: ")
    assert ("location='secret.bin'" in said or "data_location=EXTERNAL" in said) if where != "EPContext" \
        else "EPContext" in said


def test_self_contained_graphs_pass_and_a_damaged_one_is_named() -> None:
    check_self_contained(_model(_graph(inits=[_tensor(external=False)])), source="m")
    with pytest.raises(EngineLoadError, match="m: the stored ONNX graph is not a readable ONNX protobuf"):
        check_self_contained(b"\x3a\xff\xff\xff\xff\x0f", source="m")  # a graph field longer than the data


def test_exported_graphs_pass_quickly() -> None:
    import torchvision

    model = torchvision.models.resnet18().eval()
    exported = ttm.export_onnx(model, torch.randn(2, 3, 64, 64))
    onnx.checker.check_model(onnx.load_from_string(exported.onnx))
    t0 = time.perf_counter()
    check_self_contained(exported.onnx, source="resnet18")
    assert time.perf_counter() - t0 < 0.05  # the payloads (45 MB of weights) are skipped, not read
