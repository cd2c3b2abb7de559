"""Engines in the cache (torch_trt_module._cache.entries): at a hit, what is read now and what is deferred
(a plan this machine cannot run), the ONNX Runtime session made while the graph's checksum is
computed, and ONNX Runtime's optimized graph kept per kind of CPU."""

from __future__ import annotations

import contextlib
import copy
import json
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


# --------------------------------------------------------------------------- the deferred plan

@pytest.mark.usefixtures("rtx_required")  # a plan this machine cannot run: an RTX plan without a GPU
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
    assert module.runner.used_optimized  # from ORT's optimized copy, stored by the cold compile
    x = example()
    plain = _onnxruntime.OnnxRuntimeRunner(module.engine.onnx, module.engine.exported.inputs, module.engine.exported.outputs)
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
    assert read == ["onnx"] and not module.runner.used_optimized
    assert outputs_ok(module, 0) and theirs.exists()  # left in place for the machine that made it


# --------------------------------------------------------------------------- the PyTorch program blob

def _program_blob(root: Path) -> Path:
    (path,) = (root / "entries").glob("*+program+*.blob")
    return path


def test_a_corrupt_program_read_at_first_use_is_refused_and_rebuilt_by_the_next_compile(tmp_path: Path) -> None:
    # On the CPU the module runs on ONNX Runtime, so a hit defers the program until it is used
    # (state_dict(), save(), or the PyTorch runtime); a flipped byte fails its checksum there.
    root = tmp_path / "cache"
    module = compile_tiny(0, root, exporter="dynamo")
    assert module.engine is not None and module.engine.program is not None
    faults.flip_byte(_program_blob(root), random.Random(3))
    with counting() as n, faults.capture_warnings() as warned:
        module = compile_tiny(0, root, exporter="dynamo")
        assert outputs_ok(module, 0)
        assert module.engine is not None and module.engine.program is None  # never the corrupt bytes
    assert n["cache_hits"] == 1 and n["builds"] == 0
    assert any("checksum mismatch for blob 'program'" in w for w in warned), warned
    with counting() as n:
        module = compile_tiny(0, root, exporter="dynamo")
    assert n["builds"] == 1 and module.engine is not None and module.engine.program is not None


def test_a_corrupt_program_the_runtime_needs_at_once_is_rebuilt(tmp_path: Path) -> None:
    # runtime="torch" reads the program at the hit, checked like every eager blob.
    root = tmp_path / "cache"
    compile_tiny(0, root, exporter="dynamo", runtime="torch")
    faults.flip_byte(_program_blob(root), random.Random(4))
    with counting() as n, faults.capture_warnings() as warned:
        module = compile_tiny(0, root, exporter="dynamo", runtime="torch")
    assert n["builds"] == 1 and module.backend == "torch" and outputs_ok(module, 0)
    assert any("program" in w for w in warned), warned
