"""Where a CUDA graph's input copy should put an image: in the caller's layout (NCHW), or already in
the channels_last layout the convolutions run in (issue 21, mobilenet_v3_small at batch 32).

A graph runner copies the caller's tensor into its static input before each replay
(``backends/_cudagraphs.py``); that copy also casts an fp16 module's fp32 input. With a static
input in NCHW, the compiled program's first kernel then copies it to channels_last (Inductor's
``triton_poi_fused_convolution_0``, 29-34 µs at batch 32 on the H100). With a static input in
channels_last, the copy-in does the cast and the transposition in one kernel, and the program
starts at the convolution. This times both, one call at a time as ``bench_latency.py`` does
(CUDA events around the copy-in, the replay and the output's clone, synced), alternating, for
``.half()`` and fp32 ``torch.compile`` programs of the channels_last model, and the copy-in alone.

    python benchmarks/bench_input_layout.py --batch 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any, Callable

import torch


def _timed(fn: Callable[[], Any], n: int) -> float:
    """Median ms of ``n`` calls, each between CUDA events and synced (the GPU idle at its start)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _graphed(program: Callable[[torch.Tensor], torch.Tensor], static: torch.Tensor
             ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            program(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = program(static)
    return graph, out


def main(argv: list[str] | None = None) -> int:
    import torchvision

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--calls", type=int, default=300, help="timed calls per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224, device="cuda")  # the caller's fp32 NCHW image
    rows = []
    for dtype in (torch.float16, torch.float32):
        model = torchvision.models.mobilenet_v3_small().eval().cuda().to(dtype).to(memory_format=torch.channels_last)
        variants: dict[str, Callable[[], torch.Tensor]] = {}
        copies: dict[str, Callable[[], Any]] = {}
        with torch.inference_mode():
            for layout, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
                static = torch.empty(x.shape, dtype=dtype, device="cuda").contiguous(memory_format=fmt)
                program = torch.compile(model, dynamic=False)
                graph, out = _graphed(program, static)

                def call(static: torch.Tensor = static, graph: torch.cuda.CUDAGraph = graph,
                         out: torch.Tensor = out) -> torch.Tensor:
                    static.copy_(x)
                    graph.replay()
                    return out.clone()

                variants[layout], copies[layout] = call, (lambda static=static: static.copy_(x))
            want = variants["NCHW"]().float()
            got = variants["channels_last"]().float()
            err = float((got - want).abs().max() / want.abs().max())
            times: dict[str, list[float]] = {k: [] for k in [*variants, *(f"copy-in {k}" for k in copies)]}
            for _ in range(args.rounds):
                for layout in variants:
                    times[layout].append(_timed(variants[layout], args.calls))
                    times[f"copy-in {layout}"].append(_timed(copies[layout], args.calls))
        name = str(dtype).replace("torch.", "")
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((name, med, err))
        print(f"{name}: " + ", ".join(f"{k} {v * 1e3:.1f} us" for k, v in med.items()) + f"; max rel diff {err:.1e}",
              file=sys.stderr)
    print(f"mobilenet_v3_small at batch {args.batch}, {torch.cuda.get_device_name()}, torch {torch.__version__}; "
          f"median µs of {args.calls} synced calls, median of {args.rounds} rounds\n")
    print("| dtype | call, static NCHW | call, static channels_last | ratio | copy-in NCHW | copy-in channels_last |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, med, _ in rows:
        a, b = med["NCHW"], med["channels_last"]
        print(f"| {name} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / b:.3f}x | {med['copy-in NCHW'] * 1e3:.1f} | "
              f"{med['copy-in channels_last'] * 1e3:.1f} |")
    if len(rows) == 2:
        h, f = rows[0][1], rows[1][1]
        print(f"\nfp32 over fp16: static NCHW {f['NCHW'] / h['NCHW']:.3f}x, "
              f"static channels_last {f['channels_last'] / h['channels_last']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
