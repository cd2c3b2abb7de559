"""The first convolution of an ImageNet CNN (3 input channels), as Inductor compiles it: as it is,
and with the input's channels zero-padded to 4 or 8 (what TensorRT does for its first layers, so
tensor-core kernels with aligned channels apply).

mobilenet_v3_small's input layout change and first convolution took 61 µs of its fp16 call's 465 µs
of GPU time at batch 32 on an H100 (benchmarks/RESULTS.md); this measures whether padding shortens
them, before any pass does it. Each variant takes the caller's fp32 NCHW batch, casts it, runs the
convolution (weights channels_last, as the runtime keeps them) and hardswish, timed as GPU time
alone (calls replayed from a CUDA graph, as the runtime replays its call).

    python benchmarks/bench_first_conv.py --batch 32
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_dwconv import gpu_ms  # GPU time alone: calls replayed from one CUDA graph

#: Calls captured in each timed CUDA graph.
LAUNCHES = 20


def _variant(weight: torch.Tensor, bias: torch.Tensor, pad: int, dtype: torch.dtype):
    if pad:
        weight = F.pad(weight, (0, 0, 0, 0, 0, pad))  # zero input channels: the same sums
    weight = weight.to(dtype).contiguous(memory_format=torch.channels_last)
    bias = bias.to(dtype)

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype)
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
        return F.hardswish(F.conv2d(x, weight, bias, stride=2, padding=1))

    return torch.compile(fn, dynamic=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224, device="cuda")
    weight, bias = torch.randn(16, 3, 3, 3, device="cuda") * 0.2, torch.randn(16, device="cuda") * 0.1
    print(f"| dtype | channels | µs a call (batch {args.batch}) | max abs diff vs 3 channels |")
    print("| --- | --- | --- | --- |")
    for dtype in (torch.float32, torch.float16):
        base = None
        for pad in (0, 1, 5):
            fn = _variant(weight, bias, pad, dtype)
            out = fn(x)
            base = out if base is None else base
            diff = (out.float() - base.float()).abs().max().item()
            us = gpu_ms(lambda: fn(x), LAUNCHES, args.iters) * 1e3
            print(f"| {str(dtype).replace('torch.', '')} | {3 + pad} | {us:.1f} | {diff:.3g} |",
                  flush=True)


if __name__ == "__main__":
    main()
