"""On-disk engine cache: content-keyed entries, verified on every read, written atomically.

This is only the storage layer; :func:`torch_trt_module.compile` decides what the
key is and what an entry holds. Layout under the root (:func:`resolve_cache_dir`)::

    entries/<key>.json                 metadata, written last: it is the commit marker
    entries/<key>+<blob>+<sha16>.blob  one file per blob, named by its content
    index/<fingerprint>.json           {"key": ...}: a fast fingerprint -> a content key
    aux/<name>.bin                     checksummed side files (TensorRT timing caches)
    locks/<name>.lock                  inter-process locks (filelock), never deleted
    <dir>/.<file>.<random>.tmp         a write in progress, or what a crash left

Blobs are named by their content so that writers of one key that race (TensorRT
builds are not bit-identical) never replace a blob that another writer's metadata
points to: whichever metadata lands last is whole. Blobs that no metadata points
to are crash leftovers, removed once older than ``ORPHAN_AGE_S``.

The last-used time is the mtime of the metadata file, so a hit records recency with
one ``os.utime`` instead of rewriting JSON. Sizes count metadata and blobs only
(not index, aux or lock files).

Nothing here raises for a corrupt entry or an I/O error during get/put/lookup/record/
read_aux/write_aux: a bad entry is evicted and reported as a miss with one WARNING,
and a failed write returns False with one WARNING per :class:`EngineCache`.
Invalid arguments (a key like ``"../x"``) raise ValueError; the management methods
(evict, clear, prune, info) raise :class:`~torch_trt_module.CacheError` on I/O errors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping

import filelock

from ._errors import CacheError

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CacheEntry",
    "CacheLockTimeout",
    "DEFAULT_MAX_SIZE",
    "EngineCache",
    "EntryInfo",
    "parse_size",
    "resolve_cache_dir",
    "sha256_bytes",
    "stable_hash",
]

logger = logging.getLogger(__name__)

#: Bumped whenever the layout or the metadata changes meaning; older entries are then misses.
CACHE_FORMAT_VERSION: int = 1
#: Size cap when neither ``max_size=`` nor ``$TORCH_TRT_MODULE_CACHE_MAX_SIZE`` says otherwise: 4 GiB.
DEFAULT_MAX_SIZE: int = 4 * 1024**3
CACHE_DIR_ENV = "TORCH_TRT_MODULE_CACHE"
MAX_SIZE_ENV = "TORCH_TRT_MODULE_CACHE_MAX_SIZE"
#: Files without metadata younger than this may belong to a write in progress, so they are left alone.
ORPHAN_AGE_S = 600.0

_NAME_RE = re.compile(r"[0-9A-Za-z_.-]{1,100}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_SIZE_RE = re.compile(r"(-?(?:\d+(?:\.\d*)?|\.\d+))\s*(?:([kmgt])(?:i?b)?|b)?", re.IGNORECASE)
_UNITS = {None: 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_AUX_MAGIC = b"TTMAUX1\n"
_AUX_HEAD = len(_AUX_MAGIC) + 32 + 8  # magic, sha256 digest, length


class CacheLockTimeout(CacheError, TimeoutError):
    """:meth:`EngineCache.lock` did not get the lock within its timeout."""


@dataclass(frozen=True)
class CacheEntry:
    """A verified hit: every blob matched the size and sha256 its metadata records."""

    key: str
    blobs: dict[str, bytes] = field(repr=False)
    meta: dict[str, Any]


@dataclass(frozen=True)
class EntryInfo:
    """One entry as listed by :meth:`EngineCache.entries` (blobs are not read or verified)."""

    key: str
    size_bytes: int
    created: float
    last_used: float
    meta: dict[str, Any] = field(repr=False)


class _Corrupt(Exception):
    """Why an entry cannot be used; never leaves this module."""


def _valid_name(name: object) -> bool:
    return isinstance(name, str) and bool(_NAME_RE.fullmatch(name)) and not name.startswith(".")


def _check_name(name: object, what: str) -> str:
    if not _valid_name(name):
        raise ValueError(
            f"cache {what} {name!r} is not valid; expected 1-100 characters from [0-9a-zA-Z_.-] "
            "not starting with '.' (a hex digest, for example)"
        )
    return name  # type: ignore[return-value]


def parse_size(value: str | int) -> int:
    """A size in bytes from an int or a string with a binary suffix.

    Example:
        >>> parse_size("500M"), parse_size("2G"), parse_size(1024)
        (524288000, 2147483648, 1024)
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"cache size {value!r} is a {type(value).__name__}; expected an int or a string like '2G'")
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip())
        if m is None:
            raise ValueError(
                f"cache size {value!r} is not understood; expected a number of bytes with an optional "
                "K, M, G or T suffix (powers of 1024), e.g. '1073741824', '500M' or '2G'"
            )
        num, unit = m.group(1), _UNITS[m.group(2) and m.group(2).lower()]
        n = int(num) * unit if "." not in num else int(float(num) * unit)
    else:
        n = value
    if n < 0:
        raise ValueError(f"cache size {value!r} is negative; expected 0 or more bytes")
    return n


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$TORCH_TRT_MODULE_CACHE``, else ``$XDG_CACHE_HOME/torch_trt_module``,
    else ``~/.cache/torch_trt_module``. Creates nothing."""
    if cache_dir is not None and os.fspath(cache_dir) != "":
        return Path(cache_dir).expanduser()
    if env := os.environ.get(CACHE_DIR_ENV):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says relative values are to be ignored
        return Path(xdg) / "torch_trt_module"
    return Path(os.path.expanduser("~")) / ".cache" / "torch_trt_module"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(obj: object, where: str) -> object:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"__bytes_sha256__": sha256_bytes(bytes(obj))}
    if isinstance(obj, Mapping):
        for k in obj:
            if not isinstance(k, str):  # json would turn 1 and "1" into the same key
                raise TypeError(f"stable_hash: key {k!r} in {where} is a {type(k).__name__}; only str keys are allowed")
        return {k: _canonical(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(
        f"stable_hash: {where} is a {type(obj).__name__}; expected JSON data "
        "(dict with str keys, list, tuple, str, int, float, bool, None) or bytes"
    )


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def stable_hash(obj: object) -> str:
    """sha256 hex of the canonical JSON of ``obj``: the same in every process and on every machine.

    ``bytes`` are hashed separately and enter as ``{"__bytes_sha256__": hex}``.

    Example:
        >>> stable_hash({"b": [1, 2.5], "a": b"weights"}) == stable_hash({"a": b"weights", "b": (1, 2.5)})
        True
    """
    try:
        return sha256_bytes(_dumps(_canonical(obj, "obj")))
    except ValueError as e:
        raise ValueError(f"stable_hash: {e}; NaN and infinity have no stable form") from e


def _fsync_dir(d: Path) -> None:
    # Makes the rename durable. Some filesystems cannot fsync a directory; that is not a failed write.
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Readers see the old file or the whole new one, never part of it; mkstemp makes it 0o600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class EngineCache:
    """A directory of verified, size-capped, LRU-evicted cache entries, safe across processes.

    Example:
        >>> cache = EngineCache("/tmp/ttm-doc-cache", max_size="1G")
        >>> key = stable_hash({"graph": b"onnx bytes", "precision": "fp16"})
        >>> with cache.lock(key):  # one process builds, the others wait and then hit
        ...     if cache.get(key) is None:
        ...         cache.put(key, {"engine": b"plan bytes"}, {"precision": "fp16"})
        True
        >>> cache.get(key).blobs["engine"]
        b'plan bytes'
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, *, max_size: int | str | None = None) -> None:
        self.root = resolve_cache_dir(root)
        self.max_size = parse_size(max_size) if max_size is not None else self._default_max_size()
        self._warned_unwritable = False

    def __repr__(self) -> str:
        return f"EngineCache(root={str(self.root)!r}, max_size={self.max_size})"

    @staticmethod
    def _default_max_size() -> int:
        env = os.environ.get(MAX_SIZE_ENV)
        if env:
            try:
                return parse_size(env)
            except ValueError as e:  # a typo in the environment must not break the user's run
                logger.warning("ignoring $%s: %s; using the default cap of %d bytes", MAX_SIZE_ENV, e, DEFAULT_MAX_SIZE)
        return DEFAULT_MAX_SIZE

    # ----- paths and small helpers -----
    def _meta_path(self, key: str) -> Path:
        return self.root / "entries" / f"{key}.json"

    def _blob_path(self, key: str, name: str, sha: str) -> Path:
        return self.root / "entries" / f"{key}+{name}+{sha[:16]}.blob"

    def _ensure(self, sub: str) -> Path:
        d = self.root / sub
        if not d.is_dir():
            self.root.parent.mkdir(parents=True, exist_ok=True)
            for p in (self.root, d):
                try:
                    os.mkdir(p, 0o700)
                except FileExistsError:
                    continue
                os.chmod(p, 0o700)  # mkdir's mode passes through the umask
        return d

    def _warn_unwritable(self, what: str, e: OSError) -> None:
        if self._warned_unwritable:
            logger.debug("engine cache %s: %s failed: %s", self.root, what, e)
            return
        self._warned_unwritable = True
        logger.warning(
            "engine cache directory %s is not writable (%s, while %s); continuing without caching. "
            "Fix its permissions or free space, or point cache_dir= or $%s elsewhere. "
            "Further write failures of this cache are not reported.",
            self.root, e, what, CACHE_DIR_ENV,
        )

    def _filelock(self, name: str) -> filelock.FileLock | None:
        try:
            d = self._ensure("locks")
        except OSError as e:
            self._warn_unwritable(f"creating the lock directory for {name!r}", e)
            return None
        # One instance per path in this process: reentrant in a thread, exclusive between threads and processes.
        return filelock.FileLock(str(d / f"{name}.lock"), mode=0o600, is_singleton=True)

    # ----- reading -----
    def _parse_meta(self, key: str, raw: bytes) -> dict[str, Any]:
        try:
            meta = json.loads(raw.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError is a ValueError
            raise _Corrupt("metadata is not valid JSON") from None
        if not isinstance(meta, dict):
            raise _Corrupt("metadata is not a JSON object")
        if "format_version" not in meta:
            raise _Corrupt("metadata lacks 'format_version'")
        fv = meta["format_version"]
        if fv != CACHE_FORMAT_VERSION or isinstance(fv, bool):
            raise _Corrupt(f"format version {fv!r} != {CACHE_FORMAT_VERSION}")
        missing = [f for f in ("key", "created", "last_used", "blobs", "meta_sha256") if f not in meta]
        if missing:
            raise _Corrupt(f"metadata lacks {', '.join(map(repr, missing))}")
        recorded = meta.pop("meta_sha256")
        if recorded != sha256_bytes(_dumps(meta)):
            raise _Corrupt("metadata checksum mismatch")
        if meta["key"] != key:
            raise _Corrupt(f"metadata is for key {meta['key']!r}")
        blobs = meta["blobs"]
        ok = isinstance(blobs, dict) and isinstance(meta["created"], (int, float))
        for name, info in blobs.items() if ok else ():
            ok = ok and _valid_name(name) and isinstance(info, dict) and isinstance(info.get("size"), int)
            ok = ok and isinstance(info.get("sha256"), str) and bool(_HEX64_RE.fullmatch(info["sha256"]))
        if not ok:
            raise _Corrupt("metadata has malformed 'blobs' or 'created'")
        return meta

    def _read_blob(self, key: str, name: str, info: dict[str, Any]) -> bytes:
        try:
            data = self._blob_path(key, name, info["sha256"]).read_bytes()
        except FileNotFoundError:
            raise _Corrupt(f"blob {name!r} is missing") from None
        if len(data) != info["size"]:
            raise _Corrupt(f"blob {name!r} is {len(data)} bytes, expected {info['size']} (truncated?)")
        if sha256_bytes(data) != info["sha256"]:
            raise _Corrupt(f"checksum mismatch for blob {name!r}")
        return data

    def get(self, key: str) -> CacheEntry | None:
        """The verified entry for ``key``, or None on a miss; a bad entry is evicted with one WARNING."""
        _check_name(key, "key")
        path = self._meta_path(key)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                raw = f.read()
        except FileNotFoundError:
            self._check_orphans(key)
            return None
        except OSError as e:
            logger.warning("engine cache entry %s cannot be read (%s); treating it as a miss", key, e)
            return None
        meta: dict[str, Any] | None = None
        try:
            meta = self._parse_meta(key, raw)
            blobs = {name: self._read_blob(key, name, info) for name, info in meta["blobs"].items()}
        except _Corrupt as e:
            logger.warning("engine cache entry %s is unusable (%s); evicting it and rebuilding", key, e)
            with contextlib.suppress(OSError):
                now = os.stat(path)
                # Evict only what we read: a writer may have committed a good entry since.
                if (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns):
                    self._remove_entry(key, meta)
            return None
        except OSError as e:
            logger.warning("engine cache entry %s cannot be read (%s); treating it as a miss", key, e)
            return None
        now_s = time.time()
        with contextlib.suppress(OSError):  # a read-only cache still serves hits
            os.utime(path, (now_s, now_s))
        meta["last_used"] = now_s
        logger.debug("engine cache hit %s", key)
        return CacheEntry(key=key, blobs=blobs, meta=meta)

    def _check_orphans(self, key: str) -> None:
        # Blobs with no metadata that are too old to be a write in progress: a crash between the two.
        old = self._orphans(key)
        if old:
            logger.warning(
                "engine cache entry %s is unusable (metadata missing, %d blob file(s) left); removing them and rebuilding",
                key, len(old),
            )
            for p in old:
                with contextlib.suppress(OSError):
                    os.unlink(p)

    def _orphans(self, key: str | None, referenced: Collection[str] = ()) -> list[Path]:
        """Blob and temp files in entries/ (of ``key``, or of all keys) that are not in ``referenced``
        and are older than ``ORPHAN_AGE_S``, so no write in progress owns them."""
        cutoff = time.time() - ORPHAN_AGE_S
        out = []
        try:
            scan = list(os.scandir(self.root / "entries"))
        except FileNotFoundError:
            return out
        for e in scan:
            name = e.name
            if key is not None and not name.startswith((f"{key}+", f".{key}+", f".{key}.json.")):
                continue
            orphan = (name.startswith(".") and name.endswith(".tmp")) or (
                name.endswith(".blob") and name not in referenced
            )
            with contextlib.suppress(FileNotFoundError):
                if orphan and e.stat(follow_symlinks=False).st_mtime < cutoff:
                    out.append(Path(e.path))
        return out

    # ----- writing -----
    def put(self, key: str, blobs: Mapping[str, bytes], meta: Mapping[str, Any]) -> bool:
        """Store an entry atomically, then evict LRU entries over the cap. False (and one WARNING) if it cannot write.

        The store adds ``format_version``, ``key``, ``created``, ``last_used``, ``blobs`` (sha256 and size of
        each) and ``meta_sha256`` to ``meta``, replacing fields of the same names.
        """
        _check_name(key, "key")
        data: dict[str, bytes] = {}
        for name, b in blobs.items():
            _check_name(name, "blob name")
            if not isinstance(b, (bytes, bytearray, memoryview)):
                raise TypeError(f"cache blob {name!r} is a {type(b).__name__}; expected bytes")
            data[name] = bytes(b)
        try:  # round-trip so that what we checksum is exactly what a reader will parse
            full = json.loads(_dumps(dict(meta)))
        except (TypeError, ValueError) as e:
            raise TypeError(f"cache metadata for {key} is not JSON data ({e}); use dicts with str keys, lists, "
                            "str, int, finite float, bool and None") from e
        now = time.time()
        infos = {n: {"sha256": sha256_bytes(b), "size": len(b)} for n, b in data.items()}
        full.update(format_version=CACHE_FORMAT_VERSION, key=key, created=now, last_used=now, blobs=infos)
        full["meta_sha256"] = sha256_bytes(_dumps(full))
        new_files: list[Path] = []
        try:
            self._ensure("entries")
            for n, b in data.items():
                p = self._blob_path(key, n, infos[n]["sha256"])
                if not p.exists():  # an identical blob may be shared with the entry we replace; keep that one
                    new_files.append(p)
                _atomic_write(p, b)
            _atomic_write(self._meta_path(key), _dumps(full))
        except OSError as e:
            for p in new_files:
                with contextlib.suppress(OSError):
                    os.unlink(p)
            self._warn_unwritable(f"storing entry {key}", e)
            return False
        try:
            referenced = {self._blob_path(key, n, i["sha256"]).name for n, i in infos.items()}
            for p in self._orphans(key, referenced):  # blobs of the version this put replaced
                os.unlink(p)
            self._shrink(self.max_size, keep={key})
        except (OSError, CacheError) as e:  # the entry is stored; eviction is best effort
            logger.warning("engine cache %s: eviction after storing %s failed: %s", self.root, key, e)
        return True

    def _remove_entry(self, key: str, meta: dict[str, Any] | None) -> bool:
        # Metadata first: once it is gone no reader takes the blobs for an entry.
        try:
            os.unlink(self._meta_path(key))
            existed = True
        except FileNotFoundError:
            existed = False
        for name, info in (meta or {}).get("blobs", {}).items():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._blob_path(key, name, info["sha256"]))
        return existed

    def _evict_unlocked(self, key: str, meta: dict[str, Any] | None) -> bool:
        lk = self._filelock(key)
        if lk is not None:
            if lk.is_locked:  # held by this thread, which is using the entry
                return False
            try:
                lk.acquire(timeout=0)
            except filelock.Timeout:
                return False
            except OSError:
                lk = None  # nobody can take a lock we cannot create either
        try:
            return self._remove_entry(key, meta)
        finally:
            if lk is not None:
                lk.release()

    def _shrink(self, max_size: int, keep: set[str]) -> list[str]:
        infos, bad = self._scan()
        evicted = [k for k in bad if self._evict_unlocked(k, None)]
        total = sum(i.size_bytes for i in infos)
        for info in infos:
            if total <= max_size:
                break
            if info.key not in keep and self._evict_unlocked(info.key, info.meta):
                total -= info.size_bytes
                evicted.append(info.key)
        if evicted:
            logger.info("engine cache %s: evicted %d entries (cap %d bytes, now %d)", self.root, len(evicted), max_size, total)
        return evicted

    # ----- locks, index, aux -----
    @contextlib.contextmanager
    def lock(self, name: str, timeout: float | None = None) -> Iterator[None]:
        """Hold the inter-process lock ``name`` (one per name). Without a writable cache it is a no-op.

        Raises :class:`CacheLockTimeout` if ``timeout`` seconds pass first (None waits forever).
        """
        _check_name(name, "lock name")
        lk = self._filelock(name)
        if lk is not None:
            try:
                lk.acquire(timeout=-1 if timeout is None else timeout)
            except filelock.Timeout:
                raise CacheLockTimeout(
                    f"could not take cache lock {name!r} under {self.root} within {timeout} s; another process "
                    "or thread holds it (it is released when its holder exits)"
                ) from None
            except OSError as e:
                self._warn_unwritable(f"locking {name!r}", e)
                lk = None
        try:
            yield
        finally:
            if lk is not None:
                lk.release()

    def lookup(self, fingerprint: str) -> str | None:
        """The content key recorded for ``fingerprint``, or None."""
        _check_name(fingerprint, "fingerprint")
        path = self.root / "index" / f"{fingerprint}.json"
        try:
            rec = json.loads(path.read_bytes().decode("utf-8"))
            ok = isinstance(rec, dict) and rec.get("format_version") == CACHE_FORMAT_VERSION
            if ok and rec.get("fingerprint") == fingerprint and _valid_name(rec.get("key")):
                return rec["key"]  # type: ignore[no-any-return]
            why = "malformed record"
        except FileNotFoundError:
            return None
        except ValueError:
            why = "not valid JSON"
        except OSError as e:
            logger.warning("engine cache index %s cannot be read (%s); treating it as a miss", fingerprint, e)
            return None
        logger.warning("engine cache index %s is unusable (%s); removing it", fingerprint, why)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None

    def record(self, fingerprint: str, key: str) -> bool:
        """Remember that ``fingerprint`` leads to ``key``. False (one WARNING) if the cache is not writable."""
        _check_name(fingerprint, "fingerprint")
        _check_name(key, "key")
        rec = {"format_version": CACHE_FORMAT_VERSION, "fingerprint": fingerprint, "key": key}
        try:
            _atomic_write(self._ensure("index") / f"{fingerprint}.json", _dumps(rec))
        except OSError as e:
            self._warn_unwritable(f"recording fingerprint {fingerprint}", e)
            return False
        return True

    def read_aux(self, name: str) -> bytes | None:
        """A side file written by :meth:`write_aux`, or None if absent or corrupt (then removed, with a WARNING)."""
        _check_name(name, "aux name")
        path = self.root / "aux" / f"{name}.bin"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            logger.warning("engine cache aux file %s cannot be read (%s); ignoring it", name, e)
            return None
        body = raw[_AUX_HEAD:]
        if len(raw) < _AUX_HEAD or not raw.startswith(_AUX_MAGIC):
            why = "bad header"
        elif int.from_bytes(raw[_AUX_HEAD - 8 : _AUX_HEAD], "big") != len(body):
            why = f"{len(body)} bytes, expected {int.from_bytes(raw[_AUX_HEAD - 8:_AUX_HEAD], 'big')} (truncated?)"
        elif hashlib.sha256(body).digest() != raw[len(_AUX_MAGIC) : len(_AUX_MAGIC) + 32]:
            why = "checksum mismatch"
        else:
            return body
        logger.warning("engine cache aux file %s is unusable (%s); removing it", name, why)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None

    def write_aux(self, name: str, data: bytes) -> bool:
        """Store a side file atomically with a checksum header. False (one WARNING) if not writable."""
        _check_name(name, "aux name")
        body = bytes(data)
        payload = _AUX_MAGIC + hashlib.sha256(body).digest() + len(body).to_bytes(8, "big") + body
        try:
            _atomic_write(self._ensure("aux") / f"{name}.bin", payload)
        except OSError as e:
            self._warn_unwritable(f"writing aux file {name}", e)
            return False
        return True

    # ----- management -----
    def _scan(self) -> tuple[list[EntryInfo], list[str]]:
        """Committed entries in LRU order (oldest first), and keys whose metadata is unusable."""
        infos: list[EntryInfo] = []
        bad: list[str] = []
        try:
            scan = list(os.scandir(self.root / "entries"))
        except FileNotFoundError:
            return infos, bad
        for e in scan:
            key = e.name[:-5]
            if not e.name.endswith(".json") or not _valid_name(key):
                continue
            try:
                with open(e.path, "rb") as f:
                    st = os.fstat(f.fileno())
                    meta = self._parse_meta(key, f.read())
            except FileNotFoundError:  # evicted meanwhile
                continue
            except _Corrupt:
                bad.append(key)
                continue
            meta["last_used"] = st.st_mtime
            size = st.st_size + sum(b["size"] for b in meta["blobs"].values())
            infos.append(EntryInfo(key, size, float(meta["created"]), st.st_mtime, meta))
        infos.sort(key=lambda i: (i.last_used, i.created, i.key))
        return infos, bad

    @contextlib.contextmanager
    def _managing(self, what: str) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            raise CacheError(f"could not {what} the engine cache at {self.root}: {e}") from e

    def entries(self) -> list[EntryInfo]:
        """Committed entries, least recently used first."""
        with self._managing("list"):
            return self._scan()[0]

    def total_size(self) -> int:
        """Bytes used by committed entries (metadata and blobs)."""
        return sum(i.size_bytes for i in self.entries())

    def evict(self, key: str) -> bool:
        """Remove ``key`` even if it is locked (its holder may be evicting a bad hit). True if it existed."""
        _check_name(key, "key")
        with self._managing(f"evict {key} from"):
            try:
                meta: dict[str, Any] | None = self._parse_meta(key, self._meta_path(key).read_bytes())
            except (FileNotFoundError, _Corrupt):
                meta = None
            return self._remove_entry(key, meta)

    def clear(self) -> int:
        """Remove every entry that no one holds locked, and the fingerprint index; returns the number removed."""
        with self._managing("clear"):
            infos, bad = self._scan()
            n = sum(self._evict_unlocked(k, None) for k in bad)
            n += sum(self._evict_unlocked(i.key, i.meta) for i in infos)
            with contextlib.suppress(FileNotFoundError):
                for e in os.scandir(self.root / "index"):
                    os.unlink(e.path)
            self._sweep()
            return n

    def prune(self, max_size: int | str) -> list[str]:
        """Evict least recently used, unlocked entries until at most ``max_size`` bytes remain, and
        remove crash leftovers. Returns the evicted keys, oldest first."""
        cap = parse_size(max_size)
        with self._managing("prune"):
            self._sweep()
            return self._shrink(cap, keep=set())

    def _sweep(self) -> None:
        infos, _ = self._scan()
        referenced = {self._blob_path(i.key, n, b["sha256"]).name for i in infos for n, b in i.meta["blobs"].items()}
        leftovers = self._orphans(None, referenced)
        cutoff = time.time() - ORPHAN_AGE_S
        for sub in ("index", "aux"):
            with contextlib.suppress(FileNotFoundError):
                leftovers += [Path(e.path) for e in os.scandir(self.root / sub)
                              if e.name.endswith(".tmp") and e.stat().st_mtime < cutoff]
        for p in leftovers:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        if leftovers:
            logger.info("engine cache %s: removed %d leftover file(s) of interrupted writes", self.root, len(leftovers))

    def info(self, key_prefix: str) -> EntryInfo:
        """The entry whose key is ``key_prefix`` or starts with it; ValueError if none or several match."""
        _check_name(key_prefix, "key prefix")
        infos = self.entries()
        exact = [i for i in infos if i.key == key_prefix]
        matches = exact or [i for i in infos if i.key.startswith(key_prefix)]
        if not matches:
            raise ValueError(f"no cache entry under {self.root} has a key starting with {key_prefix!r}; "
                             "`python -m torch_trt_module cache list` shows the keys")
        if len(matches) > 1:
            shown = ", ".join(i.key[:16] for i in matches[:5])
            raise ValueError(f"cache key prefix {key_prefix!r} matches {len(matches)} entries ({shown}, ...); "
                             "give more characters")
        return matches[0]
