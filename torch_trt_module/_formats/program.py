"""The captured PyTorch program (``torch.export``'s ExportedProgram) as bytes, without pickle.

``torch.export.save``/``load`` fall back to unpickling anything. Here the graph is stored
as the JSON that ``torch.export``'s own serializer writes, and the weights, constants and
example inputs as ``torch.save`` archives that are read back with
``torch.load(weights_only=True)`` before the deserializer sees them, so a saved program
can hold tensors and plain data only. All parts go in one checksummed container
(:mod:`torch_trt_module._core.io`). Beside torch.export's JSON goes the compact graph of
:mod:`torch_trt_module._formats.graph` (where the program has one), which the PyTorch runtime loads
instead (:func:`load_runtime_graph`): torch.export's deserializer takes seconds on a large model.

torch.export's deserializer evaluates parts of the JSON (symbolic shapes go through
``sympy.sympify``, guards through ``exec``), so :func:`load_program` reads a program only after
:mod:`torch_trt_module._formats.program_safety` has checked every string in it.
"""

from __future__ import annotations

import io
import logging
import math
import operator
from typing import Any

import torch

from .._core.io import pack, unpack
from .._errors import EngineLoadError, ExportError
from .graph import LoadedGraph, check_graph, dump_graph, load_graph
from .program_safety import check_program_json

__all__ = ["check_program", "load_program", "load_runtime_graph", "replace_weights", "save_program",
           "store_program"]

log = logging.getLogger(__name__)

_KIND = "torch-program"
_warned: set[str] = set()


def save_program(program: Any) -> bytes:
    """Bytes for an ExportedProgram (its graph, weights and constants). ``math.ceil``/``math.floor``
    of a symbolic size, which torch.export's serializer refuses, are lowered to integer ops first.
    Raises :class:`~torch_trt_module.ExportError` for a program that cannot be stored even so."""
    from torch._export.serde.serialize import serialize

    try:
        art = serialize(program)
    except Exception as first:  # noqa: BLE001 - SerializeError, or an AssertionError from inside it
        if not _lower_rounding(program):
            raise ExportError(f"torch.export's serializer cannot store the PyTorch program: {_short(first)}") from first
        try:
            art = serialize(program)
        except Exception as e:  # noqa: BLE001 - as above
            raise ExportError(f"torch.export's serializer cannot store the PyTorch program: {_short(e)}") from e
    blobs = {"program": art.exported_program}
    if (graph := dump_graph(program)) is not None:  # after _lower_rounding: the nodes the JSON has
        blobs["graph"] = graph
    # example_inputs stays last: a damaged last byte is caught by load_program, which reads it
    blobs.update(state_dict=art.state_dict or b"", constants=art.constants or b"",
                 example_inputs=art.example_inputs or b"")
    return pack(_KIND, {"torch": torch.__version__}, {k: bytes(v) for k, v in blobs.items()})


def store_program(program: Any) -> bytes | None:
    """:func:`save_program`, or None (with one WARNING per reason) for a program that cannot be stored:
    compile() then keeps the engine without the PyTorch runtime, and never fails for it."""
    try:
        return save_program(program)
    except ExportError as e:
        why = str(e)
        if why not in _warned:
            _warned.add(why)
            log.warning("%s; the compiled module has no PyTorch runtime (its engine, ONNX Runtime and save() are "
                        "unaffected)", why)
        return None


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _lower_rounding(program: Any) -> bool:
    """Replace ``math.ceil(a / b)`` and ``math.floor(a / b)`` on symbolic sizes (TF-style "SAME" padding
    computes them) with ``-((-a) // b)`` and ``a // b``, which the serializer stores; ``math.ceil(x)`` and
    ``math.floor(x)`` of another float become ``-sym_int((-x) // 1)`` and ``sym_int(x // 1)``. Exact for
    the integers shapes are. Returns whether anything was replaced."""
    changed = False
    for gm in program.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in (math.ceil, math.floor) or len(node.args) != 1:
                continue
            (x,) = node.args
            up = node.target is math.ceil
            ints = (isinstance(x, torch.fx.Node) and x.target is operator.truediv and len(x.args) == 2
                    and all(isinstance(_val(a), (int, torch.SymInt)) for a in x.args))
            with gm.graph.inserting_before(node):
                if ints:
                    a, b = x.args
                    new = _op(gm, operator.floordiv, _op(gm, operator.neg, a) if up else a, b)
                else:
                    new = _op(gm, torch.sym_int, _op(gm, operator.floordiv, _op(gm, operator.neg, x) if up else x, 1))
                if up:
                    new = _op(gm, operator.neg, new)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            changed = True
        if changed:
            gm.graph.eliminate_dead_code()
            gm.recompile()
    return changed


