"""Following the source module's weights: the part of :class:`~torch_trt_module.TRTModule` that
notices a change (through :class:`~torch_trt_module._runtime.weights.WeightWatch`) and refits the runner,
or warns (``weights="snapshot"``), or rebuilds (a TorchScript graph, whose weights are folded).
``weights="exact"`` is "follow" with a watch that also compares the weights' bytes at every call
(:mod:`torch_trt_module._runtime.exact`); everything else here treats the two alike.

A mixin, so that ``_module.py`` keeps the call path and this file the weights path; it works on
the module's own state (its runner, engine, lock and watch), set up by ``TRTModule._load``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping

import torch

from .._core.spec import ExportedModel
from .._errors import EngineNotRefittable, RuntimeFailure
from .._formats.onnx import initializer_values
from ..backends import make_runner
from .steps import wait_for_steps
from .weights import WeightWatch, given_weights, read_weights, weights_hash

__all__ = ["FollowsWeights"]

log = logging.getLogger("torch_trt_module._runtime.module")


class FollowsWeights:
    """The weights half of TRTModule (see the module docstring)."""

    # Set by TRTModule.__init__ and _load; declared here for the type checker.
    _watch: WeightWatch | None
    _current: dict[str, torch.Tensor] | None
    _warned_weights: bool
    _look_late: bool  # the fast call looks after its run (_look_first says when)
    _refitting = False  # a call's refit for a change of the source is under way (its signature already read)
    _on_cpu: bool
    weights: str
    weights_version: int
    _lock: Any
    _exported: ExportedModel
    _runner: Any
    _fast: dict[Any, Any] | None
    _rebuild: Any
    engine: Any
    runtime: str
    runtime_reason: str
    cuda_graphs: bool | str
    allow_host_code: bool
    if TYPE_CHECKING:  # TRTModule's, which this mixin calls
        backend: str
        device: torch.device

        def _require(self) -> ExportedModel: ...

        def _load(self, engine: Any, device: Any) -> None: ...

    def _watch_source(self, exported: ExportedModel) -> None:
        source = self.__dict__.get("_source")
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if source is None:
            return
        names = sorted({src for src, _, _ in exported.weights.values()})
        if not names:  # no map (a TorchScript graph): watch every tensor, to rebuild or to warn
            names = [n for n, _ in source.named_parameters()] + [n for n, _ in source.named_buffers()]
        if names:
            self._watch = WeightWatch(source, names, exact=self.weights == "exact")
            self._watch.mark()  # the engine has the source's weights as they are now
            if self.weights != "snapshot":
                _say_plain_tensors(source)

    def _look_first(self, watch: WeightWatch) -> None:
        """A call's look at the source's weights before its run: refit if they changed. A look that
        finds them unchanged lets the next fast calls on a GPU look after enqueuing their run
        (:meth:`_ran_stale`): the look reads every followed tensor's version and address, about
        0.18 µs a tensor (37.5 µs for mobilenet_v3_small's 210 on this project's CPU,
        benchmarks/bench_look.py), which would otherwise hold back the GPU's start of every call.
        Not in "exact" mode, whose look compares bytes on the device and waits for them, nor on
        the CPU, whose runs are not enqueued but done before the look could run. A refit for a
        change, under way in another thread, is waited for: no call runs on weights it replaces."""
        if watch.changed() or self._refitting:
            self._weights_changed()
        elif self.weights == "follow" and not self._on_cpu:
            self._look_late = True

    def _ran_stale(self, watch: WeightWatch, version: int) -> bool:
        """A fast call's look after enqueuing its run on the engine's weights (``weights_version``
        ``version`` when it took its planned call): whether the source's changed (then they are
        read and refit now, and the caller runs again), or another thread refit meanwhile or is
        refitting (the caller waits for it and runs again: its run may have read the weights that
        refit replaced, for a change made before this call began). The run only read the engine's
        own memory (a refit copies, :func:`read_weights`), so a stale run is wasted work, never a
        wrong answer. Calls look first again until a look finds nothing changed, so a loop that
        changes the weights before every call wastes no run."""
        if not (watch.changed() or self.weights_version != version or self._refitting):
            return False
        self._look_late = False
        self._weights_changed()
        return True

    def _weights_changed(self) -> None:
        """Called by a call that found the source's weights changed (follow, exact or snapshot mode)."""
        if self.weights != "snapshot":
            # Before taking the lock: a step's closure in another thread may be calling this module.
            wait_for_steps()
        with self._lock:
            watch = self._watch
            if watch is None or not watch.changed():
                return
            if not watch.alive:
                self._watch = None  # the source is gone: nothing can change any more
                return
            if self.weights == "snapshot":
                if not self._warned_weights:
                    self._warned_weights = True
                    log.warning("the source module's weights changed, and this module keeps the weights it was "
                                "compiled with (weights='snapshot'). Compile with weights='follow' to follow them, "
                                "or call refit(model)")
                self._watch = None  # warned once: stop paying for the check
                return
            ex = self._exported
            self._refitting = True  # from the read of the new signature until the runner has the weights
            try:
                if not ex.weights:
                    self._rebuild_for_weights(watch)
                    return
                values = watch.read(ex.weights)  # None: a step began in another thread; the next call reads
                if values is not None:
                    self._apply_weights(values)
            finally:
                self._refitting = False

    def _weights_for_move(self) -> dict[str, torch.Tensor] | None:
        """The weights a runner made on another device must have (``.to()``): those this module was refit
        to, with a change of the source that no call has applied yet (follow or exact mode) read now."""
        follows = self.weights != "snapshot"
        if follows:
            wait_for_steps()
        with self._lock:
            values = dict(self._current or {})
            watch, ex = self._watch, self._exported
            if follows and watch is not None and ex.weights and watch.alive and watch.changed():
                new = watch.read(ex.weights)
                if new is not None:
                    values.update(new)
                    self.weights_version += 1
            return values or None

    def _rebuild_for_weights(self, watch: WeightWatch) -> None:
        if self._rebuild is None:
            if not self._warned_weights:
                self._warned_weights = True
                log.warning("the source module's weights changed, but this engine's graph has its constants folded "
                            "(TorchScript export) and this module cannot rebuild itself: it keeps the old weights. "
                            "Compile again, with exporter='dynamo' to follow weights by refitting")
            self._watch = None
            return
        log.info("the source module's weights changed; this engine's graph has them folded (TorchScript "
                 "export), so it is rebuilt")
        watch.mark()
        engine = self._rebuild()
        self._load(engine, self.device)
        self.weights_version += 1

    def _apply_weights(self, values: dict[str, torch.Tensor]) -> None:
        refit = getattr(self._runner, "refit", None)
        if refit is None:
            raise RuntimeFailure(f"the {self.backend} runner cannot take new weights")
        try:
            self._runner = refit(values)
        except EngineNotRefittable:
            if self.runtime != "auto":
                raise
            # make_runner says why at WARNING and takes the next runtime in the chain, with every weight
            # this module was refit to so far
            assert self.engine is not None
            self._runner, self.runtime_reason = make_runner(
                self.engine, self.device, runtime=self.runtime, cuda_graphs=self.cuda_graphs,
                allow_host_code=self.allow_host_code, weights={**(self._current or {}), **values})
        self._current = {**(self._current or {}), **values}
        if self._fast is not None:
            self._fast = {}  # planned calls hold the old runner
        self.weights_version += 1

    def refit(self, weights: Mapping[str, torch.Tensor] | torch.nn.Module) -> None:
        """Replace the engine's weights with ``weights`` (a ``state_dict``, or a module of the same
        architecture), on whatever runtime runs this module, without exporting or building. A tied
        tensor may be given under any of its names.

        Every name, shape and dtype is checked before anything changes: a mismatch raises InputError
        naming the tensor, and nothing is half-applied. Anything else than a mapping or a module (a
        path to a checkpoint, None) raises InputError saying how to load it.

        Example:
            >>> fast = torch_trt_module.compile(model, x)              # doctest: +SKIP
            >>> fast.refit(torch.load("checkpoint.pt"))               # doctest: +SKIP
        """
        state = given_weights(weights)  # InputError for a path, None, ...
        ex = self._require()
        if not ex.weights:
            raise RuntimeFailure("this engine's graph has its constants folded (TorchScript export), so its weights "
                                 "cannot be replaced. Fix: compile with exporter='dynamo'")
        values = read_weights(ex.weights, state, optional=ex.unsaved, aliases=ex.aliases)
        with self._lock:
            self._apply_weights(values)

    @property
    def weight_names(self) -> list[str]:
        """The source module's parameters and buffers this engine holds as weights, by their
        ``state_dict`` names, a tied tensor by its first (what a refit replaces and what
        :meth:`weights_hash` covers)."""
        return sorted({src for src, _, _ in self._require().weights.values()})

    def weights_hash(self) -> str:
        """sha256 of the weights this module computes with (its engine's, or what it was refit to),
        keyed by the source's names: equal to ``weights_hash(model.state_dict())`` over
        :attr:`weight_names` when the module is current.

        Example:
            >>> from torch_trt_module._runtime.weights import weights_hash              # doctest: +SKIP
            >>> sd = model.state_dict()                                          # doctest: +SKIP
            >>> fast.weights_hash() == weights_hash({n: sd[n] for n in fast.weight_names})  # doctest: +SKIP
            True
        """
        return weights_hash(self.weight_values())

    def weight_values(self) -> dict[str, torch.Tensor]:
        """The weights this module computes with (its engine's, or what it was refit to), by the source's
        names (:attr:`weight_names`): what :meth:`weights_hash` hashes."""
        ex = self._require()
        assert self.engine is not None

        values = initializer_values(self.engine.onnx, set(ex.weights))
        values.update(self._current or {})
        return {ex.weights[k][0]: v for k, v in values.items()}


def _say_plain_tensors(source: torch.nn.Module) -> None:
    """Name the source's plain tensor attributes (not parameters or buffers) at INFO: the export bakes
    them into the engine as constants, so an in-place change to one is not followed."""
    plain = [f"{path}.{k}" if path else k for path, m in source.named_modules() for k, v in vars(m).items()
             if isinstance(v, torch.Tensor)]
    if plain:
        log.info("weights='follow' does not follow plain tensor attributes, which the engine holds as constants: %s. "
                 "Register them as buffers (module.register_buffer(name, tensor, persistent=False)) to follow them",
                 ", ".join(plain[:5]) + (f" and {len(plain) - 5} more" if len(plain) > 5 else ""))
