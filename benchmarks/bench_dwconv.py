"""The depthwise convolutions of a model, one by one: cuDNN against our Triton kernel (issue 21).

For each depthwise convolution of ``--model`` at ``--batch`` (its input shape found by running the
model once), in fp32 and fp16, channels_last as the PyTorch runtime lays them out: the GPU time
of cuDNN's ``conv2d`` and of ``backends._dwconv.triton_depthwise`` at each ``--tiles`` setting
(elements per program x warps). Each is timed as ``--reps`` launches captured in one CUDA graph,
replayed ``--replays`` times between CUDA events, so that launch overhead is left out, and checked
against cuDNN's output first. Then the host time of one call of each, where no CUDA graph hides
it (the op is called through Python).

    python benchmarks/bench_dwconv.py --model mobilenet_v3_small --batch 32

Prints a markdown table per dtype and the totals; nothing is written. Figures are quoted in
RESULTS.md ("GPU without TensorRT").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench_latency import MODELS


def gpu_ms(fn: Callable[[], Any], reps: int, replays: int) -> float:
    """ms a call of ``fn``, GPU time alone: ``reps`` calls captured in one CUDA graph (after a warm-up
    on a side stream), the graph replayed ``replays`` times. bench_first_conv.py times with it too."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (replays * reps)


def _host_us(fn: Callable[[], Any], calls: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return host


def _layers(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[tuple[torch.nn.Conv2d, tuple[int, ...]]]:
    found: list[tuple[torch.nn.Conv2d, tuple[int, ...]]] = []

    def hook(mod: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        found.append((mod, tuple(args[0].shape)))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels]
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobilenet_v3_small", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tiles", default="2048x4,1024x4,4096x8,4096x4,1024x2,512x2",
                   help="elements per program x warps, comma-separated")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--json", help="also write the totals here (per dtype: cuDNN's and each tile's, in ms)")
    args = p.parse_args()
    from torch_trt_module.backends._dwconv import triton_depthwise

    factory, make_inputs = MODELS[args.model]
    torch.manual_seed(0)
    model = factory().eval().cuda()
    layers = _layers(model, {k: v.cuda() for k, v in make_inputs(args.batch).items()})
    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")]
    summary: dict[str, dict[str, float]] = {}
    print(f"{args.model}, batch {args.batch}: {len(layers)} depthwise convolutions; {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")
    for dtype in (torch.float32, torch.float16):
        print(f"\n**{str(dtype).split('.')[-1]}** (µs per convolution)\n")
        print("| layer | input | k, stride | cuDNN | " + " | ".join(f"triton {t}x{w}" for t, w in tiles) + " |")
        print("| --- | --- | --- | --- | " + " | ".join("---" for _ in tiles) + " |")
        totals = [0.0] * (len(tiles) + 1)
        for i, (conv, shape) in enumerate(layers):
            x = torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = conv.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last)
            b = torch.randn(w.shape[0], device="cuda", dtype=dtype)
            s, pad, d = list(conv.stride), list(conv.padding), list(conv.dilation)
            want = torch.nn.functional.conv2d(x, w, b, s, pad, d, conv.groups)
            groups = conv.groups
            row = [gpu_ms(lambda: torch.nn.functional.conv2d(x, w, b, s, pad, d, groups), args.reps, args.replays)]
            for tile, warps in tiles:
                got = triton_depthwise(x, w, b, s, pad, d, tile=tile, warps=warps)
                tol = 1e-2 if dtype == torch.float16 else 1e-3  # cuDNN runs fp32 convolutions in TF32
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)
                row.append(gpu_ms(lambda: triton_depthwise(x, w, b, s, pad, d, tile=tile, warps=warps),
                                   args.reps, args.replays))
            totals = [a + r for a, r in zip(totals, row)]
            print(f"| {i} | {'x'.join(map(str, shape))} | {w.shape[2]}, {s[0]} | "
                  + " | ".join(f"{1e3 * r:.1f}" for r in row) + " |")
        print("| **all** | | | " + " | ".join(f"**{1e3 * t:.1f}**" for t in totals) + " |")
        summary[str(dtype).split(".")[-1]] = dict(zip(["cudnn"] + [f"{t}x{n}" for t, n in tiles], totals))
    # What a call costs the host where no CUDA graph hides it: the op goes through Python.
    conv, shape = layers[-1]
    x = torch.randn(shape, device="cuda").contiguous(memory_format=torch.channels_last)
    w, s, pad = conv.weight.detach(), list(conv.stride), list(conv.padding)
    op = torch.ops.torch_trt_module.depthwise_conv2d
    for name, fn in (("cuDNN conv2d", lambda: torch.nn.functional.conv2d(x, w, None, s, pad, 1, conv.groups)),
                     ("torch.ops.torch_trt_module.depthwise_conv2d", lambda: op(x, w, None, s, pad, [1, 1]))):
        host = _host_us(fn)
        summary.setdefault("host_us", {})[name] = host
        print(f"host per call, {name}: {host:.1f} µs")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
