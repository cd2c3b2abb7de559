"""Warm start of the GPU's C++ wrapper tier, reproduced on a CPU (issue 21): a cold process, then
two warm ones (engine and Inductor caches filled by the cold one), for each form of the tier.

torch 2.11 checks each vector ISA in fresh Python processes before it loads any cached C++
library, in every process; ``cpp.vec_isa_ok=False`` skips that (see backends/_torch_opt._TIERS).
The net is small (7 convolutions) so the checks, not the compile, show. Run it with the torch
whose behaviour you want to see; the figures in RESULTS.md came from torch 2.11's CUDA wheel
run on this project's CPU:

    python benchmarks/probe_isa_warm_start.py            # prints a markdown table
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_RUN = r"""
import sys, time
import torch
import torch_trt_module as ttm
from torch_trt_module.backends import _torch_opt
tier = sys.argv[2]
_torch_opt._TIERS[False] = ({"cpp_wrapper": True, **({} if tier == "plain" else {"cpp.vec_isa_ok": tier == "true"})},)
torch.manual_seed(0)
def block(c):
    return torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.BatchNorm2d(c), torch.nn.ReLU())
m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), *[block(16) for _ in range(6)], torch.nn.AdaptiveAvgPool2d(1),
                        torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
x = torch.randn(2, 3, 32, 32)
t0 = time.perf_counter()
f = ttm.compile(m, x, max_batch=8, cache_dir=sys.argv[1], runtime="torch", optimize="inductor")
t1 = time.perf_counter()
with torch.inference_mode():
    f(x)
print(f"RESULT {t1 - t0:.2f} {time.perf_counter() - t1:.2f}")
"""


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    root = str(Path(__file__).resolve().parents[1])
    print(f"torch {__import__('torch').__version__}\n\n| C++ wrapper tier | cold compile() | warm first calls |\n"
          "| --- | --- | --- |")
    for tier in ("plain", "true", "false"):
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{tmp}/inductor",
                       PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
            times = []
            for _ in range(3):
                out = subprocess.run([sys.executable, "-c", _RUN, f"{tmp}/cache", tier], env=env,
                                     capture_output=True, text=True, timeout=900)
                line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                times.append(line[-1].split()[1:] if line else ["failed", out.stderr[-300:]])
        label = {"plain": "`cpp_wrapper` alone", "true": "`cpp.vec_isa_ok=True`", "false": "`cpp.vec_isa_ok=False`"}
        print(f"| {label[tier]} | {times[0][0]} s | {times[1][1]} s, {times[2][1]} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
