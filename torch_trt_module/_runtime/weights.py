"""Weights that change: what the engine's weights are, knowing when the source module's changed,
and reading them for a refit.

**The map.** Export keeps every parameter and buffer of the model as an ONNX initializer of its
own, under its fully qualified name, holding exactly its values (the graph optimizer never folds
a weight into another constant: ``_exporters._optimize_keeping_weights``). The engine's metadata
records, for each such initializer, the source tensor's name, dtype and shape
(:attr:`ExportedModel.weights`); a tied tensor goes by its first name in ``state_dict`` order, and
its other names are kept (:attr:`ExportedModel.aliases`) so that a checkpoint holding it under any
of them refits. A refit then replaces weights by name on every runtime: ONNX Runtime (a new
session with the initializers overridden), TensorRT (``Refitter``) and the PyTorch program (its
weights). A graph from the TorchScript exporter, whose constants are folded, has no map: a change
there is a rebuild.

**Knowing when.** ``weights="follow"`` (the default) keeps a weak link to the source module and,
at every call, compares a signature of its weights with the one the engine was refit to:

- the sum of the tracked tensors' ``_version`` counters, which every in-place write through the
  tensor bumps (optimizer steps, ``copy_``, ``load_state_dict``, EMA updates) -- about 60 ns a tensor;
- the address of each tracked tensor's memory, which ``p.data = w``, ``model.double()`` and
  ``model.to(...)`` change without bumping a version -- about 70 ns a tensor;
- a counter of the watch's own, bumped by observer hooks that only count: parameter, buffer and
  submodule registration on a watched module (a reassigned ``nn.Parameter``), ``load_state_dict``,
  the end of an optimizer step over the tracked tensors (:mod:`torch_trt_module._runtime.steps`: fused optimizers write
  without bumping versions), and the death of a tracked tensor's old memory (a weak reference to
  its storage: after ``p.data = w`` frees it, a later tensor may get the same address).

An in-place write through ``p.data`` (``p.data.mul_(2)``) goes through a tensor with a version
counter of its own and leaves the memory where it was: nothing cheap sees it (docs/weights-and-refit.md,
"How a change is noticed", says so, with the fix). ``weights="exact"`` sees it: the watch also keeps
a copy of every tracked tensor and, where the signature says "unchanged", compares the tensors with
it bit for bit (:mod:`torch_trt_module._runtime.exact`). The hooks are installed once, when the first module follows
weights; they change nothing but counters. Reads never take another thread's optimizer step
half-done (:mod:`torch_trt_module._runtime.steps`).
"""

from __future__ import annotations

import functools
import logging
import operator
import threading
import weakref
from typing import Any, Callable, Collection, Mapping

import torch

from .._core.settings import WEIGHT_MODES
from .._errors import InputError
from . import steps as _steps
from .exact import ContentCheck

__all__ = ["WEIGHT_MODES", "WeightWatch", "given_weights", "read_weights", "weights_hash"]

log = logging.getLogger(__name__)

_version = operator.attrgetter("_version")
_data_ptr = torch.Tensor.data_ptr

# ---- registration observers (they only count) -----------------------------------------------
_hooks_installed = False
_install_lock = threading.Lock()
# every submodule of every source -> the watches over it
_watched: "weakref.WeakKeyDictionary[torch.nn.Module, weakref.WeakSet[WeightWatch]]" = weakref.WeakKeyDictionary()


def _registered(module: torch.nn.Module, *_: Any) -> None:
    watches = _watched.get(module)
    if watches:  # a reassigned parameter, buffer or submodule of a source
        for watch in list(watches):
            watch.bump()


def _bump_box(box: list[int], *_: Any, **__: Any) -> None:
    box[0] += 1


def _bumper(box: list[int]) -> Callable[..., None]:
    # A partial of a module-level function, not a closure: it sits in the source's
    # load_state_dict hooks, and the user's torch.save(model) pickles those.
    return functools.partial(_bump_box, box)


def _install_hooks() -> None:
    global _hooks_installed
    with _install_lock:
        if _hooks_installed:
            return
        from torch.nn.modules import module as nn_module

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


