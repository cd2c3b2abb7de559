"""Shared fixtures: a per-test cache directory, seeded RNG, and the GPU markers."""

from __future__ import annotations

import os

import pytest
import torch


def _has_trt_runtime() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from torch_trt_module.backends import rtx_runs_on
        from torch_trt_module.backends._trt_loader import import_tensorrt

        name, _ = import_tensorrt()
        return name == "tensorrt" or rtx_runs_on("cuda")
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_trt = pytest.mark.skip(reason="needs a GPU with a TensorRT or TensorRT-RTX runtime that supports it")
    has_gpu = torch.cuda.is_available()
    has_trt = _has_trt_runtime()
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(no_gpu)
        if "trt_runtime" in item.keywords and not has_trt:
            item.add_marker(no_trt)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never touch the user's cache; each test gets a fresh one unless it passes cache_dir.
    monkeypatch.setenv("TORCH_TRT_MODULE_CACHE", str(tmp_path_factory.mktemp("cache")))
    torch.manual_seed(0)


@pytest.fixture
def cache_dir(tmp_path: "os.PathLike[str]") -> str:
    return os.fspath(tmp_path / "engines")


@pytest.fixture
def rtx_required() -> None:
    """Skips a test that needs TensorRT-RTX where it is not installed; fails it in CI (see _support.require_rtx)."""
    from ._support import require_rtx

    require_rtx()
