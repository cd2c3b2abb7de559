"""compile() (torch_trt_module._pipeline.compile) with the engine cache: what misses and what hits (in this
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
from torch_trt_module._pipeline import compile as _compile
from torch_trt_module._cache import keys as _keys
from torch_trt_module._cache.cache import EngineCache
from torch_trt_module._cache.files import DeferredBlob
from torch_trt_module._core.settings import Settings
from torch_trt_module.backends import BackendChoice

from harness import faults
from harness.faults import EXPORTER, Child, TinyNet, compile_tiny, example, outputs_ok

from .._support import IS_ROOT, REPO, assert_matches, counting, fingerprints, keys, last_json, python

from torch_trt_module._cache import entries as _entries

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
        from torch_trt_module._pipeline import compile as _compile
        from model import Net
        model = Net().eval()
        m = ttm.compile(model, torch.randn(3, 8), cache_dir={str(tmp_path / 'cache')!r}, exporter="torchscript")
        x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1)) * 3
        ref = model(x)
        print(json.dumps({{**_compile.STATS, "err": float((m(x) - ref).abs().max()), "scale": float(ref.abs().max())}}))
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
        # A stale engine is off by a third of the output or more (2.0 against 3.0, relu against tanh);
        # float32 rounding of outputs near 30 is about 1e-5, so the bound is relative.
        assert r["err"] <= 1e-5 * max(1.0, r["scale"]), f"{name}: a stale engine was served (max error {r['err']:.3g})"


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


# --------------------------------------------------------------------------- training mode (issue 20)

def _modes(model: torch.nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _training_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("torch_trt_module")
            and r.levelno == logging.WARNING and "training mode" in r.getMessage()]


def test_resnet18_in_training_mode_compiles_its_inference_semantics_as_written(
        caplog: pytest.LogCaptureFixture) -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18()  # untouched: in training mode, as users write it
    assert model.training
    stats = {n: b.clone() for n, b in model.named_buffers()}
    before = _modes(model)
    x = torch.randn(2, 3, 64, 64)
    fast = ttm.compile(model, x, max_batch=4)
    assert model.training and _modes(model) == before  # no submodule's mode changed
    # eager ran in eval mode on every check: BatchNorm's running statistics were not updated
    assert all(torch.equal(stats[n], b) for n, b in model.named_buffers())
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        y = torch.randn(3, 3, 64, 64)
        torch.testing.assert_close(fast(y), reference(y), rtol=1e-3, atol=1e-4)
    (said,) = _training_warnings(caplog)
    assert said.startswith("ResNet: it is in training mode; compile() compiles its inference semantics (dropout off, "
                           "BatchNorm running statistics), as torch.onnx.export does")


class _Mixed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.drop = torch.nn.Dropout(0.5)
        self.bn = torch.nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.drop(self.lin(x)))


def test_mixed_modes_are_restored_exactly_also_when_compile_raises(caplog: pytest.LogCaptureFixture) -> None:
    model = _Mixed().train()
    model.bn.eval()  # a frozen BatchNorm inside a model in training mode
    before = _modes(model)
    x = torch.randn(4, 8)
    fast = ttm.compile(model, x, cache=False)
    assert _modes(model) == before
    with torch.no_grad():
        torch.testing.assert_close(fast(x), copy.deepcopy(model).eval()(x))
    (said,) = _training_warnings(caplog)
    assert said.startswith("_Mixed: it is in training mode;")

    model.eval()
    model.drop.train()  # only a submodule: still one WARNING, naming it
    caplog.clear()
    ttm.compile(model, x, cache=False)
    (said,) = _training_warnings(caplog)
    assert "_Mixed: 1 of its submodules are (drop) in training mode" in said
    assert not model.training and model.drop.training

    class Fails(_Mixed):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert not self.training  # eager runs in eval mode ...
            raise RuntimeError("the model's own error")

    failing = Fails().train()
    before = _modes(failing)
    with pytest.raises(Exception):
        ttm.compile(failing, x, cache=False, partition="never")
    assert _modes(failing) == before  # ... and every mode is back after compile() raised


def test_lazy_mode_builds_the_inference_semantics_at_the_first_call(caplog: pytest.LogCaptureFixture) -> None:
    model = _Mixed().eval()
    fast = ttm.compile(model, cache=False)
    model.train()  # back to training before the first call, which builds
    x = torch.randn(4, 8)
    with torch.no_grad():
        got = fast(x)
    assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(got, copy.deepcopy(model).eval()(x))
    (said,) = _training_warnings(caplog)
    assert "the lazy module's build compiles its inference semantics" in said


def test_a_compiled_submodule_computes_inference_after_its_parents_train(caplog: pytest.LogCaptureFixture) -> None:
    inner = _Mixed().eval()
    parent = torch.nn.Sequential(ttm.compile(inner, torch.randn(4, 8), cache=False), torch.nn.ReLU())
    parent.train()  # as a training loop does to the whole model
    x = torch.randn(4, 8)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(parent(x), inner(x).relu())  # no raise; inference semantics
    (said,) = _training_warnings(caplog)  # said once
    assert said.startswith("TRTModule is in training mode (a parent's train() reaches it): a compiled module "
                           "computes inference all the same")


def test_a_segmented_module_takes_its_parents_train() -> None:
    class Between(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x).relu() + 1

    model = Between().eval()
    split = ttm.compile(model, torch.randn(4, 8), torch_executed_ops={"aten.relu"}, min_block_size=1, cache=False)
    assert isinstance(split, ttm.SegmentedModule)
    parent = torch.nn.Sequential(split).train()  # before: UsageError from SegmentedModule.train
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(parent(x), model(x))
    assert split.training


def test_a_partitioned_module_of_a_training_model_computes_inference(caplog: pytest.LogCaptureFixture) -> None:
    class DropBranch(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = torch.nn.Dropout(0.9)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.drop(x)
            if y.sum().item() > 0:
                return y * 2
            return y - 1

    model = DropBranch()  # training mode
    fast = ttm.compile(model, torch.randn(2, 8), cache=False)
    assert isinstance(fast, ttm.PartitionedModule) and model.training and model.drop.training
    x = torch.randn(3, 8).abs() + 0.1
    for _ in range(3):  # dropout off: exactly x * 2, every time
        torch.testing.assert_close(fast(x), x * 2)
    assert model.training and model.drop.training


def test_a_follow_hit_whose_engine_holds_the_models_weights_keeps_the_optimized_session(tmp_path: Path) -> None:
    model = TinyNet(0)
    x = example()
    ttm.compile(model, x, cache_dir=tmp_path)  # cold: stores ONNX Runtime's optimized graph too
    with counting() as n:
        same = ttm.compile(TinyNet(0), x, cache_dir=tmp_path)  # the same weights: nothing to refit
    assert n["cache_hits"] == 1 and same.runner.used_optimized and outputs_ok(same, 0)
    other = TinyNet(1)  # the same structure, other weights: a hit refit to them, never the stored ones
    with counting() as n:
        refit = ttm.compile(other, x, cache_dir=tmp_path)
    assert n["cache_hits"] == 1 and not refit.runner.used_optimized
    with torch.no_grad():
        torch.testing.assert_close(refit(x), other(x), rtol=1e-5, atol=1e-5)


def test_eval_semantics_nests_and_the_last_block_out_restores() -> None:
    from torch_trt_module._core.modes import eval_semantics

    model = _Mixed().train()
    model.bn.eval()
    before = _modes(model)
    with eval_semantics(model):
        assert not any(_modes(model).values())
        with eval_semantics(model):  # a nested block (a lazy build inside a partitioned call) ...
            pass
        assert not any(_modes(model).values())  # ... does not restore what the outer block relies on
        with eval_semantics(model.lin):  # nor does a block on a submodule
            pass
        assert not any(_modes(model).values())
    assert _modes(model) == before
    with pytest.raises(RuntimeError, match="inside"):
        with eval_semantics(model):
            raise RuntimeError("inside")
    assert _modes(model) == before
    # Overlapping blocks (a child's compile() in one thread, the parent's partitioned call in another):
    # the child's block ends first, and the parent's still sees eval; the last one out restores.
    child, parent = eval_semantics(model.lin), eval_semantics(model)
    child.__enter__()
    parent.__enter__()
    child.__exit__(None, None, None)
    assert not model.lin.training
    parent.__exit__(None, None, None)
    assert _modes(model) == before


def test_lazy_modules_and_the_dynamo_backend_never_join_a_collective_unasked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A first call is reached by whichever ranks reach it (a rank-0-only evaluation): only an explicit
    process_group= may make its build a collective; compile() with example inputs takes the group."""
    from torch_trt_module._cache import fleet as _fleet

    seen: list[object] = []
    real = _fleet.fleet_group
    monkeypatch.setattr(_fleet, "fleet_group", lambda s: seen.append(s.process_group) or real(s))
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    x = torch.randn(2, 4)
    ttm.compile(model, x, cache_dir=None)
    lazy = ttm.compile(model, None)
    torch.testing.assert_close(lazy(x), model(x))
    compiled = torch.compile(model, backend="torch_trt_module")
    torch.testing.assert_close(compiled(x), model(x))
    assert seen[0] is None and seen[1:] and all(s is False for s in seen[1:]), seen
