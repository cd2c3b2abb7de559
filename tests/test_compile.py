"""compile() (torch_trt_module._compile) with the engine cache: what misses and what hits (in this
process and in fresh ones), damaged entries, concurrent compiles, eviction, unwritable directories,
killed builders, and RTX validity checks on hits. Real TensorRT-RTX builds and ONNX Runtime;
``_compile.STATS`` counts exports and builds; every test checks the module against eager.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module import _compile, _keys
from torch_trt_module._cache import EngineCache
from torch_trt_module._cache_files import DeferredBlob
from torch_trt_module._settings import Settings
from torch_trt_module.backends import BackendChoice

from harness import faults
from harness.faults import EXPORTER, Child, TinyNet, compile_tiny, example, outputs_ok

from ._support import IS_ROOT, REPO, assert_matches, counting, fingerprints, keys, last_json, python

from torch_trt_module import _entries

pytestmark = []


def test_warm_compile_in_a_new_process_does_no_export_and_no_build(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    runs = []
    for _ in range(2):
        kid = Child(root=root, seeds=[0], log="INFO")
        (result,) = kid.results(1)
        assert kid.finish() == 0
        runs.append((result, kid.stderr_text()))
    (cold, cold_log), (warm, warm_log) = runs
    assert (cold["exports"], cold["builds"], cold["cache_hits"]) == (1, 1, 0) and cold["ok"]
    assert (warm["exports"], warm["builds"], warm["cache_hits"]) == (0, 0, 1) and warm["ok"]
    assert "engine cache hit" in warm_log and "(no export, no build)" in warm_log
    assert "engine cache hit" not in cold_log
    # The one engine, served: its plan (TensorRT-RTX) and its graph (always there).
    assert (warm["plan_sha"], warm["onnx_sha"]) == (cold["plan_sha"], cold["onnx_sha"])


MODEL_PY = """
import torch
from helpers import act

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(4, 8, generator=g))
            self.lin.bias.copy_(torch.randn(4, generator=g))

    def forward(self, x):
        return act(self.lin(x)) * 2.0
"""
HELPERS_PY = """
import torch

def act(x):
    return torch.relu(x)
"""


def test_code_edits_between_processes(tmp_path: Path) -> None:
    """A user edits the model's source (or a helper it imports from another file) between runs."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.py").write_text(MODEL_PY)
    (src / "helpers.py").write_text(HELPERS_PY)
    code = f"""
        import json, sys
        sys.path.insert(0, {str(src)!r})
        import torch
        import torch_trt_module as ttm
        from torch_trt_module import _compile
        from model import Net
        model = Net().eval()
        m = ttm.compile(model, torch.randn(3, 8), cache_dir={str(tmp_path / 'cache')!r}, exporter="torchscript")
        x = torch.randn(6, 8) * 3
        print(json.dumps({{**_compile.STATS, "err": float((m(x) - model(x)).abs().max())}}))
    """

    def run() -> dict[str, Any]:
        # No bytecode cache: an edit of the same size in the same second would load stale bytecode.
        return last_json(python(code, env={"PYTHONDONTWRITEBYTECODE": "1"}))

    steps = [
        ("cold", None, (1, 1)),
        ("unchanged", None, (0, 0)),
        ("forward body", lambda: (src / "model.py").write_text(MODEL_PY.replace("* 2.0", "* 3.0")), (1, 1)),
        ("helper in another file", lambda: (src / "helpers.py").write_text(HELPERS_PY.replace("relu", "tanh")), (1, 1)),
        # A comment changes the source but not the graph: the fingerprint misses, the content key hits.
        ("comment only", lambda: (src / "model.py").write_text((src / "model.py").read_text() + "# note\n"), (1, 0)),
    ]
    for name, edit, (exports, builds) in steps:
        if edit:
            edit()
        r = run()
        assert (r["exports"], r["builds"]) == (exports, builds), name
        assert r["err"] < 1e-5, f"{name}: a stale engine was served (max error {r['err']:.3g})"


