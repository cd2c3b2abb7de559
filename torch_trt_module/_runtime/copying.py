"""Copying and pickling compiled modules (issue 24), and the device conversions a parent's
``.to()``/``.cuda()``/``.cpu()`` reach them through (``_apply``).

``copy.deepcopy`` is how EMA and SWA helpers (``torch.optim.swa_utils.AveragedModel``, timm's
``ModelEmaV2``) and many trainers duplicate a model. A compiled module holds a runtime session, a
lock and a link to its source model, none of which pickle; deepcopy goes through pickling's
protocol unless a class says how to copy itself. So each compiled module class copies itself:

- the :class:`~torch_trt_module.Engine` is immutable, and is shared, not copied;
- the runtime session is made again for the copy (a TensorRT refit changes its engine in place, so
  two modules never share one);
- everything else goes through ``deepcopy`` with the caller's ``memo``, the **source model
  included**. deepcopy makes one copy per object, so a compiled child of a deep-copied parent
  follows the parent's copy of its source, never the original: ``AveragedModel(parent)`` averages
  weights into its copy, and the copied compiled child computes with those. A module copied on its
  own follows its own copy of its source.

A copy that follows a source reads that source's weights when its runtime is made (and a lazy copy
at its first build), so it is never stale, whatever the original had been refit to.

Pickling (``torch.save(module)``, ``pickle.dumps``) is refused with an error that names
``ttm.save``: a pickle of a session is not loadable, and ``ttm.save`` writes tensors and JSON only.

A lazy module's ``state_dict()`` before its first call (a training loop that checkpoints at step 0,
with a compiled child in the model) holds its settings instead of an engine. A lazy module of the
same model loads it and builds at its first call, from its source, whose weights the checkpoint
holds; a module that cannot build (``ttm.load``) refuses it with the fix.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import types
from typing import TYPE_CHECKING, Any

import torch

from .._build.engine import Engine
from .._build.engine import STATE_FORMAT as _STATE_FORMAT
from .._core.io import to_u8
from .._errors import EngineLoadError, TorchTRTError, UsageError

__all__ = ["Copies", "copy_module", "pickle_refusal"]

log = logging.getLogger("torch_trt_module._runtime.module")

# TRTModule state that is made again for a copy, never copied: the session and what is planned on it.
_REMADE = ("_lock", "_watch", "_runner", "_reference", "_fast")


def pickle_refusal(module: torch.nn.Module) -> UsageError:
    """The error a pickle of a compiled module (or of a model holding one) raises."""
    name = type(module).__name__
    return UsageError(
        f"a {name} cannot be pickled (torch.save(module), pickle.dumps): it holds a runtime session and a link to "
        f"its source model. Fix: save it with ttm.save(module, path) and read it with ttm.load(path), or save "
        "state_dict()s (a parent's state_dict() holds its compiled children's engines); copy.deepcopy works")


def copy_module(module: torch.nn.Module, memo: dict[int, Any], *, shared: tuple[str, ...] = ()) -> Any:
    """A deep copy of ``module`` whose ``__dict__`` entries named in ``shared`` are the same objects."""
    cls = type(module)
    new = cls.__new__(cls)
    memo[id(module)] = new
    for key, value in module.__dict__.items():
        new.__dict__[key] = value if key in shared else copy.deepcopy(value, memo)
    return new


class Copies:
    """The copying half of TRTModule (see the module docstring): a mixin over the module's own state."""

    if TYPE_CHECKING:  # TRTModule's
        engine: Any
        device: Any
        weights: str
        weights_version: int
        _current: dict[str, torch.Tensor] | None
        _lazy: Any
        _lazy_device: Any
        _max_rebuilds: int
        runtime: str
        cast_inputs: bool
        cuda_graphs: bool | str

        def _load(self, engine: Any, device: Any, *, refit_now: bool = False, moving: Any = None,
                  move: bool = False) -> None: ...

        def _apply_weights(self, values: dict[str, torch.Tensor]) -> None: ...

        def _weights_for_move(self) -> dict[str, torch.Tensor] | None: ...

    # ------------------------------------------------------------------ devices

    def to(self, *args: Any, **kwargs: Any) -> Any:
        device, _, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and self.engine is not None and torch.device(device) != self.device:
            # the weights it was refit to, not the engine's, and a change of the source no call applied yet
            self._load(self.engine, device, moving=self._weights_for_move(), move=True)
        if device is not None and self._lazy is not None:
            self._lazy_device = torch.device(device)
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # A parent's .to()/.cuda()/.cpu() reaches children through _apply, not through their .to():
        # follow the device the conversion moves a tensor of ours to.
        super()._apply(fn, recurse)  # type: ignore[misc]
        if self.device is not None or self._lazy is not None:
            probe = fn(torch.empty(0, device=self.device or "cpu"))
            if isinstance(probe, torch.Tensor) and probe.device != (self.device or torch.device("cpu")):
                self.to(probe.device)
        return self

    def cuda(self, device: int | torch.device | None = None) -> Any:  # type: ignore[override]
        return self.to(torch.device("cuda", device) if isinstance(device, int) else (device or "cuda"))

    def cpu(self) -> Any:  # type: ignore[override]
        return self.to("cpu")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise pickle_refusal(self)  # type: ignore[arg-type]

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        d = self.__dict__
        if self.engine is not None:
            memo.setdefault(id(self.engine), self.engine)  # immutable: shared
            memo.setdefault(id(d["_exported"]), d["_exported"])
        device = self.device
        state = {k: v for k, v in d.items() if k not in _REMADE}
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in state.items()})
        new.__dict__.update(_lock=threading.Lock(), _watch=None, _runner=None, _reference=None,
                            _fast=None if d.get("_fast") is None else {})
        source, new_source = d.get("_source"), new.__dict__.get("_source")
        if source is not None:
            # The copy follows a copy of the source: a rebuild (TorchScript) or a lazy build made from the
            # original model must read the copy's weights afterwards, or not happen.
            new.__dict__["_rebuild"] = None
            if new._lazy is not None:
                new._lazy = _refitting(new._lazy)
        if self.engine is not None:
            version = new.weights_version
            follow = new_source is not None and self.weights != "snapshot"
            current = new._current
            new._load(self.engine, device, refit_now=follow)  # a follower reads its source's weights now
            if current and not follow:
                new._apply_weights(current)  # the weights the original was refit to
            new.weights_version = version
        return new


    # ------------------------------------------------------------------ a lazy module's state

    def _lazy_state(self) -> dict[str, Any]:
        """What ``state_dict()`` holds for a module with no engine yet: a lazy module's settings."""
        if self._lazy is None:
            raise TorchTRTError("this TRTModule has no engine to save (it was made without one, and is not lazy); "
                                "load a state_dict into it or wrap an Engine first")
        return {"format": _STATE_FORMAT, "lazy": json.dumps(self._lazy_settings(), sort_keys=True)}

    def _lazy_settings(self) -> dict[str, Any]:
        return {"device": str(self._lazy_device), "max_rebuilds": self._max_rebuilds, "weights": self.weights,
                "runtime": self.runtime, "cast_inputs": self.cast_inputs, "cuda_graphs": self.cuda_graphs}

    def _load_lazy_state(self, state: dict[str, Any]) -> None:
        try:
            saved = json.loads(state["lazy"])
            assert isinstance(saved, dict)
        except (TypeError, ValueError, AssertionError) as e:
            raise EngineLoadError(f"malformed lazy TRTModule state ({type(e).__name__}: {e}); save the module "
                                  "again") from e
        said = ", ".join(f"{k}={v!r}" for k, v in sorted(saved.items()))
        if self._lazy is None:
            raise EngineLoadError(
                "this TRTModule state was saved before the module's first call (a lazy module), so it holds its "
                f"settings ({said}) and no engine. Fix: load it into a lazy module of the same model "
                "(ttm.compile(model) without example_inputs, as the saving code made it: it builds at its first call "
                "from its model's weights), or call the module once before saving it")
        # A lazy module builds from its own source at its first call (or keeps following it if it already
        # has): the source's weights come from the same state_dict, so there is nothing else to load.
        if saved != self._lazy_settings():
            log.info("loaded a lazy TRTModule state saved with other settings (%s); this module keeps its own (%s)",
                     said, ", ".join(f"{k}={v!r}" for k, v in sorted(self._lazy_settings().items())))

    # ------------------------------------------------------------------ state_dict (what save() writes)

    def get_extra_state(self) -> dict[str, Any]:
        if self.engine is None:
            return self._lazy_state()  # before its first call: its settings (_copying.Copies)
        engine = self.engine if not self._current else self.engine.with_weights(self._current)
        return {"format": _STATE_FORMAT, "engine": to_u8(engine.to_bytes())}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict) and "lazy" in state:
            return self._load_lazy_state(state)
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else "?"
            raise EngineLoadError(f"not a TRTModule state of format {_STATE_FORMAT} (format {found}); "
                                  "save the module again with this version")
        self._load(Engine.from_state(state), None)


def _refitting(build: Any) -> Any:
    """A lazy build whose engine is refit to the module's source before its first call: the build exports
    the original model, and the copy follows another one."""

    def refit_after(args: tuple[Any, ...], kwargs: dict[str, Any], module: Any) -> Any:
        got = build(args, kwargs, module)
        return types.SimpleNamespace(engine=got.engine, prepared=got.prepared, refit=True)

    return refit_after
