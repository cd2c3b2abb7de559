"""A Redis server as the engine cache's remote store (:class:`~torch_trt_module._cache.store.Store`).

Configured by ``$TORCH_TRT_MODULE_REMOTE_CACHE=redis://host:port/db`` or ``compile(..., cache=URL)``.
The URL's query may set ``socket_timeout`` and ``socket_connect_timeout`` (redis-py's, in seconds;
ours default to 10 and 2), and our own ``lease_ttl`` (30 s), ``lease_wait`` (900 s),
``max_entry`` (512M) and ``prefix`` (``torch_trt_module:``).

- Values are the checksummed containers of :mod:`torch_trt_module._cache.store` (bytes, never unpickled); names are
  ``<prefix>entry-<key>``, ``<prefix>index-<fingerprint>`` and ``<prefix>lease-<name>``.
- **One builder per name:** ``SET lease NX PX ttl`` with a random token, renewed every third of the
  ttl by a thread while the build runs, and deleted only by its holder (compare-and-delete in Lua).
  Others poll until the result is stored or the lease is free (every 0.2 s at most: a finished
  build is seen within that, for two round trips a poll), for at most ``lease_wait`` seconds, then
  build themselves. A killed builder renews nothing: its lease expires after ``lease_ttl``.
- **Faults never fail a compile:** an unreachable or timed-out server gives one WARNING per outage,
  and for 30 s every call is a miss without a network round trip; then it is tried again.
- **Size and eviction:** entries above ``max_entry`` are not uploaded (Redis refuses values above its
  ``proto-max-bulk-len``, 512 MB by default). Entries get no TTL: eviction is Redis's own, so give the
  server ``maxmemory`` and ``maxmemory-policy allkeys-lru``; an evicted entry is a miss and rebuilt.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from typing import Any, Callable, Collection, Iterator, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .._errors import SettingsError
from .cache import EngineCache
from .files import parse_size
from .store import REMOTE_ENV, Lease, Store, TieredCache

__all__ = ["RedisStore", "open_cache", "redis_store", "remote_store"]

log = logging.getLogger("torch_trt_module._cache.cache")

T = TypeVar("T")
_RETRY_AFTER_S = 30.0
# A waiter's pauses between polls: doubling from the first to the last. The last bounds how late a
# waiter sees a finished build (it was 1 s: a cold fleet lost ~0.5 s on average there); a poll is one
# SET NX and one EXISTS, so even hundreds of waiters polling 5 times a second cost Redis little.
_POLL_FIRST_S, _POLL_MAX_S = 0.02, 0.2
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_STORES: dict[str, "RedisStore"] = {}
_STORES_GUARD = threading.Lock()


def redis_store(url: str) -> "RedisStore":
    """The one :class:`RedisStore` of this process for ``url`` (its connection pool is shared)."""
    with _STORES_GUARD:
        store = _STORES.get(url)
        if store is None:
            store = _STORES[url] = RedisStore(url)
        return store


class RedisStore:
    """A :class:`~torch_trt_module._cache.store.Store` on a Redis server (the ``redis`` client is imported lazily)."""

    def __init__(self, url: str, *, lease_ttl_s: float | None = None, lease_wait_s: float | None = None,
                 max_entry: int | str | None = None, prefix: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise SettingsError(f"remote cache URL {_redact(url)!r} is not a Redis URL; expected "
                                "redis://host:port/db (or rediss:// or unix://)")
        ours = {"lease_ttl", "lease_wait", "max_entry", "prefix"}
        query = dict(parse_qsl(parts.query))
        own = {k: query.pop(k) for k in list(query) if k in ours}
        query.setdefault("socket_timeout", "10")
        query.setdefault("socket_connect_timeout", "2")
        self.url = _redact(url)
        self._redis_url = urlunsplit(parts._replace(query=urlencode(query)))
        try:
            self.lease_ttl_s = float(lease_ttl_s if lease_ttl_s is not None else own.get("lease_ttl", 30))
            self.lease_wait_s = float(lease_wait_s if lease_wait_s is not None else own.get("lease_wait", 900))
            self.max_entry = parse_size(max_entry if max_entry is not None else own.get("max_entry", "512M"))
        except ValueError as e:
            raise SettingsError(f"remote cache URL {self.url!r}: {e}; expected lease_ttl and lease_wait in seconds "
                                "and max_entry as a size such as 512M") from e
        if self.lease_ttl_s <= 0:
            raise SettingsError(f"remote cache URL {self.url!r}: lease_ttl must be > 0 seconds")
        self.prefix = prefix if prefix is not None else own.get("prefix", "torch_trt_module:")
        self._client: Any = None
        self._down_until = 0.0
        self._warned: set[str] = set()
        self._guard = threading.Lock()

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r})"

    # ----- calls that never raise -----
    def _redis(self) -> Any:
        if self._client is None:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            # One retry at most: a dead server must cost one timeout, not the client's default backoff.
            self._client = redis.Redis.from_url(self._redis_url, retry=Retry(NoBackoff(), 1))
        return self._client

    def _call(self, what: str, fn: Callable[[Any], T], default: T) -> T:
        if time.monotonic() < self._down_until:
            return default
        try:
            import redis
        except ImportError as e:
            self._warn_once("import", f"remote engine cache {self.url}: the 'redis' package is not installed ({e}); "
                            "building locally. Fix: pip install redis")
            self._down_until = float("inf")
            return default
        try:
            result = fn(self._redis())
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            self._down_until = time.monotonic() + _RETRY_AFTER_S
            self._warn_once("down", f"remote engine cache {self.url} is unreachable ({type(e).__name__}: {e}) while "
                            f"{what}; building and caching locally. It is tried again in {_RETRY_AFTER_S:.0f} s")
            return default
        except redis.RedisError as e:
            self._warn_once(type(e).__name__, f"remote engine cache {self.url}: {what} failed ({type(e).__name__}: "
                            f"{e}); continuing without it for this step")
            return default
        with self._guard:
            if "down" in self._warned:
                self._warned.discard("down")
                log.info("remote engine cache %s is reachable again", self.url)
        return result

    def _warn_once(self, kind: str, message: str) -> None:
        with self._guard:
            if kind in self._warned:
                return
            self._warned.add(kind)
        log.warning("%s", message)

    # ----- the Store protocol -----
    def get(self, name: str) -> bytes | None:
        return self._call(f"reading {name[:22]}", lambda r: r.get(self.prefix + name), None)

    def put(self, name: str, data: bytes) -> bool:
        if len(data) > self.max_entry:
            log.info("remote engine cache %s: %s is %d bytes, above max_entry=%d; not uploaded", self.url, name[:22],
                     len(data), self.max_entry)
            return False
        return bool(self._call(f"writing {name[:22]}", lambda r: r.set(self.prefix + name, data), False))

    def exists(self, names: Collection[str]) -> bool:
        return bool(self._call("checking", lambda r: r.exists(*(self.prefix + n for n in names)), 0))

    @contextlib.contextmanager
    def lease(self, name: str, *, done: Collection[str]) -> Iterator[Lease]:
        """Hold the build lease ``name`` (renewed while held), or wait until one of ``done`` exists, the
        lease is free or ``lease_wait_s`` passes. An unreachable server: not held, no wait."""
        lease_key, token, ttl_ms = f"{self.prefix}lease-{name}", secrets.token_hex(16), int(self.lease_ttl_s * 1000)
        start, pause, waited = time.monotonic(), _POLL_FIRST_S, False
        take = lambda r: r.set(lease_key, token, nx=True, px=ttl_ms)  # noqa: E731
        while not self._call("taking a build lease", take, None):
            if time.monotonic() >= self._down_until and not waited:
                log.info("remote engine cache %s: another worker is building %s; waiting for it (at most %.0f s)",
                         self.url, name[:16], self.lease_wait_s)
            waited = True
            if time.monotonic() < self._down_until or self.exists(done):
                yield Lease(False, time.monotonic() - start)
                return
            if time.monotonic() - start > self.lease_wait_s:
                log.warning("remote engine cache %s: waited %.0f s for another worker's build of %s; building it here "
                            "too (lease_wait=%g s)", self.url, time.monotonic() - start, name[:16], self.lease_wait_s)
                yield Lease(False, time.monotonic() - start)
                return
            time.sleep(pause)
            pause = min(pause * 2, _POLL_MAX_S)
        stop = threading.Event()
        renew = threading.Thread(target=self._renew, args=(lease_key, token, ttl_ms, stop), daemon=True,
                                 name=f"torch_trt_module-lease-{name[:8]}")
        renew.start()
        try:
            yield Lease(True, time.monotonic() - start if waited else 0.0)
        finally:
            stop.set()
            renew.join()
            self._call("releasing a build lease", lambda r: r.eval(_RELEASE, 1, lease_key, token), 0)

    def _renew(self, lease_key: str, token: str, ttl_ms: int, stop: threading.Event) -> None:
        while not stop.wait(self.lease_ttl_s / 3):
            self._call("renewing a build lease", lambda r: r.eval(_RENEW, 1, lease_key, token, ttl_ms), 0)

    def stats(self) -> dict[str, Any]:
        """What the server says about itself (its memory, cap and eviction policy), or that it is unreachable."""
        def ask(r: Any) -> dict[str, Any]:
            mem = r.info("memory")
            return {"keys": r.dbsize(), "used_memory": mem.get("used_memory"), "maxmemory": mem.get("maxmemory"),
                    "maxmemory_policy": mem.get("maxmemory_policy")}

        got = self._call("reading its stats", ask, None)
        return {"store": "redis", "url": self.url, "reachable": got is not None, **(got or {})}


def _redact(url: str) -> str:
    """``url`` without its password (logs and errors never show one)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{netloc[-1]}"))


def remote_store(cache: Any) -> Store | None:
    """The remote tier ``cache=`` selects: a store object, a ``redis://`` URL, or with True the
    ``$TORCH_TRT_MODULE_REMOTE_CACHE`` URL (None when unset)."""
    if isinstance(cache, bool):
        url = os.environ.get(REMOTE_ENV) if cache else None
        if not url:
            return None
        cache = url
    if isinstance(cache, str):
        return redis_store(cache)
    return cache  # type: ignore[no-any-return]  # a Store: checked by Settings


def open_cache(settings: Any) -> TieredCache:
    """compile()'s cache for ``settings``: the local directory, and the remote tier if one is set."""
    return TieredCache(EngineCache(settings.cache_dir, max_size=settings.cache_max_size), remote_store(settings.cache))
