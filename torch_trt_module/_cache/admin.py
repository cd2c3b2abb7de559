"""The engine cache's management side: list, evict, clear, prune, sweep (a mixin of
:class:`~torch_trt_module._cache.cache.EngineCache`, which holds the storage side).

Management raises :class:`~torch_trt_module.CacheError` on I/O errors: a user asked for it. The
storage side never raises for corrupt data or I/O errors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Collection, Iterator, Protocol

from .._errors import CacheError, Corrupt
from .files import ORPHAN_AGE_S, EntryInfo, check_name, parse_meta, parse_size, valid_name
from .safety import SUBDIRS, NotRegular, ours, read_regular

__all__ = ["CacheAdmin", "EntryStorage"]

logger = logging.getLogger("torch_trt_module._cache.cache")


class EntryStorage(Protocol):
    """What the management side needs of the storage side: its paths and removal primitives.
    :class:`~torch_trt_module._cache.cache.EngineCache` implements it; :class:`CacheAdmin` declares
    it as its base, so it names the contract instead of calling methods it does not know."""

    root: Path

    def _meta_path(self, key: str) -> Path: ...
    def _blob_path(self, key: str, name: str, sha: str) -> Path: ...
    def _remove_entry(self, key: str, meta: dict[str, Any] | None) -> bool: ...
    def _evict_unlocked(self, key: str, meta: dict[str, Any] | None) -> bool: ...
    def _shrink(self, max_size: int, keep: Collection[str]) -> list[str]: ...
    def _leftovers(self, key: str | None, referenced: Collection[str] = ()) -> list[Path]: ...


class CacheAdmin(EntryStorage):
    """Listing and removing entries, over the storage side's :class:`EntryStorage` primitives."""

    def _scan(self) -> tuple[list[EntryInfo], list[str]]:
        """Committed entries, least recently used first, and the keys whose metadata is unusable."""
        infos: list[EntryInfo] = []
        bad: list[str] = []
        with contextlib.suppress(FileNotFoundError):
            for e in os.scandir(self.root / "entries"):
                key = e.name[:-5]
                if not e.name.endswith(".json") or not valid_name(key):
                    continue
                try:
                    st, raw = read_regular(e.path)  # a FIFO or a symlink named like an entry is not read
                    meta = parse_meta(key, raw)
                except FileNotFoundError:  # evicted meanwhile
                    continue
                except (Corrupt, NotRegular):
                    bad.append(key)
                    continue
                meta["last_used"] = st.st_mtime
                size = st.st_size + sum(b["size"] for b in meta["blobs"].values())
                infos.append(EntryInfo(key, size, float(meta["created"]), st.st_mtime, meta))
        return sorted(infos, key=lambda i: (i.last_used, i.created, i.key)), bad

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
        """Remove ``key`` even if locked (its holder may be evicting an entry it could not load). True if it existed."""
        with self._managing(f"evict {check_name(key, 'key')} from"):
            try:
                meta: dict[str, Any] | None = parse_meta(key, read_regular(self._meta_path(key))[1])
            except (FileNotFoundError, NotRegular, Corrupt):
                meta = None
            return self._remove_entry(key, meta)

    def clear(self) -> int:
        """Remove every entry that no one holds locked, and the fingerprint index. Returns the number removed.
        Only files the cache's layout writes are removed: anything else found in its folders is left, and
        named in one WARNING (:meth:`foreign_files` lists them)."""
        with self._managing("clear"):
            infos, bad = self._scan()
            n = sum(self._evict_unlocked(k, None) for k in bad)
            n += sum(self._evict_unlocked(i.key, i.meta) for i in infos)
            with contextlib.suppress(FileNotFoundError):
                for e in os.scandir(self.root / "index"):
                    if ours("index", e.name) and not e.is_dir(follow_symlinks=False):
                        os.unlink(e.path)
            self._sweep()
            return n

    def foreign_files(self) -> list[Path]:
        """Files in the cache's folders that its layout does not write (a README, a stray copy): never
        removed by :meth:`clear` or :meth:`prune`. The cache directory's own top level is ours only for
        its four folders."""
        found: list[Path] = []
        with self._managing("list"), contextlib.suppress(FileNotFoundError):
            for e in os.scandir(self.root):
                if e.name in SUBDIRS and e.is_dir(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        found += [Path(f.path) for f in os.scandir(e.path)
                                  if not ours(e.name, f.name) or f.is_dir(follow_symlinks=False)]
                else:
                    found.append(Path(e.path))
        return sorted(found)

    def _report_foreign(self) -> None:
        if foreign := self.foreign_files():
            shown = ", ".join(str(p.relative_to(self.root)) for p in foreign[:5])
            logger.warning("engine cache %s holds %d file(s) it did not write, left in place: %s%s", self.root,
                           len(foreign), shown, ", ..." if len(foreign) > 5 else "")

    def prune(self, max_size: int | str) -> list[str]:
        """Evict unlocked entries, least recently used first, until at most ``max_size`` bytes remain, and remove
        what interrupted writes left. Returns the evicted keys."""
        cap = parse_size(max_size)
        with self._managing("prune"):
            self._sweep()
            return self._shrink(cap, keep=())

    def _sweep(self) -> None:
        referenced = {self._blob_path(i.key, n, b["sha256"]).name for i in self._scan()[0]
                      for n, b in i.meta["blobs"].items()}
        leftovers, cutoff = self._leftovers(None, referenced), time.time() - ORPHAN_AGE_S
        for sub in ("index", "aux"):
            with contextlib.suppress(FileNotFoundError):
                leftovers += [Path(e.path) for e in os.scandir(self.root / sub)
                              if e.name.endswith(".tmp") and ours(sub, e.name)
                              and e.stat(follow_symlinks=False).st_mtime < cutoff]
        for p in leftovers:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        if leftovers:
            logger.info("engine cache %s: removed %d file(s) left by interrupted writes", self.root, len(leftovers))
        self._report_foreign()

    def info(self, key_prefix: str) -> EntryInfo:
        """The entry whose key is, or starts with, ``key_prefix``; ValueError if none or several match."""
        check_name(key_prefix, "key prefix")
        infos = self.entries()
        matches = [i for i in infos if i.key == key_prefix] or [i for i in infos if i.key.startswith(key_prefix)]
        if not matches:
            raise ValueError(f"no cache entry under {self.root} has a key starting with {key_prefix!r}; "
                             "`python -m torch_trt_module cache list` shows the keys")
        if len(matches) > 1:
            raise ValueError(f"cache key prefix {key_prefix!r} matches {len(matches)} entries "
                             f"({', '.join(i.key[:16] for i in matches[:5])}, ...); give more characters")
        return matches[0]
