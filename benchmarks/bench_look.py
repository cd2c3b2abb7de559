"""Follow mode's look at the source's weights: the host time it puts before a call's run.

``weights="follow"`` (the default) reads every followed tensor's version counter and address at
each call (docs/weights-and-refit.md). On a GPU, anything the host does before enqueuing the run
leaves the GPU idle, and a benchmark that times one call at a time (CUDA events, synced, as
``bench_latency.py`` does) counts it. Since the ninth session the fast call on a GPU enqueues its
run first and looks after (``_runtime/following.py``); on the CPU it still looks first.

This times the host side only, on any machine: a compiled module over a TEST DOUBLE runner
(:class:`StampRunner`: it notes the time it is called and returns a ready output, so no
computation is timed) on the ``cpu`` device, where the call looks first, and on the ``meta``
device, which the module treats as it treats a GPU (the call looks late). Per call: the host time
from the call's entry to the runner's start (what delays a GPU's start) and to the call's return;
median ns over interleaved rounds. What this does NOT show: the GPU latency. That is
``bench_latency.py``'s, on the GPU (benchmarks/RESULTS.md, issue 21).

    python benchmarks/bench_look.py --models mobilenet_v3_small,resnet18
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from typing import Any, Sequence

import torch

from _common import command_line, machine, machine_line


class StampRunner:
    """TEST DOUBLE of a runner: on ``device``; notes when it is called, returns a ready output."""

    backend = "onnxruntime"

    def __init__(self, engine: Any, device: str, output: torch.Tensor) -> None:
        self.inputs, self.outputs = list(engine.exported.inputs), list(engine.exported.outputs)
        self.device = torch.device(device)
        self.output = output
        self.started = 0

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self.started = time.perf_counter_ns()
        return [self.output]


def _model(name: str) -> torch.nn.Module:
    import torchvision

    return getattr(torchvision.models, name)().eval()


def main(argv: list[str] | None = None) -> int:
    import torch_trt_module as ttm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mobilenet_v3_small,resnet18")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--calls", type=int, default=500, help="timed calls per variant per round")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    print(machine_line(machine()))
    print(f"`{command_line('bench_look.py', argv if argv is not None else sys.argv[1:])}`\n")
    print("| model | followed tensors | entry to run, looks first (cpu) | entry to run, looks late (meta) | "
          "whole call, looks first | whole call, looks late |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        model = _model(name)
        x = torch.randn(1, 3, 224, 224)
        engine = ttm.compile(model, x, backend="onnxruntime", cache=False, verify=False).engine
        out = torch.zeros(1, 1000)
        variants = {}
        for device in ("cpu", "meta"):
            runner = StampRunner(engine, device, out)
            module = ttm.TRTModule(engine, runner=runner, source=model)
            variants[device] = (module, runner, torch.empty(x.shape, device=device))
        samples: dict[str, dict[str, list[int]]] = {d: {"to run": [], "call": []} for d in variants}
        with torch.inference_mode():
            for module, _, xin in variants.values():
                for _ in range(3):
                    module(xin)  # the first looks first, then (meta) the fast call looks late
            clock = time.perf_counter_ns
            for _ in range(args.rounds):
                for device, (module, runner, xin) in variants.items():
                    for _ in range(args.calls):
                        t0 = clock()
                        module(xin)
                        t1 = clock()
                        samples[device]["to run"].append(runner.started - t0)
                        samples[device]["call"].append(t1 - t0)
        n = len(variants["cpu"][0].weight_names)
        med = {d: {k: statistics.median(v) / 1e3 for k, v in s.items()} for d, s in samples.items()}
        print(f"| {name} | {n} | {med['cpu']['to run']:.1f} µs | {med['meta']['to run']:.1f} µs | "
              f"{med['cpu']['call']:.1f} µs | {med['meta']['call']:.1f} µs |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
