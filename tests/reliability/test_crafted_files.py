"""Crafted files (issue 24): a saved module, an engine file or a cache entry made by someone else never
runs code and never reads a file, even with every checksum recomputed as an attacker would.

Each crafted file is built here from a real saved module:
- a torch.export program whose shape expression is a ``sympify`` payload (a plain TRTModule on the
  PyTorch runtime, a SegmentedModule file, a cache hit);
- an ONNX graph whose initializer lives in ``secret.bin`` (``data_location=EXTERNAL``), which
  ONNX Runtime would read from the current directory into the weights (ttm.load, an engine file,
  a cache hit, ONNX Runtime's optimized copy in the cache).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module import Engine, EngineLoadError
from torch_trt_module._cache.cache import EngineCache
from torch_trt_module._core.io import pack, unpack
from torch_trt_module._core.io import from_u8, to_u8

from .._support import cache_entry

from harness.faults import TinyNet, capture_warnings, compile_tiny, example, outputs_ok

STATE_FORMAT = 3  # _build.engine.STATE_FORMAT: what a saved TRTModule's state says it is
PAYLOAD = "sympify.__globals__['__builtins__']['__import__']('os').system('touch {marker}')"


@pytest.fixture(scope="module")
def dynamo_module(tmp_path_factory: pytest.TempPathFactory) -> ttm.TRTModule:
    """A TRTModule with a torch.export program (the dynamo exporter stores one)."""
    module = compile_tiny(0, tmp_path_factory.mktemp("cache"), exporter="dynamo")
    assert module.engine.has_program
    return module


def crafted_program(program: bytes, marker: Path) -> bytes:
    """The stored program with one symbolic shape replaced by the payload; checksums recomputed."""
    header, blobs = unpack(program, kind="torch-program")
    doc = json.loads(blobs["program"])
    stack, done = [doc], False
    while stack and not done:
        node = stack.pop()
        if isinstance(node, dict):
            if "expr_str" in node:
                node["expr_str"] = PAYLOAD.format(marker=marker)
                done = True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    assert done, "the program has no symbolic shape to replace"
    # Without the compact graph (_formats.graph), so that every reader goes through this JSON.
    blobs.pop("graph", None)
    return pack("torch-program", header, {**blobs, "program": json.dumps(doc).encode()})


def crafted_onnx(onnx: bytes) -> bytes:
    """The graph with its first initializer's values moved to the file ``secret.bin``."""
    import onnx as onnx_lib

    model = onnx_lib.load_from_string(onnx)
    init = model.graph.initializer[0]
    init.ClearField("raw_data")
    del init.float_data[:]
    init.data_location = onnx_lib.TensorProto.EXTERNAL
    entry = init.external_data.add()
    entry.key, entry.value = "location", "secret.bin"
    return model.SerializeToString()  # type: ignore[no-any-return]


def save_engine(engine: Engine, path: Path) -> Path:
    """A saved TRTModule holding ``engine`` (its state is only the container), written as ttm.save would."""
    torch.save({"_extra_state": {"format": STATE_FORMAT, "engine": to_u8(engine.to_bytes())}}, path)
    return path


def with_blobs(engine: Engine, **blobs: bytes) -> Engine:
    parts = {"plan": engine.plan, "onnx": engine.onnx, "program": engine.program, **blobs}
    return Engine(engine.backend, parts["plan"], parts["onnx"], engine.meta, program=parts["program"])


@pytest.fixture
def secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file the crafted graph names, in the current directory (ONNX Runtime refuses absolute paths and ..)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "secret.bin"
    path.write_bytes(b"\x00\x00\x80\x7f" * 4096)  # float +inf: any use of it shows in the outputs
    return path


# --------------------------------------------------------------------------- code in a stored program

