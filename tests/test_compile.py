"""compile() wiring that the other suites do not reach: RTX validity checks on cache hits."""

from __future__ import annotations

import logging

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module import _compile

pytest.importorskip("tensorrt_rtx")


def test_rtx_hit_that_this_gpu_rejects_is_evicted_and_rebuilt(monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture,
                                                                cache_dir: str) -> None:
    model = torch.nn.Linear(8, 4).eval()
    x = torch.randn(2, 8)
    first = ttm.compile(model, x, cache_dir=cache_dir)
    assert first.engine is not None and first.engine.backend == "tensorrt_rtx"
    builds = _compile.STATS["builds"]
    # Pretend a supported GPU is present and that RTX's get_engine_validity says INVALID:
    # no GPU here can run that check for real.
    import torch_trt_module.backends._trt_loader as trt_backend

    monkeypatch.setattr(_compile, "rtx_runs_on", lambda device: True)
    monkeypatch.setattr(trt_backend, "engine_validity", lambda plan, backend: "EngineValidity.INVALID (diagnostics 4)")
    with caplog.at_level(logging.WARNING, logger="torch_trt_module"):
        again = ttm.compile(model, x, cache_dir=cache_dir)
    assert _compile.STATS["builds"] == builds + 1
    assert "cannot load on this GPU: EngineValidity.INVALID" in caplog.text
    ttm.assert_parity(model, again, torch.randn(5, 8))


def test_rtx_hit_is_served_when_the_gpu_accepts_it(monkeypatch: pytest.MonkeyPatch, cache_dir: str) -> None:
    model = torch.nn.Linear(8, 4).eval()
    x = torch.randn(2, 8)
    ttm.compile(model, x, cache_dir=cache_dir)
    import torch_trt_module.backends._trt_loader as trt_backend

    monkeypatch.setattr(_compile, "rtx_runs_on", lambda device: True)
    monkeypatch.setattr(trt_backend, "engine_validity", lambda plan, backend: None)
    builds, hits = _compile.STATS["builds"], _compile.STATS["cache_hits"]
    ttm.compile(model, x, cache_dir=cache_dir)
    assert (_compile.STATS["builds"], _compile.STATS["cache_hits"]) == (builds, hits + 1)
