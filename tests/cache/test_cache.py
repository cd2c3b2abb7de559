"""The engine cache's storage layer: verification, atomicity, locking, eviction and faults.

Only ``torch_trt_module._cache.cache`` is exercised; compile() wiring is tested elsewhere.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from torch_trt_module._cache import cache as _cache
from torch_trt_module._cache.cache import CACHE_FORMAT_VERSION, DEFAULT_MAX_SIZE, EngineCache, parse_size, resolve_cache_dir
from torch_trt_module._cache.files import CacheEntry
from torch_trt_module._errors import CacheLockTimeout
from torch_trt_module._errors import CacheError, TorchTRTError

from .._support import child_argv, run_py

LOGGER = "torch_trt_module._cache.cache"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

KEY = "a" * 64
ENGINE = bytes(range(256)) * 8
ONNX = b"onnx-graph-bytes" * 50
META = {"precision": "fp16", "inputs": [{"name": "x", "shape": [1, 3, 8, 8]}], "note": "caf\u00e9"}


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def age(paths: list[Path], seconds: float) -> None:
    """Pretend ``paths`` were last written ``seconds`` ago (explicit time control, no sleeping)."""
    t = time.time() - seconds
    for p in paths:
        os.utime(p, (t, t))



class Holder:
    """A child process that holds ``cache.lock(name)`` until released."""

    def __init__(self, root: Path, name: str) -> None:
        code = f"""
            import sys
            from torch_trt_module._cache.cache import EngineCache
            with EngineCache({str(root)!r}).lock({name!r}):
                print("locked", flush=True)
                sys.stdin.readline()
        """
        self.proc = subprocess.Popen(child_argv(code), text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"  # not created: the store must create it


@pytest.fixture
def cache(root: Path) -> EngineCache:
    return EngineCache(root)


def put_default(cache: EngineCache, key: str = KEY) -> None:
    assert cache.put(key, {"engine": ENGINE, "onnx": ONNX}, META) is True


def assert_default(entry: CacheEntry | None, key: str = KEY) -> None:
    assert entry is not None
    assert entry.key == key
    assert entry.blobs == {"engine": ENGINE, "onnx": ONNX}
    assert {k: entry.meta[k] for k in META} == META


# ---------------------------------------------------------------- round trip


def test_round_trip_with_permissions(cache: EngineCache, root: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        put_default(cache)
        assert cache.record("fp1", KEY) and cache.write_aux("timing", b"t")
        with cache.lock(KEY):
            pass
    finally:
        os.umask(old_umask)
    entry = cache.get(KEY)
    assert_default(entry)
    assert entry is not None
    meta = entry.meta
    assert meta["format_version"] == CACHE_FORMAT_VERSION and meta["key"] == KEY
    assert meta["blobs"]["engine"] == {"sha256": hashlib.sha256(ENGINE).hexdigest(), "size": len(ENGINE)}
    assert meta["last_used"] >= meta["created"]
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert {p.parent.name for p in files_under(root)} == {"entries", "index", "aux", "locks"}
    for f in files_under(root):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert "blobs=" not in repr(entry)  # megabytes of engine stay out of logs and tracebacks


def test_metadata_is_plain_json_with_store_fields(cache: EngineCache, root: Path) -> None:
    put_default(cache)
    on_disk = json.loads((root / "entries" / f"{KEY}.json").read_text())
    for f in ("format_version", "key", "created", "last_used", "blobs", "meta_sha256"):
        assert f in on_disk
    assert on_disk["precision"] == "fp16"


def test_put_replaces_entry_and_drops_only_old_stale_blobs(cache: EngineCache, root: Path) -> None:
    put_default(cache)
    old_blobs = sorted((root / "entries").glob("*.blob"))
    age(old_blobs, _cache.ORPHAN_AGE_S + 60)
    assert cache.put(KEY, {"engine": b"new engine", "onnx": ONNX}, META)
    entry = cache.get(KEY)
    assert entry is not None and entry.blobs["engine"] == b"new engine"
    names = {p.name for p in (root / "entries").glob("*.blob")}
    assert len(names) == 2  # the replaced engine blob is gone, the unchanged onnx blob is kept


# ---------------------------------------------------------------- corruption


def test_truncated_blob_is_a_miss_and_evicted(cache: EngineCache, root: Path, caplog: pytest.LogCaptureFixture) -> None:
    put_default(cache)
    engine_file = next((root / "entries").glob(f"{KEY}+engine+*.blob"))
    engine_file.write_bytes(ENGINE[:100])
    assert cache.get(KEY) is None
    (msg,) = warnings_of(caplog)
    assert KEY in msg and "blob 'engine' is 100 bytes, expected 2048 (truncated?)" in msg
    assert not (root / "entries" / f"{KEY}.json").exists()
    assert list((root / "entries").glob("*.blob")) == []
    assert cache.entries() == []
    put_default(cache)
    assert_default(cache.get(KEY))


def test_checksum_mismatch_is_named(cache: EngineCache, root: Path, caplog: pytest.LogCaptureFixture) -> None:
    put_default(cache)
    onnx_file = next((root / "entries").glob(f"{KEY}+onnx+*.blob"))
    onnx_file.write_bytes(ONNX[:-1] + b"!")
    assert cache.get(KEY) is None
    assert ["checksum mismatch for blob 'onnx'" in m for m in warnings_of(caplog)] == [True]


def test_100_random_byte_flips_never_serve_wrong_bytes(cache: EngineCache, root: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(1234)
    outcomes = {"blob": 0, "meta": 0, "meta_identical": 0}
    for _ in range(100):
        put_default(cache)
        files = sorted((root / "entries").glob(f"{KEY}*"))
        assert len(files) == 3
        target = rng.choice(files)
        raw = bytearray(target.read_bytes())
        raw[rng.randrange(len(raw))] ^= rng.randrange(1, 256)
        target.write_bytes(bytes(raw))
        caplog.clear()
        entry = cache.get(KEY)
        kind = "meta" if target.suffix == ".json" else "blob"
        if entry is None:
            outcomes[kind] += 1
            assert len(warnings_of(caplog)) == 1 and KEY in warnings_of(caplog)[0]
            assert not (root / "entries" / f"{KEY}.json").exists()
        else:
            # Only a flip that changes no parsed value may be served, and then exactly the original.
            assert kind == "meta", f"a flipped blob was served from {target.name}"
            assert_default(entry)
            outcomes["meta_identical"] += 1
    assert outcomes["blob"] + outcomes["meta"] + outcomes["meta_identical"] == 100
    assert outcomes["blob"] > 0 and outcomes["meta"] > 0


def test_missing_metadata_is_a_miss(cache: EngineCache, root: Path, caplog: pytest.LogCaptureFixture) -> None:
    put_default(cache)
    (root / "entries" / f"{KEY}.json").unlink()
    assert cache.get(KEY) is None
    assert warnings_of(caplog) == []  # young blobs may belong to a write in progress: silent miss
    blobs = list((root / "entries").glob("*.blob"))
    assert len(blobs) == 2
    age(blobs, _cache.ORPHAN_AGE_S + 60)
    assert cache.get(KEY) is None
    (msg,) = warnings_of(caplog)
    assert KEY in msg and "metadata missing" in msg
    assert list((root / "entries").glob("*.blob")) == []
    put_default(cache)
    assert_default(cache.get(KEY))


@pytest.mark.parametrize("version", [0, 2, "1", True, None])
def test_other_format_version_is_a_miss(cache: EngineCache, root: Path, caplog: pytest.LogCaptureFixture,
                                        version: object) -> None:
    put_default(cache)
    path = root / "entries" / f"{KEY}.json"
    meta = json.loads(path.read_text())
    meta["format_version"] = version
    path.write_text(json.dumps(meta))
    assert cache.get(KEY) is None
    (msg,) = warnings_of(caplog)
    assert f"format version {version!r} != {CACHE_FORMAT_VERSION}" in msg
    assert not path.exists()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\x80\x81 not json", "metadata is not valid JSON"),
        (b'{"format_version": 1, "key": "a"', "metadata is not valid JSON"),
        (b"[1, 2, 3]", "metadata is not a JSON object"),
        (b"", "metadata is not valid JSON"),
        (b'{"key": "x"}', "metadata lacks 'format_version'"),
        (b'{"format_version": 1}', "metadata lacks 'key', 'created', 'last_used', 'blobs', 'meta_sha256'"),
    ],
)
def test_bad_metadata_is_a_miss(cache: EngineCache, root: Path, caplog: pytest.LogCaptureFixture,
                                content: bytes, why: str) -> None:
    put_default(cache)
    (root / "entries" / f"{KEY}.json").write_bytes(content)
    assert cache.get(KEY) is None
    (msg,) = warnings_of(caplog)
    assert why in msg and KEY in msg
    assert cache.entries() == []
    put_default(cache)
    assert_default(cache.get(KEY))


def test_edited_metadata_with_valid_json_is_rejected(cache: EngineCache, root: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    put_default(cache)
    path = root / "entries" / f"{KEY}.json"
    meta = json.loads(path.read_text())
    meta["precision"] = "fp32"  # e.g. another tool rewrote it: the checksum no longer matches
    path.write_text(json.dumps(meta))
    assert cache.get(KEY) is None
    assert ["metadata checksum mismatch" in m for m in warnings_of(caplog)] == [True]


def test_flip_that_overflows_a_float_is_a_miss(cache: EngineCache, root: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    assert cache.put(KEY, {"engine": ENGINE}, {"lr": 1e-05})
    path = root / "entries" / f"{KEY}.json"
    path.write_text(path.read_text().replace("1e-05", "1e905"))  # one byte: now it parses as infinity
    assert cache.get(KEY) is None
    assert ["metadata checksum mismatch" in m for m in warnings_of(caplog)] == [True]


def test_metadata_copied_to_another_key_is_rejected(cache: EngineCache, root: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    put_default(cache)
    other = "b" * 64
    (root / "entries" / f"{other}.json").write_bytes((root / "entries" / f"{KEY}.json").read_bytes())
    assert cache.get(other) is None
    assert [f"metadata is for key '{KEY}'" in m for m in warnings_of(caplog)] == [True]
    assert_default(cache.get(KEY))


# ---------------------------------------------------------------- LRU and size cap


def entry_size(tmp_path: Path) -> int:
    probe = EngineCache(tmp_path / "probe")
    assert probe.put("k0", {"engine": b"x" * 1000}, {})
    return probe.total_size()


def test_lru_eviction_order_with_get_refreshing(tmp_path: Path, root: Path) -> None:
    size = entry_size(tmp_path)
    cache = EngineCache(root, max_size=3 * size + size // 2)
    for k in ("k1", "k2", "k3"):
        assert cache.put(k, {"engine": b"x" * 1000}, {})
    for i, k in enumerate(("k1", "k2", "k3")):
        age([root / "entries" / f"{k}.json"], 300 - 100 * i)  # k1 oldest
    assert [e.key for e in cache.entries()] == ["k1", "k2", "k3"]
    assert cache.get("k1") is not None  # now the most recent
    assert [e.key for e in cache.entries()] == ["k2", "k3", "k1"]
    assert cache.put("k4", {"engine": b"x" * 1000}, {})
    assert [e.key for e in cache.entries()] == ["k3", "k1", "k4"]
    assert cache.get("k2") is None
    assert cache.total_size() <= cache.max_size
    assert cache.put("k5", {"engine": b"x" * 1000}, {})
    assert [e.key for e in cache.entries()] == ["k1", "k4", "k5"]


def test_entry_larger_than_cap_is_kept(root: Path) -> None:
    cache = EngineCache(root, max_size=10)
    assert cache.put("small", {"engine": b"1"}, {})
    assert cache.put("big", {"engine": b"x" * 1000}, {})
    assert [e.key for e in cache.entries()] == ["big"]  # never evicts what it just wrote


def test_eviction_skips_entry_locked_by_another_process(tmp_path: Path, root: Path) -> None:
    size = entry_size(tmp_path)
    cache = EngineCache(root, max_size=2 * size + size // 2)
    for i, k in enumerate(("k1", "k2")):
        assert cache.put(k, {"engine": b"x" * 1000}, {})
        age([root / "entries" / f"{k}.json"], 200 - 100 * i)
    holder = Holder(root, "k1")
    try:
        assert cache.put("k3", {"engine": b"x" * 1000}, {})
        assert [e.key for e in cache.entries()] == ["k1", "k3"]  # k1 is older but locked: k2 went
        assert cache.prune(0) == ["k3"]
        assert [e.key for e in cache.entries()] == ["k1"]
    finally:
        holder.release()
    assert cache.prune(0) == ["k1"]


def test_eviction_skips_entry_locked_by_this_thread(tmp_path: Path, root: Path) -> None:
    size = entry_size(tmp_path)
    cache = EngineCache(root, max_size=size + size // 2)
    assert cache.put("k1", {"engine": b"x" * 1000}, {})
    age([root / "entries" / "k1.json"], 100)
    with cache.lock("k1"):
        assert cache.put("k2", {"engine": b"x" * 1000}, {})
        assert {e.key for e in cache.entries()} == {"k1", "k2"}
    assert cache.put("k3", {"engine": b"x" * 1000}, {})
    assert [e.key for e in cache.entries()] == ["k3"]


def test_env_var_sets_cap(monkeypatch: pytest.MonkeyPatch, root: Path, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("TORCH_TRT_MODULE_CACHE_MAX_SIZE", "500M")
    assert EngineCache(root).max_size == 500 * 1024**2
    assert EngineCache(root, max_size=7).max_size == 7  # the option wins over the environment
    monkeypatch.setenv("TORCH_TRT_MODULE_CACHE_MAX_SIZE", "lots")
    assert EngineCache(root).max_size == DEFAULT_MAX_SIZE
    assert ["ignoring $TORCH_TRT_MODULE_CACHE_MAX_SIZE" in m for m in warnings_of(caplog)] == [True]
    monkeypatch.delenv("TORCH_TRT_MODULE_CACHE_MAX_SIZE")
    assert EngineCache(root).max_size == DEFAULT_MAX_SIZE == 4 * 1024**3


# ---------------------------------------------------------------- unwritable directory and full disk


@pytest.fixture
def deny_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Make every write under a directory fail with EACCES, as a read-only mount would, even for root."""

    def install(under: Path) -> None:
        prefix = str(under)

        def under_root(path: Any) -> bool:
            return os.path.abspath(os.fspath(path)).startswith(prefix)

        def denied(path: Any) -> PermissionError:
            return PermissionError(errno.EACCES, "Permission denied", os.fspath(path))

        real_open, real_mkdir, real_replace, real_unlink = os.open, os.mkdir, os.replace, os.unlink
        writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

        def fake_open(path: Any, flags: int, *a: Any, **k: Any) -> int:
            if flags & writing and under_root(path):
                raise denied(path)
            return real_open(path, flags, *a, **k)

        def guard(real: Any) -> Any:
            def fake(path: Any, *a: Any, **k: Any) -> Any:
                if under_root(path):
                    raise denied(path)
                return real(path, *a, **k)
            return fake

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "mkdir", guard(real_mkdir))
        monkeypatch.setattr(os, "replace", guard(real_replace))
        monkeypatch.setattr(os, "unlink", guard(real_unlink))
        monkeypatch.setattr(os, "utime", guard(os.utime))

    yield install


