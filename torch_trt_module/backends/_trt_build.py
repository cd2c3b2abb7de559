"""Building TensorRT (>= 10) and TensorRT-RTX engines from ONNX: one code path, every result checked.

Only the named-tensor API is used (the binding API was removed in 10.0). Every builder
call that reports failure through its return value (``add_optimization_profile`` gives
-1, ``set_compute_capability`` and ``set_timing_cache`` give False) is checked, and a
profile the builder calls inconsistent is an error, not a log line.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Sequence

from .._core.spec import TensorSpec
from .._errors import BuildError
from ._trt_loader import capture_log, import_tensorrt, logger, trt_log

__all__ = ["build_serialized", "builder_flags", "parse_onnx"]

log = logging.getLogger(__name__)

# Builder warnings that mean the profile cannot work at some of its shapes: the engine would
# fail (or be wrong) at run time inside the declared profile, so the build fails instead.
_INCONSISTENT = re.compile(r"not self-consistent|inconsistent (min|opt|max|profile)|kMIN values", re.IGNORECASE)


def builder_flags(backend: str, *, cuda_graphs: bool | str = False, refit: bool = False) -> list[str]:
    """The ``BuilderFlag`` names a build sets beyond the settings' own (precision, tf32, ...).

    The engine cache key includes this list, so an engine built with other flags is never
    served. ``REQUIRE_USER_ALLOCATION``: TensorRT-RTX contexts otherwise allocate while they
    run, which a CUDA graph cannot capture. Only ``cuda_graphs=True`` asks for it: "auto" (the
    default) leaves an RTX engine built without it uncaptured (backends.make_runner), so the
    default build is the one without graphs. ``REFIT``: the engine's weights can be replaced.
    """
    flags = []
    if backend == "tensorrt_rtx" and cuda_graphs is True:
        flags.append("REQUIRE_USER_ALLOCATION")
    if refit:
        flags.append("REFIT")
    return flags


class _Progress:
    """IProgressMonitor callbacks as a tqdm bar on a terminal, else INFO log lines; Ctrl-C cancels."""

    def __init__(self, enabled: bool | None) -> None:
        self.cancelled = False
        self.events = 0
        self._bars: dict[str, Any] = {}
        self._tqdm = None
        if enabled if enabled is not None else sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self._tqdm = tqdm
            except ImportError:
                pass

    def phase_start(self, phase: str, parent: str | None, steps: int) -> None:
        self.events += 1
        if self._tqdm is not None and parent is None:
            self._bars[phase] = self._tqdm(total=steps, desc=phase, leave=False)
        else:
            # Only top-level phases at INFO: nested ones would flood a log with ~100 lines a build.
            log.log(logging.INFO if parent is None else logging.DEBUG, "build phase %s started (%d steps)",
                    phase, steps)

    def step_complete(self, phase: str, step: int) -> bool:
        self.events += 1
        bar = self._bars.get(phase)
        if bar is not None:
            bar.update(1)
        return not self.cancelled

    def phase_finish(self, phase: str) -> None:
        self.events += 1
        bar = self._bars.pop(phase, None)
        if bar is not None:
            bar.close()
        else:
            log.debug("build phase %s finished", phase)


def _monitor(trt: Any, progress: _Progress) -> Any:
    class _Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            progress.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return progress.step_complete(phase_name, step)

        def phase_finish(self, phase_name: str) -> None:
            progress.phase_finish(phase_name)

    return _Monitor()


def parse_onnx(trt: Any, name: str, network: Any, onnx: bytes, *, warn: bool = True) -> Any:
    """Parse ``onnx`` into ``network`` with ``trt``'s ONNX parser; BuildError naming each node it refuses.
    ``warn``: log the parser's warnings at WARNING after a successful parse (a probe passes False)."""
    parser = trt.OnnxParser(network, logger(trt))
    with tempfile.TemporaryDirectory(prefix="torch_trt_module_") as tmp:
        path = os.path.join(tmp, "model.onnx")  # from a file: graphs over 2 GB parse too
        with open(path, "wb") as f:
            f.write(onnx)
        # The parser logs each refusal as ERROR lines (ModelImporter.cpp: While parsing node ...) before
        # it returns False; the BuildError below carries its errors, and the caller decides what the
        # refusal means (partition='auto' runs the graph elsewhere, with one WARNING). So they go to
        # DEBUG; a successful parse's warnings are logged as warnings after it.
        with capture_log(quiet=True) as said:
            parsed = parser.parse_from_file(path)
        if parsed and warn:
            for warning in said.warnings:
                trt_log.warning("%s", warning)
        if not parsed:
            errors = []
            for i in range(parser.num_errors):
                err = parser.get_error(i)
                errors.append(f"node {err.node()} ({err.node_name() or '?'}, op {err.node_operator() or '?'}): "
                              f"{err.desc()}")
            raise BuildError(f"{name}'s ONNX parser rejected the graph:\n  " + "\n  ".join(errors)
                             + "\nFix: replace the unsupported op in the model, or use backend='onnxruntime'.")
    return parser


