"""compile() with the engine cache (issue 3), on real TensorRT-RTX builds and ONNX Runtime.

The storage layer alone is tested in test_cache_store.py; here everything goes through compile():
what misses and what hits (in this process and in fresh ones), what a damaged entry leads to,
concurrent compiles, eviction, unwritable directories and killed builders. ``_compile.STATS``
counts exports and builds; every test also checks the compiled module against eager.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module import _compile
from torch_trt_module._cache import DeferredBlob, EngineCache
from torch_trt_module._settings import Settings
from torch_trt_module.backends import BackendChoice

from .reliability import faults
from .reliability.faults import EXPORTER, Child, TinyNet, compile_tiny, example, outputs_ok

REPO = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def keys(root: Path) -> set[str]:
    return {e.key for e in EngineCache(root).entries()}


def fingerprints(root: Path) -> set[str]:
    return {p.stem for p in (root / "index").glob("*.json")}


@contextlib.contextmanager
def counting() -> Iterator[dict[str, int]]:
    """The exports, builds and hits that happen inside the block."""
    before = dict(_compile.STATS)
    delta: dict[str, int] = {}
    yield delta
    delta.update({k: _compile.STATS[k] - before[k] for k in before})


def assert_matches(module: torch.nn.Module, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    with torch.inference_mode():
        got, want = module(*inputs), model(*inputs)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-2 if module.engine.meta["model"]["precision"] == "fp16" else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- what changes the key

class WithBuffer(TinyNet):
    def __init__(self, seed: int = 0, persistent: bool = True) -> None:
        super().__init__(seed)
        self.register_buffer("shift", torch.zeros(4), persistent=persistent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.shift


class Relu(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Tanh(TinyNet):  # the same weights, another forward body
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class Casts(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.float())


def _bumped(model: torch.nn.Module, edit: Callable[[torch.nn.Module], None]) -> torch.nn.Module:
    other = copy.deepcopy(model)
    with torch.no_grad():
        edit(other)
    return other


@contextlib.contextmanager
def other_backend_version() -> Iterator[None]:
    real = _compile.backend_version
    with faults.patched(_compile, "backend_version", lambda name: real(name) + ".post1"):
        yield


X = example()
INTS = torch.randint(0, 5, (3, 8))
Variant = tuple[torch.nn.Module, tuple[torch.Tensor, ...], dict[str, Any]]

# name -> (base, changed, a context the changed compile runs in)
VARIANTS: dict[str, Callable[[], tuple[Variant, Variant, Any]]] = {
    "one weight": lambda: ((m := TinyNet(0), (X,), {}),
                           (_bumped(m, lambda o: o.fc1.weight[0, 0].add_(0.5)), (X,), {}), None),
    "one buffer": lambda: ((m := WithBuffer(0), (X,), {}),
                           (_bumped(m, lambda o: o.shift[1].fill_(0.25)), (X,), {}), None),
    "one non-persistent buffer": lambda: ((m := WithBuffer(0, persistent=False), (X,), {}),
                                          (_bumped(m, lambda o: o.shift[1].fill_(0.25)), (X,), {}), None),
    "the module's code": lambda: ((Relu(0), (X,), {}), (Tanh(0), (X,), {}), None),
    "an input's max batch": lambda: ((TinyNet(0), (X,), {}), (TinyNet(0), (X,), {"max_batch": 64}), None),
    "an input's opt batch": lambda: ((TinyNet(0), (X,), {}), (TinyNet(0), (example(5),), {}), None),
    "an input's dim range": lambda: ((TinyNet(0), (X,), {"dynamic": {"x": {0: (1, 3, 16)}}}),
                                     (TinyNet(0), (X,), {"dynamic": {"x": {0: (2, 3, 16)}}}), None),
    "static shapes": lambda: ((TinyNet(0), (X,), {}), (TinyNet(0), (X,), {"dynamic": None}), None),
    "an input dtype": lambda: ((m := Casts().eval(), (INTS,), {}), (m, (INTS.int(),), {}), None),
    "the precision": lambda: ((TinyNet(0), (X,), {}), (TinyNet(0), (X,), {"precision": "fp16"}), None),
    "the optimization level": lambda: ((TinyNet(0), (X,), {}),
                                       (TinyNet(0), (X,), {"optimization_level": 1}), None),
    "the workspace": lambda: ((TinyNet(0), (X,), {}), (TinyNet(0), (X,), {"workspace": 1 << 24}), None),
    "tf32": lambda: ((TinyNet(0), (X,), {}), (TinyNet(0), (X,), {"tf32": False}), None),
    "the backend version": lambda: ((TinyNet(0), (X,), {}), (TinyNet(0), (X,), {}), other_backend_version()),
    "the RTX targets": lambda: ((TinyNet(0), (X,), {}), (TinyNet(0), (X,), {"targets": ["sm86"]}), None),
    "one more RTX target": lambda: ((TinyNet(0), (X,), {"targets": ["sm86"]}),
                                    (TinyNet(0), (X,), {"targets": ["sm86", "sm89"]}), None),
}


@pytest.mark.parametrize("what", list(VARIANTS))
def test_key_changes_with(what: str, tmp_path: Path) -> None:
    (model, inputs, opts), (model2, inputs2, opts2), context = VARIANTS[what]()
    model.eval()
    model2.eval()
    root = tmp_path / "cache"

    def compile_(m: torch.nn.Module, i: tuple[torch.Tensor, ...], o: dict[str, Any]) -> ttm.TRTModule:
        return ttm.compile(m, i, cache_dir=root, exporter=EXPORTER, **o)

    with counting() as n:
        base = compile_(model, inputs, opts)
    assert n["builds"] == 1
    keys0, fps0 = keys(root), fingerprints(root)
    with counting() as n, context or contextlib.nullcontext():
        changed = compile_(model2, inputs2, opts2)
    # Both levels miss: the fingerprint (else a warm compile would serve the old engine without
    # exporting) and the content key (a second entry, built for the change).
    assert n == {"exports": 1, "builds": 1, "cache_hits": 0}
    assert fingerprints(root) - fps0 and keys(root) - keys0 and keys0 <= keys(root)
    assert_matches(changed, model2, inputs2)
    # The first entry is still served to the first model, and to it only.
    with counting() as n:
        again = compile_(model, inputs, opts)
    assert n == {"exports": 0, "builds": 0, "cache_hits": 1}
    assert_matches(again, model, inputs)
    assert again.engine.plan == base.engine.plan


def test_what_does_not_change_the_engine_shares_the_entry(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    first = compile_tiny(0, root)
    for opts in ({"verify": False}, {"rtol": 0.1, "atol": 0.1}, {"cast_inputs": True}, {"max_rebuilds": 0},
                 {"progress": False}, {"cache_max_size": 10**9}, {"allow_host_code": True}):
        with counting() as n:
            module = compile_tiny(0, root, **opts)  # a new instance of the same model, too
        assert n == {"exports": 0, "builds": 0, "cache_hits": 1}, opts
        assert module.engine.plan == first.engine.plan and outputs_ok(module, 0)
    assert len(keys(root)) == 1


def test_gpu_identity_and_backend_version_are_in_tensorrt_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    exported = ttm.export_onnx(TinyNet(0), X, exporter=EXPORTER)
    settings = Settings.from_options()
    trt = BackendChoice("tensorrt", "tensorrt", "test")
    rtx = BackendChoice("tensorrt_rtx", "onnxruntime", "test")
    h100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "sm_count": 132, "total_memory": 85 << 30}
    gpus = {0: h100, 1: h100, 2: {**h100, "name": "NVIDIA H100 PCIe"}, 3: {**h100, "compute_capability": "9.1"},
            4: {**h100, "sm_count": 114}, 5: {**h100, "total_memory": 80 << 30}}
    versions = {"tensorrt": "10.13.0.35"}
    # Test doubles: tensorrt and a GPU are not available here; the key must take what they report.
    monkeypatch.setattr(_compile, "gpu_identity", lambda device: gpus[torch.device(device).index])
    monkeypatch.setattr(_compile, "backend_version", lambda name: versions.get(name, "1.7.1.116"))

    def key(choice: BackendChoice, gpu: int, s: Settings = settings) -> str:
        return _compile.content_key(exported.onnx, exported.to_meta(), s, choice, torch.device("cuda", gpu))

    trt_keys = [key(trt, g) for g in gpus]
    assert trt_keys[0] == trt_keys[1]  # the same GPU model on another index: never the index
    assert len(set(trt_keys[1:])) == 5  # name, compute capability, SM count and memory each count
    versions["tensorrt"] = "10.13.1.2"
    assert key(trt, 0) != trt_keys[0]
    # RTX engines are portable across GPUs: their key takes the targets, not the GPU.
    assert key(rtx, 0) == key(rtx, 2)
    assert key(rtx, 0) != key(rtx, 0, settings.replace(targets=("sm86",)))
    fp = [_compile.fingerprint(TinyNet(0), (X,), {}, settings, trt, torch.device("cuda", g)) for g in (0, 1, 2)]
    assert fp[0] == fp[1] != fp[2]  # the warm-path index follows the same rule


# --------------------------------------------------------------------------- fresh processes

def python(code: str, *, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen[str]:
    prelude = f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code)], text=True, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def last_json(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_key_is_identical_in_processes_with_different_hash_seeds(tmp_path: Path) -> None:
    # The default exporter (dynamo), as users get it; each process has its own cache.
    code = """
        import json, os, sys
        import torch_trt_module as ttm
        from torch_trt_module._cache import EngineCache
        from tests.reliability.faults import TinyNet, example
        root = sys.argv[1] if len(sys.argv) > 1 else os.environ["ROOT"]
        ttm.compile(TinyNet(0), example(), cache_dir=root)
        print(json.dumps({"keys": [e.key for e in EngineCache(root).entries()],
                          "fps": sorted(os.listdir(os.path.join(root, "index"))), "hash": hash("abc")}))
    """
    procs = [python(code, env={"PYTHONHASHSEED": seed, "ROOT": str(tmp_path / seed)}) for seed in ("1", "2")]
    a, b = (last_json(p) for p in procs)
    assert a["hash"] != b["hash"]  # the seeds did change str hashing
    assert len(a["keys"]) == 1 and len(a["fps"]) == 1
    assert (a["keys"], a["fps"]) == (b["keys"], b["fps"])


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
    assert warm["plan_sha"] == cold["plan_sha"]


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
    assert len({r["plan_sha"] for r in results}) == 1  # all four load the one engine
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


# --------------------------------------------------------------------------- the deferred plan

def test_a_warm_hit_that_cannot_run_the_plan_reads_it_only_when_used(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    tr = faults.Tracker(tmp_path / "cache")
    tr.add(0, 1)
    stored = tr.entries[0]
    read: list[str] = []
    real_read, real_deferred = EngineCache._read_blob, DeferredBlob.read
    monkeypatch.setattr(EngineCache, "_read_blob", lambda self, key, name, info: (read.append(name),
                                                                                  real_read(self, key, name, info))[1])
    monkeypatch.setattr(DeferredBlob, "read", lambda self: (read.append(self._name), real_deferred(self))[1])
    with counting() as n:
        module = compile_tiny(0, tr.root)
    assert n == {"exports": 0, "builds": 0, "cache_hits": 1} and module.backend == "onnxruntime"
    assert "onnx" in read and "engine" not in read and module.engine.has_plan  # no GPU: the plan was not read
    EngineCache(tr.root).clear()  # evicted after the hit: the open file still holds the bytes
    state = module.state_dict()  # the first use of the plan reads and checks it
    assert read.count("engine") == 1 and module.engine.plan == stored.plan
    again = ttm.TRTModule()
    again.load_state_dict(state)
    assert again.engine is not None and again.engine.plan == stored.plan and outputs_ok(again, 0)


def test_a_warm_hit_uses_the_session_made_while_checking_the_onnx(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from torch_trt_module.backends import _onnxruntime

    tr = faults.Tracker(tmp_path / "cache")
    tr.add(0)
    made: list[int] = []
    real = _onnxruntime.OnnxRuntimeRunner.__init__
    monkeypatch.setattr(_onnxruntime.OnnxRuntimeRunner, "__init__",
                        lambda self, *a, **k: (made.append(1), real(self, *a, **k))[1])
    module = compile_tiny(0, tr.root)
    assert len(made) == 1 and outputs_ok(module, 0)  # made once, during the check, and adopted
    assert module._runner.used_optimized  # from ORT's optimized copy, stored by the cold compile
    x = example()
    plain = _onnxruntime.OnnxRuntimeRunner(module.engine.onnx, module._exported.inputs, module._exported.outputs)
    assert torch.equal(module(x), plain.run([x])[0])  # the same numbers as a session over the original graph
    faults.flip_byte(tr.blob(0, "onnx"), random.Random(5))
    with counting() as n, faults.capture_warnings() as warned:
        module = compile_tiny(0, tr.root)
    assert n["builds"] == 1 and outputs_ok(module, 0)  # the session over unchecked bytes was dropped
    assert any("checksum mismatch for blob 'onnx'" in w for w in warned), warned


def test_an_optimized_graph_from_another_machine_kind_is_left_alone(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    tr = faults.Tracker(tmp_path / "cache")
    tr.add(0)
    (theirs,) = (tr.root / "entries").glob(f"{tr.entries[0].key}+ort-*.blob")
    read: list[str] = []
    real = DeferredBlob.read
    monkeypatch.setattr(DeferredBlob, "read", lambda self: (read.append(self._name), real(self))[1])
    # Another CPU (or ONNX Runtime version) names its copy differently: this one must not be used.
    from torch_trt_module.backends import _onnxruntime

    monkeypatch.setattr(_onnxruntime, "_cpu_identity", lambda: "0123456789abcdef")
    with counting() as n:
        module = compile_tiny(0, tr.root)
    # (The patch also changes the module fingerprint, which hashes what the model's module imports,
    # so the entry is found through the content key after an export: no build either way.)
    assert n["builds"] == 0, n
    assert read == ["onnx"] and not module._runner.used_optimized
    assert outputs_ok(module, 0) and theirs.exists()  # left in place for the machine that made it
