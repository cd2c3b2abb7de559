"""Where a call's time goes on a GPU (issue 21): wall time, host time, kernels and GPU busy time
per call, for eager, torch.compile and compile(), fp32 and fp16, side by side in one process.

Wall: ``--calls`` calls after 10 warm-up calls, then one sync (CUDA events would hide the host).
Host: the same calls before the sync. Where host ≈ wall and GPU busy is well below it, the call
is launch-bound: faster kernels cannot shorten it. Synced: the median of ``--calls`` calls each
timed alone between CUDA events, as bench_latency.py times them; synced minus GPU busy is what a
call costs beyond its kernels (the host's work before the first kernel, the gaps between kernels).
``torch.profiler`` gives the kernels and their GPU time (5 calls); ``--top N`` lists the N
costliest kernels at the largest batch, and ``--host-top N`` the N costliest host-side ops.

    python benchmarks/profile_gpu_calls.py --model mobilenet_v3_small --batch-sizes 32,8

Prints a markdown table; nothing is written. Figures are quoted in RESULTS.md ("GPU without
TensorRT").
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import pathlib
import statistics
import time
from typing import Any, Callable

import torch

from bench_latency import MODELS


def _timed(fn: Callable[[], Any], calls: int) -> tuple[float, float]:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e3, (time.perf_counter() - t0) / calls * 1e3


def _synced(fn: Callable[[], Any], calls: int) -> float:
    """The median of calls each timed alone between CUDA events, as bench_latency.py times them:
    what the host does before the GPU starts counts here, where ``_timed`` overlaps it."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _kernels(fn: Callable[[], Any], top: int) -> tuple[float, float, list[str]]:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    events.sort(key=lambda e: -e.self_device_time_total)
    lines = [f"{e.self_device_time_total / 5e3:.3f} ms x{e.count // 5} {e.key[:100]}" for e in events[:top]]
    return sum(e.count for e in events) / 5, sum(e.self_device_time_total for e in events) / 5e3, lines


def _host_ops(fn: Callable[[], Any], top: int) -> list[str]:
    """The ``top`` host-side ops of a call by their own CPU time (``torch.profiler``, 20 calls, each
    synced: a call as bench_latency.py times it)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            fn()
            torch.cuda.synchronize()
    events = sorted((e for e in prof.key_averages() if e.key != "cudaDeviceSynchronize"),
                    key=lambda e: -e.self_cpu_time_total)
    return [f"{e.self_cpu_time_total / 20:.1f} µs x{e.count // 20} {e.key[:80]}" for e in events[:top]]


def _timeline(fn: Callable[[], Any], calls: int = 20) -> tuple[dict[str, float], list[str]]:
    """Where one synced call's time goes on the GPU's timeline (``torch.profiler`` with CPU and CUDA
    activities, ``calls`` calls each synced): *lead*, from the call's entry on the host to its first
    kernel's start; *span*, first kernel's start to last kernel's end; *busy*, the kernels' own time
    in it; *gaps*, span minus busy; and, timed first with no profiler, the host time of the call's
