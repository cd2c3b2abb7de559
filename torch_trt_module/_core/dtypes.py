"""The one dtype table: torch <-> ONNX <-> numpy <-> TensorRT <-> Triton.

Names are torch's own (``"float32"``, ``"bfloat16"``), and they are what engine
metadata stores. Every other module looks dtypes up here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._errors import EngineLoadError, InputError

__all__ = ["ALIASES", "DType", "IO_DTYPES", "TEXT_NAMES", "by_name", "by_onnx", "by_text", "by_torch", "by_trt",
           "dtype_from_name", "dtype_name", "numpy_dtype"]


@dataclass(frozen=True)
class DType:
    """One dtype under each of its names; ``None`` where that side has no such dtype."""

    name: str                 # torch's name, stored in metadata
    torch: torch.dtype
    onnx: int                 # onnx.TensorProto element type
    numpy: Any                # numpy scalar type; None: numpy (and ONNX Runtime's binding) cannot hold it
    trt: str                  # tensorrt.DataType member name
    triton: str | None        # Triton ModelConfig DataType name
    io: bool = True           # may be an engine input or output of an exported graph


def _maybe(name: str) -> torch.dtype | None:
    return getattr(torch, name, None)


_ROWS = [
    DType("float32", torch.float32, 1, np.float32, "FLOAT", "TYPE_FP32"),
    DType("float16", torch.float16, 10, np.float16, "HALF", "TYPE_FP16"),
    DType("bfloat16", torch.bfloat16, 16, None, "BF16", "TYPE_BF16"),
    DType("int8", torch.int8, 3, np.int8, "INT8", "TYPE_INT8"),
    DType("uint8", torch.uint8, 2, np.uint8, "UINT8", "TYPE_UINT8"),
    DType("int32", torch.int32, 6, np.int32, "INT32", "TYPE_INT32"),
    DType("int64", torch.int64, 7, np.int64, "INT64", "TYPE_INT64"),
    DType("bool", torch.bool, 9, np.bool_, "BOOL", "TYPE_BOOL"),
]
# TensorRT engines may carry these at their I/O (quantized models); exported graphs do not.
for _name, _onnx, _trt in (("float8_e4m3fn", 17, "FP8"), ("float8_e8m0fnu", 24, "E8M0")):
    if (_t := _maybe(_name)) is not None:
        _ROWS.append(DType(_name, _t, _onnx, None, _trt, None, io=False))

#: Every row, in table order.
TABLE: tuple[DType, ...] = tuple(_ROWS)
#: The dtypes an exported graph's inputs and outputs may have.
IO_DTYPES: tuple[str, ...] = tuple(d.name for d in TABLE if d.io)
_BY_NAME = {d.name: d for d in TABLE}
_BY_TORCH = {d.torch: d for d in TABLE}
_BY_ONNX = {d.onnx: d for d in TABLE}
_BY_TRT = {d.trt: d for d in TABLE}
#: Other names people type for an I/O dtype (the command line's ``--dtype``), by table name.
ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
           "long": "int64", "int": "int32"}
#: Every name :func:`by_text` takes: the I/O dtypes' names and their aliases.
TEXT_NAMES: tuple[str, ...] = tuple(sorted([*IO_DTYPES, *ALIASES]))
# TensorRT dtypes with no torch counterpart: packed 4-bit types (two values a byte).
_NO_TORCH = {"INT4": "packed 4-bit integers", "FP4": "packed 4-bit floats (E2M1)"}


def by_name(name: str) -> DType:
    return _BY_NAME[name]


def by_torch(dtype: torch.dtype) -> DType | None:
    return _BY_TORCH.get(dtype)


def by_onnx(elem_type: int) -> DType | None:
    return _BY_ONNX.get(elem_type)


def by_trt(trt_dtype: Any) -> DType:
    """The row of a ``tensorrt.DataType`` (of any of tensorrt, tensorrt_rtx, tensorrt_lean)."""
    name = getattr(trt_dtype, "name", str(trt_dtype).rpartition(".")[2])
    row = _BY_TRT.get(name)
    if row is None:
        what = _NO_TORCH.get(name, "a type torch_trt_module does not know")
        raise EngineLoadError(f"engine tensor dtype {name} ({what}) has no torch dtype to bind it to; "
                              "expose the tensor in a dtype torch has (cast it in the network)")
    return row


def dtype_name(dtype: torch.dtype) -> str:
    """The metadata name of an engine input or output dtype; InputError if engines cannot take it."""
    row = _BY_TORCH.get(dtype)
    if row is None or not row.io:
        raise InputError(f"dtype {dtype} is not supported by engines; expected one of {', '.join(IO_DTYPES)}")
    return row.name


def dtype_from_name(name: str) -> torch.dtype:
    return _BY_NAME[name].torch


def numpy_dtype(dtype: torch.dtype) -> Any:
    """The numpy type for ``dtype``, or None where numpy cannot hold it (bfloat16, float8)."""
    row = _BY_TORCH.get(dtype)
    return None if row is None else row.numpy


def by_text(text: str) -> DType | None:
    """The I/O dtype a person named (``float16``, ``fp16``, ``half``: any of :data:`TEXT_NAMES`, any
    case), or None."""
    name = ALIASES.get(text.lower(), text.lower())
    row = _BY_NAME.get(name)
    return row if row is not None and row.io else None