def given_weights(weights: Any) -> dict[str, torch.Tensor]:
    """``refit()``'s argument as ``{name: tensor}``: a ``state_dict``-like mapping, or a module (every
    parameter and buffer under every name, non-persistent buffers and tied names included)."""
    if isinstance(weights, torch.nn.Module):
        state = dict(weights.named_parameters(remove_duplicate=False))
        state.update(weights.named_buffers(remove_duplicate=False))
        return state
    if isinstance(weights, Mapping):
        return dict(weights)
    import os

    got = f"{type(weights).__name__} {weights!r}" if isinstance(weights, (str, os.PathLike)) else (
        "None" if weights is None else f"a {type(weights).__name__}")
    fix = (f"load it first: refit(torch.load({os.fspath(weights)!r}, weights_only=True))"
           if isinstance(weights, (str, os.PathLike)) else "pass model.state_dict(), torch.load(path, weights_only="
           "True), or the model itself")
    raise InputError(f"refit() takes a state_dict (a mapping of names to tensors) or an nn.Module of the same "
                     f"architecture; got {got}. Fix: {fix}")


def read_weights(weights: Mapping[str, tuple[str, str, tuple[int, ...]]], source: Mapping[str, torch.Tensor],
                 device: torch.device | None = None, *, optional: Collection[str] = (),
                 aliases: Mapping[str, Collection[str]] | None = None) -> dict[str, torch.Tensor]:
    """New values for the engine's weights (``{initializer: (source name, dtype, shape)}``) from the
    source tensors ``source`` (a ``state_dict``-like mapping), cast to each weight's dtype, as new
    contiguous tensors on ``device`` (default: where each source tensor is). A tied tensor may be
    given under any of its ``aliases`` (``{name: other names}``). Source names in ``optional`` may be
    missing (a checkpoint has no non-persistent buffers): those weights are left out of the
    result, and keep their values.

    Every name, shape and dtype is checked first: an InputError names the tensor, and nothing is
    read before all pass, so a refit is never half-applied.
    """
    problems = []
    picked: dict[str, torch.Tensor] = {}
    for onnx_name, (name, dtype, shape) in weights.items():
        t = source.get(name)
        for other in (aliases or {}).get(name, ()) if t is None else ():
            t = source.get(other)
            if t is not None:
                break
        if t is None:
            if name not in optional:
                problems.append(f"{name!r} is missing")
        elif not isinstance(t, torch.Tensor):
            problems.append(f"{name!r} is a {type(t).__name__}, not a tensor")
        elif tuple(t.shape) != tuple(shape):
            problems.append(f"{name!r} has shape {tuple(t.shape)}, the engine's weight has {tuple(shape)}")
        elif not (t.is_floating_point() or t.dtype == getattr(torch, dtype)):
            problems.append(f"{name!r} is {t.dtype}, the engine's weight is {dtype}")
        else:
            picked[onnx_name] = t
    if problems:
        raise InputError("cannot refit: " + "; ".join(problems[:8]) + (f" (and {len(problems) - 8} more)"
                         if len(problems) > 8 else "") + ". Fix: pass the weights of the same architecture, or "
                         "compile the new model")
    out = {}
    for onnx_name, t in picked.items():
        t = t.detach()
        out[onnx_name] = t.to(device=device or t.device, dtype=getattr(torch, weights[onnx_name][1]),
                              copy=True).contiguous()
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


def _always() -> bool:
    return True


