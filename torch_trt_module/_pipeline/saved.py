"""Saving and loading compiled modules: bytes in ``torch.load(weights_only=True)`` archives.

A :class:`TRTModule` saves as its ``state_dict`` (the engine's checksummed container as a uint8
tensor); a :class:`~torch_trt_module._partition.split.SegmentedModule` as its program, its split (JSON) and
each engine's state. Nothing is pickled, so :func:`load` reads with ``weights_only=True``.
"""

from __future__ import annotations

from typing import Any

import torch

from .._build.engine import STATE_SOURCE
from .._core.sign import sign, signature_problem, state_digest
from .._errors import EngineLoadError, UsageError
from .._partition.partitioned import SAVE_REFUSAL, PartitionedModule
from .._partition.split import SAVED_FORMAT, SegmentedModule
from .._runtime.module import TRTModule
from ..backends import usable_device

__all__ = ["load", "read_state", "save"]

_SIGNATURE = "signature"  # a saved SegmentedModule's HMAC (see _sign); a TRTModule's container signs itself


def read_state(path: Any) -> Any:
    """What ``torch.save`` wrote at ``path``, read with ``weights_only=True`` (so it runs no code).

    A file that is missing or unreadable raises its ``OSError``; one that is cut off or damaged
    (torch reports that as ``OSError: [Errno 22]`` or a ``RuntimeError``) or holds more than
    tensors and plain data raises :class:`EngineLoadError` naming the path."""
    import zipfile

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001 - a damaged archive, or a pickle holding more than plain data
        try:
            whole = zipfile.is_zipfile(path)  # the end record of the zip is what a cut-off file lacks
        except OSError:
            whole = False
        if not whole:
            raise EngineLoadError(
                f"{path} is truncated or corrupt: it is not a complete torch.save archive ({type(e).__name__}: "
                f"{str(e)[:200]}). An interrupted copy or download leaves such a file: copy it again, or save the "
                "module again") from e
        raise EngineLoadError(f"{path} is not a module saved by torch_trt_module.save, or it is corrupt "
                              f"({type(e).__name__}: {str(e)[:300]})") from e


def save(module: Any, path: Any) -> None:
    """Save a compiled module (a TRTModule, or a SegmentedModule: engines and PyTorch parts): engine
    bytes, the program's tensors and JSON metadata, no pickled objects.

    Example:
        >>> save(trt_model, "model.pt"); m = load("model.pt")   # doctest: +SKIP
    """
    if isinstance(module, SegmentedModule):
        state = module.saved_state()
        if (mac := sign(state_digest(state))) is not None:
            state[_SIGNATURE] = mac
        torch.save(state, path)
        return
    if not isinstance(module, TRTModule):
        if isinstance(module, PartitionedModule):
            raise UsageError(SAVE_REFUSAL)
        raise UsageError(f"save() takes a module from compile(); got {type(module).__name__}")
    torch.save(module.state_dict(), path)


def load(path: Any, *, device: str | torch.device | None = None) -> Any:
    """Load a module saved by :func:`save` (a TRTModule or a SegmentedModule), with
    ``torch.load(..., weights_only=True)``."""
    if device is not None:  # before reading anything: a CUDA device this machine lacks, said plainly
        device = usable_device(device, fix="pass device='cpu', or leave device out (the module then lives where it "
                                            "can run)")
    state = read_state(path)
    if isinstance(state, dict) and state.get("format") == SAVED_FORMAT:
        body = {k: v for k, v in state.items() if k != _SIGNATURE}
        if problem := signature_problem(state_digest(body), state.get(_SIGNATURE), what=str(path)):
            raise EngineLoadError(problem)
        split = SegmentedModule.from_saved(body, source=str(path))
        return split.to(device) if device is not None else split
    if not isinstance(state, dict):
        raise EngineLoadError(f"{path} holds a {type(state).__name__}, not a module saved by torch_trt_module.save")
    module = TRTModule()
    try:
        module.load_state_dict(state)
    except EngineLoadError as e:  # the state does not know its file: name it
        why = str(e)
        named = why.replace(STATE_SOURCE, str(path), 1) if why.startswith(STATE_SOURCE) else f"{path}: {why}"
        raise EngineLoadError(named) from e
    except RuntimeError as e:  # other keys: not a saved TRTModule
        raise EngineLoadError(f"{path} does not hold a saved TRTModule: {e}") from e
    if device is not None:
        module.to(device)
    return module