def _targets(trt: Any, config: Any, targets: Sequence[str]) -> None:
    config.num_compute_capabilities = len(targets)
    for i, t in enumerate(targets):
        cc = getattr(trt.ComputeCapability, t.upper(), None)
        if cc is None:
            valid = [n.lower() for n in dir(trt.ComputeCapability) if n.startswith("SM")]
            raise BuildError(f"target {t!r} is not a TensorRT-RTX compute capability; expected one of {valid}")
        if not config.set_compute_capability(cc, i):
            raise BuildError(f"TensorRT-RTX refused target {t!r} (compute capability slot {i} of {len(targets)})")


def _timing_cache(config: Any, serialized: bytes | None) -> Any:
    """Attach a timing cache: the stored one, or a fresh one if TensorRT refuses it (another
    TensorRT version or GPU), so a refused cache is replaced rather than saved again unused."""
    cache = config.create_timing_cache(serialized or b"")
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    if serialized:
        log.warning("TensorRT refused the stored timing cache (made by another TensorRT version or GPU); "
                    "building with a fresh one, which replaces it")
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise BuildError("TensorRT could not attach an empty timing cache to the builder config")
    return cache


def build_serialized(
    onnx: bytes, inputs: Sequence[TensorSpec], *, backend: str | None = None, workspace: int | None = None,
    optimization_level: int | None = None, tf32: bool = True, targets: Sequence[str] | None = None,
    timing_cache: bytes | None = None, progress: bool | None = None, flags: Sequence[str] = (),
) -> tuple[bytes, dict[str, Any]]:
    """Parse ``onnx`` and build a serialized engine with one optimization profile.

    Returns the engine bytes and build facts (``timing_cache`` bytes on TensorRT,
    ``progress_events``, ``build_time_s``).
    """
    name, trt = import_tensorrt(backend)
    rtx = name == "tensorrt_rtx"
    with capture_log() as captured:
        builder = trt.Builder(logger(trt))
        network_flags = 0
        if not rtx and int(trt.__version__.split(".")[0]) < 11:
            network_flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(network_flags)
        parser = parse_onnx(trt, name, network, onnx)
        config = builder.create_builder_config()
        if workspace:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
        if optimization_level is not None:
            config.builder_optimization_level = int(optimization_level)
        if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
        for flag in flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        profile = builder.create_optimization_profile()
        for spec in inputs:
            if spec.min is not None and spec.opt is not None and spec.max is not None:
                profile.set_shape(spec.name, spec.min, spec.opt, spec.max)
        if config.add_optimization_profile(profile) < 0:
            raise BuildError(f"{name} rejected the optimization profile "
                             + ", ".join(f"{s.name}: {s.profile_str()}" for s in inputs) + f": {captured.said()}")
        if targets:
            if not rtx:
                raise BuildError("targets= (ahead-of-time compute capabilities) needs TensorRT-RTX; "
                                 "full TensorRT builds for the GPU it runs on")
            _targets(trt, config, targets)
        cache = None if rtx else _timing_cache(config, timing_cache)  # RTX raises on timing-cache calls
        mon = _Progress(progress)
        config.progress_monitor = _monitor(trt, mon)
        previous = None
        if threading.current_thread() is threading.main_thread():
            def _cancel(signum: int, frame: Any) -> None:
                mon.cancelled = True
            previous = signal.signal(signal.SIGINT, _cancel)
        t0 = time.perf_counter()
        try:
            plan = builder.build_serialized_network(network, config)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        elapsed = time.perf_counter() - t0
        del parser
    if mon.cancelled:
        raise KeyboardInterrupt("engine build cancelled")
    if plan is None:
        raise BuildError(f"{name} failed to build the engine: {captured.said()}")
    bad = [w for w in captured.warnings if _INCONSISTENT.search(w)]
    if bad:
        raise BuildError(f"{name} says the optimization profile is not consistent at some of its shapes, so the "
                         f"engine would fail inside the profile: {bad[0]}. The exported graph was specialised for "
                         "part of the range (an axis-less squeeze() or a size-dependent branch). Fix: narrow that "
                         "dim in dynamic= (or make it static), or remove the specialisation from the model")
    facts: dict[str, Any] = {"build_time_s": elapsed, "progress_events": mon.events}
    if cache is not None:
        facts["timing_cache"] = bytes(memoryview(cache.serialize()))
    return bytes(memoryview(plan)), facts
