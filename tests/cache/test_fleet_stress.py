"""Many workers, many compiles, one Redis (issue 23): 0 wrong engines, and one build per model.

Each worker is a fresh process (spawn) with a local cache directory of its own; they share nothing
but a real redis-server on loopback (conftest's ``redis_server``). They wait at a barrier, then each
compiles three different models over and over, in its own shuffled order, and checks every compiled
module against eager at three batch sizes. The models take the same input and give the same output
shape, so an engine served for the wrong model would run and give wrong numbers, which the check counts.

Counted exactly, from each worker's ``_compile.STATS`` and ``_fleet_stats.process_totals()``: 3 builds
and 3 exports in all (one per model: a worker that waits for another's build never exports), 3 uploads,
and one download per worker and model it did not build; every other compile is a local hit.

The issue's full 8 workers x 20 compiles x 3 models runs in CI (about 20 s on the 2-core machine).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from harness.redis_server import PREFIX, RedisServer

DEADLINE_S = 240.0  # the whole fleet; a hang fails the test instead of stalling the suite
BARRIER_S = 120.0  # every worker imported torch and is ready to compile


class Gated(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.value, self.gate = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value(x) * torch.sigmoid(self.gate(x))


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _wide() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


# Three architectures, each with weights of its own seed; (batch, 8) -> (batch, 4) for all three.
MODELS: dict[str, tuple[Callable[[], torch.nn.Module], int]] = {"mlp": (_mlp, 1), "wide": (_wide, 2),
                                                                 "gated": (Gated, 3)}


def _make(name: str) -> torch.nn.Module:
    factory, seed = MODELS[name]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory().eval()


def _matches_eager(compiled: torch.nn.Module, model: torch.nn.Module) -> bool:
    gen = torch.Generator().manual_seed(7)
    with torch.inference_mode():
        for batch in (1, 3, 7):
            x = torch.randn(batch, 8, generator=gen)
            got, want = compiled(x), model(x)
            if got.shape != want.shape or not torch.allclose(got, want, atol=1e-5, rtol=1e-4):
                return False
    return True


def _worker(rank: int, url: str, root: str, compiles: int, barrier: Any) -> None:
    """One worker: ``compiles`` rounds of the three models; writes what each compile did to w<rank>.json."""
    out: dict[str, Any] = {"rank": rank, "rows": []}
    try:
        import torch_trt_module as ttm
        from torch_trt_module._pipeline import compile as _compile
        from torch_trt_module._cache.fleet_stats import process_totals

        torch.set_num_threads(1)
        rng = random.Random(rank)
        x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
        barrier.wait(timeout=BARRIER_S)  # every worker starts compiling at once: the first round races
        for round_ in range(compiles):
            names = list(MODELS)
            rng.shuffle(names)
            for name in names:
                model = _make(name)  # a new module each time: its fingerprint is computed again
                before = dict(_compile.STATS)
                compiled = ttm.compile(model, x, backend="onnxruntime", exporter="torchscript", partition="never",
                                       cache=url, cache_dir=f"{root}/w{rank}", process_group=False)
                row = {k: _compile.STATS[k] - before[k] for k in before}
                out["rows"].append({"round": round_, "model": name, "ok": _matches_eager(compiled, model), **row})
        out["totals"] = {k: int(v) for k, v in process_totals().items()}
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test with it
        out["error"] = f"{type(e).__name__}: {e}"
    Path(root, f"w{rank}.json").write_text(json.dumps(out))


def _run_fleet(url: str, root: Path, workers: int, compiles: int) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=_worker, args=(r, url, str(root), compiles, barrier), daemon=True)
             for r in range(workers)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    try:
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        if hung := [r for r, p in enumerate(procs) if p.is_alive()]:
            pytest.fail(f"workers {hung} did not finish within {DEADLINE_S:g} s (a worker hangs)")
    finally:
        for p in procs:  # only the processes this test started
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    assert [p.exitcode for p in procs] == [0] * workers
    results = [json.loads((root / f"w{r}.json").read_text()) for r in range(workers)]
    assert [r.get("error") for r in results] == [None] * workers
    return results


# The full fleet (8 workers, 480 compiles) is slow on a 2-core CI machine; 4 workers keep every race.
@pytest.mark.parametrize("workers,compiles", [pytest.param(4, 6, id="4x6x3"),
                                              pytest.param(8, 20, id="8x20x3", marks=pytest.mark.slow)])
def test_a_fleet_on_one_redis_builds_each_model_once_and_serves_no_wrong_engine(
        redis_server: RedisServer, tmp_path: Path, workers: int, compiles: int) -> None:
    url = redis_server.url + "?lease_wait=120"  # bounded: a lost builder costs at most that, not 900 s
    results = _run_fleet(url, tmp_path, workers, compiles)
    rows = [row for r in results for row in r["rows"]]
    assert len(rows) == workers * compiles * len(MODELS)
    assert [row for row in rows if not row["ok"]] == []  # 0 wrong engines
    builds = {name: sum(row["builds"] for row in rows if row["model"] == name) for name in MODELS}
    assert builds == dict.fromkeys(MODELS, 1)
    # Only a model's builder exported it: the others waited under the lease and followed the remote index.
    assert {name: sum(row["exports"] for row in rows if row["model"] == name) for name in MODELS} == \
        dict.fromkeys(MODELS, 1)
    assert sum(row["cache_hits"] for row in rows) == len(rows) - len(MODELS)
    totals = {k: sum(r["totals"][k] for r in results) for k in ("builds", "uploads", "remote_hits")}
    # One download per worker and model it did not build; every later compile of it is local.
    assert totals == {"builds": 3, "uploads": 3, "remote_hits": len(MODELS) * (workers - 1)}
    # Redis holds one entry per model, each index record leads to its own, and every entry unpacks.
    from torch_trt_module._core.io import unpack
    from torch_trt_module._cache.store import unpack_entry

    entries = redis_server.entries()
    assert len(entries) == len(MODELS)
    keys = set()
    for name in redis_server.client.keys(PREFIX + "index-*"):
        keys.add(unpack(redis_server.client.get(name), kind="cache-index")[0]["key"])
    assert sorted(keys) == sorted(e.decode()[len(PREFIX + "entry-"):] for e in entries)
    for entry in entries:
        key = entry.decode()[len(PREFIX + "entry-"):]
        meta, blobs = unpack_entry(key, redis_server.client.get(entry), source="test")
        assert meta["backend"] == "onnxruntime" and "onnx" in blobs
    assert redis_server.client.keys(PREFIX + "lease-*") == []  # every lease was released
