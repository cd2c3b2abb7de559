"""Quickstart: compile torchvision's resnet18, run it, and print backend, timings and parity.

    python examples/quickstart.py
"""

from __future__ import annotations

import logging
import time

import torch
import torchvision

import torch_trt_module as ttm


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    example = torch.randn(4, 3, 224, 224)

    t0 = time.perf_counter()
    fast = ttm.compile(model, example)  # dynamic batch 1..32, cached on disk
    compile_s = time.perf_counter() - t0
    engine = fast.engine
    assert engine is not None
    meta = engine.meta

    x = torch.randn(8, 3, 224, 224)
    with torch.inference_mode():
        fast(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(5):
            fast(x)
        run_ms = (time.perf_counter() - t0) / 5 * 1e3
        t0 = time.perf_counter()
        for _ in range(5):
            model(x)
        eager_ms = (time.perf_counter() - t0) / 5 * 1e3

    print(f"runs on:        {fast.backend} (device {fast.device})")
    print(f"engine:         {engine.backend} {meta.get('backend_version', '')}, "
          f"{len(engine.plan or b'') / 1e6:.1f} MB plan, for {meta.get('targets') or (meta.get('gpu') or {}).get('name') or ('RTX default targets' if engine.plan else 'any CPU')}")
    print(f"compile:        {compile_s:.2f} s (export {meta.get('export_time_s', 0):.2f} s, "
          f"build {meta.get('build_time_s', 0):.2f} s; a second run hits the cache)")
    print(f"latency b=8:    {run_ms:.1f} ms compiled vs {eager_ms:.1f} ms eager ({eager_ms / run_ms:.2f}x)")
    report = ttm.verify(model, fast, torch.randn(6, 3, 224, 224), rtol=1e-2, atol=1e-3, reference="both")
    print(report)
    report.raise_for_failure()


if __name__ == "__main__":
    main()
