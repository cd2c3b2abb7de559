"""Counts of what the cache tiers and the fleet did: builds, local hits, remote hits, bytes moved,
lease waits and broadcasts.

Each event is logged at INFO with this process's running totals, and added to the cache
directory's totals (the aux file ``fleet-stats``, checksummed like every aux file), which
``torch-trt-module cache info`` shows. The directory's totals are best effort: a cache that
cannot be written keeps only this process's counts.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

__all__ = ["COUNTERS", "STATS_AUX", "fleet_totals", "note", "process_totals"]

log = logging.getLogger("torch_trt_module._cache.cache")

#: Every counter, in the order they are shown.
COUNTERS = ("builds", "local_hits", "remote_hits", "uploads", "bytes_down", "bytes_up", "lease_waits",
            "lease_wait_s", "broadcasts_sent", "broadcasts_received", "bytes_broadcast")
STATS_AUX = "fleet-stats"
# Which counter an event adds 1 to, beside the byte and second counts it carries.
_EVENT_COUNTS = {"builds", "local_hits", "remote_hits", "uploads", "lease_waits", "broadcasts_sent",
                 "broadcasts_received"}
_WHAT = {"builds": "built and stored", "local_hits": "local hit", "remote_hits": "remote hit, downloaded",
         "uploads": "uploaded to the remote store", "lease_waits": "waited for another worker's build",
         "broadcasts_sent": "broadcast to the group", "broadcasts_received": "received from the group's builder"}
_PROCESS: dict[str, float] = dict.fromkeys(COUNTERS, 0)
_GUARD = threading.Lock()


def note(cache: Any, event: str, *, key: str = "", **amounts: float) -> None:
    """Count ``event`` (one of the counters) and its ``amounts`` (``bytes_down=...``), log it at INFO,
    and add it to ``cache``'s directory totals (an :class:`EngineCache`; None for none)."""
    add = dict(amounts)
    if event in _EVENT_COUNTS:
        add[event] = add.get(event, 0) + 1
    with _GUARD:
        for name, n in add.items():
            _PROCESS[name] += n
        totals = {k: _PROCESS[k] for k in ("builds", "local_hits", "remote_hits", "lease_waits")}
    extra = "".join(f", {k}={v:.3g}" if isinstance(v, float) else f", {k}={v}" for k, v in amounts.items())
    log.info("engine cache %s: %s%s (this process: %s)", key[:16], _WHAT.get(event, event), extra,
             ", ".join(f"{k} {int(v)}" for k, v in totals.items()))
    if cache is not None:
        _add_to_directory(cache, add)


def process_totals() -> dict[str, float]:
    """This process's counts."""
    with _GUARD:
        return dict(_PROCESS)


def fleet_totals(cache: Any) -> dict[str, float]:
    """The counts every process that used ``cache``'s directory added (zeros if none)."""
    totals: dict[str, float] = dict.fromkeys(COUNTERS, 0)
    raw = cache.read_aux(STATS_AUX)
    try:
        stored = json.loads(raw) if raw is not None else {}
    except ValueError:
        stored = {}
    for name in COUNTERS:
        value = stored.get(name) if isinstance(stored, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            totals[name] = value
    return totals


def _add_to_directory(cache: Any, add: dict[str, float]) -> None:
    try:
        with cache.lock(STATS_AUX, timeout=2.0):  # counts are not worth a long wait
            totals = fleet_totals(cache)
            for name, n in add.items():
                totals[name] = totals.get(name, 0) + n
            cache.write_aux(STATS_AUX, json.dumps(totals, sort_keys=True).encode("ascii"))
    except Exception as e:  # noqa: BLE001 - counting must never fail a compile
        log.debug("engine cache counts not stored: %s", e)
