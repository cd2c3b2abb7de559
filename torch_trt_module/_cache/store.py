"""The cache's store interface, and the tier that puts a remote store behind the local directory.

A :class:`Store` keeps byte strings by name and gives one builder per name a lease; the local
directory (:class:`~torch_trt_module._cache.cache.EngineCache`), :class:`MemoryStore` (tests) and
:class:`~torch_trt_module._cache.remote.RedisStore` are stores. What a remote store holds is the one
container of :mod:`torch_trt_module._core.io` (:func:`pack_entry`): the entry's blobs and JSON metadata, each blob
indexed by sha256, the header sealed, and signed where ``$TORCH_TRT_MODULE_CACHE_KEY`` is set. A
remote entry is unpacked (every checksum and the signature checked) before any byte of it is
stored locally; nothing is unpickled.

:class:`TieredCache` is what compile() uses: the local directory, read through. A remote hit is
downloaded once into the local directory and later hits are local; a build is stored locally and
uploaded; ``lock(name)`` takes the local file lock and then the remote build lease, so one worker
of a fleet builds each key while the others wait (bounded) and then load. Counts of what happened
are kept by :mod:`torch_trt_module._cache.fleet_stats`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Collection, Iterator, Mapping, Protocol, runtime_checkable

from .._core.io import pack, unpack
from .._errors import EngineLoadError
from .cache import EngineCache
from .files import CacheEntry, valid_name
from .fleet_stats import note

__all__ = ["REMOTE_ENV", "Lease", "MemoryStore", "Store", "TieredCache", "pack_entry", "track_keys",
           "unpack_entry"]

log = logging.getLogger("torch_trt_module._cache.cache")

#: ``redis://host:port/db``: the remote tier used when ``cache=True`` (the default).
REMOTE_ENV = "TORCH_TRT_MODULE_REMOTE_CACHE"
_ENTRY_KIND, _INDEX_KIND = "cache-entry", "cache-index"
# Fields the local store sets itself at put(): never carried between stores.
_STORE_FIELDS = ("format_version", "key", "created", "last_used", "blobs", "meta_sha256", "meta_hmac")
_SEEN: contextvars.ContextVar[list[tuple[str, "TieredCache"]] | None] = contextvars.ContextVar(
    "torch_trt_module_seen_keys", default=None)


@contextlib.contextmanager
def track_keys() -> Iterator[list[tuple[str, "TieredCache"]]]:
    """Collect the keys of the entries read or stored through any :class:`TieredCache` meanwhile (in this
    thread or task), each with its cache: the last one is what a compile_engine() call returned."""
    seen: list[tuple[str, TieredCache]] = []
    token = _SEEN.set(seen)
    try:
        yield seen
    finally:
        _SEEN.reset(token)


@dataclass
class Lease:
    """What :meth:`Store.lease` yields: ``held`` when this worker builds (``waited_s`` > 0 if it first
    waited for another's lease to expire); otherwise it waited ``waited_s`` seconds until the result was
    there, or until the wait's bound, or the store is unreachable."""

    held: bool
    waited_s: float = 0.0


@runtime_checkable
class Store(Protocol):
    """Byte strings by name, and a build lease per name. Never raises for an unreachable or
    corrupt store: ``get`` misses and ``put`` returns False."""

    def get(self, name: str) -> bytes | None: ...

    def put(self, name: str, data: bytes) -> bool: ...

    def lease(self, name: str, *, done: Collection[str]) -> contextlib.AbstractContextManager[Lease]:
        """Hold the build lease ``name``, or wait (bounded) until one of ``done`` is stored."""
        ...

    def stats(self) -> dict[str, Any]: ...


class MemoryStore:
    """A :class:`Store` in this process's memory (for tests), with leases that expire after ``lease_ttl_s``."""

    def __init__(self, *, lease_ttl_s: float = 30.0, lease_wait_s: float = 60.0) -> None:
        self.data: dict[str, bytes] = {}
        self.lease_ttl_s, self.lease_wait_s = lease_ttl_s, lease_wait_s
        self._leases: dict[str, float] = {}
        self._guard = threading.Lock()

    def get(self, name: str) -> bytes | None:
        return self.data.get(name)

    def put(self, name: str, data: bytes) -> bool:
        self.data[name] = bytes(data)
        return True

    @contextlib.contextmanager
    def lease(self, name: str, *, done: Collection[str]) -> Iterator[Lease]:
        start, waited = time.monotonic(), False
        while True:
            with self._guard:
                if self._leases.get(name, 0.0) < time.monotonic():
                    self._leases[name] = time.monotonic() + self.lease_ttl_s
                    break
            if any(d in self.data for d in done) or time.monotonic() - start > self.lease_wait_s:
                yield Lease(False, time.monotonic() - start)
                return
            waited = True
            time.sleep(0.01)
        try:
            yield Lease(True, time.monotonic() - start if waited else 0.0)
        finally:
            with self._guard:
                self._leases.pop(name, None)

    def stats(self) -> dict[str, Any]:
        return {"store": "memory", "names": len(self.data), "bytes": sum(map(len, self.data.values()))}


def pack_entry(key: str, meta: Mapping[str, Any], blobs: Mapping[str, bytes]) -> bytes:
    """An entry as one checksummed (and, with a key, signed) byte string, as remote stores keep it."""
    user_meta = {k: v for k, v in meta.items() if k not in _STORE_FIELDS}
    return pack(_ENTRY_KIND, {"key": key, "meta": user_meta}, blobs)


def unpack_entry(key: str, data: bytes, *, source: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The metadata and blobs of :func:`pack_entry`'s bytes for ``key``, every checksum verified;
    :class:`~torch_trt_module.EngineLoadError` for anything else (truncated, corrupt, another key)."""
    header, blobs = unpack(data, kind=_ENTRY_KIND, source=source)
    if header.get("key") != key or not isinstance(header.get("meta"), dict):
        raise EngineLoadError(f"{source} holds entry {str(header.get('key'))[:16]!r}, not {key[:16]!r}")
    if bad := [n for n in blobs if not valid_name(n)]:
        raise EngineLoadError(f"{source} has a blob named {bad[0]!r}, which no entry has")
    return header["meta"], blobs


class TieredCache:
    """The local directory with ``remote`` read through it. It offers :class:`EngineCache`'s storage
    calls (anything else is the local cache's) and never raises for the remote store's faults."""

    def __init__(self, local: EngineCache, remote: Store | None) -> None:
        self.local, self.remote = local, remote
        self._refused: set[str] = set()  # remote entries found corrupt: not downloaded again by this compile
        self._last_put: tuple[str, dict[str, Any], dict[str, bytes]] | None = None

    def __getattr__(self, name: str) -> Any:  # evict, read_aux, write_aux, root, entries, ...
        return getattr(self.local, name)

    def __repr__(self) -> str:
        return f"TieredCache({self.local!r}, remote={self.remote!r})"

    # ----- index -----
    def lookup(self, fingerprint: str) -> str | None:
        key = self.local.lookup(fingerprint)
        if key is not None or self.remote is None:
            return key
        data = self.remote.get(f"index-{fingerprint}")
        if data is None:
            return None
        try:
            header, _ = unpack(data, kind=_INDEX_KIND, source=f"remote cache index record {fingerprint[:16]}")
        except EngineLoadError as e:
            log.warning("%s; ignoring it", e)
            return None
        key = header.get("key")
        if header.get("fingerprint") != fingerprint or not valid_name(key):
            log.warning("remote cache index record %s is malformed; ignoring it", fingerprint[:16])
            return None
        self.local.record(fingerprint, key)
        return key  # type: ignore[no-any-return]

    def record(self, fingerprint: str, key: str) -> bool:
        ok = self.local.record(fingerprint, key)
        if self.remote is not None:
            self.remote.put(f"index-{fingerprint}", pack(_INDEX_KIND, {"fingerprint": fingerprint, "key": key}, {}))
        return ok

    # ----- entries -----
    def get(self, key: str, *, defer: Collection[str] = (), only: Collection[str] | None = None) -> CacheEntry | None:
        entry = self.local.get(key, defer=defer, only=only)
        if entry is not None:
            self._saw(key)
            note(self.local, "local_hits", key=key)
            return entry
        if self.remote is None or key in self._refused:
            return None
        data = self.remote.get(f"entry-{key}")
        if data is None:
            return None
        try:
            meta, blobs = unpack_entry(key, data, source=f"remote cache entry {key[:16]}")
        except EngineLoadError as e:
            log.warning("%s; it is refused and rebuilt", e)  # never loaded; the rebuild replaces it
            self._refused.add(key)
            return None
        note(self.local, "remote_hits", key=key, bytes_down=len(data))
        self._saw(key)
        if self.local.put(key, blobs, meta) and (entry := self.local.get(key, defer=defer, only=only)) is not None:
            return entry
        # No usable local directory: serve the verified bytes from memory.
        wanted = blobs if only is None else {n: b for n, b in blobs.items() if n in only}
        return CacheEntry(key=key, blobs=wanted, meta=dict(meta))

    def put(self, key: str, blobs: Mapping[str, bytes], meta: Mapping[str, Any]) -> bool:
        ok = self.local.put(key, blobs, meta)
        self._last_put = (key, dict(meta), dict(blobs))
        self._saw(key)
        data = pack_entry(key, meta, blobs) if self.remote is not None else b""
        note(self.local, "builds", key=key)
        if self.remote is not None and self.remote.put(f"entry-{key}", data):
            note(self.local, "uploads", key=key, bytes_up=len(data))
        return ok

    def _saw(self, key: str) -> None:
        if (seen := _SEEN.get()) is not None:
            seen.append((key, self))

    def entry_bytes(self, key: str) -> bytes | None:
        """The entry stored under ``key`` as :func:`pack_entry`'s bytes (for a broadcast), or None."""
        entry = self.local.get(key)
        if entry is not None:
            return pack_entry(key, entry.meta, entry.blobs)
        if self._last_put is not None and self._last_put[0] == key:  # stored nowhere (no usable directory)
            return pack_entry(key, self._last_put[1], self._last_put[2])
        return None

    def has_local(self, fingerprint: str | None) -> bool:
        """Whether the local tier has the entry ``fingerprint`` leads to (metadata checked, blobs not read)."""
        key = self.local.lookup(fingerprint) if fingerprint is not None else None
        return key is not None and self.local.get(key, only=()) is not None

    # ----- locks -----
    @contextlib.contextmanager
    def lock(self, name: str, timeout: float | None = None) -> Iterator[None]:
        """The local lock ``name``, then (unless the local tier already has it) the remote build lease."""
        with self.local.lock(name, timeout):
            if self.remote is None or self.local.lookup(name) is not None or self.local.get(name, only=()) is not None:
                yield
                return
            with self.remote.lease(name, done=(f"entry-{name}", f"index-{name}")) as lease:
                if lease.waited_s > 0:  # another worker held it: we waited for its result, or for it to expire
                    note(self.local, "lease_waits", key=name, lease_wait_s=lease.waited_s)
                yield
