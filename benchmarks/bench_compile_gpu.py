"""Compile time on a GPU: compile() of resnet50 against torch.compile's first call, each in a fresh
process, cold (empty caches) and warm (the caches the cold run filled), issue 21.

Each run is a new process: import, build resnet50 on the device, then time ``compile(model, x,
max_batch=128)`` (or ``torch.compile(model)``) and the first call at batch 2. Cold runs get an
empty engine cache and an empty ``TORCHINDUCTOR_CACHE_DIR``; warm runs reuse them. Goal: a warm
compile() plus first call <= 2 s.

Rows: ``ttm`` (the defaults: Inductor's stored artifacts, backends/_inductor_store.py),
``ttm-dynamo`` (``STORE_ARTIFACTS = False``: Inductor through torch.compile and its own caches,
as before the artifacts), ``ttm-nopch`` (``PRECOMPILED_HEADERS_ON_LOAD = False``: a stored
artifact is loaded without Inductor's precompiled-header step, an experiment) and ``torch.compile``. ``--device cpu`` times the same on a CPU, with
``runtime="torch", optimize="inductor"`` (on a CPU ``"auto"`` does not use Inductor).

    python benchmarks/bench_compile_gpu.py                 # prints a markdown table and one JSON line
    python benchmarks/bench_compile_gpu.py --device cpu --warm-runs 2
    python benchmarks/bench_compile_gpu.py --device cpu --gpu-tier --which ttm,ttm-dynamo
    python benchmarks/bench_compile_gpu.py --which ttm,tc --warm-runs 2 --profile   # where the warm run goes

``--profile`` runs each row's last warm process under cProfile and prints its costliest calls
(cumulative, then own time) after the table: the profile's overhead is in that row's figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_RUN = r"""
import json, sys, time
t_start = time.perf_counter()
import torch, torchvision
import torch_trt_module as ttm
t_import = time.perf_counter()
which, cache_dir, device, gpu_tier = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
from torch_trt_module.backends import _inductor_store, _torch_opt
_torch_opt.STORE_ARTIFACTS = which != "ttm-dynamo"
_inductor_store.PRECOMPILED_HEADERS_ON_LOAD = which != "ttm-nopch"
if gpu_tier:  # the GPU's Inductor options (C++ wrapper, no vector-ISA checks) on a CPU: its start-up costs
    _torch_opt._TIERS[False] = _torch_opt._TIERS[True]
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
torch.manual_seed(0)
model = torchvision.models.resnet50(weights=None).eval().to(device)
x = torch.randn(2, 3, 224, 224, device=device)
sync()
cpu = {} if device == "cuda" else {"runtime": "torch", "optimize": "inductor"}
t0 = time.perf_counter()
if which.startswith("ttm"):
    fast = ttm.compile(model, x, max_batch=128, cache_dir=cache_dir, **cpu)
else:
    fast = torch.compile(model)
t1 = time.perf_counter()
with torch.inference_mode():
    fast(x)
    sync()
t2 = time.perf_counter()
r = {"which": which, "import_s": round(t_import - t_start, 2), "compile_s": round(t1 - t0, 2),
     "first_call_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2)}
if which.startswith("ttm"):
    from torch_trt_module._pipeline import compile as _compile
    r.update(stats=dict(_compile.STATS), artifacts=dict(_inductor_store.STATS), runner=fast.runner.optimized)
print("RESULT " + json.dumps(r))
"""


def run(which: str, cache_dir: str, inductor_dir: str, device: str, gpu_tier: bool = False,
        profile: str | None = None) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=inductor_dir,
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    args = [which, cache_dir, device, "1" if gpu_tier else "0"]
    if profile:  # the same script from a file, so that cProfile can run it
        script = Path(profile).with_suffix(".py")
        script.write_text(_RUN)
        cmd = [sys.executable, "-m", "cProfile", "-o", profile, str(script), *args]
    else:
        cmd = [sys.executable, "-c", _RUN, *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        return {"which": which, "error": out.stderr[-1500:]}
    return json.loads(lines[-1][len("RESULT "):])


def _top_calls(path: str, n: int = 45) -> str:
    import io
    import pstats

    parts = []
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(path, stream=buf).sort_stats(key).print_stats(n)
        parts.append("\n".join(line[:200] for line in buf.getvalue().splitlines() if line.strip()))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--warm-runs", type=int, default=1, help="warm processes after each cold one (default 1)")
    p.add_argument("--which", default="ttm,ttm-dynamo,tc", help="rows, comma-separated (default: all three)")
    p.add_argument("--gpu-tier", action="store_true",
                   help="on a CPU, compile the ttm rows with the GPU's Inductor options (C++ wrapper, no vector-ISA "
                        "checks): the GPU's start-up path, with CPU kernels")
    p.add_argument("--profile", action="store_true", help="cProfile each row's last warm process; print its top calls")
    args = p.parse_args(argv)
    profiles: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for which in args.which.split(","):
            cache, inductor = f"{tmp}/{which}-cache", f"{tmp}/{which}-inductor"
            phases = ["cold"] + ["warm"] * args.warm_runs
            for i, phase in enumerate(phases):
                prof = f"{tmp}/{which}.prof" if args.profile and phase == "warm" and i == len(phases) - 1 else None
                rows.append({"phase": phase, **run(which, cache, inductor, args.device, args.gpu_tier, prof)})
                if prof and Path(prof).exists():
                    profiles[which] = _top_calls(prof)
    print("| | compile() | first call | total |\n| --- | --- | --- | --- |")
    for r in rows:
        name = f"{'torch.compile' if r['which'] == 'tc' else r['which']}, {r['phase']}"
        print(f"| {name} | {r.get('compile_s', '-')} s | {r.get('first_call_s', '-')} s | {r.get('total_s', r.get('error'))} |")
    print(json.dumps(rows))
    for which, text in profiles.items():
        print(f"\n## cProfile, {which}, last warm run\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
