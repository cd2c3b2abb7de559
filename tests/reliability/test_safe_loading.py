"""Safe loading (issue 6): nothing read from the cache, a saved module or an engine file can run
code or reach the TensorRT runtime unverified.

- no pickle: cache entries are JSON plus raw blobs; saved modules load with ``weights_only=True``;
- no eval: metadata that names a class or a shape expression cannot make forward run code;
- cache directories are 0o700 and files 0o600;
- an entry whose checksum does not match is never deserialized;
- ``allow_host_code`` is False unless the user opts in, and reaches the TensorRT runtime as given;
- engine files from outside the cache load only through ``Engine.load`` and a corrupt one raises
  ``EngineLoadError``.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import stat
import types
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module import Engine, EngineLoadError
from torch_trt_module._pipeline import compile as _compile
from torch_trt_module._cache.cache import EngineCache
from torch_trt_module import backends
from torch_trt_module._cache import entries as _entries
from torch_trt_module._runtime import module as _module
from torch_trt_module.backends import BackendChoice, _tensorrt, _trt_loader

from harness import faults
from harness.faults import compile_tiny, example, outputs_ok

from .._support import require_rtx


def saved(tmp_path: Path, module: ttm.TRTModule, name: str = "m.pt") -> Path:
    path = tmp_path / name
    ttm.save(module, path)
    return path


def crafted_engine(engine: Engine, marker: Path) -> Engine:
    """The engine with metadata an attacker who can write the file would choose: an output tree that
    names subprocess.Popen with args=/shell= keys, and an output dim that is Python code."""
    meta = json.loads(json.dumps(engine.meta))
    command = f"touch {marker}"
    meta["model"]["output_tree"] = {
        "kind": "dict", "cls": "subprocess:Popen", "keys": ["args", "shell"],
        "children": [{"kind": "const", "value": command}, {"kind": "const", "value": True}]}
    meta["model"]["outputs"][0]["dims"] = [f"__import__('os').system('{command}')", 4]
    return Engine(engine.backend, engine.plan, engine.onnx, meta)


# --------------------------------------------------------------------------- saved modules

def test_saved_module_loads_with_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = compile_tiny(0, tmp_path / "cache")
    path = saved(tmp_path, module)
    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:  # test double: records how torch.load is called
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded = ttm.load(path)
    assert [c.get("weights_only") for c in calls] == [True]
    assert outputs_ok(loaded, 0)
    assert (loaded.engine.backend, loaded.engine.plan, loaded.engine.onnx) == \
        (module.engine.backend, module.engine.plan, module.engine.onnx)
    # What is in the file: plain data and uint8 tensors, nothing else.
    state = real_load(path, weights_only=True)["_extra_state"]
    assert {type(v) for v in state.values()} <= {int, str, torch.Tensor}
    assert all(v.dtype == torch.uint8 for v in state.values() if isinstance(v, torch.Tensor))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_payload_in_a_saved_module_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"_extra_state": _Payload(marker)}, path)
    with pytest.raises(EngineLoadError, match="is not a module saved by torch_trt_module.save"):
        ttm.load(path)
    assert not marker.exists()


def test_corrupt_saved_module_is_refused_never_served(tmp_path: Path) -> None:
    module = compile_tiny(0, tmp_path / "cache")
    path = saved(tmp_path, module)
    data = path.read_bytes()
    rng = random.Random(0)
    outcomes = {"refused": 0, "identical": 0}
    for i in range(60):
        bad = bytearray(data)
        bad[rng.randrange(len(bad))] ^= rng.randrange(1, 256)
        (tmp_path / "bad.pt").write_bytes(bytes(bad))
        try:
            loaded = ttm.load(tmp_path / "bad.pt")
        except EngineLoadError:
            outcomes["refused"] += 1
            continue
        # A flip that changes nothing the module holds (zip padding, a CRC field torch skips).
        e, o = loaded.engine, module.engine
        assert (e.backend, e.plan, e.onnx, e.meta) == (o.backend, o.plan, o.onnx, o.meta), f"flip {i} served"
        outcomes["identical"] += 1
    assert outcomes["refused"] > 40


def test_saved_module_with_edited_contents_is_refused(tmp_path: Path) -> None:
    module = compile_tiny(0, tmp_path / "cache")
    state = torch.load(saved(tmp_path, module), weights_only=True)
    data = state["_extra_state"]["engine"].numpy().tobytes()  # the container: magic, length, header, blobs
    n = int.from_bytes(data[8:16], "little")
    header = json.loads(data[16:16 + n])
    header["header"]["meta"]["model"]["inputs"][0]["max"][0] = 4096  # a valid-looking but wrong profile
    raw = json.dumps(header).encode()  # the recorded header_sha256 is left as it was
    edited = data[:8] + len(raw).to_bytes(8, "little") + raw + data[16 + n:]
    state["_extra_state"]["engine"] = torch.frombuffer(bytearray(edited), dtype=torch.uint8)
    torch.save(state, tmp_path / "edited.pt")
    with pytest.raises(EngineLoadError, match="checksum does not match"):
        ttm.load(tmp_path / "edited.pt")


# --------------------------------------------------------------------------- no eval, no arbitrary classes

def test_metadata_cannot_make_forward_run_code_from_a_saved_module(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    module = compile_tiny(0, tmp_path / "cache")
    crafted = ttm.TRTModule(crafted_engine(module.engine, marker))
    path = saved(tmp_path, crafted, "crafted.pt")  # valid checksums: the attacker recomputes them
    loaded = ttm.load(path)
    with torch.inference_mode():
        out = loaded(example())
    assert not marker.exists()
    assert type(out) is dict  # the named class was refused; the builtin container is used


def test_metadata_cannot_make_forward_run_code_from_the_cache(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    root = tmp_path / "cache"
    module = compile_tiny(0, root)
    cache = EngineCache(root)
    (info,) = cache.entries()
    entry = cache.get(info.key)
    assert entry is not None
    meta = {k: v for k, v in entry.meta.items() if k in ("engine_meta", "backend")}
    meta["engine_meta"] = crafted_engine(module.engine, marker).meta
    assert cache.put(info.key, entry.blobs, meta)  # a cache writer's entry: every checksum matches
    warm = compile_tiny(0, root)
    with torch.inference_mode():
        out = warm(example())
    assert not marker.exists() and type(out) is dict


def test_engine_file_metadata_cannot_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    module = compile_tiny(0, tmp_path / "cache")
    crafted_engine(module.engine, marker).save(tmp_path / "crafted.ttm")
    loaded = ttm.TRTModule(Engine.load(tmp_path / "crafted.ttm"))
    with torch.inference_mode():
        loaded(example())
    assert not marker.exists()


# --------------------------------------------------------------------------- the cache on disk

def walk(root: Path) -> Iterator[Path]:
    yield root
    yield from sorted(root.rglob("*"))


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_cache_is_private_json_and_raw_blobs(tmp_path: Path, umask: int) -> None:
    root = tmp_path / "cache"
    old = os.umask(umask)
    try:
        module = compile_tiny(0, root)
        compile_tiny(0, root)  # a hit: records, refreshes, takes locks
    finally:
        os.umask(old)
    blobs = {module.engine.plan, module.engine.onnx}
    kinds = set()
    for p in walk(root):
        mode = stat.S_IMODE(p.stat().st_mode)
        if p.is_dir():
            assert mode == 0o700, f"{p} is {oct(mode)}"
            continue
        assert mode == 0o600, f"{p} is {oct(mode)}"
        data = p.read_bytes()
        if p.suffix == ".json":
            json.loads(data)  # metadata and index records: plain JSON
            kinds.add("json")
        elif p.suffix == ".blob" and "+ort-" in p.name:  # ONNX Runtime's optimized copy: an ONNX protobuf
            import onnx

            graph = onnx.load_from_string(data).graph
            assert [i.name for i in graph.input] == module.input_names
            kinds.add("ort")
        elif p.suffix == ".blob":
            assert data in blobs  # the engine's own bytes, not a container of objects
            kinds.add("blob")
        elif p.parent.name == "aux":  # timing caches, the cache's counts: _io's checksummed container
            assert data.startswith(b"TTMBOX03")
        else:
            assert p.suffix == ".lock" and data == b""
            kinds.add("lock")
    assert kinds == {"json", "blob", "ort", "lock"}


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Test double over pickle's entry points: records every use instead of unpickling."""
    used: list[str] = []
    for name in ("load", "loads"):
        real = getattr(pickle, name)
        monkeypatch.setattr(pickle, name, lambda *a, _n=name, _r=real, **k: (used.append(_n), _r(*a, **k))[1])
    real_unpickler = pickle.Unpickler

    class Unpickler(real_unpickler):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **k: Any) -> None:
            used.append("Unpickler")
            super().__init__(*a, **k)

    monkeypatch.setattr(pickle, "Unpickler", Unpickler)
    return used


