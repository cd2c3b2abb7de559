"""Stage 2: an :class:`ExportedModel` -> an :class:`Engine` (serialized bytes + JSON metadata)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
import threading
from typing import Any, Callable, Sequence

import torch

from ._errors import BuildError, EngineLoadError
from ._export import ExportedModel
from ._settings import Settings, normalize_targets
from .backends import BackendChoice, backend_version, gpu_identity, select_backend

__all__ = ["ENGINE_FORMAT", "Engine", "build_engine"]

log = logging.getLogger(__name__)

ENGINE_FORMAT = 2  # 2: the header carries its own sha256
_MAGIC = b"TTMENG01"


class Engine:
    """A built engine: ``plan`` (TensorRT/RTX bytes, or None for ONNX Runtime), the ONNX
    graph it came from (the runtime of last resort and the accuracy reference), and
    JSON-able metadata (I/O specs, profiles, structure, backend and version, GPU or targets).

    Immutable. A plan served by the cache to a machine that cannot run it is read, and
    checked against its checksum, at the first access of :attr:`plan` (``plan_loader``).

    Example:
        >>> engine = build_engine(export_onnx(model, x))      # doctest: +SKIP
        >>> engine.save("resnet18.ttm"); Engine.load("resnet18.ttm").backend  # doctest: +SKIP
        'tensorrt_rtx'
    """

    __slots__ = ("backend", "onnx", "meta", "_plan", "_plan_loader", "_plan_size", "_timing_cache", "_lock",
                 "_runner")
    backend: str
    onnx: bytes
    meta: dict[str, Any]

    def __init__(self, backend: str, plan: bytes | None, onnx: bytes, meta: dict[str, Any], *,
                 plan_loader: Callable[[], bytes | None] | None = None, plan_size: int = 0) -> None:
        if plan is not None and plan_loader is not None:
            raise ValueError("Engine takes plan or plan_loader, not both")
        for name, value in (("backend", backend), ("onnx", onnx), ("meta", meta), ("_plan", plan),
                            ("_plan_loader", plan_loader), ("_plan_size", len(plan) if plan else plan_size),
                            ("_timing_cache", None), ("_lock", threading.Lock()), ("_runner", None)):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Engine is immutable; cannot set {name!r}")

    @property
    def plan(self) -> bytes | None:
        """The serialized TensorRT/TensorRT-RTX engine, or None for an ONNX Runtime engine."""
        if self._plan_loader is not None:
            with self._lock:
                if self._plan_loader is not None:
                    object.__setattr__(self, "_plan", self._plan_loader())
                    object.__setattr__(self, "_plan_loader", None)
        return self._plan

    def _offer_runner(self, runner: Any) -> None:
        """A runtime already made over this engine (by the cache, while it checked the entry)
        that the next TRTModule on the same device may adopt instead of making its own."""
        object.__setattr__(self, "_runner", runner)

    def _take_runner(self, device: torch.device, kind: type) -> Any:
        with self._lock:
            runner = self._runner
            if isinstance(runner, kind) and runner.device == device:
                object.__setattr__(self, "_runner", None)
                return runner
        return None

    @property
    def has_plan(self) -> bool:
        """Whether there is a TensorRT/RTX plan (without reading one that is deferred)."""
        return self._plan is not None or self._plan_loader is not None

    @property
    def exported(self) -> ExportedModel:
        return ExportedModel.from_meta(self.onnx, self.meta["model"])

    @property
    def size(self) -> int:
        return self._plan_size + len(self.onnx)

    def __repr__(self) -> str:
        m = self.meta
        where = m.get("targets") or (m.get("gpu") or {}).get("name") or "cpu"
        return (f"Engine(backend={self.backend} {m.get('backend_version', '?')}, precision="
                f"{m['model']['precision']}, plan={self._plan_size / 1e6:.1f} MB, for={where})")

    # A single-file container: magic, header length, JSON header (with sha256 of
    # each blob and of the header itself), then the blobs. No pickle, so loading a
    # file runs no code.
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the engine to one file (atomically)."""
        blobs = {"plan": self.plan or b"", "onnx": self.onnx}
        header: dict[str, Any] = {
            "format": ENGINE_FORMAT, "backend": self.backend, "meta": self.meta,
            "blobs": {k: {"size": len(v), "sha256": hashlib.sha256(v).hexdigest()} for k, v in blobs.items()}}
        header["header_sha256"] = _header_sha256(header)
        hdr = json.dumps(header, sort_keys=True).encode()
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(_MAGIC + struct.pack("<Q", len(hdr)) + hdr + blobs["plan"] + blobs["onnx"])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Engine":
        """Read a file written by :meth:`save`, checking its checksums before use."""
        with open(path, "rb") as f:
            data = f.read()
        return cls.from_bytes(data, source=os.fspath(path))

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "bytes") -> "Engine":
        if not data.startswith(_MAGIC) or len(data) < 16:
            raise EngineLoadError(f"{source} is not a torch_trt_module engine file (bad magic)")
        (n,) = struct.unpack("<Q", data[8:16])
        try:
            header = json.loads(data[16:16 + n])
        except ValueError as e:
            raise EngineLoadError(f"{source}: corrupt engine header") from e
        if not isinstance(header, dict) or header.get("format") != ENGINE_FORMAT:
            found = header.get("format") if isinstance(header, dict) else None
            raise EngineLoadError(f"{source}: engine format {found} != {ENGINE_FORMAT}; build and save it again")
        if header.pop("header_sha256", None) != _header_sha256(header):
            raise EngineLoadError(f"{source}: checksum mismatch in the header (corrupt file)")
        off = 16 + n
        blobs = {}
        try:
            for name in ("plan", "onnx"):
                info = header["blobs"][name]
                blob = data[off:off + info["size"]]
                off += info["size"]
                if len(blob) != info["size"] or hashlib.sha256(blob).hexdigest() != info["sha256"]:
                    raise EngineLoadError(f"{source}: checksum mismatch in the {name!r} blob (corrupt file)")
                blobs[name] = blob
            return cls(header["backend"], blobs["plan"] or None, blobs["onnx"], header["meta"])
        except (KeyError, TypeError, ValueError) as e:  # a header that checks out but lacks a field
            raise EngineLoadError(f"{source}: malformed engine header ({type(e).__name__}: {e})") from e


