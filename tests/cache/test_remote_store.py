"""The remote tier (_store, _remote) against a real redis-server on loopback (conftest's ``redis_server``).

"Machines" are processes with cache directories of their own; they share nothing but the server.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module._pipeline import compile as _compile
from torch_trt_module._core.io import unpack
from torch_trt_module._core.settings import Settings
from torch_trt_module._cache.store import MemoryStore, unpack_entry

from harness.redis_server import PREFIX, RedisServer


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()


def _compile_here(cache: Any, cache_dir: Path, seed: int = 0) -> tuple[dict[str, int], bool]:
    before = dict(_compile.STATS)
    model, x = _model(seed), torch.randn(5, 6)
    compiled = ttm.compile(model, x, backend="onnxruntime", cache=cache, cache_dir=cache_dir)
    with torch.no_grad():
        ok = bool(torch.allclose(compiled(x), model(x), atol=1e-5, rtol=1e-4))
    return {k: _compile.STATS[k] - before[k] for k in before}, ok


def _machine(url: str, cache_dir: str, out: str, times: int, slow_build: str) -> None:
    """One "machine": compile ``times`` times; write the counts of each compile to ``out``."""
    from torch_trt_module._cache.fleet_stats import process_totals

    torch.set_num_threads(1)
    if slow_build:  # announce the build, then take forever in it (the test kills this process)
        def slow(*args: Any, **kwargs: Any) -> Any:
            Path(slow_build).write_text("building")
            time.sleep(120)

        _compile._build = slow  # type: ignore[assignment]
    rows = []
    for _ in range(times):
        counts, ok = _compile_here(url, Path(cache_dir))
        rows.append({**counts, "ok": ok, **{k: int(v) for k, v in process_totals().items()}})
    Path(out).write_text(json.dumps(rows))


def _run_machine(tmp: Path, name: str, url: str, times: int = 1, slow_build: str = "") -> Any:
    proc = multiprocessing.get_context("spawn").Process(
        target=_machine, args=(url, str(tmp / name), str(tmp / f"{name}.json"), times, slow_build))
    proc.start()
    return proc


def _result(proc: Any, tmp: Path, name: str) -> list[dict[str, Any]]:
    proc.join(timeout=120)
    assert proc.exitcode == 0, f"machine {name} exited with {proc.exitcode}"
    return json.loads((tmp / f"{name}.json").read_text())  # type: ignore[no-any-return]


def test_two_machines_build_once_then_remote_then_local(redis_server: RedisServer, tmp_path: Path) -> None:
    first = _result(_run_machine(tmp_path, "a", redis_server.url), tmp_path, "a")
    assert first[0]["builds"] == 1 and first[0]["ok"]
    assert len(redis_server.entries()) == 1
    second = _result(_run_machine(tmp_path, "b", redis_server.url, times=2), tmp_path, "b")
    # The second machine builds nothing and exports nothing: the remote index leads to the entry.
    assert [(r["builds"], r["exports"], r["ok"]) for r in second] == [(0, 0, True), (0, 0, True)]
    assert (second[0]["remote_hits"], second[0]["local_hits"]) == (1, 0)
    assert (second[1]["remote_hits"], second[1]["local_hits"]) == (1, 1)  # the later hit is local
    assert second[0]["bytes_down"] > 1000


def test_a_builder_killed_mid_build_loses_its_lease_and_another_takes_over(redis_server: RedisServer,
                                                                            tmp_path: Path) -> None:
    # The lease must outlive the second machine's start (a fresh process importing torch: 2-4 s on a
    # loaded 2-core CI machine; with a 2 s lease it sometimes found it expired already and never
    # waited). Renewed every third of it, a killed builder's lease lives 6.7-10 s more.
    url = redis_server.url + "?lease_ttl=10"
    marker = tmp_path / "building"
    victim = _run_machine(tmp_path, "a", url, slow_build=str(marker))
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline and victim.is_alive(), "the builder never started building"
        time.sleep(0.05)
    assert redis_server.client.keys(PREFIX + "lease-*")  # it holds the leases while it builds
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(timeout=10)
    rows = _result(_run_machine(tmp_path, "b", url), tmp_path, "b")
    assert (rows[0]["builds"], rows[0]["ok"]) == (1, True)
    assert rows[0]["lease_waits"] >= 1  # it waited for the dead builder's lease to expire
    entries = redis_server.entries()
    assert len(entries) == 1
    key = entries[0].decode()[len(PREFIX + "entry-"):]
    meta, blobs = unpack_entry(key, redis_server.client.get(entries[0]), source="test")
    assert meta["backend"] == "onnxruntime" and "onnx" in blobs
    assert redis_server.client.keys(PREFIX + "lease-*") == []


def test_a_waiter_sees_a_finished_build_within_a_fifth_of_a_second(redis_server: RedisServer) -> None:
    """A waiter polls at most every 0.2 s: it used to back off to 1 s, and a cold fleet's workers then
    sat idle ~0.5 s on average after the build was stored."""
    from torch_trt_module._cache.remote import RedisStore

    builder, waiter = RedisStore(redis_server.url), RedisStore(redis_server.url)
    held, stored_at = threading.Event(), []

    def build() -> None:
        with builder.lease("k", done=("entry-k",)) as lease:
            assert lease.held
            held.set()
            time.sleep(1.7)  # the waiter's pauses have grown to their longest (the old 1 s polled at 1.55, 2.55)
            assert builder.put("entry-k", b"engine")
            stored_at.append(time.monotonic())
            time.sleep(1.0)  # still held: the waiter must see the stored entry, not a free lease

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    assert held.wait(10)
    with waiter.lease("k", done=("entry-k",)) as lease:
        seen = time.monotonic()
    thread.join(timeout=10)
    assert not lease.held and lease.waited_s > 1.5
    assert seen - stored_at[0] < 0.45, f"the waiter saw the stored entry {seen - stored_at[0]:.2f} s late"


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_remote_entry_is_refused_and_rebuilt(redis_server: RedisServer, tmp_path: Path, damage: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    assert _compile_here(redis_server.url, tmp_path / "a")[0]["builds"] == 1
    (name,) = redis_server.entries()
    good = redis_server.client.get(name)
    bad = good[:-10] if damage == "truncate" else good[:-100] + bytes([good[-100] ^ 1]) + good[-99:]
    redis_server.client.set(name, bad)
    with caplog.at_level(logging.WARNING, logger="torch_trt_module"):
        counts, ok = _compile_here(redis_server.url, tmp_path / "b")
    assert (counts["builds"], ok) == (1, True)
    expected = "checksum mismatch" if damage == "flip" else "truncated"
    refused = [r.getMessage() for r in caplog.records if "refused and rebuilt" in r.getMessage()]
    assert len(refused) == 1 and refused[0].startswith(f"remote cache entry {name.decode()[-64:][:16]}")
    assert expected in refused[0]
    assert unpack_entry(name.decode()[-64:], redis_server.client.get(name), source="test")  # replaced by a good one


def test_redis_stopped_mid_run_builds_locally_with_one_warning(redis_server: RedisServer, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from torch_trt_module._cache.remote import RedisStore

    store = RedisStore(redis_server.url)  # its own object: the one-WARNING state of this test alone
    assert _compile_here(store, tmp_path / "a")[0]["builds"] == 1
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="torch_trt_module"):
        start = time.monotonic()
        counts, ok = _compile_here(store, tmp_path / "b", seed=1)
        counts2, ok2 = _compile_here(store, tmp_path / "c", seed=2)
    assert (counts["builds"], ok, counts2["builds"], ok2) == (1, True, 1, True)
    assert time.monotonic() - start < 60
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"remote engine cache {redis_server.url} is unreachable (ConnectionError")
    assert "building and caching locally" in warnings[0]


def test_entries_are_signed_with_a_key_and_unsigned_ones_refused(redis_server: RedisServer, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    assert _compile_here(redis_server.url, tmp_path / "a")[0]["builds"] == 1  # written without a key
    monkeypatch.setenv("TORCH_TRT_MODULE_CACHE_KEY", "fleet secret")
    with caplog.at_level(logging.WARNING, logger="torch_trt_module"):
        counts, ok = _compile_here(redis_server.url, tmp_path / "b")
    assert (counts["builds"], ok) == (1, True)
    assert any("is unsigned" in r.getMessage() for r in caplog.records)
    (name,) = redis_server.entries()
    header = unpack(redis_server.client.get(name), kind="cache-entry")[0]  # signed now: checks under the key
    assert header["key"] == name.decode()[-64:]


def test_values_are_containers_not_pickles(redis_server: RedisServer, tmp_path: Path) -> None:
    _compile_here(redis_server.url, tmp_path / "a")
    values = [redis_server.client.get(k) for k in redis_server.client.keys(PREFIX + "*")]
    assert values and all(v.startswith(b"TTMBOX03") for v in values)


def test_memory_store_reads_through_the_local_directory(tmp_path: Path) -> None:
    store = MemoryStore()
    assert _compile_here(store, tmp_path / "a")[0]["builds"] == 1
    counts, ok = _compile_here(store, tmp_path / "b")
    assert (counts["builds"], counts["exports"], ok) == (0, 0, True)
    assert list((tmp_path / "b" / "entries").glob("*.json"))  # downloaded once into the local tier


def test_cache_option_is_checked_and_settings_stay_hashable() -> None:
    hash(Settings(cache=MemoryStore()))
    hash(Settings(cache="redis://127.0.0.1:6379/0"))
    with pytest.raises(ttm.SettingsError, match=r"option 'cache' got 'http://x'; expected True, False, a Redis "
                                                r"URL such as 'redis://host:6379/0', or a store object"):
        Settings.from_options(cache="http://x")


def test_an_unreachable_server_is_one_warning_and_bounded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from torch_trt_module._cache.remote import RedisStore

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    store = RedisStore(f"redis://127.0.0.1:{port}/0")
    with caplog.at_level(logging.WARNING, logger="torch_trt_module"):
        start = time.monotonic()
        assert _compile_here(store, tmp_path / "a") == ({"exports": 1, "builds": 1, "cache_hits": 0}, True)
        assert store.get("entry-x") is None and store.put("entry-x", b"1") is False
    assert time.monotonic() - start < 30
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_cache_info_shows_the_counts_and_the_remote_store(redis_server: RedisServer, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from torch_trt_module import cli

    monkeypatch.setenv("TORCH_TRT_MODULE_REMOTE_CACHE", redis_server.url)
    _compile_here(True, tmp_path / "a")  # True: the environment's remote store
    _compile_here(True, tmp_path / "b")  # a remote hit
    _compile_here(True, tmp_path / "b")  # then local
    capsys.readouterr()
    assert cli.main(["cache", "info", "--cache-dir", str(tmp_path / "b"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    counts = report["counts"]
    assert (counts["builds"], counts["remote_hits"], counts["local_hits"]) == (0, 1, 1)
    assert counts["bytes_down"] > 1000 and report["entries"] == 1
    assert report["remote"]["reachable"] is True and report["remote"]["url"] == redis_server.url
    assert cli.main(["cache", "info", "--cache-dir", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    assert "  builds               1\n" in text and "  uploads              1\n" in text
    assert f"remote store: url {redis_server.url}, reachable True, keys 2" in text
