"""Bytes that outlive the process: the one atomic writer and the one checksummed container.

The container is what an engine file, a saved module's state and a cache entry are made
of: a JSON header sealed with its own sha256, and named blobs, each indexed by size and
sha256. An engine file and a module's state hold it as one byte string (:func:`pack`,
:func:`unpack`); a cache entry keeps the header and each blob in files of their own (so
that a blob can be read late, or never), with the same index and the same checks
(:func:`blob_index`, :func:`blob_problem`, :func:`seal`, :func:`header_problem`). There is
no pickle anywhere: reading a container runs no code.

With ``$TORCH_TRT_MODULE_CACHE_KEY`` set, :func:`pack` also signs the header (an HMAC that covers
each blob through its sha256) and :func:`unpack` refuses what is unsigned or signed with another
key (:mod:`.sign`).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Collection, Mapping

import torch

from .._errors import EngineLoadError
from .sign import canonical_json, sha256_bytes, sign, signature_problem

__all__ = ["CONTAINER_FORMAT", "atomic_write", "blob_index", "blob_problem", "canonical_json", "from_u8",
           "header_problem", "pack", "seal", "sha256_bytes", "to_u8", "unpack"]

#: Bumped when the layout of :func:`pack` changes; other versions are refused with a clear error.
CONTAINER_FORMAT = 3
_MAGIC = b"TTMBOX03"
_HEAD = len(_MAGIC) + 8


def atomic_write(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
    """Readers see the old file or all of the new one, never part of it: a temp file in the
    same directory (mode 0o600, from mkstemp), fsync, ``os.replace``, then an fsync of the
    directory so that the rename survives a crash. The temp file is removed on any failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
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
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


# --------------------------------------------------------------------------- index and seal

def blob_index(blobs: Mapping[str, bytes]) -> dict[str, dict[str, Any]]:
    """``{name: {"size": n, "sha256": hex}}`` for each blob."""
    return {name: {"size": len(data), "sha256": sha256_bytes(data)} for name, data in blobs.items()}


def blob_problem(name: str, info: Mapping[str, Any], data: bytes) -> str | None:
    """Why ``data`` is not the blob ``info`` indexes (truncated, or another checksum), or None."""
    if len(data) != info["size"]:
        return f"blob {name!r} is {len(data)} bytes, expected {info['size']} (truncated?)"
    if sha256_bytes(data) != info["sha256"]:
        return f"checksum mismatch for blob {name!r}"
    return None


def seal(header: Mapping[str, Any], field: str = "header_sha256") -> dict[str, Any]:
    """``header`` plus ``field``: the sha256 of its canonical JSON."""
    sealed = dict(header)
    sealed.pop(field, None)
    sealed[field] = sha256_bytes(canonical_json(sealed))
    return sealed


def header_problem(header: dict[str, Any], field: str = "header_sha256") -> str | None:
    """Why a sealed header is not intact, or None. Removes ``field`` from ``header``."""
    recorded = header.pop(field, None)
    try:
        ok = recorded == sha256_bytes(canonical_json(header))
    except ValueError:  # a flipped digit can turn 1e-05 into 1e905, which is infinity
        ok = False
    return None if ok else "the header's checksum does not match its contents"


# --------------------------------------------------------------------------- one byte string

def pack(kind: str, header: Mapping[str, Any], blobs: Mapping[str, bytes]) -> bytes:
    """One byte string: magic, header length, the sealed JSON header (kind, format, user header,
    blob index and order), then the blobs.

    Example:
        >>> data = pack("example", {"note": "hi"}, {"a": b"123"})
        >>> unpack(data, kind="example")
        ({'note': 'hi'}, {'a': b'123'})
    """
    head: dict[str, Any] = {"kind": kind, "format": CONTAINER_FORMAT, "header": dict(header),
                            "blobs": blob_index(blobs), "order": list(blobs)}
    if (mac := sign(canonical_json(head))) is not None:
        head["hmac"] = mac
    raw = canonical_json(seal(head))
    return b"".join([_MAGIC, struct.pack("<Q", len(raw)), raw, *(bytes(blobs[n]) for n in blobs)])


