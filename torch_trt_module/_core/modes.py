"""Inference semantics without touching the user's module: what ``torch.onnx.export`` does by default.

Engines compute a module's inference (eval) semantics: dropout off, BatchNorm on its running
statistics. :func:`eval_semantics` puts every submodule in eval mode for the duration of a block
(compile(), a lazy build, a partitioned module's call) and puts each one back to the mode it had
in a ``finally``, so a model in training mode compiles as written (``compile(resnet18())``) and
leaves compile() in training mode, its mixed modes (a frozen BatchNorm inside a training model)
included.

The flags are set directly (``m.training = ...``), not through ``train()``: an override of
``train()`` may do more than set the flag (freeze a layer, raise), and only the flag is restored.
Nested and concurrent blocks share one saved flag per submodule (with a count of the blocks holding
it): the last block to leave a submodule restores it, so a block never restores a mode another
block (on the same model, a parent or a child, in any thread) still relies on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Iterator

import torch

__all__ = ["eval_semantics", "say_inference_only", "training_modules"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
#: id(submodule) -> (blocks holding it, the submodule, its training flag before the first of them)
_held: dict[int, tuple[int, torch.nn.Module, bool]] = {}


def say_inference_only(module: torch.nn.Module) -> None:
    """One WARNING per compiled module called in training mode (a parent's ``train()`` reaches it): it
    computes inference all the same, and returns no gradients."""
    if module.__dict__.get("_said_training"):
        return
    module.__dict__["_said_training"] = True
    log.warning("%s is in training mode (a parent's train() reaches it): a compiled module computes inference "
                "all the same (dropout off, BatchNorm running statistics) and returns no gradients. Train the source "
                "model, and call the compiled one for evaluation", type(module).__name__)


def training_modules(model: torch.nn.Module) -> list[str]:
    """The names of the submodules in training mode ("" for the model itself)."""
    return [name for name, m in model.named_modules() if m.training]


@contextlib.contextmanager
def eval_semantics(model: torch.nn.Module) -> Iterator[None]:
    """Every submodule of ``model`` in eval mode inside the block, each back to its own mode after it.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Dropout(0.5)).train()
        >>> with eval_semantics(m):
        ...     m.training, m[0].training
        (False, False)
        >>> m.training, m[0].training
        (True, True)
    """
    if not isinstance(model, torch.nn.Module):  # the caller's own check names the wrong type
        yield
        return
    modules = list(model.modules())
    with _lock:
        for m in modules:
            count, _, was = _held.get(id(m), (0, m, m.training))
            _held[id(m)] = (count + 1, m, was)
            m.training = False
    try:
        yield
    finally:
        with _lock:
            for m in modules:
                count, _, was = _held[id(m)]
                if count == 1:
                    del _held[id(m)]
                    m.training = was
                else:
                    _held[id(m)] = (count - 1, m, was)
