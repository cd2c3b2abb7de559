"""torch_trt_module._build.engine: Engine is immutable, its deferred blobs are read once at first use,
and it round-trips through to_bytes/from_bytes and save/load; corrupt or foreign files are refused
with an EngineLoadError that names the file and the problem."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module import EngineLoadError
from torch_trt_module._build.engine import ENGINE_FORMAT, Deferred, Engine
from torch_trt_module._core.io import pack, unpack


@pytest.fixture(scope="module")
def exported() -> ttm.ExportedModel:
    torch.manual_seed(0)
    return ttm.export_onnx(torch.nn.Linear(4, 2).eval(), torch.randn(2, 4), exporter="torchscript")


@pytest.fixture
def engine(exported: ttm.ExportedModel) -> Engine:
    return ttm.build_engine(exported, backend="onnxruntime")


def _real_program() -> bytes:
    # A stored program is checked when an engine is read (nothing in it may be evaluated), so the
    # tests carry a real one, not placeholder bytes.
    program = ttm.export_onnx(torch.nn.Linear(4, 2).eval(), torch.randn(2, 4), exporter="dynamo").program
    assert program is not None
    return program


PROGRAM = _real_program()


def with_plan(engine: Engine, plan: bytes = b"PLAN" * 100, program: bytes | None = PROGRAM) -> Engine:
    """The ONNX Runtime engine's graph and metadata with a (fake) plan: Engine never parses a plan."""
    return Engine("tensorrt_rtx", plan, engine.onnx, dict(engine.meta), program=program)


class Reads:
    """A Deferred's loader that counts its calls."""

    def __init__(self, data: bytes | None) -> None:
        self.data, self.calls = data, 0

    def __call__(self) -> bytes | None:
        self.calls += 1
        return self.data


# --------------------------------------------------------------------------- immutability

def test_attributes_cannot_be_set_or_added(engine: Engine) -> None:
    for name in ("backend", "meta", "_blobs", "plan", "new_attribute"):
        with pytest.raises(AttributeError, match=rf"^Engine is immutable; cannot set {name!r}$"):
            setattr(engine, name, None)
    assert engine.backend == "onnxruntime"


def test_attributes_cannot_be_deleted(engine: Engine) -> None:
    with pytest.raises(AttributeError, match="immutable"):
        del engine.backend


def test_a_blob_given_both_as_bytes_and_deferred_is_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match=r"^Engine takes each blob once, as bytes or deferred; got both for "
                                         r"\{'plan'\}$"):
        Engine("tensorrt_rtx", b"plan", engine.onnx, engine.meta, deferred={"plan": Deferred(4, lambda: b"plan")})


def test_an_onnxruntime_engine_has_no_plan(engine: Engine, exported: ttm.ExportedModel) -> None:
    assert engine.plan is None and not engine.has_plan
    assert engine.onnx == exported.onnx and engine.size == len(exported.onnx)
    assert engine.exported.inputs == exported.inputs and engine.exported.outputs == exported.outputs
    assert repr(engine).startswith("Engine(backend=onnxruntime ") and "plan=0.0 MB, for=cpu)" in repr(engine)


# --------------------------------------------------------------------------- deferred blobs

def test_a_deferred_plan_is_read_once_at_its_first_use(engine: Engine) -> None:
    plan = b"P" * 2_000_000
    read = Reads(plan)
    lazy = Engine("tensorrt_rtx", None, engine.onnx, engine.meta, deferred={"plan": Deferred(len(plan), read)})
    # What can be answered without the bytes is: has_plan, size, repr.
    assert lazy.has_plan and not lazy.has_program
    assert lazy.size == len(plan) + len(engine.onnx)
    assert "plan=2.0 MB" in repr(lazy)
    assert read.calls == 0
    assert lazy.plan == plan and lazy.plan is lazy.plan
    assert read.calls == 1


def test_a_deferred_blob_that_reads_none_is_absent_afterwards(engine: Engine) -> None:
    # The cache's loader returns None when the blob went bad after the hit.
    read = Reads(None)
    lazy = Engine("tensorrt_rtx", None, engine.onnx, engine.meta, deferred={"program": Deferred(10, read)})
    assert lazy.has_program and lazy.size == len(engine.onnx) + 10
    assert lazy.program is None and lazy.program is None
    assert read.calls == 1 and not lazy.has_program and lazy.size == len(engine.onnx)