``CUDAGraph.replay`` (the launch the GPU waits for). Medians over the calls; with the listing of the last call's
    device work in order (start offset, duration, gap before, name)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    replays: list[float] = []  # first, with no profiler: the host time of each CUDA graph launch
    replay = torch.cuda.CUDAGraph.replay

    def timed_replay(graph: torch.cuda.CUDAGraph) -> None:
        t0 = time.perf_counter()
        replay(graph)
        replays.append((time.perf_counter() - t0) * 1e6)

    torch.cuda.CUDAGraph.replay = timed_replay  # type: ignore[method-assign]
    try:
        for _ in range(calls * 5):
            fn()
            torch.cuda.synchronize()
    finally:
        torch.cuda.CUDAGraph.replay = replay  # type: ignore[method-assign]
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            with record_function("timed_call"):
                fn()
            torch.cuda.synchronize()
    events = prof.events()
    marks = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.name == "timed_call" and e.device_type.name == "CPU")
    device = sorted(((e.time_range.start, e.time_range.end, e.name) for e in events  # not the GPU's annotation
                     if e.device_type.name == "CUDA" and e.name != "timed_call"), key=lambda t: t[0])
    figures: dict[str, list[float]] = {"graph launch, no profiler": replays, "lead": [], "span": [], "busy": [],
                                       "gaps": [], "device ops": []}
    listing: list[str] = []
    for i, (begin, _) in enumerate(marks):
        stop = marks[i + 1][0] if i + 1 < len(marks) else float("inf")
        mine = [d for d in device if begin <= d[0] < stop]
        if not mine:
            continue
        busy = sum(d[1] - d[0] for d in mine)
        span = max(d[1] for d in mine) - mine[0][0]
        for key, value in (("lead", mine[0][0] - begin), ("span", span), ("busy", busy),
                           ("gaps", span - busy), ("device ops", len(mine))):
            figures[key].append(value)
        listing = []
        last = mine[0][0]
        for start, end, name in mine:
            listing.append(f"{start - mine[0][0]:8.1f} {end - start:7.1f} {start - last:6.1f} {name[:110]}")
            last = end
    return {k: statistics.median(v) for k, v in figures.items() if v}, listing


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobilenet_v3_small", choices=sorted(MODELS))
    p.add_argument("--batch-sizes", default="32,8")
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--rows", default="", help="only the rows whose label holds one of these, comma-separated, "
                                              "e.g. trtmodule")
    p.add_argument("--host-top", type=int, default=0,
                   help="also list each row's N costliest host-side ops per call (torch.profiler, CPU), at the "
                        "largest batch: where the host time of a call goes")
    p.add_argument("--dwconv-triton", metavar="DTYPES", default="",
                   help="backends._dwconv.DWCONV_TRITON for this process (an experiment), e.g. float16,float32")
    p.add_argument("--dwconv-tile", metavar="ELEMENTSxWARPS", default="", help="its tile, e.g. 2048x4")
    p.add_argument("--graph-inputs", choices=("caller", "runner"), default="caller",
                   help="backends._cudagraphs.STATIC_INPUT_LAYOUT for this process (an experiment)")
    p.add_argument("--pad-channels", choices=("on", "off"),
                   help="pad convolutions' few input channels where Inductor compiles for a GPU, or not "
                        "(backends._pad_channels.PAD_INPUT_CHANNELS; default: the library's, on)")
    p.add_argument("--timeline", metavar="DIR", default="",
                   help="also time each row's synced call on the GPU's timeline (lead, span, busy, gaps, µs) "
                        "at the largest batch, and write each row's device work in order to DIR")
    args = p.parse_args()
    import torch_trt_module as ttm

    if args.dwconv_triton:
        from torch_trt_module.backends import _dwconv

        _dwconv.DWCONV_TRITON = frozenset(args.dwconv_triton.split(","))
        if args.dwconv_tile:
            _dwconv.TILE, _dwconv.WARPS = (int(v) for v in args.dwconv_tile.split("x"))

    if args.pad_channels:
        from torch_trt_module.backends import _pad_channels

        _pad_channels.PAD_INPUT_CHANNELS = args.pad_channels == "on"
    if args.graph_inputs != "caller":
        from torch_trt_module.backends import _cudagraphs

        _cudagraphs.STATIC_INPUT_LAYOUT = args.graph_inputs
    factory, inputs = MODELS[args.model]
    torch.manual_seed(0)
    model = factory().eval().cuda()
    example = {k: v.cuda() for k, v in inputs(2).items()}
    half = copy.deepcopy(model).half().to(memory_format=torch.channels_last)

    def autocast() -> Any:
        return torch.autocast("cuda", torch.float16)

    def ours(**options: Any) -> Callable[[dict[str, torch.Tensor]], Any]:
        fast = ttm.compile(model, ((), example), dynamic={k: {0: (1, 8, 32)} for k in example}, **options)
        print(f"compile({options}): {fast.runner.optimized}")
        return lambda kw: fast(**kw)

    def under(ctx: Callable[[], Any], fn: Callable[..., Any]) -> Callable[[dict[str, torch.Tensor]], Any]:
        def call(kw: dict[str, torch.Tensor]) -> Any:
            with ctx():  # entered and left at every call: no state leaks into the next row
                return fn(**kw)
        return call

    compiled, compiled_half = torch.compile(model), torch.compile(half)
    rows: dict[str, Callable[[dict[str, torch.Tensor]], Any]] = {
        "eager fp32": under(contextlib.nullcontext, model),
        "eager autocast": under(autocast, model),
        "eager .half() channels_last": lambda kw: half(**{k: v.half().contiguous(memory_format=torch.channels_last)
                                                          for k, v in kw.items()}),
        "torch.compile fp32": under(contextlib.nullcontext, compiled),
        "torch.compile autocast": under(autocast, compiled),
        "torch.compile .half() channels_last": lambda kw: compiled_half(
            **{k: v.half().contiguous(memory_format=torch.channels_last) for k, v in kw.items()}),
        "trtmodule fp32": ours(),
        "trtmodule fp16": ours(precision="fp16", cast_inputs=True),
    }
    if args.rows:
        rows = {k: v for k, v in rows.items() if any(r in k for r in args.rows.split(","))}
    batches = [int(b) for b in args.batch_sizes.split(",")]
    with torch.inference_mode():
        for batch in batches:
            kw = {k: v.cuda() for k, v in inputs(batch).items()}
            print(f"\n**{args.model}, batch {batch}** (per call)\n")
            print("| | wall ms | host ms | synced ms | kernels | GPU busy ms |\n| --- | --- | --- | --- | --- | --- |")
            tops = []
            for label, fn in rows.items():
                host, wall = _timed(lambda: fn(kw), args.calls)
                synced = _synced(lambda: fn(kw), args.calls)
                n, busy, top = _kernels(lambda: fn(kw), args.top if batch == max(batches) else 0)
                print(f"| {label} | {wall:.3f} | {host:.3f} | {synced:.3f} | {n:.0f} | {busy:.3f} |")
                tops += [f"{label}: {line}" for line in top]
                if args.host_top and batch == max(batches):
                    tops += [f"{label}, host: {line}" for line in _host_ops(lambda: fn(kw), args.host_top)]
                if args.timeline and batch == max(batches):
                    figures, listing = _timeline(lambda: fn(kw))
                    tops.append(f"{label}, timeline µs: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))
                    folder = pathlib.Path(args.timeline)
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / f"{label.replace(' ', '_').replace('.', '')}-b{batch}.txt").write_text(
                        "   start     dur    gap name\n" + "\n".join(listing) + "\n")
            for line in tops:
                print(f"- {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