def _val(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg


def _op(gm: Any, fn: Any, *args: Any) -> Any:
    node = gm.graph.call_function(fn, args)
    node.meta["val"] = fn(*(_val(a) for a in args))  # what the serializer records (a SymInt: its expression)
    return node


def _tensors(data: bytes, what: str) -> Any:
    if not data:
        return {}
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an archive holding more than tensors and plain data
        raise EngineLoadError(f"the saved PyTorch program's {what} hold more than tensors and plain data, or are "
                              f"corrupt ({type(e).__name__}: {str(e)[:200]}); compile the model again") from e


def replace_weights(data: bytes, values: Any) -> bytes:
    """The saved program with the weights in ``values`` (``{name: tensor}``, names as in its state dict
    or constants) replaced; the graph is not read."""
    header, blobs = unpack(data, kind=_KIND, source="the saved PyTorch program", signed=False)
    for part in ("state_dict", "constants"):
        state = _tensors(blobs[part], part)
        hit = {k: v for k, v in values.items() if k in state}
        if not hit:
            continue
        for k, v in hit.items():
            old = state[k]
            new = v.detach().to(old.device, old.dtype).clone()
            state[k] = torch.nn.Parameter(new, requires_grad=old.requires_grad) \
                if isinstance(old, torch.nn.Parameter) else new
        buf = io.BytesIO()
        torch.save(state, buf)
        blobs[part] = buf.getvalue()
    return pack(_KIND, header, blobs)


def check_program(data: bytes, *, source: str = "the saved PyTorch program", graph_only: bool = False) -> None:
    """Raise :class:`~torch_trt_module.EngineLoadError` unless ``data`` is an intact stored program that
    says nothing torch.export's deserializer would evaluate as code (see
    :mod:`torch_trt_module._formats.program_safety`), with a well-formed compact graph if it has one
    (:func:`~torch_trt_module._formats.graph.check_graph`).
    ``graph_only=True``: where there is a compact graph, check only that (what the PyTorch runtime reads;
    :func:`load_program` checks the JSON before torch's deserializer reads it): a warm cache hit's fast path."""
    # Only the graph's parts are read (the weights' archives are checked when they are loaded): about
    # 10 ms for resnet18, where checking every blob's sha256 took 0.1 s.
    _, blobs = _unpack(data, source, only=("graph",) if graph_only else ("program", "graph"), optional=("graph",))
    if "graph" in blobs:
        check_graph(blobs["graph"], source=source)
        if graph_only:
            return
    if "program" not in blobs:
        _, blobs = _unpack(data, source, only=("program",))
    check_program_json(blobs["program"], source=source)


def load_runtime_graph(data: bytes, *, source: str = "the saved PyTorch program"
                       ) -> tuple[LoadedGraph, dict[str, torch.Tensor]] | None:
    """The compact graph of a stored program and its weights by name (every one the graph takes is
    checked to be there, and a tensor), or None for a program stored without one (by an earlier
    version, or one the format cannot express): read it with :func:`load_program` then."""
    _, blobs = _unpack(data, source, only=("graph", "state_dict", "constants"), optional=("graph",))
    if "graph" not in blobs:
        return None
    graph = load_graph(blobs["graph"], source=source)
    state = {**_tensors(blobs["state_dict"], "weights"), **_tensors(blobs["constants"], "constants")}
    for kind, name in graph.weights:
        if not isinstance(state.get(name), torch.Tensor):
            found = f"hold as a {type(state[name]).__name__}" if name in state else "lack"
            raise EngineLoadError(f"{source}: the stored PyTorch program's graph takes the {kind.lower()} {name!r}, "
                                  f"which its weights {found}; the file is corrupt: compile the model again")
    return graph, state


_PARTS = ("program", "state_dict", "constants", "example_inputs")


def _unpack(data: bytes, source: str, only: tuple[str, ...] = _PARTS,
            optional: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, bytes]]:
    # Not asked to be signed: the container that holds it (an engine, a cache entry, a saved
    # SegmentedModule) is, and its signature covers these bytes.
    header, blobs = unpack(data, kind=_KIND, source=source, signed=False, only=only)
    if missing := [n for n in only if n not in blobs and n not in optional]:
        raise EngineLoadError(f"{source}: the stored PyTorch program lacks its {', '.join(missing)} part(s); "
                              "the file is corrupt or was not written by torch_trt_module")
    return header, blobs


def load_program(data: bytes, *, source: str = "the saved PyTorch program") -> Any:
    """The ExportedProgram that :func:`save_program` stored (its tensors on the CPU), checked by
    :mod:`torch_trt_module._formats.program_safety` before torch's deserializer reads any of it."""
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    header, blobs = _unpack(data, source)
    check_program_json(blobs["program"], source=source)
    example = _tensors(blobs["example_inputs"], "example inputs") or ((), {})
    artifact = SerializedArtifact(blobs["program"], _tensors(blobs["state_dict"], "weights"),
                                  _tensors(blobs["constants"], "constants"), example)
    try:
        return deserialize(artifact)
    except Exception as e:  # noqa: BLE001 - another torch version's schema, most often
        raise EngineLoadError(f"{source} (saved by torch {header.get('torch')}) cannot be read by torch "
                              f"{torch.__version__}: {type(e).__name__}: {str(e)[:300]}") from e
