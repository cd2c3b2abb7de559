"""One compiled module shared by threads (issue 6).

Here the module runs on ONNX Runtime (no GPU). The TensorRT adapter's one-context-per-thread
design is checked against its execution-context double in tests/test_tensorrt_adapter.py.
"""

from __future__ import annotations

import threading

import torch

import torch_trt_module as ttm
from torch_trt_module._pipeline import compile as _compile

from harness.faults import EXPORTER, TinyNet, example

from .._support import in_threads

THREADS, CALLS = 8, 500


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and got.dtype == want.dtype and torch.allclose(got, want, 1e-4, 1e-5)




def test_shared_module_8_threads_x_500_calls_each_equals_eager() -> None:
    model = TinyNet(0)
    module = ttm.compile(model, example(), exporter=EXPORTER)
    kept: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(THREADS)]
    errors: list[str] = []
    start = threading.Barrier(THREADS)

    def work(t: int) -> None:
        gen = torch.Generator().manual_seed(1000 + t)
        start.wait()  # all threads call at once
        try:
            for i in range(CALLS):
                x = torch.randn(1 + (t + i) % 8, 8, generator=gen)  # its own values and batch size
                with torch.inference_mode():
                    got = module(x)
                    want = model(x)
                if not close(got, want):
                    errors.append(f"thread {t} call {i}: max err {(got - want).abs().max():.3g}")
                kept[t].append((x, got))
        except Exception as e:  # noqa: BLE001 - reported below, with the thread
            errors.append(f"thread {t}: {e!r}")

    in_threads(work, THREADS, timeout=120)
    assert errors == []
    assert sum(len(k) for k in kept) == THREADS * CALLS
    # Checked again after every thread is done: no result was later overwritten by another call
    # (an output buffer shared between calls or threads would show up here).
    with torch.inference_mode():
        stale = sum(not close(got, model(x)) for k in kept for x, got in k)
    assert stale == 0
    assert len({got.data_ptr() for k in kept for _, got in k}) == THREADS * CALLS  # every result is its own tensor


def test_lazy_module_first_called_by_8_threads_builds_once() -> None:
    model = TinyNet(1)
    lazy = ttm.compile(model, None, exporter=EXPORTER)
    builds = _compile.STATS["builds"]
    errors: list[str] = []
    start = threading.Barrier(THREADS)

    def work(t: int) -> None:
        x = example(2 + t, seed=t)
        start.wait()
        try:
            with torch.inference_mode():
                if not close(lazy(x), model(x)):
                    errors.append(f"thread {t}: wrong result")
        except Exception as e:  # noqa: BLE001
            errors.append(f"thread {t}: {e!r}")

    in_threads(work, THREADS, timeout=120)
    assert errors == []
    assert _compile.STATS["builds"] == builds + 1
