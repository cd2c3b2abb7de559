"""Per-call time of the PyTorch runtime's Inductor program: a stored artifact against torch.compile.

Two modules of the same model in one process, ``runtime="torch", optimize="inductor"``: one calls
Inductor's stored artifact for its input signature (``backends/_inductor_store.py``, the default),
the other the same program through ``torch.compile`` (``_torch_opt.STORE_ARTIFACTS = False``, the
runtime before the artifacts), whose Dynamo guards check every weight argument at each call. Each
is timed through ``runner.run`` (the runtime's call, without TRTModule's), in interleaved rounds,
``plain`` (no CUDA graphs: on a GPU the host's launch cost is what is measured). Medians in µs.

    python benchmarks/bench_inductor_call.py --device cpu --model mlp
    python benchmarks/bench_inductor_call.py --device cuda --model mobilenet_v3_small --batch 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import _common  # noqa: F401 - the repository on sys.path
import torch


def _model(name: str) -> tuple[torch.nn.Module, Callable[[int], torch.Tensor]]:
    torch.manual_seed(0)
    if name == "mlp":
        mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        return mlp.eval(), lambda b: torch.randn(b, 8)
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    return net.eval(), lambda b: torch.randn(b, 3, 224, 224)


def main(argv: list[str] | None = None) -> int:
    import torch_trt_module as ttm
    from torch_trt_module.backends import _torch_opt

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model", default="mlp", help="mlp, or a torchvision model name (default mlp)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=2000, help="calls per variant per round")
    args = p.parse_args(argv)
    model, make = _model(args.model)
    model = model.to(args.device)
    x = make(args.batch).to(args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    runners: dict[str, Any] = {}
    for name, store in (("stored artifact", True), ("torch.compile", False)):
        _torch_opt.STORE_ARTIFACTS = store  # read at the runner's first call: made and called here
        fast = ttm.compile(model, x, cache=False, runtime="torch", optimize="inductor", cuda_graphs=False,
                           verify=False)
        with torch.inference_mode():
            fast.runner.run([x])
        runners[name] = fast.runner
    _torch_opt.STORE_ARTIFACTS = True
    samples: dict[str, list[float]] = {k: [] for k in runners}
    with torch.inference_mode():
        for r in runners.values():
            for _ in range(50):
                r.run([x])
        sync()
        for _ in range(args.rounds):
            for name, r in runners.items():
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    r.run([x])
                sync()
                samples[name].append((time.perf_counter() - t0) / args.calls * 1e6)
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"| {args.model}, batch {args.batch}, {args.device} | stored artifact | torch.compile | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| µs per call (median of {args.rounds} rounds of {args.calls}) | {med['stored artifact']:.1f} | "
          f"{med['torch.compile']:.1f} | {med['torch.compile'] / med['stored artifact']:.2f}x |")
    print(json.dumps({"args": vars(args), "torch": torch.__version__, "samples_us": samples}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
