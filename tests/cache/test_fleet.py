"""compile() across a torch.distributed group (_fleet): real gloo, 4 processes spawned on loopback.

Each rank has its own cache directory (no shared filesystem). The builder is the lowest rank of the
target; it builds and broadcasts the entry, the others check it, store it and load it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

import torch_trt_module as ttm

WORLD = 4
DEADLINE_S = 120.0  # a hang fails the test instead of stalling the suite


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, world: int, port: int, root: str, mode: str) -> None:
    """One rank: compile the same model with its own cache directory; write what happened to rank<N>.json."""
    import torch.distributed as dist

    from torch_trt_module import _errors
    from torch_trt_module._pipeline import compile as _compile

    torch.set_num_threads(1)
    out: dict[str, Any] = {"rank": rank}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        if mode == "fail":
            def failing_build(*args: Any, **kwargs: Any) -> Any:  # only the builder ever gets here
                raise _errors.BuildError(f"boom on rank {dist.get_rank()}")

            _compile._build = failing_build  # type: ignore[assignment]
        model, x = _model(), torch.randn(5, 6)
        try:
            compiled = ttm.compile(model, x, backend="onnxruntime", partition="never",
                                   cache_dir=os.path.join(root, f"cache{rank}"))
            with torch.no_grad():
                out["matches_eager"] = bool(torch.allclose(compiled(x), model(x), atol=1e-5, rtol=1e-4))
        except ttm.TorchTRTError as e:
            out["error"] = [type(e).__name__, str(e)]
        out.update(builds=_compile.STATS["builds"], exports=_compile.STATS["exports"])
        dist.barrier()  # no rank leaves before every rank is done
    finally:
        Path(root, f"rank{rank}.json").write_text(json.dumps(out))
        dist.destroy_process_group()


def _run_world(tmp_path: Path, mode: str, world: int = WORLD) -> list[dict[str, Any]]:
    ctx = mp.spawn(_rank_main, args=(world, _free_port(), str(tmp_path), mode), nprocs=world, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world} ranks did not finish within {DEADLINE_S} s (a rank hangs)")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def test_world_of_four_builds_once_and_every_rank_matches_eager(tmp_path: Path) -> None:
    results = _run_world(tmp_path, "ok")
    assert [r.get("error") for r in results] == [None] * WORLD
    assert [r["matches_eager"] for r in results] == [True] * WORLD
    assert sum(r["builds"] for r in results) == 1 and results[0]["builds"] == 1
    # The others neither built nor exported: the builder's fingerprint led them to the received entry.
    assert [r["exports"] for r in results[1:]] == [0] * (WORLD - 1)
    for rank in range(1, WORLD):  # each rank stored it in its own directory: a later compile there is local
        assert list((tmp_path / f"cache{rank}" / "entries").glob("*.json"))


def test_a_builder_that_raises_gives_every_rank_the_same_build_error(tmp_path: Path) -> None:
    results = _run_world(tmp_path, "fail", world=2)  # (two ranks are enough: a rank that did not build)
    errors = [r.get("error") for r in results]
    expected = ["BuildError", "rank 0 built the engine for ranks [0, 1] of the process group and failed: "
                              "boom on rank 0"]
    assert errors == [expected] * 2
    assert [r["builds"] for r in results] == [0] * 2  # the stub raised before counting


def test_process_group_option_is_checked() -> None:
    with pytest.raises(ttm.SettingsError, match=r"option 'process_group' got 'world'; expected a "
                                                r"torch.distributed ProcessGroup"):
        ttm.compile(_model(), torch.randn(2, 6), process_group="world")


def test_without_a_group_compile_is_alone() -> None:
    from torch_trt_module._cache.fleet import fleet_group
    from torch_trt_module._core.settings import Settings

    assert fleet_group(Settings()) is None  # torch.distributed is not initialized in this process
    assert fleet_group(Settings(process_group=False)) is None