def check_unwritable(cache: EngineCache, root: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = files_under(root)
    caplog.clear()
    assert cache.put("k2", {"engine": b"new"}, {}) is False
    assert cache.put("k3", {"engine": b"new"}, {}) is False
    assert cache.record("fp", "k2") is False
    assert cache.write_aux("timing", b"t") is False
    with cache.lock("k2", timeout=1):  # falls back to a no-op lock instead of failing the run
        pass
    (msg,) = warnings_of(caplog)
    assert "is not writable" in msg and str(root) in msg and "Permission denied" in msg
    assert_default(cache.get(KEY))  # existing entries are still served
    assert files_under(root) == before


def test_unwritable_directory_simulated(root: Path, deny_writes: Any, caplog: pytest.LogCaptureFixture) -> None:
    put_default(EngineCache(root))
    deny_writes(root)
    check_unwritable(EngineCache(root), root, caplog)


def test_unwritable_directory_never_created(tmp_path: Path, deny_writes: Any,
                                            caplog: pytest.LogCaptureFixture) -> None:
    deny_writes(tmp_path)
    cache = EngineCache(tmp_path / "cache")
    assert cache.put(KEY, {"engine": ENGINE}, {}) is False
    assert cache.get(KEY) is None and cache.lookup("fp") is None and cache.read_aux("t") is None
    assert len(warnings_of(caplog)) == 1 and cache.entries() == []


def test_corrupt_entry_in_unwritable_directory(root: Path, deny_writes: Any,
                                               caplog: pytest.LogCaptureFixture) -> None:
    put_default(EngineCache(root))
    (root / "entries" / f"{KEY}.json").write_bytes(b"garbage")
    deny_writes(root)
    assert EngineCache(root).get(KEY) is None  # cannot evict, must not raise
    assert len(warnings_of(caplog)) == 1


@pytest.mark.skipif(IS_ROOT, reason="root writes through chmod; the simulated test covers root")
def test_unwritable_directory_real(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    put_default(EngineCache(root))
    dirs = [root, *(p for p in root.iterdir() if p.is_dir())]
    for d in dirs:
        d.chmod(0o500)
    try:
        check_unwritable(EngineCache(root), root, caplog)
    finally:
        for d in dirs:
            d.chmod(0o700)


@pytest.mark.parametrize("fail_on", ["blob", "meta"])
def test_disk_full(cache: EngineCache, root: Path, monkeypatch: pytest.MonkeyPatch,
                   caplog: pytest.LogCaptureFixture, fail_on: str) -> None:
    put_default(cache)
    before = {p: p.read_bytes() for p in files_under(root)}
    real_write = os.write
    filling: set[int] = set()

    def full_disk(fd: int, data: Any) -> int:
        if fd not in filling and (bytes(data[:1]) == b"{") != (fail_on == "meta"):
            return real_write(fd, data)
        if fd in filling:
            raise OSError(errno.ENOSPC, "No space left on device")
        filling.add(fd)
        return real_write(fd, data[: len(data) // 2])  # a partial write, then the disk is full

    monkeypatch.setattr(os, "write", full_disk)
    assert cache.put("b" * 64, {"engine": b"E" * 5000, "onnx": b"O" * 3000}, {"x": 1}) is False
    assert cache.put("c" * 64, {"engine": b"E" * 5000}, {}) is False
    monkeypatch.undo()
    (msg,) = warnings_of(caplog)
    assert "No space left on device" in msg and "not writable" in msg
    assert {p: p.read_bytes() for p in files_under(root)} == before  # no temp files, no half entries
    assert_default(cache.get(KEY))
    assert cache.put("b" * 64, {"engine": b"E"}, {}) is True


# ---------------------------------------------------------------- crashes and concurrency


def test_sigkill_between_blobs_and_metadata(root: Path) -> None:
    code = f"""
        import os, signal
        from torch_trt_module._cache import cache as _cache
        real = _cache.atomic_write
        def dying_write(path, data):
            if path.name.endswith(".json"):
                with open(path.parent / f".{{path.name}}.crash.tmp", "wb") as f:
                    f.write(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, data)
        _cache.atomic_write = dying_write
        _cache.EngineCache({str(root)!r}).put({KEY!r}, {{"engine": b"E" * 4096, "onnx": b"O" * 100}}, {{}})
        print("survived")
    """
    proc = run_py(code)
    assert proc.returncode == -signal.SIGKILL and "survived" not in proc.stdout
    leftovers = files_under(root / "entries")
    assert len(leftovers) == 3  # two blobs and a half-written metadata temp file
    cache = EngineCache(root)
    assert cache.get(KEY) is None
    assert cache.entries() == [] and cache.total_size() == 0
    assert cache.prune(0) == [] and files_under(root / "entries") == leftovers  # young: maybe in progress
    age(leftovers, _cache.ORPHAN_AGE_S + 60)
    assert cache.prune(10**9) == []
    assert files_under(root / "entries") == []
    put_default(cache)
    assert_default(cache.get(KEY))


# Only with different bytes can a reader see a mixed entry; identical bytes, the common case of a
# fleet, is the slow variant (8 processes importing torch on a 2-core CI machine: about 10 s each).
@pytest.mark.parametrize("same_bytes", [pytest.param(True, marks=pytest.mark.slow), False])
def test_eight_processes_put_the_same_key(root: Path, same_bytes: bool) -> None:
    code = """
        import os, sys, time
        from torch_trt_module._cache.cache import EngineCache
        root, i, same, go = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
        cache = EngineCache(root)
        tag = b"S" if same else bytes([65 + i])
        while not os.path.exists(go):
            time.sleep(0.001)
        for n in range(20):
            assert cache.put(KEY, {"engine": tag * 20000, "onnx": tag * 300}, {"writer": 0 if same else i})
            e = cache.get(KEY)  # another writer may have replaced ours, but never with a broken entry
            assert e is not None, "a whole entry was lost"
            t = b"S" if same else bytes([65 + e.meta["writer"]])
            assert e.blobs == {"engine": t * 20000, "onnx": t * 300}, "a mixed or corrupt entry was served"
    """.replace("KEY", repr(KEY))
    go = root.parent / "go"
    procs = [subprocess.Popen(child_argv(code, str(root), str(i), "1" if same_bytes else "0", str(go)))
             for i in range(8)]
    time.sleep(0.3)
    go.touch()
    assert [p.wait(timeout=60) for p in procs] == [0] * 8
    entry = EngineCache(root).get(KEY)
    assert entry is not None
    writer = entry.meta["writer"]
    tag = b"S" if same_bytes else bytes([65 + writer])
    assert entry.blobs == {"engine": tag * 20000, "onnx": tag * 300}
    assert [e.key for e in EngineCache(root).entries()] == [KEY]
    assert not [p for p in files_under(root) if p.name.endswith(".tmp")]


def test_lock_excludes_across_processes(cache: EngineCache, root: Path) -> None:
    holder = Holder(root, "build-x")
    try:
        t0 = time.monotonic()
        with pytest.raises(CacheLockTimeout, match="'build-x'") as info:
            with cache.lock("build-x", timeout=0.3):
                pytest.fail("acquired a lock another process holds")
        assert 0.25 <= time.monotonic() - t0 < 5
        assert isinstance(info.value, CacheError) and isinstance(info.value, TimeoutError)
        assert isinstance(info.value, TorchTRTError)
        with cache.lock("build-y", timeout=0.3):  # other names are not blocked
            pass
    finally:
        holder.release()
    with cache.lock("build-x", timeout=5):
        with cache.lock("build-x", timeout=0):  # reentrant in one thread
            pass


def test_lock_excludes_across_threads(cache: EngineCache) -> None:
    import threading

    results: list[str] = []
    with cache.lock("t"):
        def other() -> None:
            try:
                with cache.lock("t", timeout=0.2):
                    results.append("acquired")
            except CacheLockTimeout:
                results.append("timeout")
        th = threading.Thread(target=other, daemon=True)
        th.start()
        th.join(timeout=30)  # the other thread's lock times out after 0.2 s; 30 s means it is stuck
    assert not th.is_alive(), "the other thread is stuck on the lock past its 0.2 s timeout"
    assert results == ["timeout"]


# ---------------------------------------------------------------- index, aux, management


def test_index_round_trip_and_corruption(cache: EngineCache, root: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert cache.lookup("fp1") is None
    assert cache.record("fp1", KEY) is True
    assert cache.lookup("fp1") == KEY
    assert EngineCache(root).lookup("fp1") == KEY
    path = root / "index" / "fp1.json"
    path.write_bytes(b"{not json")
    assert cache.lookup("fp1") is None
    assert ["index fp1 is unusable (not valid JSON)" in m for m in warnings_of(caplog)] == [True]
    assert not path.exists()
    path.write_text(json.dumps({"format_version": 1, "fingerprint": "fp1", "key": "../etc/passwd"}))
    assert cache.lookup("fp1") is None


def test_aux_round_trip_and_corruption(cache: EngineCache, root: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert cache.read_aux("timing-gpu-trt10") is None
    data = os.urandom(3000)
    assert cache.write_aux("timing-gpu-trt10", data) is True
    assert cache.read_aux("timing-gpu-trt10") == data
    path = root / "aux" / "timing-gpu-trt10.bin"
    for mutate, why in [(lambda b: b[:-1], "truncated"), (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum mismatch"),
                        (lambda b: b"junk", "bad header")]:
        cache.write_aux("timing-gpu-trt10", data)
        path.write_bytes(mutate(path.read_bytes()))
        caplog.clear()
        assert cache.read_aux("timing-gpu-trt10") is None
        (msg,) = warnings_of(caplog)
        assert why in msg and not path.exists()
    assert cache.total_size() == 0  # aux files are not entries


def test_info_clear_evict_and_listing(cache: EngineCache, root: Path) -> None:
    keys = ["ab12", "ab34", "cd56"]
    for k in keys:
        assert cache.put(k, {"engine": b"x" * 10}, {"name": k})
        assert cache.record(f"fp-{k}", k)
    assert cache.info("c").key == "cd56" and cache.info("c").meta["name"] == "cd56"
    assert cache.info("ab12").size_bytes == (root / "entries" / "ab12.json").stat().st_size + 10
    with pytest.raises(ValueError, match="matches 2 entries"):
        cache.info("ab")
    with pytest.raises(ValueError, match="no cache entry .* starting with 'zz'"):
        cache.info("zz")
    assert cache.total_size() == sum(e.size_bytes for e in cache.entries())
    assert cache.evict("ab34") is True and cache.evict("ab34") is False
    assert cache.info("ab").key == "ab12"
    assert cache.clear() == 2
    assert cache.entries() == [] and cache.lookup("fp-ab12") is None
    assert list((root / "entries").iterdir()) == []


# ---------------------------------------------------------------- hashing, paths, sizes, names


def test_resolve_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_TRT_MODULE_CACHE", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_cache_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    assert resolve_cache_dir(None) == tmp_path / "env"
    monkeypatch.delenv("TORCH_TRT_MODULE_CACHE")
    assert resolve_cache_dir(None) == tmp_path / "xdg" / "torch_trt_module"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the XDG spec says
    assert resolve_cache_dir(None) == tmp_path / "home" / ".cache" / "torch_trt_module"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_cache_dir(None) == tmp_path / "home" / ".cache" / "torch_trt_module"
    assert resolve_cache_dir("~/c") == tmp_path / "home" / "c"
    assert not (tmp_path / "home").exists()  # resolving creates nothing
    assert EngineCache().root == tmp_path / "home" / ".cache" / "torch_trt_module"


def test_parse_size() -> None:
    assert parse_size(0) == 0 and parse_size(123) == 123 and parse_size("123") == 123
    assert parse_size("500M") == 500 * 1024**2 and parse_size("2G") == 2 * 1024**3
    assert parse_size("2gib") == parse_size("2 GB") == parse_size("2g") == 2 * 1024**3
    assert parse_size("1.5K") == 1536 and parse_size("10k") == 10240 and parse_size("1T") == 1024**4
    assert parse_size("7B") == 7
    with pytest.raises(ValueError, match="not understood.*'500M'"):
        parse_size("lots")
    with pytest.raises(ValueError, match="negative"):
        parse_size(-1)
    with pytest.raises(ValueError, match="negative"):
        parse_size("-5M")
    for bad in ("", "5X", "M", True, 1.5):
        with pytest.raises(ValueError):
            parse_size(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "x" * 101, "a b", "k\x00", 5])
def test_names_are_validated(cache: EngineCache, root: Path, bad: Any) -> None:
    for call in (lambda: cache.get(bad), lambda: cache.put(bad, {"e": b""}, {}), lambda: cache.lock(bad).__enter__(),
                 lambda: cache.lookup(bad), lambda: cache.record("fp", bad), lambda: cache.read_aux(bad),
                 lambda: cache.write_aux(bad, b""), lambda: cache.evict(bad),
                 lambda: cache.put("k", {bad: b""}, {})):
        with pytest.raises(ValueError, match="not valid"):
            call()
    assert not root.exists()


def test_put_rejects_non_json_metadata(cache: EngineCache, root: Path) -> None:
    with pytest.raises(TypeError, match="not JSON data"):
        cache.put(KEY, {"engine": b"x"}, {"bad": object()})
    with pytest.raises(TypeError, match="expected bytes"):
        cache.put(KEY, {"engine": "text"}, {})  # type: ignore[dict-item]
    assert not root.exists()


def test_module_all_is_sorted_and_complete() -> None:
    assert _cache.__all__ == sorted(_cache.__all__)
    for name in _cache.__all__:
        assert hasattr(_cache, name)
