"""The captured PyTorch program (``torch.export``'s ExportedProgram) as bytes, without pickle.

``torch.export.save``/``load`` fall back to unpickling anything. Here the graph is stored
as the JSON that ``torch.export``'s own serializer writes, and the weights, constants and
example inputs as ``torch.save`` archives that are read back with
``torch.load(weights_only=True)`` before the deserializer sees them, so a saved program
can hold tensors and plain data only. All parts go in one checksummed container
(:mod:`._io`).
"""

from __future__ import annotations

import io
from typing import Any

import torch

from ._errors import EngineLoadError
from ._io import pack, unpack

__all__ = ["load_program", "replace_weights", "save_program"]

_KIND = "torch-program"


def save_program(program: Any) -> bytes:
    """Bytes for an ExportedProgram (its graph, weights and constants)."""
    from torch._export.serde.serialize import serialize

    art = serialize(program)
    blobs = {"program": art.exported_program, "state_dict": art.state_dict or b"", "constants": art.constants or b"",
             "example_inputs": art.example_inputs or b""}
    return pack(_KIND, {"torch": torch.__version__}, {k: bytes(v) for k, v in blobs.items()})


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
    header, blobs = unpack(data, kind=_KIND, source="the saved PyTorch program")
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


def load_program(data: bytes, *, source: str = "the saved PyTorch program") -> Any:
    """The ExportedProgram that :func:`save_program` stored (its tensors on the CPU)."""
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    header, blobs = unpack(data, kind=_KIND, source=source)
    example = _tensors(blobs["example_inputs"], "example inputs") or ((), {})
    artifact = SerializedArtifact(blobs["program"], _tensors(blobs["state_dict"], "weights"),
                                  _tensors(blobs["constants"], "constants"), example)
    try:
        return deserialize(artifact)
    except Exception as e:  # noqa: BLE001 - another torch version's schema, most often
        raise EngineLoadError(f"{source} (saved by torch {header.get('torch')}) cannot be read by torch "
                              f"{torch.__version__}: {type(e).__name__}: {str(e)[:300]}") from e