def test_four_processes_compile_the_same_model_at_once(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    go = tmp_path / "go"
    # slow_build keeps the builder inside its lock for 0.5 s more, so that the others really wait.
    kids = [Child(root=root, seeds=[0], go=go, slow_build=0.5) for _ in range(4)]
    try:
        for kid in kids:
            kid.expect("ready")
        go.touch()
        results = [kid.results(1)[0] for kid in kids]
    finally:
        for kid in kids:
            kid.close()
    assert sum(r["builds"] for r in results) == 1 and sum(r["exports"] for r in results) == 1
    assert sum(r["cache_hits"] for r in results) == 3
    assert all(r["ok"] for r in results)
    assert len({(r["plan_sha"], r["onnx_sha"]) for r in results}) == 1  # all four load the one engine
    assert max(r["t_enter"] for r in results) < min(r["t_exit"] for r in results)  # they did overlap
    assert len(keys(root)) == 1


def test_sigkill_in_the_middle_of_a_build_then_a_clean_rebuild(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    kid = Child(root=root, seeds=[0], hold="build")
    try:
        kid.expect("at build")
        kid.kill()
    finally:
        kid.close()
    assert keys(root) == set()  # nothing the killed builder left passes for an entry
    faults.assert_locks_free(root)  # its lock died with it
    with counting() as n:
        module = compile_tiny(0, root)
    assert n["builds"] == 1 and outputs_ok(module, 0)
    assert len(keys(root)) == 1
    with counting() as n:
        compile_tiny(0, root)
    assert n["builds"] == 0


# --------------------------------------------------------------------------- damaged entries

def _truncate_engine(tr: faults.Tracker) -> None:
    faults.truncate(tr.blob(0, "engine"))


def _flip_engine_byte(tr: faults.Tracker) -> None:
    faults.flip_byte(tr.blob(0, "engine"), random.Random(3))


def _delete_metadata(tr: faults.Tracker) -> None:
    blobs = [p for p in tr.files(0) if p.suffix == ".blob"]
    tr.metadata(0).unlink()
    faults.age(blobs, faults.ORPHAN_AGE_S + 60)  # a crash long ago (young blobs may be a write in progress)


def _other_format_version(tr: faults.Tracker) -> None:
    path = tr.metadata(0)
    meta = json.loads(path.read_bytes())
    meta["format_version"] += 1
    path.write_text(json.dumps(meta))


@pytest.mark.usefixtures("rtx_required")  # damages the entry's plan blob ("engine")
@pytest.mark.parametrize(("damage", "why"), [
    (_truncate_engine, "(truncated?)"),
    (_flip_engine_byte, "checksum mismatch for blob 'engine'"),
    (_delete_metadata, "metadata missing"),
    (_other_format_version, "format version 2 != 1"),
])
def test_damaged_entry_is_rebuilt_with_a_warning(tmp_path: Path, damage: Callable[[faults.Tracker], None],
                                                 why: str) -> None:
    tr = faults.Tracker(tmp_path / "cache")
    tr.add(0, 1)
    damage(tr)
    with counting() as n, faults.capture_warnings() as warned:
        module = compile_tiny(0, tr.root)
        # Without a GPU the RTX plan cannot run, so the cache reads and checks it only when it
        # is used (state_dict, save): a damaged plan is rebuilt at that point.
        plan = module.engine.plan
    assert n["builds"] == 1 and outputs_ok(module, 0)
    stored = tr.find(module.engine.onnx)  # read back through the checksums
    assert plan and stored is not None and stored.plan == plan  # what was served is the verified rebuild
    (msg,) = warned
    assert why in msg and tr.entries[0].key in msg
    with counting() as n:
        compile_tiny(0, tr.root)  # the rebuilt entry is whole
    assert n == {"exports": 0, "builds": 0, "cache_hits": 1}
    assert tr.lost(skip=(0,)) == 0


# --------------------------------------------------------------------------- eviction and unwritable caches

def test_lru_eviction_under_a_small_cap(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    probe = tmp_path / "probe"
    for seed in (0, 1, 2):
        compile_tiny(seed, probe)
    sizes = [e.size_bytes for e in EngineCache(probe).entries()]
    cap = int(2.5 * max(sizes))  # two entries fit, three do not
    assert 3 * min(sizes) > cap

    def use(seed: int) -> bool:
        """compile() under the cap; True if it had to build."""
        with counting() as n:
            module = compile_tiny(seed, root, cache_max_size=cap)
        assert outputs_ok(module, seed)
        return n["builds"] == 1

    assert use(0) and use(1)
    assert not use(0)  # a hit: 0 is now the most recently used
    assert use(2)  # over the cap: 1, the least recently used, goes
    assert not use(0) and not use(2)
    assert use(1)  # 1 was evicted; storing it again evicts 0 (2 was used after 0)
    assert not use(2) and not use(1)
    assert use(0)
    assert EngineCache(root).total_size() <= cap


def test_read_only_directory_simulated(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    compile_tiny(0, root)
    before = faults.file_bytes(root)
    with faults.read_only(root), faults.capture_warnings() as warned, counting() as n:
        module = compile_tiny(1, root)
    assert n["builds"] == 1 and outputs_ok(module, 1)
    (msg,) = warned
    assert "is not writable" in msg and "Read-only file system" in msg and "continuing without caching" in msg
    assert faults.file_bytes(root) == before


@pytest.mark.skipif(IS_ROOT, reason="root writes through chmod; test_read_only_directory_simulated covers root")
def test_read_only_directory_real(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    compile_tiny(0, root)
    dirs = [root, *(p for p in root.iterdir() if p.is_dir())]
    before = faults.file_bytes(root)
    for d in dirs:
        d.chmod(0o500)
    try:
        with faults.capture_warnings() as warned:
            module = compile_tiny(1, root)
            hit = compile_tiny(0, root)
    finally:
        for d in dirs:
            d.chmod(0o700)
    assert outputs_ok(module, 1) and outputs_ok(hit, 0)
    assert len(warned) == 2 and all("is not writable" in w and "Permission denied" in w for w in warned)
    assert faults.file_bytes(root) == before


def test_cache_false_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    module = compile_tiny(0, root, cache=False)
    assert outputs_ok(module, 0) and not root.exists()


@pytest.mark.usefixtures("rtx_required")
def test_rtx_hit_that_this_gpu_rejects_is_evicted_and_rebuilt(monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture,
                                                                cache_dir: str) -> None:
    model = torch.nn.Linear(8, 4).eval()
    x = torch.randn(2, 8)
    first = ttm.compile(model, x, cache_dir=cache_dir)
    assert first.engine is not None and first.engine.backend == "tensorrt_rtx"
    builds = _compile.STATS["builds"]
    # Pretend a supported GPU is present and that RTX's get_engine_validity says INVALID:
    # no GPU here can run that check for real.
    import torch_trt_module.backends._trt_loader as trt_backend

    monkeypatch.setattr(_entries, "rtx_runs_on", lambda device: True)
    monkeypatch.setattr(trt_backend, "engine_validity", lambda plan, backend: "EngineValidity.INVALID (diagnostics 4)")
    with caplog.at_level(logging.WARNING, logger="torch_trt_module"):
        again = ttm.compile(model, x, cache_dir=cache_dir)
    assert _compile.STATS["builds"] == builds + 1
    assert "cannot load on this GPU: EngineValidity.INVALID" in caplog.text
    ttm.assert_parity(model, again, torch.randn(5, 8))


@pytest.mark.usefixtures("rtx_required")
def test_rtx_hit_is_served_when_the_gpu_accepts_it(monkeypatch: pytest.MonkeyPatch, cache_dir: str) -> None:
    model = torch.nn.Linear(8, 4).eval()
    x = torch.randn(2, 8)
    first = ttm.compile(model, x, cache_dir=cache_dir)
    assert first.engine is not None and first.engine.backend == "tensorrt_rtx"  # else there is no RTX hit to check
    import torch_trt_module.backends._trt_loader as trt_backend

    monkeypatch.setattr(_entries, "rtx_runs_on", lambda device: True)
    monkeypatch.setattr(trt_backend, "engine_validity", lambda plan, backend: None)
    builds, hits = _compile.STATS["builds"], _compile.STATS["cache_hits"]
    ttm.compile(model, x, cache_dir=cache_dir)
    assert (_compile.STATS["builds"], _compile.STATS["cache_hits"]) == (builds, hits + 1)
