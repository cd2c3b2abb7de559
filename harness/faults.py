"""Fault injection for the engine cache, shared by ``tests/reliability`` and ``benchmarks/fault_injection.py``.

Every scenario works on a real cache: TensorRT-RTX builds real engines, ONNX Runtime runs them,
and ``compile()`` is called after each fault. It counts into a :class:`Counts`:

- ``injected``: faults injected (a damaged file, a killed writer, a racing writer, a write that fails);
- ``recovered``: faults after which ``compile()`` returned a module with correct outputs, the cache
  holds exactly what was served (when it can be written), and every other entry is intact;
- ``wrong_results``: compiled modules whose outputs differ from eager;
- ``corrupt_served``: compiles that served engine bytes other than the verified entry's without rebuilding;
- ``lost_entries``: entries that no fault touched but that disappeared or changed.

Children (``child_main``) are fresh processes: each imports torch and the package again, as a
user's second run would. Models are tiny (an MLP) so a rebuild takes a fraction of a second, and
they export with the TorchScript exporter (0.02 s instead of the dynamo exporter's ~3 s warm-up in
every process); the dynamo path is covered by ``tests/pipeline/test_compile.py``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import torch_trt_module as ttm
from torch_trt_module._cache import cache as _cache
from torch_trt_module._pipeline import compile as _compile
from torch_trt_module._cache.cache import CACHE_FORMAT_VERSION, ORPHAN_AGE_S, EngineCache
from torch_trt_module._cache.keys import stable_hash

EXPORTER = "torchscript"


# --------------------------------------------------------------------------- models and checks

class TinyNet(torch.nn.Module):
    """An MLP whose weights are fixed by ``seed``: each seed is a different model (and cache entry)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def example(batch: int = 3, seed: int = 1234) -> torch.Tensor:
    return torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed))


def compile_tiny(seed: int, root: str | os.PathLike[str], **options: Any) -> ttm.TRTModule:
    options.setdefault("exporter", EXPORTER)
    return ttm.compile(TinyNet(seed), example(), cache_dir=os.fspath(root), **options)


def outputs_ok(module: torch.nn.Module, model: torch.nn.Module | int) -> bool:
    """Does ``module`` give eager's outputs at three batch sizes (min, the example's, another)?"""
    if isinstance(model, int):
        model = TinyNet(model)
    with torch.inference_mode():
        for batch in (1, 3, 7):
            x = example(batch, seed=batch)
            got, want = module(x), model(x)
            if got.shape != want.shape or got.dtype != want.dtype or not torch.allclose(got, want, 1e-4, 1e-5):
                return False
    return True


def sha(data: bytes | None) -> str:
    return hashlib.sha256(data or b"").hexdigest()


# --------------------------------------------------------------------------- counters

@dataclass
class Counts:
    injected: int = 0
    recovered: int = 0
    wrong_results: int = 0
    corrupt_served: int = 0
    lost_entries: int = 0

    def line(self) -> str:
        return (f"faults injected: {self.injected}, recovered: {self.recovered}, wrong results: "
                f"{self.wrong_results}, corrupt served: {self.corrupt_served}, lost entries: {self.lost_entries}")

    def merge_one(self, local: "Counts", ok: bool) -> None:
        """Count one injected fault from the sub-counts of its steps: recovered when ``ok``."""
        self.wrong_results += local.wrong_results
        self.corrupt_served += local.corrupt_served
        self.lost_entries += local.lost_entries
        self.recovered += ok

    @property
    def clean(self) -> bool:
        return (self.injected > 0 and self.recovered == self.injected and self.wrong_results == 0
                and self.corrupt_served == 0 and self.lost_entries == 0)


# --------------------------------------------------------------------------- the cache, seen from outside

@dataclass(frozen=True)
class Stored:
    """A verified entry's bytes."""

    key: str
    plan: bytes | None
    onnx: bytes


def read_entries(root: Path) -> dict[str, Stored]:
    """Every entry the store verifies (checksums and metadata), by key."""
    cache = EngineCache(root)
    out = {}
    for info in cache.entries():
        entry = cache.get(info.key)
        if entry is not None:
            out[info.key] = Stored(info.key, entry.blobs.get("engine"), entry.blobs["onnx"])
    return out


def file_bytes(root: Path, subdirs: tuple[str, ...] = ("entries", "index", "aux")) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for sub in subdirs for p in sorted((root / sub).glob("*")) if p.is_file()}


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.tmp")]


