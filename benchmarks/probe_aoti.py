"""Why does ``aoti_load_package`` segfault on the lent GPU (issue 21)? A probe, not a benchmark.

Compiles a one-layer Linear with AOTInductor, lists the package and the shared libraries its .so
needs, loads it in a fresh process, and where that crashes, reruns the load under ``cuda-gdb`` for a
native backtrace (the lent machines have cuda-gdb, not gdb). Prints everything; writes nothing.

    python benchmarks/probe_aoti.py            # cuda (the default)
    python benchmarks/probe_aoti.py cuda cpu   # also the CPU package: is it CUDA-specific?
"""
import os, subprocess, sys, zipfile, glob
COMPILE = r'''
import torch, faulthandler, sys; faulthandler.enable()
m = torch.nn.Linear(8, 8).to(sys.argv[2])
ep = torch.export.export(m, (torch.randn(2, 8, device=sys.argv[2]),))
p = torch._inductor.aoti_compile_and_package(ep, package_path=sys.argv[1])
print("packaged", p, flush=True)
'''
LOAD = r'''
import torch, faulthandler, sys; faulthandler.enable()
print("loading", flush=True)
r = torch._inductor.aoti_load_package(sys.argv[1])
print("loaded", flush=True)
print("result", r(torch.randn(2, 8, device=sys.argv[2])).sum().item(), flush=True)
'''
def run(cmd, t=240):
    print("$", " ".join(cmd)[:200], flush=True)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=t)
        print("rc", r.returncode, "\n", r.stdout[-3000:], "\n", r.stderr[-5000:], flush=True)
        return r.returncode
    except subprocess.TimeoutExpired as e:
        print("timeout", flush=True)
        return None
os.makedirs("/tmp/aoti", exist_ok=True)
open("/tmp/aoti/c.py", "w").write(COMPILE); open("/tmp/aoti/l.py", "w").write(LOAD)
run(["bash", "-c", "gcc --version | head -1; which gcc g++ c++; python3 -c 'import torch;print(torch.__version__, torch._C._GLIBCXX_USE_CXX11_ABI, torch.version.cuda)'; ldconfig -p | grep -c libstdc"])
for dev in (sys.argv[1:] or ["cuda"]):
    pkg = f"/tmp/aoti/lin-{dev}.pt2"
    run([sys.executable, "/tmp/aoti/c.py", pkg, dev])
    if not os.path.exists(pkg):
        continue
    with zipfile.ZipFile(pkg) as z:
        names = z.namelist(); print(names, flush=True); z.extractall(f"/tmp/aoti/x-{dev}")
    for so in glob.glob(f"/tmp/aoti/x-{dev}/**/*.so", recursive=True):
        run(["bash", "-c", f"ldd {so} | grep -i 'not found\\|torch\\|c10\\|cuda\\|stdc'; nm -D --undefined-only {so} | wc -l"])
    rc = run([sys.executable, "/tmp/aoti/l.py", pkg, dev])
    if rc not in (0, None):
        # No "info sharedlibrary": its list filled the kept tail of the output on the H100 (2026-12-07)
        # and pushed the backtrace out of it.
        run(["cuda-gdb", "--batch", "-ex", "set pagination off", "-ex", "run", "-ex", "bt 40",
             "--args", sys.executable, "/tmp/aoti/l.py", pkg, dev], t=300)
