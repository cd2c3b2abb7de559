"""torch_trt_module._formats.onnx on hand-made graphs: reading and listing them (non-ONNX bytes and
unsupported element types are InputErrors naming the source), building an ExportedModel for an
ONNX file, the export checks (invalid graph, dropped input, specialised dim) and the Einsum rewrite."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx.helper as oh
import pytest
import torch
from onnx import TensorProto as TP

from torch_trt_module import ExportError, InputError
from torch_trt_module._formats.onnx import (
    check_graph,
    exported_from_onnx,
    graph_dims,
    graph_dtype,
    load,
    normalize_einsum,
    onnx_io,
    op_summary,
)
from torch_trt_module._core.signature import Param
from torch_trt_module.backends._onnxruntime import run_onnx_cpu

from .._support import onnx_model as model, onnx_vi as vi


# x + w (w an initializer that is also listed as an input, as old exporters do), cast to int64
ADD_CAST = model(
    [oh.make_node("Add", ["x", "w"], ["y"]), oh.make_node("Cast", ["y"], ["z"], to=TP.INT64)],
    [vi("x", TP.FLOAT, ["b", 3]), vi("w", TP.FLOAT, [3])],
    [vi("y", TP.FLOAT, ["b", 3]), vi("z", TP.INT64, ["b", 3])],
    [oh.make_tensor("w", TP.FLOAT, [3], [1.0, 2.0, 3.0])])
HALF = model([oh.make_node("Relu", ["x"], ["y"])], [vi("x", TP.FLOAT16, [2, 3])], [vi("y", TP.FLOAT16, [2, 3])])
BF16 = model([oh.make_node("Relu", ["x"], ["y"])], [vi("x", TP.BFLOAT16, [2])], [vi("y", TP.BFLOAT16, [2])])
DOUBLE = model([oh.make_node("Relu", ["x"], ["y"])], [vi("x", TP.DOUBLE, [2])], [vi("y", TP.DOUBLE, [2])])


def test_load_refuses_bytes_that_are_not_onnx() -> None:
    assert load(ADD_CAST).graph.node[0].op_type == "Add"
    with pytest.raises(InputError, match=r"^model.onnx is not a readable ONNX model: "):
        load(b"\xff\x00 not a protobuf", "model.onnx")


def test_onnx_io_lists_real_inputs_and_outputs() -> None:
    ins, outs = onnx_io(ADD_CAST)
    assert ins == [("x", torch.float32, ("b", 3))]  # w is an initializer, not an input
    assert outs == [("y", torch.float32, ("b", 3)), ("z", torch.int64, ("b", 3))]


def test_onnx_io_refuses_element_types_engines_cannot_take() -> None:
    with pytest.raises(InputError) as info:
        onnx_io(DOUBLE, "d.onnx")
    assert str(info.value) == "d.onnx: tensor 'x' has ONNX element type 11, which engines cannot take"


def test_op_summary() -> None:
    assert op_summary(ADD_CAST) == "2 nodes: Add 1, Cast 1"


def test_exported_from_onnx_builds_like_an_export() -> None:
    exported = exported_from_onnx(ADD_CAST, {"x": ((1, 3), (2, 3), (4, 3))}, "m.onnx")
    (x,) = exported.inputs
    assert (x.name, x.dtype, x.dims, x.min, x.opt, x.max) == ("x", "float32", ("b", 3), (1, 3), (2, 3), (4, 3))
    assert [(o.name, o.dtype, o.min) for o in exported.outputs] == [("y", "float32", None), ("z", "int64", None)]
    assert exported.exporter == "onnx-file" and exported.precision == "fp32" and exported.program is None
    assert exported.params == (Param("x", "keyword_only"),)  # called by keyword with the graph's names
    assert exported.call_tree.keys == ["x"] and exported.output_tree.keys == ["y", "z"]
    assert exported.user_input_dtypes == ("float32",) and exported.user_output_dtypes == ("float32", "int64")


@pytest.mark.parametrize("graph,precision", [(HALF, "fp16"), (BF16, "bf16"), (ADD_CAST, "fp32")])
def test_exported_from_onnx_takes_the_precision_from_the_dtypes(graph: bytes, precision: str) -> None:
    shape = ((2, 3),) * 3 if graph is HALF else ((2,),) * 3 if graph is BF16 else ((1, 3), (1, 3), (1, 3))
    assert exported_from_onnx(graph, {"x": shape}).precision == precision


def test_exported_from_onnx_needs_a_profile_for_every_input() -> None:
    with pytest.raises(InputError) as info:
        exported_from_onnx(ADD_CAST, {}, "m.onnx")
    assert str(info.value) == "m.onnx: no shapes for input(s) ['x']; give (min, opt, max) for each"


# --------------------------------------------------------------------------- export checks

PROFILES = {"x": ((1, 3), (2, 3), (8, 3))}


def test_check_graph_accepts_a_good_graph() -> None:
    assert check_graph(ADD_CAST, ["x"], PROFILES, "dynamo").graph.input[0].name == "x"


def test_check_graph_refuses_an_invalid_graph() -> None:
    bad = model([oh.make_node("NoSuchOp", ["x"], ["y"])], [vi("x", TP.FLOAT, [2])], [vi("y", TP.FLOAT, [2])])
    with pytest.raises(ExportError, match=r"^the torchscript exporter produced an invalid ONNX graph: "):
        check_graph(bad, ["x"], {"x": ((2,), (2,), (2,))}, "torchscript")


def test_check_graph_names_an_input_the_exporter_dropped() -> None:
    with pytest.raises(ExportError) as info:
        check_graph(ADD_CAST, ["x", "unused"], {**PROFILES, "unused": ((1,), (1,), (1,))}, "dynamo")
    assert str(info.value) == ("input 'unused' is not used by the model, so the exporter dropped it; remove it from "
                               "the call")


def test_check_graph_names_a_dim_the_exporter_specialised() -> None:
    fixed = model([oh.make_node("Relu", ["x"], ["y"])], [vi("x", TP.FLOAT, [2, 3])], [vi("y", TP.FLOAT, [2, 3])])
    with pytest.raises(ExportError) as info:
        check_graph(fixed, ["x"], PROFILES, "torchscript")
    assert str(info.value) == (
        "dim 0 of input 'x' was declared dynamic (1..8) but the torchscript exporter specialised it to 2: the model "
        "fixes that size in its code. Fix: make that dimension static (dynamic=None or leave it out of dynamic=).")
    assert check_graph(fixed, ["x"], {"x": ((2, 3),) * 3}, "torchscript")  # declared static: fine


def test_graph_dims_and_graph_dtype() -> None:
    proto = load(ADD_CAST)
    assert graph_dims(proto.graph.output, "z", None) == ("b", 3)
    assert graph_dims(proto.graph.output, "missing", (4, 5)) == (4, 5)  # not in the graph: the example's shape
    assert graph_dims(proto.graph.output, "missing", None) == ()
    unknown = vi("u", TP.FLOAT, [None, 2])
    assert graph_dims([unknown], "u", None) == ("?", 2)
    assert [graph_dtype(v) for v in proto.graph.output] == ["float32", "int64"]
    with pytest.raises(ExportError) as info:
        graph_dtype(load(DOUBLE).graph.output[0])
    assert str(info.value) == "output 'y' has ONNX element type 11, which engines do not support"


# --------------------------------------------------------------------------- Einsum

def einsum(equation: str) -> bytes:
    return model([oh.make_node("Einsum", ["a", "b"], ["c"], equation=equation)],
                 [vi("a", TP.FLOAT, [2, 3]), vi("b", TP.FLOAT, [3, 4])], [vi("c", TP.FLOAT, [2, 4])])


def equations(data: bytes) -> list[str]:
    return [a.s.decode() for n in load(data).graph.node for a in n.attribute if a.name == "equation"]


def test_normalize_einsum_lowercases_without_changing_the_meaning() -> None:
    original = einsum("I J, J K -> I K")
    fixed = normalize_einsum(original)
    (eq,) = equations(fixed)
    assert eq == eq.lower() and " " not in eq and len(set(eq) - set(",->")) == 3
    a, b = np.random.rand(2, 3).astype(np.float32), np.random.rand(3, 4).astype(np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    (got,) = run_onnx_cpu(fixed, ["a", "b"], ["c"], [ta, tb])
    torch.testing.assert_close(got, ta @ tb)


def test_normalize_einsum_keeps_lowercase_letters_distinct() -> None:
    (eq,) = equations(normalize_einsum(einsum("iJ,Jk->ik")))
    assert eq.startswith("i") and eq[1] not in "ik" and eq == f"i{eq[1]},{eq[1]}k->ik"


def test_normalize_einsum_returns_graphs_without_einsum_unchanged() -> None:
    assert normalize_einsum(ADD_CAST) is ADD_CAST
    lower = einsum("ij,jk->ik")
    assert normalize_einsum(lower) is lower  # nothing to rename: the same bytes, not a re-serialisation
