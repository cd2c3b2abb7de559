"""Stage 2: an :class:`ExportedModel` -> an :class:`Engine` (serialized bytes + JSON metadata).

TensorRT and TensorRT-RTX build through ``backends/_trt_build.py``; an ONNX Runtime engine is
the graph itself. The build facts that are not part of the engine (TensorRT's timing cache,
which compile() keeps in the cache) are returned beside it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import torch

from .._core.settings import Settings, normalize_targets
from .._core.spec import ExportedModel
from .._errors import BuildError
from ..backends import BackendChoice, backend_version, select_backend
from ..backends import _trt_build
from ..backends._trt_build import builder_flags
from .engine import ENGINE_FORMAT, Engine

__all__ = ["build_engine", "build_with_choice", "engine_flags", "engine_targets"]

log = logging.getLogger(__name__)


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
    return build_with_choice(exported, settings, choice, torch.device(device))[0]


def build_with_choice(exported: ExportedModel, settings: Settings, choice: BackendChoice,
                      device: torch.device, timing_cache: bytes | None = None) -> tuple[Engine, dict[str, Any]]:
    """Build with an already-made backend choice (what compile() calls): the engine, and the
    build facts kept elsewhere (``timing_cache``: TensorRT's, updated by this build)."""
    meta: dict[str, Any] = {
        "format": ENGINE_FORMAT,
        "model": exported.to_meta(),
        "backend": choice.build,
        "backend_version": backend_version(choice.build),
        "settings": settings.engine_fields(),
        "export_time_s": round(exported.export_time_s, 4),
        "created": time.time(),
        "device": torch.device(device).type,  # where the module was compiled: a saved one loads there again
        "torch_version": torch.__version__,
    }
    # Before the ONNX Runtime return: targets= that no backend here can honour is refused, never ignored.
    targets = engine_targets(choice, settings)
    if choice.build == "onnxruntime":
        return Engine("onnxruntime", None, exported.onnx, meta, program=exported.program), {}

    flags = engine_flags(choice, settings)
    meta["targets"] = list(targets) if targets else None
    meta["gpu"] = choice.gpu if choice.build == "tensorrt" else None
    meta["builder_flags"] = flags
    t0 = time.perf_counter()
    try:
        plan, facts = _trt_build.build_serialized(
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
    engine = Engine(choice.build, plan, exported.onnx, meta, program=exported.program)
    return engine, {k: v for k, v in facts.items() if k == "timing_cache"}


def engine_flags(choice: BackendChoice, settings: Settings) -> list[str]:
    """The builder flags of this build beyond precision (the cache key records them).

    ``weights="follow"`` builds refittable engines (``REFIT``), except TensorRT-RTX on a machine
    without a CUDA device: TensorRT-RTX 1.7 accepts the flag there, but every build that keeps a
    weight refittable then fails inside its code generator (``MyelinCheckException: graph_jit.cpp:
    CHECK(status == CUDA_SUCCESS)``, for REFIT, REFIT_IDENTICAL, STRIP_PLAN and marked
    REFIT_INDIVIDUAL weights alike; tests/runtime/test_refit.py pins it). Such an engine follows new
    weights on the next runtime of the chain (``EngineNotRefittable``), never stale.
    """

    refit = settings.follows_weights and (choice.build != "tensorrt_rtx" or torch.cuda.is_available())
    return builder_flags(choice.build, cuda_graphs=settings.cuda_graphs, refit=refit)


def engine_targets(choice: BackendChoice, settings: Settings) -> tuple[str, ...] | None:
    """RTX targets: the user's, else None (RTX's portable default) — or the current GPU's when
    the engine runs here on a supported GPU. Targets for any other backend raise BuildError."""
    if choice.build == "onnxruntime" and settings.targets:
        # An ONNX Runtime engine is the graph itself, so there is nothing to build for a GPU.
        raise BuildError(f"targets= needs backend='tensorrt_rtx'; got targets={list(settings.targets)} with "
                         "backend 'onnxruntime', which builds nothing ahead of time (its engine is the ONNX graph, "
                         "run on whatever device loads it). Drop targets=, or pass backend='tensorrt_rtx' "
                         "(pip install 'torch_trt_module[rtx]' if it is not installed)")
    if choice.build != "tensorrt_rtx":
        if settings.targets:
            raise BuildError("targets= needs backend='tensorrt_rtx'; TensorRT builds for the GPU it runs on")
        return None
    return normalize_targets(settings.targets) if settings.targets else None
