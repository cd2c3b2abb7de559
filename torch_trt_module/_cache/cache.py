"""On-disk engine cache: content-keyed entries, verified on every read, written atomically.

Only the storage layer: compile() decides the key and what an entry holds. Layout under
the root (:func:`resolve_cache_dir`)::

    entries/<key>.json                 metadata, written last: it is the commit marker
    entries/<key>+<blob>+<sha16>.blob  one file per blob, named by its content
    index/<fingerprint>.json           {"key": ...}: a fast fingerprint -> a content key
    aux/<name>.bin                     checksummed side files (TensorRT timing caches)
    locks/<name>.lock                  inter-process locks (filelock); never deleted
    <dir>/.<file>.<random>.tmp         a write in progress, or what a crash left

Blobs are named by content so that writers of one key that race (TensorRT builds are not
bit-identical) never replace a blob that another writer's metadata points to: whichever
metadata lands last is whole. Files no metadata points to are removed once older than
``ORPHAN_AGE_S``. The last-used time is the metadata file's mtime, so a hit costs one
``os.utime``. Sizes count metadata and blobs, not index, aux or lock files.

The directory must be private (``_cache_safety.directory_problem``): one that others can write is
not used at all, with one WARNING. Files are opened without following symlinks and only if
regular; clear and prune remove only names the layout above writes. With
``$TORCH_TRT_MODULE_CACHE_KEY`` set, metadata and index records are signed (:mod:`torch_trt_module._core.sign`).

get/put/lookup/record/read_aux/write_aux never raise for corrupt data or I/O errors: a bad
entry is evicted and missed with one WARNING; a failed write returns False, with one WARNING
per :class:`EngineCache`. Bad arguments (a key like ``"../x"``) raise ValueError or TypeError;
evict/clear/prune/entries raise :class:`~torch_trt_module.CacheError` on I/O errors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping

import filelock

from .admin import CacheAdmin
from .safety import NotRegular, directory_problem, open_regular, ours, read_regular
from .safety import NOT_A_DIRECTORY as _NOT_A_DIRECTORY
from .side import CacheSideFiles
from .files import (CACHE_DIR_ENV, CACHE_FORMAT_VERSION, MAX_SIZE_ENV, ORPHAN_AGE_S, CacheEntry,
                           DeferredBlob, check_blob, check_name, check_size, parse_meta, parse_size, resolve_cache_dir)
from .._core.io import atomic_write, blob_index, canonical_json, seal
from .._core.sign import sign, signing_key
from .._errors import CacheLockTimeout, Corrupt

__all__ = ["CACHE_FORMAT_VERSION", "DEFAULT_MAX_SIZE", "EngineCache", "parse_size", "resolve_cache_dir"]

logger = logging.getLogger(__name__)

#: Size cap unless ``max_size=`` or ``$TORCH_TRT_MODULE_CACHE_MAX_SIZE`` (e.g. "500M", "2G") says otherwise: 4 GiB.
DEFAULT_MAX_SIZE: int = 4 * 1024**3
_LOCKS: weakref.WeakValueDictionary[tuple[int, str], filelock.FileLock] = weakref.WeakValueDictionary()
_LOCKS_GUARD = threading.Lock()
_WARNED_UNSAFE: set[str] = set()  # one WARNING per unsafe directory and process


class EngineCache(CacheSideFiles, CacheAdmin):
    """A directory of verified, size-capped, LRU-evicted entries, safe across threads and processes.

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
        self._unsafe: str | None = None
        self._checked = False

    def __repr__(self) -> str:
        return f"EngineCache(root={str(self.root)!r}, max_size={self.max_size})"

    @staticmethod
    def _default_max_size() -> int:
        if env := os.environ.get(MAX_SIZE_ENV):
            try:
                return parse_size(env)
            except ValueError as e:  # a typo in the environment must not break the user's run
                logger.warning("ignoring $%s: %s; using the default cap of %d bytes", MAX_SIZE_ENV, e, DEFAULT_MAX_SIZE)
        return DEFAULT_MAX_SIZE

    def _usable(self) -> bool:
        """Whether entries may be read from (and written to) the directory: False, with one WARNING per
        directory, where others can write it (see ``_cache_safety.directory_problem``). compile() then
        runs without the cache: reading entries others can plant would run their engines."""
        if not self._checked:
            self._unsafe = directory_problem(self.root, shared_ok=signing_key() is not None)
            self._checked = True
        if self._unsafe is None:
            return True
        if self._unsafe not in _WARNED_UNSAFE:
            _WARNED_UNSAFE.add(self._unsafe)
            if self._unsafe.endswith(_NOT_A_DIRECTORY):
                logger.warning("engine cache %s cannot be used (no reads, no writes): %s", self.root, self._unsafe)
                return False
            logger.warning("engine cache directory %s is not private, so it is not used (no reads, no writes): %s. "
                           "Others who can write it could plant engines. Or set $TORCH_TRT_MODULE_CACHE_KEY (the "
                           "same secret for everyone who shares it) to share a cache between users of a group",
                           self.root, self._unsafe)
        return False

    def _meta_path(self, key: str) -> Path:
        return self.root / "entries" / f"{key}.json"

    def _blob_path(self, key: str, name: str, sha: str) -> Path:
        return self.root / "entries" / f"{key}+{name}+{sha[:16]}.blob"

    def _ensure(self, sub: str) -> Path:
        d = self.root / sub
        if not d.is_dir():
            self.root.parent.mkdir(parents=True, exist_ok=True)
            for p in (self.root, d):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(p, 0o700)
                    os.chmod(p, 0o700)  # the umask may have taken bits from mkdir's mode
        return d

    def _warn_unwritable(self, what: str, e: OSError) -> None:
        if self._warned_unwritable:
            return logger.debug("engine cache %s: %s failed: %s", self.root, what, e)
        self._warned_unwritable = True
        logger.warning("engine cache directory %s is not writable (%s, while %s); continuing without caching. Fix its "
                       "permissions or free space, or point cache_dir= or $%s elsewhere. Further write failures of "
                       "this cache are not reported.", self.root, e, what, CACHE_DIR_ENV)

    def _filelock(self, name: str) -> filelock.FileLock | None:
        if not self._usable():
            return None
        try:
            d = self._ensure("locks")
        except OSError as e:
            self._warn_unwritable(f"creating the lock directory for {name!r}", e)
            return None
        # One instance per path and process (filelock>=3.12 has no is_singleton): reentrant within a thread,
        # exclusive between threads and processes, and visible to eviction's is_locked check.
        ident = (os.getpid(), os.path.realpath(d / f"{name}.lock"))
        with _LOCKS_GUARD:
            lk = _LOCKS.get(ident)
            if lk is None:
                lk = _LOCKS[ident] = filelock.FileLock(ident[1], mode=0o600)
        return lk

    # ----- reading -----
    def _read_blob(self, key: str, name: str, info: dict[str, Any]) -> bytes:
        try:
            data = read_regular(self._blob_path(key, name, info["sha256"]))[1]
        except FileNotFoundError:
            raise Corrupt(f"blob {name!r} is missing") from None
        except NotRegular as e:
            raise Corrupt(str(e)) from None
        check_blob(name, info, data)
        return data

    def get(self, key: str, *, defer: Collection[str] = (), only: Collection[str] | None = None) -> CacheEntry | None:
        """The verified entry for ``key``, or None. A bad entry is evicted, with one WARNING that says why.

        Blobs named in ``defer`` are only opened and size-checked here; reading and the
        checksum wait until :class:`DeferredBlob` is called (for bytes this process may never
        use, such as an engine that cannot run on this machine). With ``only``, blobs not named
        there are left alone (neither read nor returned).
        """
        check_name(key, "key")
        if not self._usable():
            return None
        path, meta, st = self._meta_path(key), None, None
        deferred: dict[str, DeferredBlob] = {}
        try:
            try:
                st, raw = read_regular(path)  # no symlink followed, and a FIFO cannot block the read
            except NotRegular as e:
                raise Corrupt(str(e)) from None
            meta = parse_meta(key, raw)
            wanted = set(meta["blobs"]) if only is None else set(meta["blobs"]) & set(only)
            blobs = {name: self._read_blob(key, name, meta["blobs"][name]) for name in sorted(wanted - set(defer))}
            for name in wanted & set(defer):
                deferred[name] = self._open_blob(key, name, meta["blobs"][name])
        except FileNotFoundError:
            if leftovers := self._leftovers(key):  # too old to be a write in progress: a crash between the two
                logger.warning("engine cache entry %s is unusable (metadata missing, %d file(s) left); removing "
                               "them and rebuilding", key, len(leftovers))
                for p in leftovers:
                    with contextlib.suppress(OSError):
                        os.unlink(p)
            return None
        except Corrupt as e:
            for d in deferred.values():
                d.close()
            logger.warning("engine cache entry %s is unusable (%s); evicting it and rebuilding", key, e)
            with contextlib.suppress(OSError):
                now = os.lstat(path)  # evict only what we read: a writer may have committed a good entry since
                if st is None or (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns):
                    self._remove_entry(key, meta)
            return None
        except OSError as e:
            logger.warning("engine cache entry %s cannot be read (%s); treating it as a miss", key, e)
            return None
        meta["last_used"] = time.time()
        with contextlib.suppress(OSError):  # a read-only cache still serves hits
            os.utime(path, (meta["last_used"], meta["last_used"]))
        logger.debug("engine cache hit %s", key)
        return CacheEntry(key=key, blobs=blobs, meta=meta, deferred=deferred)

    def _open_blob(self, key: str, name: str, info: dict[str, Any]) -> DeferredBlob:
        try:
            f = open_regular(self._blob_path(key, name, info["sha256"]))  # DeferredBlob closes it
        except FileNotFoundError:
            raise Corrupt(f"blob {name!r} is missing") from None
        except NotRegular as e:
            raise Corrupt(str(e)) from None
        try:
            check_size(name, info, os.fstat(f.fileno()).st_size)
        except Corrupt:
            f.close()
            raise
        return DeferredBlob(self, key, name, info, f)

    def _leftovers(self, key: str | None, referenced: Collection[str] = ()) -> list[Path]:
        """Temp files and unreferenced blobs in entries/ (of ``key``, or of all) older than ``ORPHAN_AGE_S``."""
        cutoff, out = time.time() - ORPHAN_AGE_S, []
        with contextlib.suppress(FileNotFoundError):
            for e in os.scandir(self.root / "entries"):
                n = e.name
                if key is not None and not n.startswith((f"{key}+", f".{key}+", f".{key}.json.")):
                    continue
                if not ours("entries", n):  # never a file the layout did not write
                    continue
                if (n.startswith(".") and n.endswith(".tmp")) or (n.endswith(".blob") and n not in referenced):
                    with contextlib.suppress(FileNotFoundError):
                        if e.stat(follow_symlinks=False).st_mtime < cutoff:
                            out.append(Path(e.path))
        return out

    # ----- writing -----
    def put(self, key: str, blobs: Mapping[str, bytes], meta: Mapping[str, Any]) -> bool:
        """Store an entry atomically, then evict LRU entries above the cap. False (one WARNING) if it cannot write.

        The store sets ``format_version``, ``key``, ``created``, ``last_used``, ``blobs`` ({name: {sha256, size}})
        and ``meta_sha256`` in the metadata, replacing fields of those names.
        """
        check_name(key, "key")
        if not self._usable():
            return False
        data = {check_name(n, "blob name"): b for n, b in blobs.items()}
        if bad := [n for n, b in data.items() if not isinstance(b, (bytes, bytearray, memoryview))]:
            raise TypeError(f"cache blob {bad[0]!r} is a {type(data[bad[0]]).__name__}; expected bytes")
        try:  # a round trip, so that what we checksum is exactly what a reader parses
            full = json.loads(canonical_json(dict(meta)))
        except (TypeError, ValueError) as e:
            raise TypeError(f"cache metadata for {key} is not JSON data ({e}); use dicts with str keys, lists, str, "
                            "int, finite float, bool and None") from e
        now = time.time()
        infos = blob_index(data)
        full.update(format_version=CACHE_FORMAT_VERSION, key=key, created=now, last_used=now, blobs=infos)
        full.pop("meta_hmac", None)
        if (mac := sign(canonical_json(full))) is not None:  # covers the blobs through their sha256
            full["meta_hmac"] = mac
        full = seal(full, "meta_sha256")
        paths = {n: self._blob_path(key, n, i["sha256"]) for n, i in infos.items()}
        new_files = []
        try:
            self._ensure("entries")
            for n, p in paths.items():
                if not p.exists():  # an identical blob may be shared with the entry being replaced: keep that one
                    new_files.append(p)
                atomic_write(p, bytes(data[n]))
            atomic_write(self._meta_path(key), canonical_json(full))
        except OSError as e:
            for p in new_files:
                with contextlib.suppress(OSError):
                    os.unlink(p)
            self._warn_unwritable(f"storing entry {key}", e)
            return False
        with contextlib.suppress(OSError):  # the kernel's coarse clock could order it before a recent hit
            os.utime(self._meta_path(key), (now, now))
        try:
            for p in self._leftovers(key, {p.name for p in paths.values()}):  # blobs of the entry this replaced
                os.unlink(p)
            self._shrink(self.max_size, keep={key})
        except OSError as e:  # the entry is stored; eviction is best effort
            logger.warning("engine cache %s: eviction after storing %s failed: %s", self.root, key, e)
        return True

    def _remove_entry(self, key: str, meta: dict[str, Any] | None) -> bool:
        try:
            os.unlink(self._meta_path(key))  # first: without metadata no reader takes the blobs for an entry
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
                lk = None  # no one can take a lock that cannot be created
        try:
            return self._remove_entry(key, meta)
        finally:
            if lk is not None:
                lk.release()

    def _shrink(self, max_size: int, keep: Collection[str]) -> list[str]:
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
            logger.info("engine cache %s: evicted %d entries (cap %d bytes, %d used)", self.root, len(evicted),
                        max_size, total)
        return evicted

    # ----- locks (index records and aux files: _cache_side.CacheSideFiles) -----
    @contextlib.contextmanager
    def lock(self, name: str, timeout: float | None = None) -> Iterator[None]:
        """Hold the inter-process lock ``name`` (None waits forever). A no-op if the cache is not writable.

        Raises :class:`CacheLockTimeout` when ``timeout`` seconds pass first.
        """
        check_name(name, "lock name")
        lk = self._filelock(name)
        if lk is not None:
            try:
                lk.acquire(timeout=-1 if timeout is None else timeout)
            except filelock.Timeout:
                raise CacheLockTimeout(f"could not take cache lock {name!r} under {self.root} within {timeout} s; "
                                       "another process or thread holds it until it finishes or exits") from None
            except OSError as e:
                self._warn_unwritable(f"locking {name!r}", e)
                lk = None
        try:
            yield
        finally:
            if lk is not None:
                lk.release()