def unpack(data: bytes | bytearray | memoryview, *, kind: str, source: str = "bytes",
           what: str | None = None, signed: bool = True,
           only: Collection[str] | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The header and blobs of a :func:`pack` result, every checksum verified first.

    Raises :class:`~torch_trt_module.EngineLoadError` naming ``source`` and what is wrong.
    ``signed=False``: do not ask for a signature (a container inside another one, whose
    signature covers it). ``only``: read and check just these blobs (the others are skipped,
    and the check that nothing follows the last blob still runs).
    """
    what = what or f"torch_trt_module {kind}"
    data = bytes(data)
    if len(data) < _HEAD or not data.startswith(_MAGIC):
        # This version's magic with too few bytes after it is a cut-off file of this version, not
        # another version's (whose magic starts with the same TTMBOX/TTMENG prefix).
        if data.startswith(_MAGIC):
            raise EngineLoadError(
                f"{source} is not a {what} (bad header: bad magic); it is truncated: expected at least {_HEAD} "
                f"bytes (magic and header length), found {len(data)}. The file is incomplete (an interrupted copy "
                "or download): copy it again, or build and save it again")
        old = data[:8].startswith(b"TTMENG") or data[:8].startswith(b"TTMBOX")
        raise EngineLoadError(f"{source} is not a {what} (bad header: bad magic)" + (
            "; it was written by another version of torch_trt_module: build and save it again" if old else ""))
    (n,) = struct.unpack("<Q", data[len(_MAGIC):_HEAD])
    try:
        head = json.loads(data[_HEAD:_HEAD + n])
    except (ValueError, RecursionError) as e:
        raise EngineLoadError(f"{source}: corrupt header (checksum mismatch in the header: not JSON)") from e
    if not isinstance(head, dict):
        raise EngineLoadError(f"{source}: corrupt header (checksum mismatch in the header: not an object)")
    problem = header_problem(head)
    if problem:
        raise EngineLoadError(f"{source}: checksum mismatch in the header: {problem} (corrupt file)")
    mac = head.pop("hmac", None)
    if signed and (problem := signature_problem(canonical_json(head), mac, what=source)):
        raise EngineLoadError(problem)
    if head.get("kind") != kind or head.get("format") != CONTAINER_FORMAT:
        raise EngineLoadError(f"{source} holds a {head.get('kind')!r} of format {head.get('format')}, not a {kind!r} "
                              f"of format {CONTAINER_FORMAT}; write it again with this version")
    blobs: dict[str, bytes] = {}
    off = _HEAD + n
    try:
        for name in head["order"]:
            info = head["blobs"][name]
            if only is not None and name not in only:
                off += int(info["size"])
                continue
            blob = data[off:off + info["size"]]
            off += info["size"]
            problem = blob_problem(name, info, blob)
            if problem:
                raise EngineLoadError(f"{source}: checksum mismatch in the {name!r} blob ({problem}; corrupt file)")
            blobs[name] = blob
    except (KeyError, TypeError, ValueError) as e:  # a header that checks out but lacks a field
        raise EngineLoadError(f"{source}: malformed header ({type(e).__name__}: {e})") from e
    # pack() writes nothing after the last blob: extra bytes mean a damaged file (two containers
    # concatenated, a bad copy), which must not load as if it were whole.
    if off != len(data):
        raise EngineLoadError(f"{source}: {len(data) - off} unexpected bytes after the last blob (expected the data "
                              f"to end at byte {off}, where the blobs end; found {len(data)} bytes). The file is "
                              "corrupt: save it again, or build it again")
    return head["header"], blobs


def to_u8(b: bytes) -> torch.Tensor:
    """Bytes as a uint8 tensor: what a ``torch.load(weights_only=True)`` archive can hold."""
    return torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.empty(0, dtype=torch.uint8)


def from_u8(t: torch.Tensor) -> bytes:
    """The bytes of a :func:`to_u8` tensor."""
    return t.cpu().contiguous().numpy().tobytes()
