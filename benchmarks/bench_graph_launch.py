"""What a CUDA graph's launch costs, by the kind of its nodes (issue 21).

A call timed alone (CUDA events, synced, as ``bench_latency.py`` times it) leaves the GPU idle
until ``cudaGraphLaunch`` returns on the host. ``profile_gpu_calls.py --timeline`` showed
mobilenet_v3_small's graphs starting their first kernel 180–300 µs (under the profiler) after the
input copy. This times graphs of ``--nodes`` nodes of one kind each, with no profiler:

- *launch*: the host time of ``CUDAGraph.replay()`` (median, each after a sync);
- *synced*: a replay timed alone between CUDA events, as a call is;
- *queued*: a replay's time when ``--queued`` replays run back to back (the GPU's own time);
- *lead*: synced minus queued, what the launch adds to a call timed alone.

``--pieces``: each chain is also captured as 2 or 4 graphs in one memory pool, launched in order,
so the GPU runs the first while the host launches the next: how much of the lead that removes.

The kinds: elementwise kernels; fp16 and fp32 GEMMs (cuBLAS); fp16 and fp32 1x1 convolutions,
channels_last (cuDNN), at mobilenet_v3_small's batch-32 sizes. The kernel names of each kind come
from ``torch.profiler`` (one replay), so a kind's launch cost can be tied to its kernels.

    python benchmarks/bench_graph_launch.py --nodes 116 --pieces 1,2,4

Prints a markdown table; nothing is written.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch


Step = Callable[[torch.Tensor], torch.Tensor]


def _kinds() -> dict[str, tuple[Step, torch.Tensor]]:
    """Each kind's one step and the tensor its chain starts from."""
    dev = "cuda"
    torch.manual_seed(0)
    x16 = torch.randn(32 * 28 * 28, 96, device=dev, dtype=torch.float16)
    w16 = torch.randn(96, 96, device=dev, dtype=torch.float16) / 10
    x32, w32 = x16.float(), w16.float()
    c16 = torch.randn(32, 96, 28, 28, device=dev, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    k16 = (torch.randn(96, 96, 1, 1, device=dev, dtype=torch.float16) / 10).contiguous(
        memory_format=torch.channels_last)
    c32, k32 = c16.float(), k16.float()
    conv = torch.nn.functional.conv2d
    return {
        "elementwise fp16": (lambda y: y * 1.0001, x16),
        "GEMM fp16 (mm)": (lambda y: torch.mm(y, w16), x16),
        "GEMM fp32 (mm)": (lambda y: torch.mm(y, w32), x32),
        "1x1 conv fp16 channels_last": (lambda y: conv(y, k16), c16),
        "1x1 conv fp32 channels_last": (lambda y: conv(y, k32), c32),
        "GEMM fp16 (mm), cuBLASLt preferred": (lambda y: torch.mm(y, w16), x16),
        "1x1 conv fp16 channels_last, cudnn.benchmark": (lambda y: conv(y, k16), c16),
        "GEMM fp16 + elementwise, alternating": (lambda y: torch.mm(y, w16) * 1.0001, x16),  # 2 nodes a step
    }


def _pieces(step: Step, start: torch.Tensor, nodes: int,
            pieces: int) -> tuple[list[torch.cuda.CUDAGraph], torch.Tensor]:
    """The chain of ``nodes`` steps captured as ``pieces`` graphs in one memory pool, each
    continuing from the last one's output (replayed in order, they run the chain), and the last
    graph's output (to keep alive beside them)."""
    per = [nodes // pieces + (i < nodes % pieces) for i in range(pieces)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = start
        for _ in range(nodes):  # warm-up: cuBLAS and cuDNN pick their kernels outside the capture
            y = step(y)
    torch.cuda.current_stream().wait_stream(s)
    pool = torch.cuda.graph_pool_handle()
    graphs, y = [], start
    for count in per:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            for _ in range(count):
                y = step(y)
        graphs.append(g)
    return graphs, y


def _kernels(g: torch.cuda.CUDAGraph) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.replay()
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages() if e.device_type.name == "CUDA"]
    return "; ".join(sorted({n.split("<")[0][:60] for n in names}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=116, help="steps in each chain (the alternating kind: 2 nodes a step)")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--queued", type=int, default=50)
    p.add_argument("--pieces", default="1,2,4", help="each chain captured as this many graphs, launched in order")
    args = p.parse_args()
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}; "
          f"chains of {args.nodes} steps\n")
    print("| kind | graphs | launch µs | synced µs | queued µs | lead µs | kernels |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.inference_mode():
        for name, (step, x) in _kinds().items():
            for pieces in (int(v) for v in args.pieces.split(",")):
                blas = torch.backends.cuda.preferred_blas_library()
                bench = torch.backends.cudnn.benchmark
                if "cuBLASLt preferred" in name:  # this benchmark's own process: set for the capture, restored after
                    torch.backends.cuda.preferred_blas_library("cublaslt")
                if "cudnn.benchmark" in name:
                    torch.backends.cudnn.benchmark = True
                try:
                    graphs, last = _pieces(step, x, args.nodes, pieces)
                finally:
                    torch.backends.cuda.preferred_blas_library(blas)
                    torch.backends.cudnn.benchmark = bench

                def replay() -> None:
                    for g in graphs:
                        g.replay()

                for _ in range(5):
                    replay()
                launch, synced = [], []
                for _ in range(args.calls):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    replay()
                    launch.append(time.perf_counter() - t0)
                    torch.cuda.synchronize()
                    start.record()
                    replay()
                    end.record()
                    end.synchronize()
                    synced.append(start.elapsed_time(end) * 1e-3)
                torch.cuda.synchronize()
                start.record()
                for _ in range(args.queued):
                    replay()
                end.record()
                end.synchronize()
                queued = start.elapsed_time(end) * 1e3 / args.queued
                lm, sm = statistics.median(launch) * 1e6, statistics.median(synced) * 1e6
                kernels = _kernels(graphs[0]) if pieces == 1 else ""
                print(f"| {name} | {pieces} | {lm:.1f} | {sm:.1f} | {queued:.1f} | {sm - queued:.1f} | {kernels} |",
                      flush=True)
                del graphs, last
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
