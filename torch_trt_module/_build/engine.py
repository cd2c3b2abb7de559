"""``Engine``: a built engine as bytes and JSON metadata, immutable, saved in the one container format.

An engine holds named blobs: ``plan`` (a TensorRT or TensorRT-RTX plan; absent for an ONNX
Runtime engine), ``onnx`` (the graph it came from: the accuracy reference and a runtime of
last resort) and ``program`` (torch.export's program of the same computation, when the
torch.export path made the graph: the PyTorch runtime's input). Its metadata holds the
tensor specs, the profiles, the call and output structure, the backend and its version,
and the GPU or targets it was built for.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Mapping

from .._core.io import atomic_write, from_u8, pack, unpack
from .._core.spec import ExportedModel
from .._errors import EngineLoadError
from .._formats.onnx import with_initializers
from .._formats.onnx_safety import check_engine_blobs
from .._formats.program import replace_weights

__all__ = ["ENGINE_FORMAT", "STATE_FORMAT", "STATE_SOURCE", "Deferred", "Engine"]

#: Bumped when the metadata changes meaning; engines of other formats are refused with a clear error.
ENGINE_FORMAT = 3
_KIND = "engine"
#: The format of a TRTModule's extra state (``state_dict()["_extra_state"]``): 3, one container (the
#: engine's bytes), checked by its own checksums.
STATE_FORMAT = 3
#: What a TRTModule's state is called where its file is not known (load() puts the path in its place).
STATE_SOURCE = "the saved module"


class Deferred:
    """A blob that is read (and checked) at its first use: its size now, its bytes from ``load``."""

    __slots__ = ("size", "load")

    def __init__(self, size: int, load: Callable[[], bytes | None]) -> None:
        self.size = size
        self.load = load


class Engine:
    """A built engine: ``plan`` (TensorRT/RTX bytes, or None for ONNX Runtime), the ONNX graph
    it came from, torch.export's ``program`` where there is one, and JSON-able metadata.

    Immutable. A blob served by the cache to a machine that does not need it now (a plan
    this GPU cannot run) is :class:`Deferred`: read, and checked against its checksum, at
    the first access of its property.

    Example:
        >>> engine = build_engine(export_onnx(model, x))      # doctest: +SKIP
        >>> engine.save("resnet18.ttm"); Engine.load("resnet18.ttm").backend  # doctest: +SKIP
        'tensorrt_rtx'
    """

    __slots__ = ("backend", "meta", "_blobs", "_deferred", "_lock")
    backend: str
    meta: dict[str, Any]

    def __init__(self, backend: str, plan: bytes | None, onnx: bytes, meta: dict[str, Any], *,
                 program: bytes | None = None, deferred: Mapping[str, Deferred] | None = None) -> None:
        blobs = {"onnx": onnx}
        if plan is not None:
            blobs["plan"] = plan
        if program is not None:
            blobs["program"] = program
        deferred = dict(deferred or {})
        if set(deferred) & set(blobs):
            raise ValueError(f"Engine takes each blob once, as bytes or deferred; got both for {set(deferred) & set(blobs)}")
        for name, value in (("backend", backend), ("meta", meta), ("_blobs", blobs), ("_deferred", deferred),
                            ("_lock", threading.Lock())):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Engine is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        # Blocked like __setattr__: a deleted slot would make the engine fail later, far from the del.
        raise AttributeError(f"Engine is immutable; cannot delete {name!r}")

    def _blob(self, name: str) -> bytes | None:
        if name in self._deferred:
            with self._lock:
                pending = self._deferred.get(name)
                if pending is not None:
                    data = pending.load()
                    if data is not None:
                        self._blobs[name] = data
                    del self._deferred[name]
        return self._blobs.get(name)

    @property
    def onnx(self) -> bytes:
        return self._blobs["onnx"]

    @property
    def plan(self) -> bytes | None:
        """The serialized TensorRT/TensorRT-RTX engine, or None for an ONNX Runtime engine."""
        return self._blob("plan")

    @property
    def program(self) -> bytes | None:
        """torch.export's program (``_program.load_program`` reads it), or None."""
        return self._blob("program")

    @property
    def has_plan(self) -> bool:
        """Whether there is a TensorRT/RTX plan (without reading one that is deferred)."""
        return "plan" in self._blobs or "plan" in self._deferred

    @property
    def has_program(self) -> bool:
        return "program" in self._blobs or "program" in self._deferred

    @property
    def exported(self) -> ExportedModel:
        """The export's specs and structure (without the program: see :attr:`program`)."""
        return ExportedModel.from_meta(self.onnx, self.meta["model"])

    def _size(self, name: str) -> int:
        if name in self._blobs:
            return len(self._blobs[name])
        return self._deferred[name].size if name in self._deferred else 0

    @property
    def size(self) -> int:
        return self._size("plan") + len(self.onnx) + self._size("program")

    def __repr__(self) -> str:
        m = self.meta
        where = m.get("targets") or (m.get("gpu") or {}).get("name") or "cpu"
        return (f"Engine(backend={self.backend} {m.get('backend_version', '?')}, precision="
                f"{m['model']['precision']}, plan={self._size('plan') / 1e6:.1f} MB, for={where})")

    def with_weights(self, values: Mapping[str, Any]) -> "Engine":
        """A new engine whose ONNX graph and PyTorch program hold these weights (by initializer name).
        The plan keeps the weights it was built with; its metadata says so, and a TensorRT runtime
        refits it from the graph's weights when it loads it."""

        program = self.program
        meta = {**self.meta, "plan_weights_stale": self.has_plan}
        deferred = {"plan": Deferred(self._size("plan"), lambda: self.plan)} if self.has_plan else None
        return Engine(self.backend, None, with_initializers(self.onnx, values), meta,
                      program=replace_weights(program, values) if program is not None else None, deferred=deferred)

    # ------------------------------------------------------------------ bytes and files

    def to_bytes(self) -> bytes:
        """The engine in the one checksummed container format (engine files and saved modules)."""
        blobs = {name: data for name in ("plan", "onnx", "program") if (data := self._blob(name)) is not None}
        return pack(_KIND, {"format": ENGINE_FORMAT, "backend": self.backend, "meta": self.meta}, blobs)

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "bytes") -> "Engine":
        """An engine from :meth:`to_bytes`'s bytes, every checksum verified first."""

        header, blobs = unpack(data, kind=_KIND, source=source, what="torch_trt_module engine file")
        check_engine_blobs(blobs, source=source)  # before any parser: no external files, no code in the program
        try:
            if header["format"] != ENGINE_FORMAT:
                raise EngineLoadError(f"{source}: engine format {header['format']} != {ENGINE_FORMAT}; build and save "
                                      "it again")
            engine = cls(header["backend"], blobs.get("plan"), blobs["onnx"], header["meta"],
                         program=blobs.get("program"))
            engine.exported  # parses the metadata: a malformed engine fails here, not in forward
            return engine
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise EngineLoadError(f"{source}: malformed engine ({type(e).__name__}: {e})") from e

    @classmethod
    def from_state(cls, state: Mapping[str, Any], *, source: str = STATE_SOURCE) -> "Engine":
        """The engine in a TRTModule's extra state (``state_dict()["_extra_state"]``), checksums verified."""
        try:
            data = from_u8(state["engine"])
        except (KeyError, TypeError, AttributeError, RuntimeError) as e:
            raise EngineLoadError(f"malformed TRTModule state in {source} ({type(e).__name__}: {e})") from e
        return cls.from_bytes(data, source=source)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the engine to one file (atomically)."""
        atomic_write(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Engine":
        """Read a file written by :meth:`save`, checking its checksums before use."""
        with open(path, "rb") as f:
            data = f.read()
        return cls.from_bytes(data, source=os.fspath(path))
