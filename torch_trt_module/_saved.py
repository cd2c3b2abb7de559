"""Saving and loading compiled modules: bytes in ``torch.load(weights_only=True)`` archives.

A :class:`TRTModule` saves as its ``state_dict`` (the engine's checksummed container as a uint8
tensor); a :class:`~torch_trt_module._split.SegmentedModule` as its program, its split (JSON) and
each engine's state. Nothing is pickled, so :func:`load` reads with ``weights_only=True``.
"""

from __future__ import annotations

from typing import Any

import torch

from ._engine import Engine
from ._errors import EngineLoadError, UsageError
from ._module import TRTModule

__all__ = ["engine_of_state", "from_u8", "load", "save", "to_u8"]


def engine_of_state(state: dict[str, Any], *, source: str = "the saved module") -> Engine:
    """The engine in a TRTModule's extra state (``state_dict()["_extra_state"]``), checksums verified."""
    try:
        data = from_u8(state["engine"])
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise EngineLoadError(f"malformed TRTModule state in {source} ({type(e).__name__}: {e})") from e
    return Engine.from_bytes(data, source=source)


def to_u8(b: bytes) -> torch.Tensor:
    """Bytes as a uint8 tensor: what a ``torch.load(weights_only=True)`` archive can hold."""
    return torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.empty(0, dtype=torch.uint8)


def from_u8(t: torch.Tensor) -> bytes:
    return t.cpu().contiguous().numpy().tobytes()


def save(module: Any, path: Any) -> None:
    """Save a compiled module (a TRTModule, or a SegmentedModule: engines and PyTorch parts): engine
    bytes, the program's tensors and JSON metadata, no pickled objects.

    Example:
        >>> save(trt_model, "model.pt"); m = load("model.pt")   # doctest: +SKIP
    """
    from ._split import SegmentedModule

    if isinstance(module, SegmentedModule):
        torch.save(module.saved_state(), path)
        return
    if not isinstance(module, TRTModule):
        from ._partition import SAVE_REFUSAL, PartitionedModule

        if isinstance(module, PartitionedModule):
            raise UsageError(SAVE_REFUSAL)
        raise UsageError(f"save() takes a module from compile(); got {type(module).__name__}")
    torch.save(module.state_dict(), path)


def load(path: Any, *, device: str | torch.device | None = None) -> Any:
    """Load a module saved by :func:`save` (a TRTModule or a SegmentedModule), with
    ``torch.load(..., weights_only=True)``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # a corrupt archive, or a pickle holding more than tensors and plain data
        raise EngineLoadError(f"{path} is not a module saved by torch_trt_module.save, or it is corrupt "
                              f"({type(e).__name__}: {str(e)[:300]})") from e
    from ._split import SAVED_FORMAT, SegmentedModule

    if isinstance(state, dict) and state.get("format") == SAVED_FORMAT:
        split = SegmentedModule.from_saved(state, source=str(path))
        return split.to(device) if device is not None else split
    module = TRTModule()
    try:
        module.load_state_dict(state)
    except RuntimeError as e:  # other keys: not a saved TRTModule (EngineLoadError passes through)
        raise EngineLoadError(f"{path} does not hold a saved TRTModule: {e}") from e
    if device is not None:
        module.to(device)
    return module