class WeightWatch:
    """A weak link to the source module, and the signature of its tracked weights (see the module
    docstring). ``changed()`` is what every call of a following module pays: a closure made at each
    read, over what that read saw, so a call does no attribute lookups. ``exact``: the closure also
    compares the tensors' bytes with copies taken at that read, where the signature is unchanged."""

    changed: Callable[[], bool]

    def __init__(self, source: torch.nn.Module, names: list[str], *, exact: bool = False) -> None:
        _install_hooks()
        self.names = names
        self.exact = exact
        # exact: the copies the last read or mark took, by position in names (None: not compared);
        # what read() gives the engine, so the engine gets exactly what later calls compare with
        self._copies: list[torch.Tensor | None] = []
        self.tensor_ids: frozenset[int] = frozenset()
        self.changed = _always  # until the first read or mark
        self._bumps = [0]  # the hooks' counter (bump())
        self._source = weakref.ref(source, self._gone)
        self._tensors: list[torch.Tensor] = []
        self._versioned: list[torch.Tensor] = []  # those with a version counter
        self._addressed: list[torch.Tensor] = []  # those with memory of their own (not sparse)
        self._storages: list[weakref.ref[Any]] = []  # their memory: its death bumps the counter
        self._blind: list[str] = []  # the names of those without a version counter
        self._handles = [m.register_load_state_dict_post_hook(_bumper(self._bumps)) for m in source.modules()]
        for m in source.modules():
            _watched.setdefault(m, weakref.WeakSet()).add(self)
        self._resolve()
        _steps.install(self)

    def bump(self) -> None:
        """Something the signature cannot see may have changed the weights: read them at the next call."""
        self._bumps[0] += 1

    def _gone(self, _: Any) -> None:
        # The source is gone: nothing can change any more, and nothing is kept alive.
        self._tensors = self._versioned = self._addressed = []
        self._storages = []
        self._copies = []
        self.changed = _always  # the owner finds it dead, and drops it

    def _resolve(self) -> None:
        source = self._source()
        tensors = [] if source is None else [_resolve(source, n) for n in self.names]
        # Inference tensors (made under torch.inference_mode, as a buffer a forward creates lazily
        # there) have no version counter: reading it raises. They can only be written in place
        # inside inference_mode, which no signature sees; a reassignment is still seen.
        self._versioned = [t for t in tensors if not t.is_inference()]
        blind = [n for n, t in zip(self.names, tensors) if t.is_inference()]
        if blind and blind != self._blind and not self.exact:  # exact compares their bytes: followed
            log.warning("weights='follow' cannot see in-place writes made under torch.inference_mode to %s "
                        "(inference tensors have no version counter); a reassignment or load_state_dict is "
                        "still followed. Create them outside inference_mode, or call refit(model) after such writes",
                        ", ".join(blind[:5]) + (f" and {len(blind) - 5} more" if len(blind) > 5 else ""))
        self._blind = blind
        addressed, storages = [], []
        bump = _bumper(self._bumps)
        for t in tensors:
            try:
                storages.append(weakref.ref(t.untyped_storage(), bump))
                t.data_ptr()
            except (RuntimeError, NotImplementedError, TypeError):
                continue  # no memory of its own (sparse, or a subclass): followed by its version
            addressed.append(t)
        self._tensors, self._addressed, self._storages = tensors, addressed, storages
        ids = frozenset(map(id, tensors))
        if ids != self.tensor_ids:
            self.tensor_ids = ids
            _steps.watched_tensors_changed()
        if source is not None:
            for m in source.modules():
                _watched.setdefault(m, weakref.WeakSet()).add(self)

    def _signature(self) -> Callable[[], bool]:
        """A ``changed()`` that compares against the weights as they are now (exact: copies them now)."""
        box, versioned, addressed = self._bumps, self._versioned, self._addressed
        bumps, total, addresses = box[0], sum(map(_version, versioned)), [*map(_data_ptr, addressed)]
        self._copies = []
        if not self._tensors:  # the source is gone, or follows nothing
            return _always if self._source() is None else (lambda: box[0] != bumps)

        def changed() -> bool:
            return (box[0] != bumps or sum(map(_version, versioned)) != total
                    or [*map(_data_ptr, addressed)] != addresses)

        if not self.exact:
            return changed
        check = ContentCheck(self._tensors)
        self._copies = check.copies
        differs = check.differs

        def changed_exactly() -> bool:
            # The cheap signature first: after an optimizer step it answers, and no byte is read.
            return changed() or differs()

        return changed_exactly

    @property
    def alive(self) -> bool:
        return self._source() is not None

    def mark(self) -> None:
        """The engine has the source's weights as they are now (a new engine, or a rebuild)."""
        with _steps.quiet():
            self._resolve()
            self.changed = self._signature()

    def read(self, weights: Mapping[str, tuple[str, str, tuple[int, ...]]],
             device: torch.device | None = None, *, defer: bool = True) -> dict[str, torch.Tensor] | None:
        """The source's current weights for the engine, read between optimizer steps; the signature
        they were read at becomes the watch's. None if the source is gone, or (``defer``) if another
        thread is inside a step: the caller keeps its weights for now, and the next call reads
        (call :func:`_steps.wait_for_steps` first, holding no lock, to make that rare)."""
        with _steps.quiet() as whole:
            if defer and not whole:
                return None
            self._resolve()
            if self._source() is None:
                return None
            changed = self._signature()  # taken before reading: a write from now on shows at the next call
            # exact: the engine gets the copies the next calls compare with, so a write between the
            # copy and this read cannot leave the two apart unseen
            copies = self._copies or [None] * len(self._tensors)
            state = {n: t if c is None else c for n, t, c in zip(self.names, self._tensors, copies)}
            values = read_weights(weights, state, device)
            if device is not None and device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()  # copied before a step can start
            self.changed = changed  # only once read: a failed read is tried again at the next call
            return values

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
