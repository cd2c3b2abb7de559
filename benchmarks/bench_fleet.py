"""Time to the first correct inference for a fleet of workers compiling one model (issue 23).

Each scenario starts its workers at once as fresh processes (torch imported in each, an empty local
cache of its own) and takes the time from the start to the moment the last worker's compiled model
has matched eager on one input:

- ``single``: one worker, cold (the baseline);
- ``no shared cache``: 4 workers, each building;
- ``torch.distributed``: 4 ranks (gloo on loopback), one builds and broadcasts;
- ``redis cold``: 4 workers and an empty Redis server: one builds under the lease, the others wait and download;
- ``redis warm``: 4 workers, the Redis server already holding the entry.

It starts its own redis-server on a loopback port (``harness.redis_server``). ``--repeat N`` runs the
five scenarios N times in turn (the Redis store emptied before each cold run) and reports each one's
median, with the range: on a machine shared with other jobs one run is noisy. ``--phases`` also
prints where each worker of the Redis cold scenario spent its time (lease wait, export, build, store,
download, unpack, local store and session), timed by wrapping those steps in the workers.

    python benchmarks/bench_fleet.py [--model resnet18] [--repeat 3] [--phases] [--results] [--note TEXT]

``--results`` writes the "Fleet (build once)" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import _common  # noqa: F401 - puts the repository on sys.path

WORKERS = 4
SCENARIOS = ("single worker, cold", "no shared cache", "torch.distributed broadcast", "Redis, cold", "Redis, warm")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _make(model_name: str) -> Any:
    import torch
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, model_name)().eval(), torch.randn(1, 3, 224, 224)


def _time_phases(phases: list[tuple[str, float, float]], t0: float) -> None:
    """Record (step, start, end) of the pipeline's steps in this worker, seconds since ``t0``."""
    from torch_trt_module._pipeline import compile as _compile
    from torch_trt_module._cache import entries as _entries
    from torch_trt_module._cache import remote as _remote
    from torch_trt_module._cache import store as _store

    def wrap(owner: Any, name: str, label: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.time() - t0
            try:
                return fn(*args, **kwargs)
            finally:
                phases.append((label, start, time.time() - t0))

        setattr(owner, name, timed)

    for owner, name, label in ((_compile, "_export", "export"), (_compile, "_build", "build"),
                               (_entries, "store_entry", "store (local + upload)"),
                               (_entries, "read_entry", "read entry (download, unpack, local store, session)"),
                               (_store, "unpack_entry", "unpack + verify"),
                               (_remote.RedisStore, "get", "redis GET (an index record, then the entry)")):
        wrap(owner, name, label)
    lease = _remote.RedisStore.lease

    @contextlib.contextmanager
    def timed_lease(self: Any, name: str, *, done: Any) -> Iterator[Any]:
        start = time.time() - t0
        with lease(self, name, done=done) as got:
            what = ("lease: taken after a wait" if got.waited_s > 0 else "lease: taken") if got.held else \
                "lease: waited for the build"
            phases.append((what, start, time.time() - t0))
            yield got

    _remote.RedisStore.lease = timed_lease  # type: ignore[method-assign]


def _worker(rank: int, world: int, mode: str, root: str, model_name: str, url: str, port: int, t0: float,
            phases_on: bool) -> None:
    import torch

    import torch_trt_module as ttm
    from torch_trt_module._pipeline import compile as _compile

    phases: list[tuple[str, float, float]] = [("start the process, import torch and the package", 0.0,
                                                  time.time() - t0)]
    if phases_on:
        _time_phases(phases, t0)
    options: dict[str, Any] = {"cache_dir": f"{root}/cache{rank}", "process_group": False}
    if mode == "dist":
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=600))
        options.pop("process_group")
    if url:
        options["cache"] = url
    made = time.time()
    model, x = _make(model_name)
    begin = time.time()
    phases.append(("import torchvision, make the model", made - t0, begin - t0))
    compiled = ttm.compile(model, x, **options)
    compiled_at = time.time()
    phases.append(("compile()", begin - t0, compiled_at - t0))
    with torch.no_grad():
        ok = bool(torch.allclose(compiled(x), model(x), atol=1e-3, rtol=1e-3))
    done = time.time()
    phases.append(("first inference (and eager's), checked", compiled_at - t0, done - t0))
    Path(root, f"w{rank}.json").write_text(json.dumps({"done": done, "begin": begin, "ok": ok, "phases": phases,
                                                        "builds": _compile.STATS["builds"]}))
    if mode == "dist":
        dist.destroy_process_group()


def scenario(mode: str, workers: int, model_name: str, url: str = "", phases: bool = False) -> dict[str, Any]:
    import torch.multiprocessing as mp

    root = tempfile.mkdtemp(prefix="bench-fleet-")
    start = time.time()
    mp.spawn(_worker, args=(workers, mode, root, model_name, url, _port(), start, phases), nprocs=workers,
             join=True)
    rows = [json.loads(Path(root, f"w{r}.json").read_text()) for r in range(workers)]
    shutil.rmtree(root, ignore_errors=True)
    assert all(r["ok"] for r in rows), f"{mode}: a worker's module does not match eager"
    return {"seconds": max(r["done"] for r in rows) - start, "builds": sum(r["builds"] for r in rows),
            "compile": max(r["done"] - r["begin"] for r in rows), "phases": [r["phases"] for r in rows],
            "built": [r["builds"] for r in rows], "done": [r["done"] - start for r in rows]}


