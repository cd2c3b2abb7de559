"""torch_trt_module._core.dtypes: the one dtype table is consistent with torch, ONNX, numpy, TensorRT and
Triton (each checked against that library's own mapping, not against a copy of the table), every
lookup round-trips, and dtypes engines cannot take are refused with a clear error."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest
import torch

from torch_trt_module import EngineLoadError, InputError
from torch_trt_module._core.dtypes import (
    IO_DTYPES,
    TABLE,
    DType,
    by_name,
    by_onnx,
    by_torch,
    by_trt,
    dtype_from_name,
    dtype_name,
    numpy_dtype,
)

ROWS = [pytest.param(row, id=row.name) for row in TABLE]


def test_every_column_is_unique() -> None:
    for column in ("name", "torch", "onnx", "trt"):
        values = [getattr(row, column) for row in TABLE]
        assert len(set(values)) == len(values), column
    tritons = [row.triton for row in TABLE if row.triton is not None]
    assert len(set(tritons)) == len(tritons)


def test_io_dtypes_are_the_io_rows_in_table_order() -> None:
    assert IO_DTYPES == ("float32", "float16", "bfloat16", "int8", "uint8", "int32", "int64", "bool")
    assert all(by_name(n).io for n in IO_DTYPES)
    assert [r.name for r in TABLE if not r.io] == [n for n in ("float8_e4m3fn", "float8_e8m0fnu") if hasattr(torch, n)]


@pytest.mark.parametrize("row", ROWS)
def test_lookups_round_trip(row: DType) -> None:
    assert by_name(row.name) is row and by_torch(row.torch) is row and by_onnx(row.onnx) is row
    assert dtype_from_name(row.name) is row.torch
    assert by_trt(row.trt) is row and by_trt(f"DataType.{row.trt}") is row  # a name, or str() of the enum
    if row.io:
        assert dtype_name(row.torch) == row.name


@pytest.mark.parametrize("row", ROWS)
def test_the_name_is_torch_s_own(row: DType) -> None:
    assert str(row.torch) == f"torch.{row.name}" and getattr(torch, row.name) is row.torch


@pytest.mark.parametrize("row", ROWS)
def test_onnx_element_type_agrees_with_onnx(row: DType) -> None:
    import onnx.helper

    # onnx maps its element types to numpy (ml_dtypes for bfloat16 and float8), whose names are torch's.
    assert str(onnx.helper.tensor_dtype_to_np_dtype(row.onnx)) == row.name


@pytest.mark.parametrize("row", ROWS)
def test_numpy_type_agrees_with_torch(row: DType) -> None:
    assert numpy_dtype(row.torch) is row.numpy
    if row.numpy is None:
        # None means torch (and ONNX Runtime's binding) cannot hand this dtype to numpy at all.
        with pytest.raises(TypeError):
            torch.zeros(1, dtype=row.torch).numpy()
    else:
        assert torch.zeros(1, dtype=row.torch).numpy().dtype == np.dtype(row.numpy)


@pytest.mark.parametrize("row", ROWS)
def test_triton_name_is_a_triton_data_type(row: DType) -> None:
    pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    if row.triton is None:
        assert not row.io  # every engine I/O dtype can be served by Triton
    else:
        assert pb2.DataType.Value(row.triton) != pb2.DataType.Value("TYPE_INVALID")


def test_unknown_lookups() -> None:
    assert by_torch(torch.float64) is None and by_onnx(11) is None and numpy_dtype(torch.complex64) is None
    with pytest.raises(KeyError):
        by_name("double")
    with pytest.raises(KeyError):
        dtype_from_name("float64")


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64, torch.int16]
                         + [getattr(torch, n) for n in ("float8_e4m3fn",) if hasattr(torch, n)])
def test_dtypes_engines_cannot_take_are_an_input_error(dtype: torch.dtype) -> None:
    with pytest.raises(InputError) as info:
        dtype_name(dtype)
    assert str(info.value) == (f"dtype {dtype} is not supported by engines; expected one of "
                               "float32, float16, bfloat16, int8, uint8, int32, int64, bool")


# --------------------------------------------------------------------------- TensorRT's own enum

def _lean() -> Any:
    if importlib.util.find_spec("tensorrt_lean") is None:
        pytest.skip("tensorrt_lean is not installed (it is in the 'test' extra)")
    import tensorrt_lean

    return tensorrt_lean


@pytest.mark.parametrize("row", ROWS)
def test_by_trt_on_real_tensorrt_lean_members(row: DType) -> None:
    trt = _lean()
    member = getattr(trt.DataType, row.trt)
    assert by_trt(member) is row


def test_every_tensorrt_dtype_is_in_the_table_or_explained() -> None:
    trt = _lean()
    for name, member in trt.DataType.__members__.items():
        if name in ("INT4", "FP4"):
            continue  # packed 4-bit types: the test below
        assert by_trt(member).trt == name


@pytest.mark.parametrize("name,what", [("INT4", "packed 4-bit integers"), ("FP4", "packed 4-bit floats (E2M1)")])
def test_packed_4_bit_types_are_a_clear_load_error(name: str, what: str) -> None:
    members = _lean().DataType.__members__ if importlib.util.find_spec("tensorrt_lean") else {}
    member = members.get(name, f"DataType.{name}")  # the real enum member where there is one
    with pytest.raises(EngineLoadError) as info:
        by_trt(member)
    assert str(info.value) == (f"engine tensor dtype {name} ({what}) has no torch dtype to bind it to; "
                               "expose the tensor in a dtype torch has (cast it in the network)")


def test_an_unknown_tensorrt_dtype_says_so() -> None:
    with pytest.raises(EngineLoadError, match=r"^engine tensor dtype FP6 \(a type torch_trt_module does not know\) "
                                              r"has no torch dtype"):
        by_trt("DataType.FP6")
