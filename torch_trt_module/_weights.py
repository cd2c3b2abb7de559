"""Weights that change: what the engine's weights are, knowing when the source module's changed,
and reading them for a refit.

**The map.** Export keeps every parameter and buffer of the model as an ONNX initializer of its
own, under its fully qualified name, holding exactly its values (the graph optimizer never folds
a weight into another constant: ``_exporters._optimize_keeping_weights``). The engine's metadata
records, for each such initializer, the source tensor's name, dtype and shape
(:attr:`ExportedModel.weights`). A refit then replaces weights by name on every runtime:
ONNX Runtime (a new session with the initializers overridden), TensorRT (``Refitter``) and
the PyTorch program (its weights). A graph from the TorchScript exporter, whose constants are
folded, has no map: a change there is a rebuild.

**Knowing when.** ``weights="follow"`` (the default) keeps a weak link to the source module and,
at every call, compares a signature of its weights with the one the engine was refit to:

- the sum of the tracked tensors' ``_version`` counters, which every in-place write bumps
  (optimizer steps, ``copy_``, ``load_state_dict``, EMA updates) -- about 85 ns a tensor;
- a global epoch, bumped by observer hooks that only count: parameter, buffer and submodule
  registration on a watched module (a reassigned ``nn.Parameter``), and ``load_state_dict`` on
  any submodule of a source (modules nobody watches never bump it);
- the storage, dtype and device of the first tracked tensor (``model.to(...)`` and
  ``model.half()`` replace every tensor's data without bumping versions).

The hooks are installed once, when the first module follows weights; they change nothing but a
counter. An optimizer step in another thread is never read half-done: ``torch.optim``'s global
step hooks count the steps in progress, reads wait for them, and a step that starts waits until
the read is over (the step's in-place writes themselves bump the versions).
"""

from __future__ import annotations

import logging
import operator
import threading
import weakref
from typing import Any, Collection, Mapping

import torch

from ._errors import InputError

__all__ = ["WEIGHT_MODES", "WeightWatch", "read_weights", "weights_hash"]

log = logging.getLogger(__name__)

WEIGHT_MODES = ("follow", "snapshot")
_version = operator.attrgetter("_version")

# ---- the global epoch and optimizer steps (observer hooks: they only count) -----------------
_epoch = [0]
_stepping = [0]
_steps = threading.Condition()
_hooks_installed = False
_install_lock = threading.Lock()


_watched: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # every submodule of every source


def _bump(*_: Any, **__: Any) -> None:
    _epoch[0] += 1


def _registered(module: torch.nn.Module, *_: Any) -> None:
    if module in _watched:  # a reassigned parameter, buffer or submodule of a source
        _epoch[0] += 1


def _step_started(*_: Any, **__: Any) -> None:
    with _steps:  # waits while a weight read is in progress (it holds the condition's lock)
        _stepping[0] += 1


def _step_finished(*_: Any, **__: Any) -> None:
    with _steps:
        _stepping[0] -= 1
        _steps.notify_all()


def _install_hooks() -> None:
    global _hooks_installed
    with _install_lock:
        if _hooks_installed:
            return
        from torch.nn.modules import module as nn_module
        from torch.optim import optimizer

        optimizer.register_optimizer_step_pre_hook(_step_started)
        optimizer.register_optimizer_step_post_hook(_step_finished)
        nn_module.register_module_parameter_registration_hook(_registered)
        nn_module.register_module_buffer_registration_hook(_registered)
        nn_module.register_module_module_registration_hook(_registered)
        _hooks_installed = True


def _resolve(source: torch.nn.Module, name: str) -> torch.Tensor:
    """The source's parameter or buffer ``name`` (``layer1.0.conv1.weight``)."""
    module_name, _, leaf = name.rpartition(".")
    module = source.get_submodule(module_name) if module_name else source
    tensor = module._parameters.get(leaf) if leaf in module._parameters else module._buffers.get(leaf)
    if tensor is None:
        raise InputError(f"the source module has no parameter or buffer {name!r} any more (its structure changed); "
                         "compile it again")
    return tensor


