"""Engines in the cache: reading an entry back as an :class:`Engine` (and what it needs to run
here), and storing one.

An entry's blobs are the engine's: ``onnx``, ``engine`` (the plan) and ``program``, plus ONNX
Runtime's optimized copy of the graph for this CPU (see
``backends._onnxruntime.optimized_graph_name``). At a hit only what this machine needs now is
read: a plan no runtime here can run, or a program the PyTorch runtime will not run, stays
:class:`~torch_trt_module._build.engine.Deferred` until its first use (``state_dict``, ``save``,
``export_triton``). Where the module runs on ONNX Runtime the session is made from the graph's
bytes while their checksum is computed, and handed to the module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch

from .._build.engine import Deferred, Engine
from .._core.spec import ExportedModel
from .._errors import CacheError, EngineLoadError, TorchTRTError
from .._formats.onnx_safety import check_engine_blobs, check_self_contained
from .._formats.program import check_program
from ..backends import BackendChoice, Runner, make_runner, rtx_runs_on
from ..backends._onnxruntime import OnnxRuntimeRunner, optimized_graph_name
from ..backends import _trt_loader
from .cache import EngineCache

__all__ = ["read_entry", "store_entry"]

log = logging.getLogger(__name__)


Rebuild = Callable[[ExportedModel], Engine]


def read_entry(cache: EngineCache, key: str, device: torch.device, choice: BackendChoice,
               rebuild: Rebuild, *, session: bool = True) -> tuple[Engine, Runner | None] | None:
    """The engine stored under ``key`` and, where compile() will run it on ONNX Runtime, its session;
    None on a miss. An entry that cannot be used here is evicted (a rebuild replaces it).
    ``session=False``: make no ONNX Runtime session (the module makes one with other weights).
    ``rebuild`` builds the engine again from its export, for a deferred plan that fails its checksum."""
    runs_plan = choice.run in ("tensorrt", "tensorrt_rtx")
    defer = () if runs_plan else ("engine",)
    if choice.run != "torch":
        defer += ("program",)
    only = {"onnx", "engine", "program"}
    if choice.run == "onnxruntime" and device.type == "cpu" and session:
        # Read here, and checked while ONNX Runtime loads them (_onnx_and_session); ORT's
        # optimized copies made by other ORT versions or on other CPUs are left alone.
        mine = {n for n in (optimized_graph_name(half=False), optimized_graph_name(half=True)) if n}
        defer += ("onnx", *mine)
        only |= mine
    entry = cache.get(key, defer=defer, only=only)
    if entry is None:
        return None
    try:
        meta = entry.meta["engine_meta"]
        source = f"engine cache entry {key[:16]}"
        # Before any parser: no external files, no code. Of the PyTorch program, only what the runtime
        # reads (its compact graph, where stored; torch.export's JSON is checked if it is ever read):
        # checking the JSON took 0.15 s of a warm hit on resnet50.
        check_engine_blobs(entry.blobs, source=source, graph_only=True)
        onnx, session = entry.blobs.get("onnx"), None
        if "onnx" in entry.deferred:
            onnx, session = _onnx_and_session(entry.deferred, meta, device, source)
        deferred = {}
        if "engine" in entry.deferred:
            blob = entry.deferred["engine"]
            deferred["plan"] = Deferred(blob.size, _plan_loader(blob, cache, key, onnx, meta, rebuild))
        if "program" in entry.deferred:
            deferred["program"] = Deferred(entry.deferred["program"].size,
                                           _program_loader(entry.deferred["program"], cache, key))
        engine = Engine(entry.meta["backend"], entry.blobs.get("engine"), onnx, meta,
                        program=entry.blobs.get("program"), deferred=deferred)
        engine.exported  # parses the metadata: a malformed entry fails here, not in forward
        if engine.backend == "tensorrt_rtx" and rtx_runs_on(device) and engine.plan is not None:
            why = _trt_loader.engine_validity(engine.plan, backend="tensorrt_rtx")
            if why is not None:
                raise EngineLoadError(f"TensorRT-RTX says the engine cannot load on this GPU: {why}")
        if runs_plan:
            session = make_runner(engine, device, runtime=choice.run)[0]  # an engine that cannot load fails here
    except CacheError as e:  # a deferred blob failed its checksum; it evicted the entry
        log.warning("%s; rebuilding", e)
        return None
    except (KeyError, TypeError, ValueError, EngineLoadError) as e:
        log.warning("cache entry %s cannot be used (%s); evicting and rebuilding", key[:16], e)
        cache.evict(key)
        return None
    return engine, session


def store_entry(cache: EngineCache, key: str, engine: Engine, device: torch.device,
                choice: BackendChoice) -> Runner | None:
    """Store ``engine`` under ``key``; where the module runs on ONNX Runtime (CPU), also ONNX Runtime's
    optimized graph, made by the session returned for the module to use."""
    blobs = {"onnx": engine.onnx}
    if engine.plan is not None:
        blobs["engine"] = engine.plan
    if engine.program is not None:
        blobs["program"] = engine.program
    session = None
    if choice.run == "onnxruntime" and device.type == "cpu":
        session, optimized = _session_keeping_optimized(engine, device)
        blobs.update(optimized)
    cache.put(key, blobs, {"engine_meta": engine.meta, "backend": engine.backend})
    return session


def _onnx_and_session(deferred: dict[str, Any], meta: dict[str, Any], device: torch.device,
                      source: str) -> tuple[bytes, Any]:
    """Read the ONNX blob (and ONNX Runtime's optimized copy of it, if this machine has one),
    then make the session from those bytes while their sha256 is computed (both release the
    GIL). Only checked bytes are used: a mismatch raises CacheError and the session is dropped.
    The session is the bulk of a warm compile()."""

    ex = ExportedModel.from_meta(b"", meta["model"])
    half = ex.precision != "fp32"
    blob, opt_blob = deferred["onnx"], deferred.get(optimized_graph_name(half=half) or "")
    data = blob.read()
    opt = opt_blob.read() if opt_blob is not None else None
    # Checked before ONNX Runtime sees them, as every stored graph is (the checksums are checked
    # while the session is made, and a mismatch drops it).
    check_self_contained(data, source=source)
    if opt is not None:
        check_self_contained(opt, source=source, what="ONNX Runtime optimized graph")
    with ThreadPoolExecutor(1, thread_name_prefix="torch_trt_module-ort") as pool:
        made = pool.submit(OnnxRuntimeRunner, data, ex.inputs, ex.outputs, device, half=half, optimized=opt)
        try:
            blob.check(data)
            if opt_blob is not None:
                opt_blob.check(opt)
        finally:
            if not made.done():
                made.add_done_callback(lambda f: f.exception())  # a dropped session's error is not news
        try:
            runner = made.result()
        except Exception:  # noqa: BLE001 - TRTModule makes it again and reports the error there
            runner = None
    return data, runner


def _session_keeping_optimized(engine: Engine, device: torch.device) -> tuple[Runner | None, dict[str, bytes]]:
    """Make the module's ONNX Runtime session, keeping ORT's optimized copy of the graph for the cache
    entry (warm hits then load that copy, about twice as fast). Empty where no copy can be made."""

    ex = engine.exported
    half = ex.precision != "fp32"
    name = optimized_graph_name(half=half)
    if name is None:
        return None, {}
    with tempfile.TemporaryDirectory(prefix="torch_trt_module-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        try:
            runner = OnnxRuntimeRunner(engine.onnx, ex.inputs, ex.outputs, device, half=half, save_optimized=path)
            with open(path, "rb") as f:
                graph = f.read()
        except Exception as e:  # noqa: BLE001 - TRTModule makes the session again and reports any error
            log.debug("no optimized ONNX Runtime graph for the cache: %s", e)
            return None, {}
    return runner, {name: graph}


def _plan_loader(blob: Any, cache: EngineCache, key: str, onnx: bytes, meta: dict[str, Any],
                 rebuild: Rebuild) -> Callable[[], bytes | None]:
    """Read the deferred plan. If it fails its checksum then, build it again rather than fail
    the caller's save() or state_dict(): the entry was evicted, and the rebuild is stored anew."""

    def load() -> bytes | None:
        try:
            return blob()  # type: ignore[no-any-return]
        except TorchTRTError as e:
            log.warning("%s; building the engine again", e)  # the one WARNING for this fault
        engine = rebuild(ExportedModel.from_meta(onnx, meta["model"]))
        with contextlib.suppress(TorchTRTError, OSError), cache.lock(key):
            cache.put(key, {"onnx": engine.onnx, "engine": engine.plan or b""},
                      {"engine_meta": engine.meta, "backend": engine.backend})
        return engine.plan

    return load


def _program_loader(blob: Any, cache: EngineCache, key: str) -> Callable[[], bytes | None]:
    """Read the deferred PyTorch program. It cannot be rebuilt without the model: if it fails its
    checksum, or its check (:func:`~torch_trt_module._formats.program.check_program`), the engine goes on
    without it (the entry is evicted; the next compile() rebuilds it)."""

    def load() -> bytes | None:
        try:
            data: bytes = blob()
            # All of it, JSON included: read at save() or state_dict(), not at a hit, and what it
            # returns goes into saved files, which load() checks whole.
            check_program(data, source=f"engine cache entry {key[:16]}")
            return data
        except TorchTRTError as e:
            with contextlib.suppress(TorchTRTError):
                cache.evict(key)
            log.warning("%s; this engine has no PyTorch program until it is compiled again", e)
            return None

    return load
