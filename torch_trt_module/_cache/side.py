"""The engine cache's side files: the fingerprint index (a fast fingerprint -> a content key) and
aux files (checksummed bytes, such as TensorRT timing caches). A mixin of
:class:`~torch_trt_module._cache.cache.EngineCache`; like its storage side, it never raises for corrupt
data or I/O errors. With ``$TORCH_TRT_MODULE_CACHE_KEY`` set, index records are signed too: a
record pointing a fingerprint at another model's entry is as much a forgery as an entry."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from .._core.io import atomic_write, canonical_json, pack, unpack
from .._core.sign import sign, signature_problem
from .._errors import EngineLoadError
from .files import CACHE_FORMAT_VERSION, check_name, valid_name
from .safety import NotRegular, read_regular

__all__ = ["CacheSideFiles", "SideStorage"]

logger = logging.getLogger("torch_trt_module._cache.cache")

_AUX_KIND = "cache-aux"


class SideStorage(Protocol):
    """What the side files need of the storage side: its directory checks and the warning for an
    unwritable cache. :class:`~torch_trt_module._cache.cache.EngineCache` implements it."""

    root: Path

    def _usable(self) -> bool: ...
    def _ensure(self, sub: str) -> Path: ...
    def _warn_unwritable(self, what: str, e: OSError) -> None: ...


class CacheSideFiles(SideStorage):
    """Index records and aux files, over the storage side's :class:`SideStorage` primitives."""

    def lookup(self, fingerprint: str) -> str | None:
        """The content key recorded for ``fingerprint``, or None (a corrupt record is removed with a WARNING)."""
        path = self.root / "index" / f"{check_name(fingerprint, 'fingerprint')}.json"
        if not self._usable():
            return None
        try:
            rec = json.loads(read_regular(path)[1].decode("utf-8"))
            mac = rec.pop("hmac", None) if isinstance(rec, dict) else None
            if (isinstance(rec, dict) and rec.get("format_version") == CACHE_FORMAT_VERSION
                    and rec.get("fingerprint") == fingerprint and valid_name(rec.get("key"))):
                why = signature_problem(canonical_json(rec), mac, what=f"index record {fingerprint[:16]}")
                if why is None:
                    return rec["key"]  # type: ignore[no-any-return]
            else:
                why = "malformed record"
        except FileNotFoundError:
            return None
        except NotRegular as e:
            why = str(e)
        except (ValueError, RecursionError):
            why = "not valid JSON"
        except OSError as e:
            logger.warning("engine cache index %s cannot be read (%s); treating it as a miss", fingerprint, e)
            return None
        logger.warning("engine cache index %s is unusable (%s); removing it", fingerprint, why)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None

    def _write(self, sub: str, filename: str, data: bytes, what: str) -> bool:
        try:
            atomic_write(self._ensure(sub) / filename, data)
            return True
        except OSError as e:
            self._warn_unwritable(what, e)
            return False

    def record(self, fingerprint: str, key: str) -> bool:
        """Remember that ``fingerprint`` leads to ``key``. False (one WARNING) if the cache is not writable."""
        rec: dict[str, Any] = {"format_version": CACHE_FORMAT_VERSION,
                               "fingerprint": check_name(fingerprint, "fingerprint"), "key": check_name(key, "key")}
        if not self._usable():
            return False
        if (mac := sign(canonical_json(rec))) is not None:
            rec["hmac"] = mac
        return self._write("index", f"{fingerprint}.json", canonical_json(rec), f"recording fingerprint {fingerprint}")

    def read_aux(self, name: str) -> bytes | None:
        """A side file stored by :meth:`write_aux`, or None if absent or corrupt (then removed, with a WARNING)."""
        path = self.root / "aux" / f"{check_name(name, 'aux name')}.bin"
        if not self._usable():
            return None
        try:
            raw = read_regular(path)[1]
        except FileNotFoundError:
            return None
        except OSError as e:
            logger.warning("engine cache aux file %s cannot be read (%s); ignoring it", name, e)
            return None
        try:
            return unpack(raw, kind=_AUX_KIND, source=f"engine cache aux file {name}")[1]["body"]
        except (EngineLoadError, KeyError) as e:
            logger.warning("%s; removing it", e)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None

    def write_aux(self, name: str, data: bytes) -> bool:
        """Store a side file atomically, checksummed. False (one WARNING) if the cache is not writable."""
        if not self._usable():
            return False
        payload = pack(_AUX_KIND, {"name": name}, {"body": bytes(data)})
        return self._write("aux", f"{check_name(name, 'aux name')}.bin", payload, f"writing aux file {name}")