def read_weights(weights: Mapping[str, tuple[str, str, tuple[int, ...]]], source: Mapping[str, torch.Tensor],
                 device: torch.device | None = None, *, optional: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """New values for the engine's weights (``{initializer: (source name, dtype, shape)}``) from the
    source tensors ``source`` (a ``state_dict``-like mapping), cast to each weight's dtype, as new
    contiguous tensors on ``device`` (default: where each source tensor is). Source names in
    ``optional`` may be missing (a checkpoint has no non-persistent buffers): those weights are
    left out of the result, and keep their values.

    Every name, shape and dtype is checked first: an InputError names the tensor, and nothing is
    read before all pass, so a refit is never half-applied.
    """
    problems = []
    for onnx_name, (name, dtype, shape) in weights.items():
        t = source.get(name)
        if t is None:
            if name not in optional:
                problems.append(f"{name!r} is missing")
        elif tuple(t.shape) != tuple(shape):
            problems.append(f"{name!r} has shape {tuple(t.shape)}, the engine's weight has {tuple(shape)}")
        elif not (t.is_floating_point() or t.dtype == getattr(torch, dtype)):
            problems.append(f"{name!r} is {t.dtype}, the engine's weight is {dtype}")
    if problems:
        raise InputError("cannot refit: " + "; ".join(problems[:8]) + (f" (and {len(problems) - 8} more)"
                         if len(problems) > 8 else "") + ". Fix: pass the weights of the same architecture, or "
                         "compile the new model")
    out = {}
    for onnx_name, (name, dtype, _) in weights.items():
        if name not in source:
            continue  # optional, and not given
        t = source[name].detach()
        out[onnx_name] = t.to(device=device or t.device, dtype=getattr(torch, dtype), copy=True).contiguous()
    return out


def weights_hash(values: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the weights' names, dtypes, shapes and bytes (what a module's engine holds)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(values):
        t = values[name].detach().contiguous().cpu()
        h.update(f"\0{name} {t.dtype} {tuple(t.shape)}".encode())
        if t.numel():
            h.update(memoryview(t.view(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


class WeightWatch:
    """A weak link to the source module, and the signature of its tracked weights (see the module
    docstring). ``changed()`` is what every call of a following module pays."""

    def __init__(self, source: torch.nn.Module, names: list[str]) -> None:
        _install_hooks()
        self.names = names
        self._source = weakref.ref(source, self._gone)
        self._tensors: list[torch.Tensor] = []
        self._versioned: list[torch.Tensor] = []  # those with a version counter
        self._blind: list[str] = []  # the names of those without
        self._handles = [m.register_load_state_dict_post_hook(_bump) for m in source.modules()]
        self._signature: tuple[Any, ...] = ()
        self._resolve()

    def _gone(self, _: Any) -> None:
        # The source is gone: nothing can change any more, and nothing is kept alive.
        self._tensors = self._versioned = []

    def _resolve(self) -> None:
        source = self._source()
        self._tensors = [] if source is None else [_resolve(source, n) for n in self.names]
        # Inference tensors (made under torch.inference_mode, as a buffer a forward creates lazily
        # there) have no version counter: reading it raises. They can only be written in place
        # inside inference_mode, which no signature sees; a reassignment still bumps the epoch.
        self._versioned = [t for t in self._tensors if not t.is_inference()]
        blind = [n for n, t in zip(self.names, self._tensors) if t.is_inference()]
        if blind and blind != self._blind:
            log.warning("weights='follow' cannot see in-place writes made under torch.inference_mode to %s "
                        "(inference tensors have no version counter); a reassignment or load_state_dict is "
                        "still followed. Create them outside inference_mode, or call refit(model) after such writes",
                        ", ".join(blind[:5]) + (f" and {len(blind) - 5} more" if len(blind) > 5 else ""))
        self._blind = blind
        if source is not None:
            _watched.update(source.modules())

    def _now(self) -> tuple[Any, ...]:
        ts = self._tensors
        if not ts:
            return ()
        first = ts[0]
        return _epoch[0], sum(map(_version, self._versioned)), first.data_ptr(), first.dtype, first.device

    def changed(self) -> bool:
        return self._now() != self._signature

    @property
    def alive(self) -> bool:
        return self._source() is not None

    def read(self, weights: Mapping[str, tuple[str, str, tuple[int, ...]]],
             device: torch.device | None = None) -> dict[str, torch.Tensor] | None:
        """The source's current weights for the engine (None if the source is gone), read between
        optimizer steps; the signature they were read at becomes the watch's."""
        with _steps:
            while _stepping[0]:
                _steps.wait()  # an optimizer step in another thread: never read it half-done
            self._resolve()
            source = self._source()
            if source is None:
                return None
            signature = self._now()
            state = {n: t for n, t in zip(self.names, self._tensors)}
            values = read_weights(weights, state, device)
            if device is not None and device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()  # copied before a step can start
            self._signature = signature
            return values

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
