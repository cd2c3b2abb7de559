"""Time to the first correct inference for a fleet of workers compiling one model (issue 23).

Each scenario starts its workers at once as fresh processes (torch imported in each, an empty local
cache of its own) and takes the time from the start to the moment the last worker's compiled model
has matched eager on one input:

- ``single``: one worker, cold (the baseline);
- ``no shared cache``: 4 workers, each building;
- ``torch.distributed``: 4 ranks (gloo on loopback), one builds and broadcasts;
- ``redis cold``: 4 workers and an empty Redis server: one builds under the lease, the others wait and download;
- ``redis warm``: 4 workers, the Redis server already holding the entry.

It starts its own redis-server on a loopback port. ``python benchmarks/bench_fleet.py [--model resnet18]
[--results]`` (--results writes the "Fleet" section of RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import _common  # noqa: F401 - puts the repository on sys.path

WORKERS = 4


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _make(model_name: str) -> Any:
    import torch
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, model_name)().eval(), torch.randn(1, 3, 224, 224)


def _worker(rank: int, world: int, mode: str, root: str, model_name: str, url: str, port: int) -> None:
    import torch

    import torch_trt_module as ttm
    from torch_trt_module import _compile

    options: dict[str, Any] = {"cache_dir": f"{root}/cache{rank}", "process_group": False}
    if mode == "dist":
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=600))
        options.pop("process_group")
    if url:
        options["cache"] = url
    model, x = _make(model_name)
    begin = time.time()
    compiled = ttm.compile(model, x, **options)
    with torch.no_grad():
        ok = bool(torch.allclose(compiled(x), model(x), atol=1e-3, rtol=1e-3))
    done = time.time()
    Path(root, f"w{rank}.json").write_text(json.dumps({"done": done, "begin": begin, "ok": ok, "builds": _compile.STATS["builds"]}))
    if mode == "dist":
        dist.destroy_process_group()


def scenario(mode: str, workers: int, model_name: str, url: str = "") -> dict[str, Any]:
    import torch.multiprocessing as mp

    root = tempfile.mkdtemp(prefix="bench-fleet-")
    start = time.time()
    mp.spawn(_worker, args=(workers, mode, root, model_name, url, _port()), nprocs=workers, join=True)
    rows = [json.loads(Path(root, f"w{r}.json").read_text()) for r in range(workers)]
    shutil.rmtree(root, ignore_errors=True)
    assert all(r["ok"] for r in rows), f"{mode}: a worker's module does not match eager"
    return {"seconds": max(r["done"] for r in rows) - start, "builds": sum(r["builds"] for r in rows),
            "compile": max(r["done"] - r["begin"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision.models name")
    parser.add_argument("--results", action="store_true", help="write the Fleet section of benchmarks/RESULTS.md")
    args = parser.parse_args()
    info = _common.machine()
    port = _port()
    server = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        time.sleep(0.5)
        rows = {"single worker, cold": scenario("local", 1, args.model),
                "no shared cache": scenario("local", WORKERS, args.model),
                "torch.distributed broadcast": scenario("dist", WORKERS, args.model),
                "Redis, cold": scenario("local", WORKERS, args.model, url),
                "Redis, warm": scenario("local", WORKERS, args.model, url)}
    finally:
        server.terminate()
        server.wait(timeout=10)
    info["load_average_end"] = [round(v, 2) for v in __import__("os").getloadavg()]
    base = rows["single worker, cold"]["seconds"]
    lines = ["| scenario | workers | time to first correct inference | builds | vs one worker's cold compile "
             "| compile() to first inference (slowest worker) | vs one worker's |", "| --- | --- | --- | --- | --- | --- | --- |"]
    cbase = rows["single worker, cold"]["compile"]
    for name, r in rows.items():
        n = 1 if name.startswith("single") else WORKERS
        lines.append(f"| {name} | {n} | {r['seconds']:.1f} s | {r['builds']} | {r['seconds'] / base:.2f}x | "
                     f"{r['compile']:.1f} s | {r['compile'] / cbase:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.results:
        body = (f"Time from starting the workers (fresh processes: torch imported in each, an empty local cache "
                f"each) to the last worker's first inference that matched eager, {args.model}, default options "
                f"(TensorRT-RTX builds on this CPU, ONNX Runtime runs). Goal (issue 23): with a shared cache, 4 "
                f"workers <= 1.3x one worker's cold compile. The workers share the machine's cores, so the "
                f"imports of 4 processes compete for them; on a machine with a core set per worker the shared "
                f"cache scenarios approach one cold compile plus the transfer. The last two columns leave out "
                f"the import of torch and the package and the model's construction: the time from compile() to "
                f"the first inference.\n\n"
                f"    {_common.command_line('bench_fleet.py', sys.argv[1:])}\n\n"
                f"Measured {_common.machine_line(info)}.\n\n{table}\n")
        _common.write_section("Fleet (build once)", None, body)


if __name__ == "__main__":
    main()