def _header_sha256(header: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()


def build_engine(
    exported: ExportedModel,
    *,
    backend: str = "auto",
    targets: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    workspace: int | None = None,
    optimization_level: int | None = None,
    tf32: bool = True,
    progress: bool | None = None,
) -> Engine:
    """Build an engine from an exported model.

    With TensorRT-RTX on a machine without a supported GPU this builds ahead of
    time for ``targets`` (default: RTX's portable set).

    Example:
        >>> exported = export_onnx(model, torch.randn(4, 3, 224, 224))   # doctest: +SKIP
        >>> build_engine(exported, backend="tensorrt_rtx", targets=["sm86", "sm89"])  # doctest: +SKIP
        Engine(backend=tensorrt_rtx 1.7.1.116, precision=fp32, plan=46.9 MB, for=['sm86', 'sm89'])
    """
    settings = Settings.from_options(backend=backend, targets=targets, workspace=workspace,
                                     optimization_level=optimization_level, tf32=tf32, progress=progress,
                                     precision=exported.precision)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    choice = select_backend(settings.backend, device, to_run=False)
    return build_with_choice(exported, settings, choice, torch.device(device))


def build_with_choice(exported: ExportedModel, settings: Settings, choice: BackendChoice,
                      device: torch.device, timing_cache: bytes | None = None) -> Engine:
    """Build with an already-made backend choice (what compile() calls)."""
    meta: dict[str, Any] = {
        "format": ENGINE_FORMAT,
        "model": exported.to_meta(),
        "backend": choice.build,
        "backend_version": backend_version(choice.build),
        "settings": settings.engine_fields(),
        "export_time_s": round(exported.export_time_s, 4),
        "created": time.time(),
        "torch_version": torch.__version__,
    }
    if choice.build == "onnxruntime":
        return Engine("onnxruntime", None, exported.onnx, meta)
    from .backends._trt_build import build_serialized, builder_flags

    targets = engine_targets(choice, settings)
    flags = builder_flags(choice.build, cuda_graphs=settings.cuda_graphs)
    meta["targets"] = list(targets) if targets else None
    meta["gpu"] = gpu_identity(device) if choice.build == "tensorrt" else None
    meta["builder_flags"] = flags
    t0 = time.perf_counter()
    try:
        plan, facts = build_serialized(
            exported.onnx, exported.inputs, backend=choice.build, workspace=settings.workspace,
            optimization_level=settings.optimization_level, tf32=settings.tf32, targets=targets,
            timing_cache=timing_cache, progress=settings.progress, flags=flags)
    except BuildError:
        raise
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - anything the native builder throws
        raise BuildError(f"{choice.build} build failed: {e}") from e
    meta["build_time_s"] = round(time.perf_counter() - t0, 4)
    meta["progress_events"] = facts.get("progress_events", 0)
    log.info("built a %s engine in %.2f s (%.1f MB)", choice.build, meta["build_time_s"], len(plan) / 1e6)
    engine = Engine(choice.build, plan, exported.onnx, meta)
    if "timing_cache" in facts:
        object.__setattr__(engine, "_timing_cache", facts["timing_cache"])  # compile() stores it in the cache
    return engine


def engine_targets(choice: BackendChoice, settings: Settings) -> tuple[str, ...] | None:
    """RTX targets: the user's, else None (RTX's portable default) — or the current GPU's when
    the engine runs here on a supported GPU."""
    if choice.build != "tensorrt_rtx":
        if settings.targets:
            raise BuildError("targets= needs backend='tensorrt_rtx'; TensorRT builds for the GPU it runs on")
        return None
    return normalize_targets(settings.targets) if settings.targets else None
