"""The engine cache's files: where the cache lives, names and sizes, entry records, metadata
that checks itself, and blobs read after the hit (:class:`DeferredBlob`).

The store itself (reads, writes, locks, eviction) is :mod:`torch_trt_module._cache.cache`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .._core.io import blob_problem, canonical_json, header_problem
from .._core.sign import signature_problem
from .._errors import CacheError, Corrupt


class _Evicts(Protocol):
    """What a :class:`DeferredBlob` needs of its cache: the eviction of an entry found corrupt."""

    def evict(self, key: str) -> Any: ...

__all__ = ["CACHE_DIR_ENV", "CACHE_FORMAT_VERSION", "CacheEntry", "DeferredBlob", "EntryInfo",
           "MAX_SIZE_ENV", "ORPHAN_AGE_S", "check_name", "parse_meta", "parse_size", "resolve_cache_dir", "valid_name"]

#: Bumped whenever the layout or the metadata changes meaning; entries of other versions are misses.
CACHE_FORMAT_VERSION: int = 1
CACHE_DIR_ENV = "TORCH_TRT_MODULE_CACHE"
MAX_SIZE_ENV = "TORCH_TRT_MODULE_CACHE_MAX_SIZE"
#: Files without metadata younger than this may belong to a write in progress, so they are left alone.
ORPHAN_AGE_S = 600.0

_NAME_RE = re.compile(r"[0-9A-Za-z_.-]{1,100}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_SIZE_RE = re.compile(r"(-?(?:\d+(?:\.\d*)?|\.\d+))\s*(?:([kmgt])(?:i?b)?|b)?", re.IGNORECASE)
_UNITS = {None: 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def check_blob(name: str, info: dict[str, Any], data: bytes) -> None:
    """Raise Corrupt unless ``data`` has the size and sha256 that the metadata records."""
    problem = blob_problem(name, info, data)
    if problem:
        raise Corrupt(problem)


def check_size(name: str, info: dict[str, Any], size: int) -> None:
    if size != info["size"]:
        raise Corrupt(f"blob {name!r} is {size} bytes, expected {info['size']} (truncated?)")


def valid_name(name: object) -> bool:
    return isinstance(name, str) and bool(_NAME_RE.fullmatch(name)) and not name.startswith(".")


def check_name(name: object, what: str) -> str:
    if not valid_name(name):
        raise ValueError(f"cache {what} {name!r} is not valid; expected 1-100 characters from [0-9a-zA-Z_.-], "
                         "not starting with '.' (a hex digest, for example)")
    return name  # type: ignore[return-value]


@dataclass(frozen=True)
class CacheEntry:
    """A verified hit: every blob in ``blobs`` matched the size and sha256 that its metadata
    records. Blobs asked for with ``get(key, defer=...)`` are in ``deferred`` instead."""

    key: str
    blobs: dict[str, bytes] = field(repr=False)
    meta: dict[str, Any]
    deferred: dict[str, "DeferredBlob"] = field(default_factory=dict, repr=False)


class DeferredBlob:
    """A blob opened at the hit and read, and checked against its sha256, only when called.

    The file is held open, so a later eviction or prune (which unlinks it) cannot take the
    bytes away. A mismatch raises :class:`CacheError` and evicts the entry.
    """

    def __init__(self, cache: _Evicts, key: str, name: str, info: dict[str, Any], f: Any) -> None:
        self._cache, self._key, self._name, self._info, self._f = cache, key, name, info, f
        self.size: int = info["size"]

    def __call__(self) -> bytes:
        """The blob's bytes, checked."""
        data = self.read()
        self.check(data)
        return data

    def read(self) -> bytes:
        """The bytes, not yet checked: use them only once :meth:`check` has passed."""
        if self._f.closed:
            raise CacheError(f"engine cache entry {self._key[:16]}: blob {self._name!r} was already read")
        with self._f as f:
            f.seek(0)
            return f.read()  # type: ignore[no-any-return]

    def check(self, data: bytes) -> None:
        """Raise :class:`CacheError` (and evict the entry) unless ``data`` matches the recorded sha256."""
        try:
            check_blob(self._name, self._info, data)
        except Corrupt as e:
            with contextlib.suppress(CacheError):
                self._cache.evict(self._key)
            raise CacheError(f"engine cache entry {self._key} is unusable ({e}, read after the hit); "
                             "it was evicted") from None

    def close(self) -> None:
        self._f.close()

    def __del__(self) -> None:  # never read: close quietly (no ResourceWarning)
        with contextlib.suppress(Exception):
            self._f.close()


@dataclass(frozen=True)
class EntryInfo:
    """An entry as listed by :meth:`EngineCache.entries`; its blobs are neither read nor verified."""

    key: str
    size_bytes: int
    created: float
    last_used: float
    meta: dict[str, Any] = field(repr=False)


def parse_size(value: str | int) -> int:
    """Bytes from an int or a string with an optional binary suffix: ``parse_size("500M") == 500 * 1024**2``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"cache size {value!r} is a {type(value).__name__}; expected an int or a string like '2G'")
    n = value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip())
        if m is None:
            raise ValueError(f"cache size {value!r} is not understood; expected a number of bytes with an optional "
                             "K, M, G or T suffix (powers of 1024), e.g. '1073741824', '500M' or '2G'")
        num, unit = m.group(1), _UNITS[m.group(2) and m.group(2).lower()]
        n = int(num) * unit if "." not in num else int(float(num) * unit)
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
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore relative values
        return Path(xdg) / "torch_trt_module"
    return Path(os.path.expanduser("~")) / ".cache" / "torch_trt_module"


def parse_meta(key: str, raw: bytes) -> dict[str, Any]:
    """The checked metadata of entry ``key`` from its file's bytes; Corrupt says what is wrong."""
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise Corrupt("metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise Corrupt("metadata is not a JSON object")
    if "format_version" not in meta:
        raise Corrupt("metadata lacks 'format_version'")
    if (fv := meta["format_version"]) != CACHE_FORMAT_VERSION or isinstance(fv, bool):
        raise Corrupt(f"format version {fv!r} != {CACHE_FORMAT_VERSION}")
    if missing := [f for f in ("key", "created", "last_used", "blobs", "meta_sha256") if f not in meta]:
        raise Corrupt(f"metadata lacks {', '.join(map(repr, missing))}")
    if header_problem(meta, "meta_sha256"):
        raise Corrupt("metadata checksum mismatch")
    mac = meta.pop("meta_hmac", None)
    if problem := signature_problem(canonical_json(meta), mac, what="the entry"):
        raise Corrupt(problem)
    if meta["key"] != key:
        raise Corrupt(f"metadata is for key {meta['key']!r}")
    blobs = meta["blobs"]
    ok = isinstance(blobs, dict) and isinstance(meta["created"], (int, float))
    for name, info in blobs.items() if ok else ():
        ok = ok and valid_name(name) and isinstance(info, dict) and isinstance(info.get("size"), int)
        ok = ok and isinstance(info.get("sha256"), str) and bool(_HEX64_RE.fullmatch(info["sha256"]))
    if not ok:
        raise Corrupt("metadata has malformed 'blobs' or 'created'")
    return meta
