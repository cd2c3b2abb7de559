"""The cache directory is ours, and private (issue 24): it is made 0o700; one that others can write is
not used (one WARNING that says how to fix it); entries are opened without following symlinks and
only as regular files (a FIFO hangs nothing); clear and prune remove only what the layout wrote."""

from __future__ import annotations

import os
import shutil
import stat
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

import torch_trt_module as ttm
from torch_trt_module._cache import cache as _cache
from torch_trt_module._pipeline import compile as _compile
from torch_trt_module._cache.cache import EngineCache
from torch_trt_module.cli import main as cli_main

from harness.faults import capture_warnings, compile_tiny, outputs_ok

KEY_ENV = "TORCH_TRT_MODULE_CACHE_KEY"


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cache, "_WARNED_UNSAFE", set())  # each test sees its own "once"
    monkeypatch.delenv(KEY_ENV, raising=False)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()``'s result, failing the test if it does not return in time (a FIFO read would block)."""
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} did not return within {seconds} s"
    return box[0]


def test_a_new_cache_directory_is_private(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        compile_tiny(0, tmp_path / "a" / "cache")
    finally:
        os.umask(old)
    root = tmp_path / "a" / "cache"
    assert mode(root) == 0o700 and all(mode(root / d) == 0o700 for d in ("entries", "index", "locks"))


@pytest.mark.parametrize("bits", [0o777, 0o1777, 0o770])
def test_a_directory_others_can_write_is_not_used(tmp_path: Path, bits: int) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    os.chmod(root, bits)
    builds = _compile.STATS["builds"]
    with capture_warnings() as warned:
        module = compile_tiny(0, root)
        again = compile_tiny(0, root)
    assert outputs_ok(module, 0) and outputs_ok(again, 0)
    assert _compile.STATS["builds"] == builds + 2  # no hit: nothing read from, or written to, it
    assert os.listdir(root) == [] and mode(root) == bits  # the user's directory is left as it was
    who = "anyone" if bits & 0o002 else "its group"
    assert warned == [f"torch_trt_module._cache.cache: engine cache directory {root} is not private, so it is not used "
                      f"(no reads, no writes): {root}: {who} can write it (mode {stat.filemode(bits | stat.S_IFDIR)})"
                      f". Fix: chmod 700 {root}. Others who can write it could plant engines. Or set "
                      "$TORCH_TRT_MODULE_CACHE_KEY (the same secret for everyone who shares it) to share a cache "
                      "between users of a group"]


def test_an_entry_planted_in_a_world_writable_directory_is_never_served(tmp_path: Path) -> None:
    private, shared = tmp_path / "private", tmp_path / "shared"
    compile_tiny(1, private)  # another model's entry, planted under model 0's key
    shared.mkdir()
    shutil.copytree(private, shared, dirs_exist_ok=True)
    os.chmod(shared, 0o777)
    module = compile_tiny(0, shared)
    assert outputs_ok(module, 0)


def test_a_parent_anyone_can_write_without_the_sticky_bit_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "open"
    parent.mkdir()
    os.chmod(parent, 0o777)
    with capture_warnings() as warned:
        compile_tiny(0, parent / "cache")
    assert len(warned) == 1 and f"its parent {parent} is writable by anyone, without the sticky bit" in warned[0]
    os.chmod(parent, 0o1777)  # as /tmp is: others cannot rename what is ours
    assert EngineCache(parent / "cache2")._usable()


def test_a_group_directory_is_accepted_with_a_signing_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "team"
    root.mkdir()
    os.chmod(root, 0o770)
    monkeypatch.setenv(KEY_ENV, "team secret")
    builds = _compile.STATS["builds"]
    with capture_warnings() as warned:
        compile_tiny(0, root)
        compile_tiny(0, root)
    assert warned == [] and _compile.STATS["builds"] == builds + 1
    os.chmod(root, 0o777)
    assert not EngineCache(root)._usable()  # world-writable: never


def test_entries_are_not_followed_through_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    compile_tiny(0, root)
    cache = EngineCache(root)
    (info,) = cache.entries()
    meta = root / "entries" / f"{info.key}.json"
    elsewhere = tmp_path / "elsewhere.json"
    os.replace(meta, elsewhere)
    meta.symlink_to(elsewhere)
    with capture_warnings() as warned:
        assert cache.get(info.key) is None
    assert len(warned) == 1 and "is a symbolic link; cache files are never followed" in warned[0]
    assert elsewhere.exists() and not meta.exists() and not meta.is_symlink()  # the link went, not its target


def test_a_fifo_named_like_an_entry_hangs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cache"
    compile_tiny(0, root)
    fifo = root / "entries" / ("f" * 64 + ".json")
    os.mkfifo(fifo)
    cache = EngineCache(root)
    assert len(within(10, cache.entries)) == 1
    assert within(10, lambda: cli_main(["cache", "list", "--cache-dir", str(root)])) == 0
    assert within(10, lambda: cache.put("k" * 64, {"onnx": b"x"}, {})) is True  # a write scans the cache too
    assert within(10, lambda: cache.get("f" * 64)) is None
    assert within(30, lambda: compile_tiny(1, root)) is not None


def test_clear_and_prune_remove_only_what_the_cache_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "proj"
    compile_tiny(0, root)
    mine = {root / "index" / "README.md": b"notes", root / "entries" / "keep.txt": b"x",
            root / "entries" / ".hidden.tmp": b"y", root / "notes.md": b"z"}
    for p, data in mine.items():
        p.write_bytes(data)
        os.utime(p, (1, 1))  # old: a leftover of an interrupted write would be swept
    (root / "aux").mkdir(exist_ok=True)  # the fleet counts may already be there
    (root / "aux" / "sub").mkdir()
    cache = EngineCache(root)
    assert cache.foreign_files() == sorted([*mine, root / "aux" / "sub"])
    assert cli_main(["cache", "clear", "--cache-dir", str(root)]) == 0
    out = capsys.readouterr()
    assert f"removed 1 entries from {root}" in out.out
    assert f"engine cache {root} holds 5 file(s) it did not write, left in place: " in out.err
    assert all(p.read_bytes() == data for p, data in mine.items())
    assert os.listdir(root / "index") == ["README.md"] and cache.entries() == []
    with capture_warnings() as warned:
        cache.prune(0)
    assert len(warned) == 1 and "holds 5 file(s) it did not write" in warned[0]
    assert all(p.exists() for p in mine)
    assert outputs_ok(ttm.TRTModule(compile_tiny(0, root).engine), 0)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving a directory away needs root")
def test_a_directory_of_another_user_is_not_used(tmp_path: Path) -> None:
    root = tmp_path / "theirs"
    root.mkdir(mode=0o700)
    os.chown(root, 65534, 65534)
    with capture_warnings() as warned:
        compile_tiny(0, root)
    assert len(warned) == 1 and f"{root}: it belongs to another user (uid 65534, you are 0). Fix: chmod 700 " \
        f"{root}, and chown it to yourself" in warned[0]


def test_a_cache_path_that_is_a_file_is_one_warning_and_compile_works(tmp_path: Path) -> None:
    path = tmp_path / "not-a-dir"
    path.write_bytes(b"mine")
    with capture_warnings() as warned:
        for seed in (0, 0):
            assert outputs_ok(compile_tiny(seed, path), seed)
    assert warned == [f"torch_trt_module._cache.cache: engine cache {path} cannot be used (no reads, no writes): {path} is not a directory. Fix: "
                      "point cache_dir= (or $TORCH_TRT_MODULE_CACHE) at a directory, or remove the file"]
    assert path.read_bytes() == b"mine"