def flip_byte(path: Path, rng: random.Random) -> int:
    """XOR one byte at a random offset with a random non-zero value (bit rot); returns the offset."""
    data = bytearray(path.read_bytes())
    pos = rng.randrange(len(data))
    data[pos] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))
    return pos


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def age(paths: list[Path], seconds: float) -> None:
    """Pretend ``paths`` were written ``seconds`` ago (a crash long past), without sleeping."""
    t = time.time() - seconds
    for p in paths:
        os.utime(p, (t, t))


def assert_locks_free(root: Path, timeout: float = 10.0) -> None:
    """Every lock file can be taken: a killed holder's lock died with it (raises CacheLockTimeout if not)."""
    cache = EngineCache(root)
    for p in sorted((root / "locks").glob("*.lock")):
        with cache.lock(p.stem, timeout=timeout):
            pass


class Tracker:
    """A cache with known entries (one per TinyNet seed), and the checks that follow each fault."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.entries: dict[int, Stored] = {}

    def add(self, *seeds: int) -> None:
        for seed in seeds:
            module = compile_tiny(seed, self.root)
            stored = self.find(module.engine.onnx)
            assert stored is not None and outputs_ok(module, seed), f"setup: model {seed} was not cached"
            self.entries[seed] = stored

    def find(self, onnx: bytes) -> Stored | None:
        """The verified entry holding this graph (graphs carry weights, so one per model)."""
        return next((s for s in read_entries(self.root).values() if s.onnx == onnx), None)

    def files(self, seed: int) -> list[Path]:
        """The entry's metadata and blob files, and the index record(s) that point to it."""
        key = self.entries[seed].key
        files = sorted(p for p in (self.root / "entries").glob(f"{key}*") if not p.name.startswith("."))
        for p in sorted((self.root / "index").glob("*.json")):
            with contextlib.suppress(ValueError, OSError):
                if json.loads(p.read_bytes()).get("key") == key:
                    files.append(p)
        return files

    def metadata(self, seed: int) -> Path:
        return self.root / "entries" / f"{self.entries[seed].key}.json"

    def blob(self, seed: int, name: str) -> Path:
        (path,) = (self.root / "entries").glob(f"{self.entries[seed].key}+{name}+*.blob")
        return path

    def lost(self, skip: tuple[int, ...] = ()) -> int:
        """Entries (other than ``skip``) that are gone or no longer hold their bytes."""
        cache = EngineCache(self.root)
        n = 0
        for seed, s in self.entries.items():
            if seed in skip:
                continue
            entry = cache.get(s.key)
            n += entry is None or (entry.blobs.get("engine"), entry.blobs["onnx"]) != (s.plan, s.onnx)
        return n

    def recover(self, seed: int, counts: Counts, *, stored: bool = True) -> dict[str, Any]:
        """compile() the model after a fault and count what it served. ``stored=False``: the cache
        cannot be written (read-only, full), so the model must work without an entry appearing."""
        builds = _compile.STATS["builds"]
        module = compile_tiny(seed, self.root)
        good = outputs_ok(module, seed)
        counts.wrong_results += not good
        # Reading the plan comes first: where it cannot run (no GPU) the cache defers reading and
        # checking it until this access, and a plan that fails its checksum is rebuilt here.
        served = (module.engine.plan, module.engine.onnx)
        rebuilt = _compile.STATS["builds"] > builds
        before = self.entries.get(seed)
        if before is not None and not rebuilt and served != (before.plan, before.onnx):
            counts.corrupt_served += 1
            good = False
        now = self.find(module.engine.onnx)
        if stored:
            good = good and now is not None and (now.plan, now.onnx) == served
        else:
            good = good and (now is None if before is None else now == before)
        lost = self.lost(skip=(seed,))
        counts.lost_entries += lost
        if good and lost == 0:
            counts.recovered += 1
        if now is not None:
            self.entries[seed] = now
        return {"rebuilt": rebuilt, "ok": good, "lost": lost}


# --------------------------------------------------------------------------- logs and simulated file systems

@contextlib.contextmanager
def capture_warnings() -> Iterator[list[str]]:
    """WARNING and above from the package's loggers, as ``"logger: message"``."""
    messages: list[str] = []

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(f"{record.name}: {record.getMessage()}")

    handler = _Handler(logging.WARNING)
    logger = logging.getLogger("torch_trt_module")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _under(root: Path) -> Callable[[Any], bool]:
    prefix = os.path.abspath(root)

    def under(path: Any) -> bool:
        if isinstance(path, int):
            return False
        p = os.path.abspath(os.fspath(path))
        return p == prefix or p.startswith(prefix + os.sep)

    return under


