"""Compile time on a GPU: compile() of resnet50 against torch.compile's first call, each in a fresh
process, cold (empty caches) and warm (the caches the cold run filled), issue 21.

Each run is a new process: import, build resnet50 on the GPU, then time ``compile(model, x,
max_batch=128)`` (or ``torch.compile(model)``) and the first call at batch 2. Cold runs get an
empty engine cache and an empty ``TORCHINDUCTOR_CACHE_DIR``; warm runs reuse them. Goal: a warm
compile() plus first call <= 2 s.

    python benchmarks/bench_compile_gpu.py            # prints a markdown table and one JSON line
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
which, cache_dir = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = torchvision.models.resnet50(weights=None).eval().cuda()
x = torch.randn(2, 3, 224, 224, device="cuda")
torch.cuda.synchronize()
t0 = time.perf_counter()
fast = ttm.compile(model, x, max_batch=128, cache_dir=cache_dir) if which == "ttm" else torch.compile(model)
t1 = time.perf_counter()
with torch.inference_mode():
    fast(x)
    torch.cuda.synchronize()
t2 = time.perf_counter()
r = {"which": which, "import_s": round(t_import - t_start, 2), "compile_s": round(t1 - t0, 2),
     "first_call_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2)}
if which == "ttm":
    from torch_trt_module._pipeline import compile as _compile
    r.update(stats=dict(_compile.STATS), runner=fast.runner.optimized)
print("RESULT " + json.dumps(r))
"""


def run(which: str, cache_dir: str, inductor_dir: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=inductor_dir,
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _RUN, which, cache_dir], env=env, capture_output=True, text=True,
                         timeout=900)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        return {"which": which, "error": out.stderr[-1500:]}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for which in ("ttm", "tc"):
            cache, inductor = f"{tmp}/{which}-cache", f"{tmp}/{which}-inductor"
            for phase in ("cold", "warm"):
                rows.append({"phase": phase, **run(which, cache, inductor)})
    print("| | compile() | first call | total |\n| --- | --- | --- | --- |")
    for r in rows:
        name = f"{'ttm' if r['which'] == 'ttm' else 'torch.compile'}, {r['phase']}"
        print(f"| {name} | {r.get('compile_s', '-')} s | {r.get('first_call_s', '-')} s | {r.get('total_s', r.get('error'))} |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
