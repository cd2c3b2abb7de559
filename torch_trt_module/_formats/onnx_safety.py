"""Stored ONNX graphs are self-contained: none may make a reader open a file.

An ONNX tensor can keep its values outside the graph (``data_location=EXTERNAL`` with an
``external_data`` entry ``location="secret.bin"``): ONNX Runtime then reads that file, relative
to the current directory, into the weights, and from there into the outputs. Graphs this library
writes never do that (the exporters run with ``external_data=False``), so a stored graph that
does was made by someone else and is refused before ONNX Runtime or TensorRT sees it.

The check reads protobuf's wire format just far enough to reach every tensor: the graph's
initializers and sparse initializers, tensors in node attributes, subgraphs (``If``, ``Loop``,
``Scan`` bodies), local functions and training graphs. Payloads are skipped, never copied, so it
costs milliseconds on a 500 MB graph. ORT's ``EPContext`` nodes, which name a cached engine file,
are refused too.
"""

from __future__ import annotations

from typing import Iterator, Mapping

from .._errors import EngineLoadError
from .program import check_program

__all__ = ["check_engine_blobs", "check_self_contained", "fields", "varint"]

# Field numbers (onnx.proto): which fields of which message hold messages that can hold a tensor.
_MODEL = {7: "graph", 20: "training", 25: "function"}
_TRAINING = {1: "graph", 2: "graph"}
_GRAPH = {1: "node", 5: "tensor", 15: "sparse"}
_NODE = {5: "attribute"}
_FUNCTION = {7: "node", 11: "attribute"}
_ATTRIBUTE = {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"}
_SPARSE = {1: "tensor", 2: "tensor"}
_CHILDREN = {"model": _MODEL, "training": _TRAINING, "graph": _GRAPH, "node": _NODE, "function": _FUNCTION,
             "attribute": _ATTRIBUTE, "sparse": _SPARSE, "tensor": {}}
_TENSOR_NAME, _EXTERNAL_DATA, _DATA_LOCATION = 8, 13, 14
_NODE_OP_TYPE = 4
_MAX_DEPTH = 64


class _NamesAFile(Exception):
    pass


def varint(buf: bytes | memoryview, i: int) -> tuple[int, int]:
    """The varint at ``buf[i]`` and the index after it (IndexError past the end, ValueError if too long)."""
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def fields(buf: bytes | memoryview, start: int, end: int) -> Iterator[tuple[int, int | None, int, int]]:
    """``(field number, varint value or None, payload start, payload end)`` of each field in ``buf[start:end]``."""
    i = start
    while i < end:
        key, i = varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, j = varint(buf, i)
            yield field, value, i, j
        elif wire == 2:
            n, i = varint(buf, i)
            j = i + n
            yield field, None, i, j
        elif wire in (1, 5):
            j = i + (8 if wire == 1 else 4)
            yield field, None, i, j
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        if j > end:
            raise ValueError("a field runs past the end of its message")
        i = j


def _scan(buf: memoryview, kind: str, start: int, end: int, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError(f"graphs nested more than {_MAX_DEPTH} deep")
    children = _CHILDREN[kind]
    name = None
    for field, value, a, b in fields(buf, start, end):
        if kind == "tensor":
            if field == _TENSOR_NAME:
                name = bytes(buf[a:b]).decode("utf-8", "replace")
            elif field == _EXTERNAL_DATA or (field == _DATA_LOCATION and value != 0):
                raise _NamesAFile(f"tensor {name or '?'!r} keeps its data in an external file "
                                  f"({_location(buf, a, b) if field == _EXTERNAL_DATA else 'data_location=EXTERNAL'})")
        elif kind == "node" and field == _NODE_OP_TYPE and bytes(buf[a:b]) == b"EPContext":
            raise _NamesAFile("it holds an EPContext node, which names an engine file")
        elif field in children and value is None:
            _scan(buf, children[field], a, b, depth + 1)


def _location(buf: memoryview, a: int, b: int) -> str:
    """``location='secret.bin'`` from an external_data entry (a StringStringEntryProto), for the message."""
    try:
        parts = {f: bytes(buf[x:y]).decode("utf-8", "replace") for f, v, x, y in fields(buf, a, b) if v is None}
    except (IndexError, ValueError):
        return "external_data"
    return f"{parts.get(1, '?')}={parts.get(2, '?')[:100]!r}"


def check_self_contained(data: bytes | memoryview, *, source: str, what: str = "ONNX graph") -> None:
    """Raise :class:`~torch_trt_module.EngineLoadError` if the ONNX model ``data`` has a tensor whose values
    live in another file (or anything else that names a file), or is not a readable protobuf."""
    buf = memoryview(data)
    try:
        _scan(buf, "model", 0, len(buf), 0)
    except _NamesAFile as e:
        raise EngineLoadError(f"{source}: refused the stored {what}: {e}. torch_trt_module never writes such a "
                              "graph, and loading it would read a file from this machine into the model; the file "
                              "was made or edited by someone else. Do not use it: compile the model again") from None
    except (IndexError, ValueError) as e:
        raise EngineLoadError(f"{source}: the stored {what} is not a readable ONNX protobuf ({e}); the file is "
                              "corrupt: compile the model again") from None


def check_engine_blobs(blobs: Mapping[str, bytes | None], *, source: str, graph_only: bool = False) -> None:
    """Check what parsers would read of an engine loaded from storage (a file, a saved module, a cache
    entry): the ONNX graph (no external files) and torch.export's program (no code). The plan goes
    to TensorRT only, and its host code is off unless the user allows it. ``graph_only=True`` (a cache
    hit): of a program stored with its compact graph, check only that graph, which is all the PyTorch
    runtime reads (``_formats.program.check_program``); torch.export's JSON is checked where it is read."""
    if (onnx := blobs.get("onnx")) is not None:
        check_self_contained(onnx, source=source)
    if (program := blobs.get("program")) is not None:
        check_program(program, source=source, graph_only=graph_only)