def test_a_warm_compile_unpickles_nothing(tmp_path: Path, no_unpickling: list[str]) -> None:
    root = tmp_path / "cache"
    compile_tiny(0, root)
    builds = _compile.STATS["builds"]
    warm = compile_tiny(0, root)
    assert _compile.STATS["builds"] == builds and outputs_ok(warm, 0)
    assert no_unpickling == []
    pickle.loads(pickle.dumps(1))  # the spy does see a use
    assert no_unpickling == ["loads"]


# --------------------------------------------------------------------------- never deserialized unverified

class _RunnerDouble:
    """Test double for TensorRTRunner: this machine has no GPU to run an engine on."""

    backend = "tensorrt_rtx"

    def __init__(self, engine: Any, inputs: Any, outputs: Any, device: Any, **kwargs: Any) -> None:
        self.engine, self.device = engine, torch.device(device)


def _no_rebuild(exported: Any) -> Any:
    raise AssertionError("nothing here may rebuild")


def install_fake_gpu(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bool]]:
    """Pretend a GPU can run the engine, and record what reaches deserialization: a test double,
    since deserializing needs a GPU this machine does not have. Install it after building for real
    (the doubles cannot run forward)."""
    seen: list[tuple[bytes, bool]] = []

    def deserialize(plan: bytes, *, backend: str, device: Any = None, allow_host_code: bool = False) -> object:
        seen.append((bytes(plan), allow_host_code))
        return object()

    monkeypatch.setattr(backends, "can_run_plan", lambda backend, meta, device: None)
    monkeypatch.setattr(_module, "default_device", lambda backend, meta, has_plan: "cuda")
    monkeypatch.setattr(_trt_loader, "deserialize", deserialize)
    monkeypatch.setattr(_tensorrt, "TensorRTRunner", _RunnerDouble)
    return seen


