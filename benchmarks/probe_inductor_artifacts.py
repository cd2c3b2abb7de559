"""Do Inductor's stored artifacts work with this torch? Compile, store, then load in a fresh process.

A conv-BN-Linear net, ``runtime="torch", optimize="inductor"``, called at batches 3, 5, 3, 7, 9
(two static artifacts, then torch.compile's dynamic shapes), in two fresh processes that share a
store and an Inductor cache: the first should compile and store 2, the second load 2 and compile
none; both within 1e-5 of eager. Once with the device's default tier (on a CPU: the Python
wrapper), once with the GPU's C++ wrapper tier. Needs no torchvision, so it runs under another
torch too (``/path/to/other/python benchmarks/probe_inductor_artifacts.py``).

    python benchmarks/probe_inductor_artifacts.py            # CPU
    python benchmarks/probe_inductor_artifacts.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, os, sys, torch
from pathlib import Path
import torch_trt_module as ttm
from torch_trt_module.backends import _inductor_store, _torch_opt
device, store, tier = sys.argv[1], sys.argv[2], sys.argv[3]
if tier == "cpp_wrapper":
    _torch_opt._TIERS[False] = _torch_opt._TIERS[True]
_inductor_store.store_dir = lambda: Path(store)
torch.manual_seed(0)

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.b, self.l = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.l(torch.relu(self.b(self.c(x))).mean((2, 3)))

m = Net().eval().to(device)
f = ttm.compile(m, torch.randn(2, 3, 8, 8, device=device), cache=False, runtime="torch", optimize="inductor",
                verify=False, cuda_graphs=False)
errs = []
for b in (3, 5, 3, 7, 9):
    x = torch.randn(b, 3, 8, 8, device=device)
    with torch.no_grad():
        errs.append(float((f(x) - m(x)).abs().max()))
print("RESULT " + json.dumps({**_inductor_store.STATS, "max_err": max(errs), "runtime": f.runner.optimized,
                              "torch": torch.__version__}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args(argv)
    repo = str(Path(__file__).resolve().parents[1])
    ok = True
    for tier in ("default", "cpp_wrapper"):
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{tmp}/inductor",
                       PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
            for run in ("first process", "second process"):
                r = subprocess.run([sys.executable, "-c", _CHILD, args.device, f"{tmp}/store", tier], env=env,
                                   capture_output=True, text=True, timeout=900)
                lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
                if r.returncode or not lines:
                    print(f"{tier}, {run}: rc {r.returncode}\n{r.stderr[-2000:]}")
                    ok = False
                    break
                res = json.loads(lines[-1][len("RESULT "):])
                want = (2, 0) if run == "first process" else (0, 2)
                good = (res["compiled"], res["loaded"]) == want and res["max_err"] < 1e-5
                ok &= good
                print(f"{tier}, {run}: {'ok' if good else 'UNEXPECTED'} {json.dumps(res)}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