@contextlib.contextmanager
def read_only(root: Path) -> Iterator[None]:
    """Every write under ``root`` fails with EROFS, as on a read-only mount. A simulation, because CI
    runs as root, and chmod does not stop root from writing."""
    under = _under(root)
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def denied(path: Any) -> OSError:
        return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    def fake_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & writing and under(path):
            raise denied(path)
        return real_open(path, flags, *args, **kwargs)

    def guard(real: Callable[..., Any]) -> Callable[..., Any]:
        def fake(path: Any, *args: Any, **kwargs: Any) -> Any:
            if under(path):
                raise denied(path)
            return real(path, *args, **kwargs)
        return fake

    real_open = os.open
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(os, "open", fake_open))
        for name in ("mkdir", "replace", "rename", "unlink", "utime", "chmod", "rmdir"):
            stack.enter_context(patched(os, name, guard(getattr(os, name))))
        yield


@contextlib.contextmanager
def disk_full(root: Path) -> Iterator[None]:
    """Writes to files under ``root`` stop with ENOSPC after a partial first write, as on a full disk."""
    under = _under(root)
    real_write = os.write
    started: set[int] = set()

    def fake_write(fd: int, data: Any) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if not under(target):
            return real_write(fd, data)
        if fd in started:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        started.add(fd)
        return real_write(fd, bytes(memoryview(data)[: len(data) // 2]))

    with patched(os, "write", fake_write):
        yield


# --------------------------------------------------------------------------- child processes

# Children import this module under the name the parent uses ("harness.faults"), so TinyNet's
# fingerprint is the same in both.
_IMPORT_ROOT = Path(__file__).resolve().parents[__name__.count(".")]
_CHILD = (f"import sys; sys.path.insert(0, {str(_IMPORT_ROOT)!r}); "
          f"from {__name__} import child_main; child_main(sys.argv[1])")


def child_main(config: str) -> None:
    """A fresh process that compiles TinyNet(seed) for each seed, then prints one ``result {json}``
    line per model (``options`` go to compile(); ``log`` sets the logging level, to stderr).
    ``hold`` parks it at a phase ("export", "build", "built": after the build,
    "put": blobs written, metadata not) so that the parent can kill it there; ``slow_build`` keeps
    the build lock longer, so that racing processes really overlap; ``go`` is a file to wait for."""
    cfg = json.loads(config)
    if cfg.get("log"):
        logging.basicConfig(level=cfg["log"], stream=sys.stderr)

    def park(phase: str) -> None:
        print(f"at {phase}", flush=True)
        time.sleep(600)
        os._exit(3)

    hold = cfg.get("hold")
    real_build = _compile._build
    if hold == "export":
        _compile._export = lambda *a, **k: park("export")  # type: ignore[assignment]
    elif hold == "build":
        _compile._build = lambda *a, **k: park("build")  # type: ignore[assignment]
    elif hold == "built":
        def built(*args: Any, **kwargs: Any) -> Any:
            real_build(*args, **kwargs)
            park("built")
        _compile._build = built  # type: ignore[assignment]
    elif hold == "put":
        real_write = _cache.atomic_write

        def write(path: Path, data: bytes) -> None:
            if path.parent.name == "entries" and path.suffix == ".json":
                park("put")
            real_write(path, data)
        _cache.atomic_write = write  # type: ignore[assignment]
    if cfg.get("slow_build"):
        def slow(*args: Any, **kwargs: Any) -> Any:
            engine = real_build(*args, **kwargs)
            time.sleep(cfg["slow_build"])
            return engine
        _compile._build = slow  # type: ignore[assignment]
    print("ready", flush=True)
    while cfg.get("go") and not os.path.exists(cfg["go"]):
        time.sleep(0.002)
    for seed in cfg["seeds"]:
        before = dict(_compile.STATS)
        t_enter = time.time()
        module = compile_tiny(seed, cfg["root"], **cfg.get("options", {}))
        t_exit = time.time()
        delta = {k: _compile.STATS[k] - before[k] for k in before}
        print("result " + json.dumps({
            "seed": seed, "ok": outputs_ok(module, seed), "t_enter": t_enter, "t_exit": t_exit, **delta,
            "plan_sha": sha(module.engine.plan), "onnx_sha": sha(module.engine.onnx), "pid": os.getpid(),
        }), flush=True)
    os._exit(0)  # skip torch's slow interpreter teardown; everything is printed and flushed


class Child:
    """A running :func:`child_main`, with its stdout lines in a queue."""

    def __init__(self, **config: Any) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(config, default=str)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append), daemon=True).start()

    @staticmethod
    def _pump(stream: Any, put: Callable[[Any], None]) -> None:
        for line in stream:
            put(line.rstrip("\n"))
        put(None)

    def expect(self, prefix: str, timeout: float = 180.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                time.sleep(0.2)  # let stderr drain
                raise AssertionError(f"child {self.proc.pid} ended or timed out before {prefix!r} "
                                     f"(rc={self.proc.poll()}):\n" + self.stderr_text()[-6000:])
            if line.startswith(prefix):
                return line

    def stderr_text(self) -> str:
        return "\n".join(line for line in self.stderr if line is not None)

    def results(self, n: int) -> list[dict[str, Any]]:
        return [json.loads(self.expect("result ")[len("result "):]) for _ in range(n)]

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def finish(self, timeout: float = 60.0) -> int:
        """Wait for a child that printed all its results; its exit status."""
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()


def sync_dir(root: Path) -> Path:
    """A directory beside the cache for go-files (never inside the cache)."""
    return Path(tempfile.mkdtemp(prefix="sync-", dir=Path(root).parent))


# --------------------------------------------------------------------------- scenarios

def truncated_engine(root: Path, counts: Counts) -> dict[str, Any]:
    tr = Tracker(root)
    tr.add(0, 1, 2)
    truncate(tr.blob(1, "engine"))
    counts.injected += 1
    with capture_warnings() as warned:
        result = tr.recover(1, counts)
    return {**result, "warnings": warned}


def byte_flips(root: Path, counts: Counts, n: int = 100, seed: int = 0) -> dict[str, Any]:
    """``n`` single-byte flips, each in one file of one of three entries (metadata, engine blob,
    ONNX blob, ONNX Runtime's optimized graph, or the index record pointing to it), each followed
    by a compile() of that model."""
    rng = random.Random(seed)
    tr = Tracker(root)
    tr.add(0, 1, 2)
    outcomes: Counter[str] = Counter()
    for _ in range(n):
        victim = rng.choice(sorted(tr.entries))
        path = rng.choice(tr.files(victim))
        kind = ("index" if path.parent.name == "index" else "metadata" if path.suffix == ".json"
                else path.name.split("+")[1])
        kind = "ort" if kind.startswith("ort-") else kind  # ONNX Runtime's optimized copy of the graph
        flip_byte(path, rng)
        counts.injected += 1
        result = tr.recover(victim, counts)
        outcomes[f"{kind}:{'rebuilt' if result['rebuilt'] else 'hit'}"] += 1
    return {"outcomes": dict(sorted(outcomes.items()))}


def deleted_metadata(root: Path, counts: Counts) -> dict[str, Any]:
    """The metadata is gone and its blobs are old: a crash between blobs and metadata, long ago."""
    tr = Tracker(root)
    tr.add(0, 1)
    blobs = [p for p in tr.files(0) if p.suffix == ".blob"]
    tr.metadata(0).unlink()
    age(blobs, ORPHAN_AGE_S + 60)
    counts.injected += 1
    with capture_warnings() as warned:
        result = tr.recover(0, counts)
    return {**result, "warnings": warned, "old_blobs_left": [p.name for p in blobs if p.exists()]}


def other_version_metadata(root: Path, counts: Counts) -> dict[str, Any]:
    """Metadata written by another cache format version, otherwise valid (its checksum matches)."""
    tr = Tracker(root)
    tr.add(0, 1)
    path = tr.metadata(1)
    meta = json.loads(path.read_bytes())
    del meta["meta_sha256"]
    meta["format_version"] = CACHE_FORMAT_VERSION + 1
    meta["meta_sha256"] = stable_hash(meta)
    path.write_text(json.dumps(meta))
    counts.injected += 1
    with capture_warnings() as warned:
        result = tr.recover(1, counts)
    return {**result, "warnings": warned}


def concurrent_writers(root: Path, counts: Counts, n: int = 8) -> dict[str, Any]:
    """``n`` fresh processes compile the same two new models at once, into a cache holding others."""
    tr = Tracker(root)
    tr.add(0, 1)
    go = sync_dir(root) / "go"
    seeds = [20, 21]
    kids = [Child(root=root, seeds=seeds if i % 2 == 0 else seeds[::-1], go=go, slow_build=0.3) for i in range(n)]
    try:
        for kid in kids:
            kid.expect("ready")
        go.touch()
        results = [kid.results(len(seeds)) for kid in kids]
    finally:
        for kid in kids:
            kid.close()
    counts.injected += n
    by_onnx = {sha(s.onnx): s for s in read_entries(root).values()}
    builds: Counter[int] = Counter()
    exports: Counter[int] = Counter()
    missing = set()
    for rs in results:
        good = True
        for r in rs:
            builds[r["seed"]] += r["builds"]
            exports[r["seed"]] += r["exports"]
            counts.wrong_results += not r["ok"]
            good = good and r["ok"]
            entry = by_onnx.get(r["onnx_sha"])
            if entry is None:
                missing.add(r["seed"])
                good = False
            elif r["builds"] == 0 and sha(entry.plan) != r["plan_sha"]:
                counts.corrupt_served += 1
                good = False
        counts.recovered += good
    lost = tr.lost()
    counts.lost_entries += lost + len(missing)
    firsts = [r for rs in results for r in rs[:1]]
    return {"builds": dict(builds), "exports": dict(exports), "lost": lost, "missing": sorted(missing),
            # every process entered compile() before the first one left it: they really raced
            "overlapped": max(r["t_enter"] for r in firsts) < min(r["t_exit"] for r in firsts)}


def kill9_mid_build(root: Path, counts: Counts, n: int = 10) -> dict[str, Any]:
    """``n`` processes, each killed with SIGKILL while it holds the build lock of a new model: in the
    export, in the build, after the build, or between the blobs and the metadata. After each kill,
    compile() of that model must rebuild cleanly while every earlier entry stays whole."""
    tr = Tracker(root)
    tr.add(0, 1)
    phases = ("export", "build", "built", "put")
    sync = sync_dir(root)
    kids = [Child(root=root, seeds=[100 + k], go=sync / f"go{k}", hold=phases[k % len(phases)]) for k in range(n)]
    rounds = []
    try:
        for kid in kids:
            kid.expect("ready")
        for k, kid in enumerate(kids):
            (sync / f"go{k}").touch()
            kid.expect(f"at {phases[k % len(phases)]}")
            kid.kill()
            counts.injected += 1
            committed = set(read_entries(root)) - {s.key for s in tr.entries.values()}
            assert_locks_free(root)
            result = tr.recover(100 + k, counts)
            rounds.append({"phase": phases[k % len(phases)], "committed_by_killed": len(committed), **result})
    finally:
        for kid in kids:
            kid.close()
    return {"rounds": rounds, "entries": len(read_entries(root))}


def read_only_dir(root: Path, counts: Counts) -> dict[str, Any]:
    """The cache directory becomes read-only: a hit is still served, a miss builds without storing."""
    tr = Tracker(root)
    tr.add(0, 1)
    before = file_bytes(root)
    counts.injected += 1
    local = Counts()
    warned = []
    with read_only(root):
        for seed, stored in ((0, True), (2, False)):
            with capture_warnings() as w:
                tr.recover(seed, local, stored=stored)
            warned.append(w)
    unchanged = file_bytes(root) == before and not temp_files(root)
    counts.merge_one(local, local.recovered == 2 and unchanged)
    return {"warnings": warned, "unchanged": unchanged}


def disk_full_on_write(root: Path, counts: Counts) -> dict[str, Any]:
    """The disk fills up in the middle of storing an entry; once space is back the next compile stores it."""
    tr = Tracker(root)
    tr.add(0, 1)
    before = file_bytes(root)
    counts.injected += 1
    local = Counts()
    with disk_full(root), capture_warnings() as warned:
        tr.recover(3, local, stored=False)
    unchanged = file_bytes(root) == before and not temp_files(root)
    after = tr.recover(3, local)  # space is back
    counts.merge_one(local, local.recovered == 2 and unchanged)
    return {"warnings": warned, "unchanged": unchanged, "stored_later": after["ok"] and after["rebuilt"]}


SCENARIOS: dict[str, Callable[[Path, Counts], dict[str, Any]]] = {
    "truncated engine": truncated_engine,
    "100 byte flips": byte_flips,
    "deleted metadata": deleted_metadata,
    "other-version metadata": other_version_metadata,
    "8 concurrent writers": concurrent_writers,
    "10 kill -9 mid-build": kill9_mid_build,
    "read-only directory": read_only_dir,
    "ENOSPC on write": disk_full_on_write,
}