def test_threads_racing_for_a_deferred_blob_read_it_once(engine: Engine) -> None:
    gate = threading.Event()
    read = Reads(b"plan bytes")

    def slow() -> bytes | None:
        gate.wait(5)
        return read()

    lazy = Engine("tensorrt_rtx", None, engine.onnx, engine.meta, deferred={"plan": Deferred(10, slow)})
    got: list[bytes | None] = []
    threads = [threading.Thread(target=lambda: got.append(lazy.plan), daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "a thread is stuck reading the deferred blob"
    assert got == [b"plan bytes"] * 8 and read.calls == 1


def test_to_bytes_reads_deferred_blobs(engine: Engine) -> None:
    read = Reads(b"the plan")
    lazy = Engine("tensorrt_rtx", None, engine.onnx, engine.meta, program=PROGRAM,
                  deferred={"plan": Deferred(8, read)})
    back = Engine.from_bytes(lazy.to_bytes())
    assert read.calls == 1 and back.plan == b"the plan" and back.program == PROGRAM and back.onnx == engine.onnx


# --------------------------------------------------------------------------- bytes and files

def test_bytes_round_trip(engine: Engine) -> None:
    full = with_plan(engine)
    back = Engine.from_bytes(full.to_bytes())
    assert (back.backend, back.plan, back.onnx, back.program, back.meta) == \
        ("tensorrt_rtx", full.plan, full.onnx, PROGRAM, full.meta)
    plain = Engine.from_bytes(engine.to_bytes())
    assert plain.plan is None and plain.program is None and not plain.has_plan and plain.meta == engine.meta


def test_the_file_is_one_container_of_kind_engine(engine: Engine) -> None:
    header, blobs = unpack(with_plan(engine).to_bytes(), kind="engine")
    assert header["format"] == ENGINE_FORMAT and header["backend"] == "tensorrt_rtx"
    assert list(blobs) == ["plan", "onnx", "program"]


def test_save_and_load(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "model.ttm"
    with_plan(engine).save(path)
    back = Engine.load(path)
    assert back.plan == b"PLAN" * 100 and back.backend == "tensorrt_rtx" and back.exported.input_names == ["input"]
    with_plan(engine, plan=b"other").save(path)  # replaces the file whole
    assert Engine.load(str(path)).plan == b"other"
    assert [p.name for p in tmp_path.iterdir()] == ["model.ttm"]


def test_a_corrupt_file_names_itself_and_the_problem(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "model.ttm"
    data = bytearray(with_plan(engine).to_bytes())
    data[-3] ^= 0xFF  # inside the program blob, the last one
    path.write_bytes(bytes(data))
    with pytest.raises(EngineLoadError, match=rf"^{path}: checksum mismatch in the 'program' blob \(checksum mismatch "
                                              r"for blob 'program'; corrupt file\)$"):
        Engine.load(path)
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(EngineLoadError, match=rf"^{path}: corrupt header"):
        Engine.load(path)
    path.write_bytes(b"\x80\x04 a pickle, not an engine")
    with pytest.raises(EngineLoadError, match=rf"^{path} is not a torch_trt_module engine file \(bad header: "
                                              r"bad magic\)$"):
        Engine.load(path)


def test_another_container_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EngineLoadError, match=r"^bytes holds a 'torch-program' of format 3, not a 'engine'"):
        Engine.from_bytes(pack("torch-program", {}, {}))


def test_another_engine_format_is_refused_with_the_fix(engine: Engine) -> None:
    data = pack("engine", {"format": ENGINE_FORMAT - 1, "backend": "onnxruntime", "meta": engine.meta},
                {"onnx": engine.onnx})
    with pytest.raises(EngineLoadError, match=rf"^old.ttm: engine format {ENGINE_FORMAT - 1} != {ENGINE_FORMAT}; "
                                              "build and save it again$"):
        Engine.from_bytes(data, source="old.ttm")


@pytest.mark.parametrize("drop,error", [("meta.model", "KeyError: 'model'"), ("blob.onnx", "KeyError: 'onnx'"),
                                        ("header.backend", "KeyError: 'backend'"),
                                        ("meta.model.inputs", "KeyError: 'inputs'")])
def test_malformed_metadata_fails_at_load_not_at_forward(engine: Engine, drop: str, error: str) -> None:
    meta = {**engine.meta, "model": dict(engine.meta["model"])}
    header = {"format": ENGINE_FORMAT, "backend": "onnxruntime", "meta": meta}
    blobs = {"onnx": engine.onnx}
    if drop == "meta.model":
        del meta["model"]
    elif drop == "meta.model.inputs":
        del meta["model"]["inputs"]
    elif drop == "blob.onnx":
        blobs = {}
    else:
        del header["backend"]
    with pytest.raises(EngineLoadError, match=rf"^e.ttm: malformed engine \({error}\)$"):
        Engine.from_bytes(pack("engine", header, blobs), source="e.ttm")