@pytest.mark.usefixtures("rtx_required")  # an entry with a plan to deserialize
def test_an_entry_whose_checksum_fails_is_never_deserialized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cache"
    tr = faults.Tracker(root)
    tr.add(0)
    key, plan = tr.entries[0].key, tr.entries[0].plan
    assert plan
    seen = install_fake_gpu(monkeypatch)
    device = torch.device("cpu")
    settings = ttm.Settings.from_options()
    runs_here = BackendChoice("tensorrt_rtx", "tensorrt_rtx", "the fake GPU runs it")
    # Positive control: a verified hit does reach deserialization, with exactly the stored bytes.
    assert _entries.read_entry(EngineCache(root), key, device, runs_here, _no_rebuild) is not None
    assert seen == [(plan, False)]
    faults.flip_byte(tr.blob(0, "engine"), random.Random(1))
    with faults.capture_warnings() as warned:
        assert _entries.read_entry(EngineCache(root), key, device, runs_here, _no_rebuild) is None
    assert seen == [(plan, False)]  # the corrupt bytes never got there
    assert any("checksum mismatch for blob 'engine'" in w for w in warned)


def test_a_corrupt_engine_file_is_never_deserialized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine("tensorrt_rtx", b"PLAN" * 100, b"ONNX", {"model": {}})
    engine.save(tmp_path / "e.ttm")
    data = bytearray((tmp_path / "e.ttm").read_bytes())
    data[-150] ^= 1  # inside the plan
    (tmp_path / "e.ttm").write_bytes(bytes(data))
    seen = install_fake_gpu(monkeypatch)
    with pytest.raises(EngineLoadError, match="checksum mismatch in the 'plan' blob"):
        ttm.TRTModule(Engine.load(tmp_path / "e.ttm"))
    assert seen == []


# --------------------------------------------------------------------------- host code

def test_allow_host_code_is_off_unless_opted_in(tmp_path: Path) -> None:
    assert ttm.TRTModule().allow_host_code is False
    assert ttm.Settings().allow_host_code is False
    module = compile_tiny(0, tmp_path / "cache")
    assert module.allow_host_code is False
    assert compile_tiny(0, tmp_path / "cache", allow_host_code=True).allow_host_code is True


