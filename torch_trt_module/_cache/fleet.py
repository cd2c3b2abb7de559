"""compile() across the ranks of a ``torch.distributed`` group: one build per target, broadcast.

When ``torch.distributed`` is initialized with several ranks, or ``compile(..., process_group=pg)``
is given, every rank of the group calls compile() with the same model (as any collective), and:

1. the ranks gather what they are (a digest of their target: the backend, its version and
   flags, and the GPU identity or the RTX targets, as the cache key has them), their model's
   fingerprint, and whether their local cache already has its entry;
2. the lowest rank of each target that some rank lacks is its builder: it builds, or hits its
   own cache (local or remote), and broadcasts the entry over the group's own backend (gloo or
   NCCL) as a uint8 tensor: a header ``[status, length]``, then the bytes;
3. the other ranks of that target unpack it (every checksum, and the signature where
   ``$TORCH_TRT_MODULE_CACHE_KEY`` is set, checked), store it in their local cache, and load it.

A builder that fails sends its error instead: every rank of its target raises the same exception
(:class:`BuildError` unless it was another of ours), naming the builder's rank and reason. Waits are
those of the group's collectives, bounded by its timeout; a builder that dies fails them, and every
other rank raises :class:`BuildError`. No shared filesystem and no pickle are involved.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from .. import _errors
from .._errors import BuildError, EngineLoadError, TorchTRTError
from .fleet_stats import note
from .keys import fingerprint, stable_hash, target_part
from .remote import open_cache
from .store import track_keys, unpack_entry

__all__ = ["compile_in_fleet", "fleet_group"]

log = logging.getLogger(__name__)

_OK, _FAILED, _NOTHING = 0, 1, 2
_ROW = 65  # target digest (32), fingerprint digest (32, zeros for none), has it locally (1)


def fleet_group(settings: Any) -> Any:
    """The process group compile() shares its builds with, or None (this rank compiles alone)."""
    group = settings.process_group
    if group is False or settings.cache is False:
        return None
    import torch.distributed as dist

    if group is None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
            return None
        return dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def compile_in_fleet(group: Any, model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                     settings: Any, choice: Any, device: torch.device, local: Callable[[Any], Any]) -> Any:
    """``local(settings)`` (compile_engine on this rank alone) with one build per target of ``group``."""
    import torch.distributed as dist

    alone = settings.replace(process_group=False)
    cache = open_cache(alone)
    fp = fingerprint(model, args, kwargs, settings, choice, device)
    me, world = dist.get_rank(group), dist.get_world_size(group)
    on = torch.device("cuda", torch.cuda.current_device()) if _nccl_only(group) else torch.device("cpu")
    row = torch.zeros(_ROW, dtype=torch.uint8)
    row[:32] = _digest(stable_hash(target_part(choice, settings, device)))
    if fp is not None:
        row[32:64] = _digest(fp)
    row[64] = int(cache.has_local(fp))
    rows = [torch.empty(_ROW, dtype=torch.uint8, device=on) for _ in range(world)]
    _collective("gathering the ranks' targets", lambda: dist.all_gather(rows, row.to(on), group=group))
    table = [r.cpu() for r in rows]
    targets: dict[bytes, list[int]] = {}
    for rank, r in enumerate(table):
        targets.setdefault(bytes(r[:32].tolist()), []).append(rank)
    # A target needs a broadcast unless each of its ranks has the entry already, for the same model.
    builders = sorted(ranks[0] for ranks in targets.values()
                      if not all(table[r][64] and torch.equal(table[r][32:64], table[ranks[0]][32:64]) for r in ranks))
    mine = targets[bytes(table[me][:32].tolist())]
    builds = me == mine[0] and me in builders
    got, failure, payload, status = None, None, b"", _NOTHING
    if builds:  # first: the builders of all targets build at once, then the broadcasts follow in turn
        try:
            with track_keys() as seen:
                got = local(alone)
            if seen and (data := seen[-1][1].entry_bytes(seen[-1][0])) is not None:
                payload, status = seen[-1][0].encode("ascii") + data, _OK
        except Exception as e:  # noqa: BLE001 - every rank of the target raises it, below
            failure, status = e, _FAILED
            name = type(e).__name__ if isinstance(e, TorchTRTError) else "BuildError"
            reason = str(e) if isinstance(e, TorchTRTError) else f"{type(e).__name__}: {e}"
            payload = f"{name}\nrank {me} built the engine for ranks {mine} of the process group and failed: " \
                      f"{reason}".encode("utf-8", "replace")
    received = None
    for builder in builders:
        data = _broadcast(group, builder, me, on, status if me == builder else 0, payload if me == builder else b"")
        if builder == mine[0] and me != builder:
            received = data
    if failure is not None:
        raise _error(payload) from failure
    if builds:
        if status == _OK:
            note(cache.local, "broadcasts_sent", key=seen[-1][0], bytes_broadcast=len(payload) * (len(mine) - 1))
        return got
    if received is None:  # every rank of this target has the entry already
        return local(alone)
    code, data = received
    if code == _FAILED:
        raise _error(data)
    if code == _OK:
        _store_received(cache, data, fp, table[mine[0]][32:64], row[32:64], mine[0])
    else:
        log.info("rank %d had no cache entry to send (its cache is off or unwritable); compiling here", mine[0])
    return local(alone)


def _store_received(cache: Any, data: bytes, fp: str | None, theirs: torch.Tensor, ours: torch.Tensor,
                    builder: int) -> None:
    key = data[:64].decode("ascii", "replace")
    try:
        meta, blobs = unpack_entry(key, data[64:], source=f"the engine rank {builder} broadcast")
    except EngineLoadError as e:
        log.warning("%s; it is refused, and this rank builds its own", e)
        return
    note(cache.local, "broadcasts_received", key=key, bytes_broadcast=len(data))
    if cache.local.get(key, only=()) is None:  # a directory shared with the builder has it already
        with cache.local.lock(key):
            cache.local.put(key, blobs, meta)
    if fp is not None and torch.equal(theirs, ours):  # the same model: its fingerprint leads there too
        cache.local.record(fp, key)


def _broadcast(group: Any, builder: int, me: int, on: torch.device, status: int, payload: bytes
               ) -> tuple[int, bytes]:
    import torch.distributed as dist

    src = dist.get_global_rank(group, builder) if group is not dist.group.WORLD else builder
    head = torch.tensor([status, len(payload)], dtype=torch.int64, device=on)
    _collective(f"receiving the engine of rank {builder}", lambda: dist.broadcast(head, src=src, group=group))
    code, size = (int(v) for v in head.tolist())
    body = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(on) if me == builder
            else torch.empty(size, dtype=torch.uint8, device=on))
    if size:
        _collective(f"receiving the engine of rank {builder}", lambda: dist.broadcast(body, src=src, group=group))
    return code, body.cpu().numpy().tobytes() if me != builder else payload


def _collective(what: str, call: Callable[[], Any]) -> None:
    try:
        call()
    except RuntimeError as e:  # torch's DistBackendError and gloo's errors: a rank left, or the timeout passed
        raise BuildError(f"compile() across the process group failed while {what}: {e}. A rank exited or took "
                         "longer than the group's timeout; every rank of the group must call compile() with the "
                         "same model (or pass process_group=False to compile on one rank alone)") from e


def _error(payload: bytes) -> TorchTRTError:
    """The builder's error, as every rank of its target raises it (a class of ours by name, never unpickled)."""
    name, _, message = payload.decode("utf-8", "replace").partition("\n")
    cls = getattr(_errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, TorchTRTError)):
        cls = BuildError
    return cls(message)


def _digest(hex64: str) -> torch.Tensor:
    return torch.tensor(list(bytes.fromhex(hex64)), dtype=torch.uint8)


def _nccl_only(group: Any) -> bool:
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    return "nccl" in backend and "gloo" not in backend