def test_a_saved_trtmodule_with_a_crafted_program_is_refused_at_load(dynamo_module: ttm.TRTModule,
                                                                     tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    ttm.save(dynamo_module, tmp_path / "real.pt")
    state = torch.load(tmp_path / "real.pt", weights_only=True)
    assert set(state) == {"_extra_state"} and state["_extra_state"]["format"] == STATE_FORMAT  # save_engine's layout
    engine = with_blobs(dynamo_module.engine, program=crafted_program(dynamo_module.engine.program, marker))
    path = save_engine(engine, tmp_path / "crafted.pt")
    with pytest.raises(EngineLoadError, match=r"crafted.pt: refused to read the stored PyTorch program: symbolic "
                                              r"expression .*sympify"):
        ttm.load(path)
    assert not marker.exists()
    # An engine handed straight to the PyTorch runtime (as on a GPU without TensorRT) is refused too.
    with pytest.raises(EngineLoadError, match="refused to read the stored PyTorch program"):
        ttm.TRTModule(engine, runtime="torch")
    engine.save(tmp_path / "crafted.ttm")
    with pytest.raises(EngineLoadError, match="crafted.ttm: refused to read the stored PyTorch program"):
        Engine.load(tmp_path / "crafted.ttm")
    assert not marker.exists()
    assert outputs_ok(ttm.TRTModule(ttm.load(tmp_path / "real.pt").engine, runtime="torch"), 0)  # the real one


def test_a_saved_segmented_module_with_a_crafted_program_is_refused(tmp_path: Path) -> None:
    from tests._support import require_rtx
    from tests.partition.test_split import NonZeroBetween

    require_rtx()
    marker = tmp_path / "PWNED"
    split = ttm.compile(NonZeroBetween().eval(), torch.randn(4, 8), cache=False)
    assert isinstance(split, ttm.SegmentedModule)
    ttm.save(split, tmp_path / "split.pt")
    state = torch.load(tmp_path / "split.pt", weights_only=True)
    state["program"] = to_u8(crafted_program(from_u8(state["program"]), marker))
    torch.save(state, tmp_path / "crafted.pt")
    with pytest.raises(EngineLoadError, match="crafted.pt: refused to read the stored PyTorch program"):
        ttm.load(tmp_path / "crafted.pt")
    assert not marker.exists()


def _replant(cache: EngineCache, key: str, entry: Any, **blobs: bytes) -> None:
    meta = {k: v for k, v in entry.meta.items() if k in ("engine_meta", "backend")}
    assert cache.put(key, {**entry.blobs, **blobs}, meta)  # a cache writer's entry: every checksum matches


def test_a_cache_hit_with_a_crafted_program_is_evicted_and_rebuilt(tmp_path: Path) -> None:
    marker, root = tmp_path / "PWNED", tmp_path / "cache"
    compile_tiny(0, root, exporter="dynamo", runtime="torch")
    cache, key, entry = cache_entry(root)
    _replant(cache, key, entry, program=crafted_program(entry.blobs["program"], marker))
    with capture_warnings() as warned:
        warm = compile_tiny(0, root, exporter="dynamo", runtime="torch")
    assert not marker.exists()
    assert any("refused to read the stored PyTorch program" in w and "evicting and rebuilding" in w for w in warned)
    assert warm.backend == "torch" and outputs_ok(warm, 0)
    stored = EngineCache(root).get(key)
    assert stored is not None and b"sympify" not in stored.blobs["program"]  # rebuilt, clean


def test_a_deferred_crafted_program_in_the_cache_is_dropped_at_its_first_use(tmp_path: Path) -> None:
    marker, root = tmp_path / "PWNED", tmp_path / "cache"
    compile_tiny(0, root, exporter="dynamo")
    cache, key, entry = cache_entry(root)
    _replant(cache, key, entry, program=crafted_program(entry.blobs["program"], marker))
    warm = compile_tiny(0, root, exporter="dynamo")  # ONNX Runtime runs it: the program is not read yet
    with capture_warnings() as warned:
        ttm.save(warm, tmp_path / "m.pt")  # reads it
    assert not marker.exists()
    assert any("refused to read the stored PyTorch program" in w for w in warned)
    assert not ttm.load(tmp_path / "m.pt").engine.has_program and EngineCache(root).get(key) is None


# --------------------------------------------------------------------------- files named by a stored graph

def test_a_saved_module_whose_graph_names_a_file_is_refused(tmp_path: Path, secret: Path) -> None:
    module = compile_tiny(0, tmp_path / "cache")
    engine = with_blobs(module.engine, onnx=crafted_onnx(module.engine.onnx))
    path = save_engine(engine, tmp_path / "crafted.pt")
    with pytest.raises(EngineLoadError, match=r"crafted.pt: refused the stored ONNX graph: tensor 'model.fc1.weight' "
                                              r"keeps its data in an external file \(location='secret.bin'\)"):
        ttm.load(path)
    engine.save(tmp_path / "crafted.ttm")
    with pytest.raises(EngineLoadError, match="keeps its data in an external file"):
        Engine.load(tmp_path / "crafted.ttm")
    secret.unlink()  # missing: the same refusal, not a raw onnxruntime Fail
    with pytest.raises(EngineLoadError, match="keeps its data in an external file"):
        ttm.load(path)


def test_without_the_check_onnx_runtime_reads_the_named_file(tmp_path: Path, secret: Path) -> None:
    """Positive control: the crafted graph does read ``secret.bin`` when nothing stops it."""
    module = compile_tiny(0, tmp_path / "cache")
    from torch_trt_module.backends._onnxruntime import OnnxRuntimeRunner

    ex = module.engine.exported
    runner = OnnxRuntimeRunner(crafted_onnx(module.engine.onnx), ex.inputs, ex.outputs, torch.device("cpu"))
    (out,) = runner.run([example()])
    assert not torch.isfinite(out).all()  # the file's +inf values reached the outputs


@pytest.mark.parametrize("blob", ["onnx", "optimized"])
def test_a_cache_hit_whose_graph_names_a_file_is_evicted_and_rebuilt(tmp_path: Path, secret: Path,
                                                                     blob: str) -> None:
    root = tmp_path / "cache"
    compile_tiny(0, root)
    cache, key, entry = cache_entry(root)
    name = "onnx" if blob == "onnx" else next(n for n in entry.meta["blobs"] if n.startswith("ort-"))
    data = entry.blobs["onnx"] if blob == "onnx" else cache.get(key, only={name}).blobs[name]
    full = {n: b for n, b in cache.get(key, only=set(entry.meta["blobs"])).blobs.items()}
    _replant(cache, key, entry, **{**full, name: crafted_onnx(data)})
    with capture_warnings() as warned:
        warm = compile_tiny(0, root)
    assert any("keeps its data in an external file (location='secret.bin')" in w and "evicting" in w
               for w in warned), warned
    assert outputs_ok(warm, 0)
    assert outputs_ok(warm, TinyNet(0))
