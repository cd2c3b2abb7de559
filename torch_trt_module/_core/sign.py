"""Optional authenticity: an HMAC-SHA256 key from ``$TORCH_TRT_MODULE_CACHE_KEY`` signs what is stored.

Checksums find damage; they do not stop someone who can write a cache directory or hand over a
file, since they recompute them. With a key set, every container (:func:`.io.pack`: engine
files, saved modules, cache side files), every cache entry's metadata, every fingerprint record
and every saved :class:`SegmentedModule` carries an HMAC of its content (which names each
blob's sha256, so the blobs are covered too), and anything unsigned or signed with another key
is refused: a cache treats it as a miss and rebuilds it, with a WARNING; ``ttm.load`` raises
:class:`~torch_trt_module.EngineLoadError`. Without a key nothing is signed or checked.

The key is read from the environment at each use, never stored, logged or put in an error.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any

import torch


__all__ = ["KEY_ENV", "canonical_json", "sha256_bytes", "sign", "signature_problem", "signing_key", "state_digest"]

KEY_ENV = "TORCH_TRT_MODULE_CACHE_KEY"


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: object) -> bytes:
    """The one JSON form that is hashed: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def signing_key() -> bytes | None:
    """The key (the variable's UTF-8 bytes), or None when it is unset or empty."""
    value = os.environ.get(KEY_ENV)
    return value.encode("utf-8") if value else None


def sign(payload: bytes, key: bytes | None = None) -> str | None:
    """The hex HMAC-SHA256 of ``payload`` under ``key`` (default: the environment's), or None without a key."""
    key = key if key is not None else signing_key()
    return None if key is None else hmac.new(key, payload, hashlib.sha256).hexdigest()


def signature_problem(payload: bytes, recorded: Any, *, what: str) -> str | None:
    """Why ``recorded`` is not a valid signature of ``payload`` under the environment's key, or None
    (always None without a key: then nothing is checked)."""
    key = signing_key()
    if key is None:
        return None
    if recorded is None:
        return (f"{what} is unsigned, and ${KEY_ENV} is set: only what was written with that key is used. Write it "
                f"again with the key set, or unset ${KEY_ENV} to accept unsigned files")
    if not isinstance(recorded, str) or not hmac.compare_digest(sign(payload, key) or "", recorded):
        return (f"{what} is signed with another key than ${KEY_ENV}'s, or was changed after it was signed. Write "
                "it again with this key, or set the key it was written with")
    return None


def state_digest(state: Any) -> bytes:
    """A canonical byte string naming everything in a saved state (tensors by dtype, shape and sha256),
    to sign a ``torch.save`` archive's content rather than its zip layout."""
    return canonical_json(_plain(state))


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        return {"tensor": str(value.dtype), "shape": list(value.shape), "sha256": sha256_bytes(data)}
    if isinstance(value, dict):
        return {"dict": [[_plain(k), _plain(v)] for k, v in sorted(value.items(), key=lambda kv: repr(kv[0]))]}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_plain(v) for v in value]}
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return {"float": value.hex()}
    return {"other": type(value).__name__}  # unsigned content never reaches here: load() refuses it first