@pytest.mark.usefixtures("rtx_required")  # a plan to hand to deserialization
def test_trtmodule_hands_allow_host_code_to_deserialization(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = compile_tiny(0, tmp_path / "cache")
    assert module.engine.has_plan
    seen = install_fake_gpu(monkeypatch)
    ttm.TRTModule(module.engine)
    ttm.TRTModule(module.engine, allow_host_code=True)
    assert [flag for _, flag in seen] == [False, True]  # what TRTModule hands to deserialization


def test_deserialize_sets_host_code_to_the_given_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real runtime segfaults deserializing without a GPU, so a strict double of it stands in
    # (tests/trt_double.py): it takes only what the real tensorrt_rtx.Runtime takes, and the engine
    # it returns refuses new attributes as the real one does.
    require_rtx()  # the double is derived from the real tensorrt_rtx.Runtime
    import tensorrt_rtx as trt

    from ..backends.trt_double import runtime_double

    seen: list[bool] = []
    fake_trt = types.SimpleNamespace(__name__="tensorrt_rtx_double", Runtime=runtime_double(trt, seen),
                                     ILogger=trt.ILogger)
    monkeypatch.setattr(_trt_loader, "import_runtime", lambda backend: ("tensorrt_rtx", fake_trt))
    assert _trt_loader.deserialize(b"plan", backend="tensorrt_rtx") is not None
    assert _trt_loader.deserialize(b"plan", backend="tensorrt_rtx", allow_host_code=True) is not None
    assert seen == [False, True]
    with pytest.raises(EngineLoadError, match="could not deserialize the engine"):
        _trt_loader.deserialize(b"bad", backend="tensorrt_rtx")


# --------------------------------------------------------------------------- engine files

def test_compile_never_loads_engine_files_it_finds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cache"
    other = compile_tiny(1, tmp_path / "elsewhere").engine  # another model's engine
    root.mkdir(mode=0o700)
    other.save(root / "model.ttm")
    (root / "entries").mkdir(mode=0o700)
    other.save(root / "entries" / "model.engine")
    opened: list[str] = []
    real = Engine.from_bytes.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(Engine, "from_bytes", classmethod(lambda cls, *a, **k: (opened.append("x"), real(cls, *a, **k))[1]))
    module = compile_tiny(0, root)
    assert outputs_ok(module, 0) and opened == []
    # The explicit API does load it.
    assert outputs_ok(ttm.TRTModule(Engine.load(root / "model.ttm")), 1) and opened == ["x"]


@pytest.mark.usefixtures("rtx_required")  # an engine file with a plan
def test_a_flipped_plan_byte_in_an_engine_file_is_named(tmp_path: Path) -> None:
    engine = compile_tiny(0, tmp_path / "cache").engine
    assert engine.has_plan and not engine.has_program  # the plan is the blob just before the graph
    path = tmp_path / "e.ttm"
    engine.save(path)
    data = path.read_bytes()
    bad = data[:-len(engine.onnx) - 10] + b"\0" + data[-len(engine.onnx) - 9:]
    (tmp_path / "bad.ttm").write_bytes(bad)
    with pytest.raises(EngineLoadError, match="'plan' blob"):
        Engine.load(tmp_path / "bad.ttm")


def test_corrupt_engine_files_raise_engine_load_error(tmp_path: Path) -> None:
    engine = compile_tiny(0, tmp_path / "cache").engine
    path = tmp_path / "e.ttm"
    engine.save(path)
    data = path.read_bytes()
    header_len = int.from_bytes(data[8:16], "little")
    cases = {
        "bad magic": (b"NOTANENG" + data[8:], "bad magic"),
        "truncated": (data[: len(data) // 2], "checksum mismatch in the"),
        "header flip": (data[:40] + bytes([data[40] ^ 0x20]) + data[41:], "header"),
    }
    for name, (bad, why) in cases.items():
        (tmp_path / "bad.ttm").write_bytes(bad)
        with pytest.raises(EngineLoadError, match=why):
            Engine.load(tmp_path / "bad.ttm")
    rng = random.Random(0)
    for i in range(300):  # half in the header, where a flip once loaded silently
        bad = bytearray(data)
        pos = rng.randrange(16 + header_len) if i % 2 else rng.randrange(len(bad))
        bad[pos] ^= rng.randrange(1, 256)
        try:
            loaded = Engine.from_bytes(bytes(bad))
        except EngineLoadError:
            continue
        assert (loaded.backend, loaded.plan, loaded.onnx, loaded.meta) == \
            (engine.backend, engine.plan, engine.onnx, engine.meta), f"flip {i} at {pos} loaded different content"
    assert outputs_ok(ttm.TRTModule(Engine.load(path)), 0)
