"""Shared fixtures: a per-test cache directory, seeded RNG, the GPU markers, and a real Redis server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
import torch

from harness.redis_server import RedisServer, redis_missing


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
    # Nor the artifacts of TorchInductor's programs (kept under Inductor's cache directory, shared by
    # every test otherwise): whether a test compiles or loads must not depend on the tests before it.
    from torch_trt_module.backends import _inductor_store

    artifacts = tmp_path_factory.mktemp("inductor-artifacts")
    monkeypatch.setattr(_inductor_store, "store_dir", lambda: artifacts)
    torch.manual_seed(0)


@pytest.fixture
def cache_dir(tmp_path: "os.PathLike[str]") -> str:
    return os.fspath(tmp_path / "engines")


@pytest.fixture
def rtx_required() -> None:
    """Skips a test that needs TensorRT-RTX where it is not installed; fails it in CI (see _support.require_rtx)."""
    from ._support import require_rtx

    require_rtx()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a loopback port for this test, stopped after it. Skips where none can be
    started (the reason says why); fails in CI, which installs it."""
    why = redis_missing()
    if why is not None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(f"CI installs redis-server and the redis client, but: {why}")
        pytest.skip(f"needs a real Redis server: {why}")
    server = RedisServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()