def _print_phases(per_worker: list[list[list[Any]]]) -> None:
    for rank, phases in enumerate(per_worker):
        print(f"  worker {rank}:")
        for label, start, end in sorted(phases, key=lambda p: (p[2], p[1])):
            print(f"    {start:6.2f} -> {end:6.2f} s  ({end - start:5.2f} s)  {label}")


def _phase_table(cold: dict[str, Any]) -> str:
    """The builder's and the slowest waiting worker's steps in one Redis cold run (seconds since the start)."""
    builder = cold["built"].index(1) if 1 in cold["built"] else 0
    waiters = [r for r in range(len(cold["built"])) if r != builder]
    slowest = max(waiters, key=lambda r: cold["done"][r]) if waiters else builder
    columns = {f"builder (worker {builder})": cold["phases"][builder],
               f"slowest waiting worker ({slowest})": cold["phases"][slowest]}
    steps: list[str] = []
    for phases in columns.values():
        for label, _, _ in sorted(phases, key=lambda p: (p[1], p[2])):
            if label not in steps:
                steps.append(label)
    lines = ["| step | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for step in steps:
        cells = []
        for phases in columns.values():
            got = [p for p in phases if p[0] == step]
            cells.append("; ".join(f"{a:.2f}-{b:.2f} s ({b - a:.2f} s)" for _, a, b in got) or "-")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    from harness.redis_server import RedisServer, redis_missing

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision.models name")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every scenario; the median is reported")
    parser.add_argument("--phases", action="store_true", help="print each Redis cold worker's steps")
    parser.add_argument("--results", action="store_true", help="write the Fleet section of benchmarks/RESULTS.md")
    parser.add_argument("--note", action="append", default=[], help="a paragraph for the section (repeatable)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    if (why := redis_missing()) is not None:
        parser.exit(2, f"bench_fleet.py needs a Redis server: {why}\n")
    info = _common.machine()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in SCENARIOS}
    with tempfile.TemporaryDirectory(prefix="bench-fleet-redis-") as tmp:
        server = RedisServer(tmp)
        try:
            for i in range(args.repeat):
                runs["single worker, cold"].append(scenario("local", 1, args.model))
                runs["no shared cache"].append(scenario("local", WORKERS, args.model))
                runs["torch.distributed broadcast"].append(scenario("dist", WORKERS, args.model))
                server.client.flushdb()  # cold: the store holds nothing
                cold = scenario("local", WORKERS, args.model, server.url, phases=args.phases)
                runs["Redis, cold"].append(cold)
                runs["Redis, warm"].append(scenario("local", WORKERS, args.model, server.url))
                if args.phases:
                    print(f"Redis, cold, run {i + 1}: {cold['seconds']:.1f} s")
                    _print_phases(cold["phases"])
        finally:
            server.stop()
    info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "compile")} for name, rs in runs.items()}
    base, cbase = med["single worker, cold"]["seconds"], med["single worker, cold"]["compile"]
    lines = ["| scenario | workers | time to first correct inference | builds | vs one worker's cold compile "
             "| compile() to first inference (slowest worker) | vs one worker's |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, rs in runs.items():
        n, m = (1 if name.startswith("single") else WORKERS), med[name]
        spread = f" ({min(r['seconds'] for r in rs):.1f}-{max(r['seconds'] for r in rs):.1f})" if len(rs) > 1 else ""
        builds = "/".join(sorted({str(r["builds"]) for r in rs}))
        lines.append(f"| {name} | {n} | {m['seconds']:.1f} s{spread} | {builds} | {m['seconds'] / base:.2f}x | "
                     f"{m['compile']:.1f} s | {m['compile'] / cbase:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.results:
        runs_text = (f"the median of {args.repeat} runs of each scenario (the five in turn; the range in brackets)"
                     if args.repeat > 1 else "one run of each scenario")
        body = (f"Time from starting the workers (fresh processes: torch imported in each, an empty local cache "
                f"each) to the last worker's first inference that matched eager, {args.model}, default options "
                f"(TensorRT-RTX builds on this CPU, ONNX Runtime runs), {runs_text}. Goal (issue 23): with a "
                f"shared cache, 4 workers <= 1.3x one worker's cold compile. The workers share the machine's "
                f"cores, so the imports of 4 processes compete for them; on a machine with a core set per worker "
                f"the shared cache scenarios approach one cold compile plus the transfer. The last two columns "
                f"leave out the import of torch and the package and the model's construction: the time from "
                f"compile() to the first inference.\n\n"
                f"    {_common.command_line('bench_fleet.py', sys.argv[1:])}\n\n"
                f"Measured {_common.machine_line(info)}.\n\n{table}\n")
        if args.phases:
            colds = sorted(runs["Redis, cold"], key=lambda r: r["seconds"])
            cold = colds[(len(colds) - 1) // 2]  # the median run (the lower one of an even count)
            body += (f"\nWhere the time of the median Redis cold run ({cold['seconds']:.1f} s) went, in seconds "
                     f"since the workers were started (--phases: the pipeline's steps timed inside the workers; "
                     f"a step that ran twice shows twice, the outer and the inner build lease):\n\n"
                     f"{_phase_table(cold)}\n")
        body += "".join(f"\n{note}\n" for note in args.note)
        _common.write_section("Fleet (build once)", None, body)


if __name__ == "__main__":
    main()
