"""Fuzzing what is stored (issue 24): random truncations and bit flips of a saved module and of a cache
entry, 200 of each kind (seeded). Every damaged saved module raises a TorchTRTError subclass, or
loads with exactly the original engine (a flip in the zip's own bookkeeping, which torch does not
read, changes nothing we hold: our checksums cover every byte that is ours). Every damaged cache
entry is a miss (evicted, with a WARNING), or, for a plan that no runtime here runs and that is
therefore only size-checked at the hit, caught by its checksum at its first use and rebuilt. And nothing
outside the test's temporary directory is written, removed or renamed: an audit hook watches."""

from __future__ import annotations

import contextlib
import os
import random
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module import Engine, TorchTRTError
from torch_trt_module._cache import entries as _entries
from torch_trt_module._cache.cache import EngineCache
from torch_trt_module.backends import BackendChoice

from harness.faults import capture_warnings, compile_tiny, outputs_ok

N = 200
_WATCH: list[list[tuple[str, str]]] = []  # the audit hook's sink while a test watches (hooks cannot be removed)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _WATCH:
        return
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None))[:3]
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writes and isinstance(path, (str, bytes, os.PathLike)):
            _WATCH[-1].append((event, os.fsdecode(path)))
    elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.truncate", "os.symlink", "os.utime"):
        if isinstance(args[0], (str, bytes, os.PathLike)):
            _WATCH[-1].append((event, os.fsdecode(args[0])))
    elif event == "os.rename":
        _WATCH[-1].extend((event, os.fsdecode(p)) for p in args[:2] if isinstance(p, (str, bytes, os.PathLike)))


sys.addaudithook(_audit)


@contextlib.contextmanager
def watched(tmp_path: Path) -> Iterator[list[tuple[str, str]]]:
    """Every file operation that changes something, inside the block; checked to stay in ``tmp_path``."""
    seen: list[tuple[str, str]] = []
    _WATCH.append(seen)
    try:
        yield seen
    finally:
        _WATCH.pop()
    root = os.path.realpath(tmp_path)
    outside = [(e, p) for e, p in seen if not os.path.realpath(p).startswith(root + os.sep)]
    assert outside == [], outside[:5]


def _damaged(data: bytes, rng: random.Random, i: int) -> bytes:
    if i < N:  # truncations, at every part of the file
        return data[:rng.randrange(len(data))]
    bad = bytearray(data)
    bit = rng.randrange(len(bad) * 8)
    bad[bit // 8] ^= 1 << (bit % 8)
    return bytes(bad)


def test_damaged_saved_modules_raise_or_load_unchanged(tmp_path: Path) -> None:
    module = compile_tiny(0, tmp_path / "cache")
    path = tmp_path / "m.pt"
    ttm.save(module, path)
    data, rng, outcomes = path.read_bytes(), random.Random(24), {"refused": 0, "unchanged": 0}
    original = module.engine.to_bytes()
    with watched(tmp_path) as touched:
        _fuzz_saved(tmp_path, data, rng, original, outcomes)
    assert outcomes["refused"] >= N + N // 2, outcomes
    assert outputs_ok(ttm.load(path), 0)
    assert any(p == os.fspath(tmp_path / "bad.pt") for _, p in touched)  # the hook does see writes


def _fuzz_saved(tmp_path: Path, data: bytes, rng: random.Random, original: bytes, outcomes: dict[str, int]) -> None:
    for i in range(2 * N):
        (tmp_path / "bad.pt").write_bytes(_damaged(data, rng, i))
        try:
            loaded = ttm.load(tmp_path / "bad.pt")
        except TorchTRTError:
            outcomes["refused"] += 1
            continue
        assert i >= N, f"truncation {i} loaded"
        assert loaded.engine.to_bytes() == original, f"flip {i} loaded different content"
        outcomes["unchanged"] += 1


def test_damaged_cache_entries_are_misses_or_unchanged(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    compile_tiny(0, root)
    cache = EngineCache(root)
    (info,) = cache.entries()
    files = {p: p.read_bytes() for p in (root / "entries").iterdir()}
    stored = cache.get(info.key, only=set(info.meta["blobs"]))
    assert stored is not None and len(files) == len(info.meta["blobs"]) + 1
    rng, outcomes = random.Random(24), {"miss": 0, "caught at first use": 0}
    names = sorted(files)
    with watched(tmp_path):
        _fuzz_entry(root, info, files, names, stored, rng, outcomes)
    # Every cut and every flip is caught: at the hit, or (a plan not read at the hit) at its first use.
    assert sum(outcomes.values()) == 2 * N and outcomes["miss"] > 2 * N * 0.8, outcomes
    assert outputs_ok(compile_tiny(0, root), 0)


def _fuzz_entry(root: Path, info: Any, files: dict[Path, bytes], names: list[Path], stored: Any,
                rng: random.Random, outcomes: dict[str, int]) -> None:
    choice, cpu = BackendChoice("onnxruntime", "onnxruntime", "the CPU"), torch.device("cpu")
    rebuilt: list[Any] = []

    def rebuild(exported: Any) -> Engine:  # test double for the builder: the engine as first built
        rebuilt.append(exported)
        return Engine(info.meta["backend"], stored.blobs["engine"], stored.blobs["onnx"], info.meta["engine_meta"])

    for i in range(2 * N):
        victim = names[i % len(names)]
        victim.write_bytes(_damaged(files[victim], rng, i))
        with capture_warnings() as warned:
            got = _entries.read_entry(EngineCache(root), info.key, cpu, choice, rebuild)
        if got is None:
            # One WARNING that evicts it (a damaged optimized graph may also get ONNX Runtime's own word,
            # since the session is made while the checksum is computed).
            assert [w for w in warned if "evict" in w] == warned[-1:], (i, victim.name, warned)
            outcomes["miss"] += 1
        else:
            engine, _ = got
            assert warned == [] and engine.onnx == stored.blobs["onnx"] and engine.meta == info.meta["engine_meta"]
            # Only a plan no runtime here runs is left unread at the hit (its size is checked); its
            # checksum is checked at its first use, which rebuilds it with a WARNING.
            assert "+engine+" in victim.name and i >= N, (i, victim.name)
            rebuilt.clear()
            with capture_warnings() as warned:
                plan = engine.plan
            assert plan == stored.blobs["engine"] and len(rebuilt) == 1, (i, victim.name)
            assert len(warned) == 1 and "checksum mismatch for blob 'engine'" in warned[0], warned
            outcomes["caught at first use"] += 1
        for p in (root / "entries").iterdir():  # put the entry back as it was
            if p not in files:
                p.unlink()
        for p, data in files.items():
            p.write_bytes(data)
            os.chmod(p, 0o600)
