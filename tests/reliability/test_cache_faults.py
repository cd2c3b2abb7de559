"""Cache faults seen from compile() (issue 6): every run returns a module with correct outputs, no
corrupt entry is served, and no entry that a fault did not touch is lost.

The scenarios live in ``faults.py`` so that ``benchmarks/fault_injection.py`` runs the same ones and
prints their summary line. Real TensorRT-RTX builds, ONNX Runtime runs, real processes and SIGKILL;
the read-only and full-disk file systems are simulated (see ``faults.read_only``/``faults.disk_full``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from harness import faults
from harness.faults import Counts


def run(scenario: Callable[[Path, Counts], dict[str, Any]], tmp_path: Path) -> tuple[Counts, dict[str, Any]]:
    counts = Counts()
    details = scenario(tmp_path / "cache", counts)
    return counts, details


def clean(n: int) -> Counts:
    return Counts(injected=n, recovered=n)


@pytest.mark.usefixtures("rtx_required")  # truncates the entry's plan blob ("engine")
def test_truncated_engine_is_rebuilt_with_a_warning(tmp_path: Path) -> None:
    counts, d = run(faults.truncated_engine, tmp_path)
    assert counts == clean(1)
    assert d["rebuilt"]
    (msg,) = d["warnings"]
    assert "blob 'engine'" in msg and "(truncated?)" in msg and "evicting it and rebuilding" in msg


@pytest.mark.usefixtures("rtx_required")  # the plan blob ("engine") is one of the kinds flipped
def test_100_random_byte_flips_never_serve_a_corrupt_entry(tmp_path: Path) -> None:
    counts, d = run(faults.byte_flips, tmp_path)
    assert counts == clean(100), d
    outcomes = d["outcomes"]
    assert {k.split(":")[0] for k in outcomes} == {"metadata", "engine", "onnx", "ort", "index"}  # every kind hit
    # A flip in an entry's own files always rebuilds (checksums); a flipped index record only
    # costs an export, because the content key still finds the intact entry.
    assert set(outcomes) <= {"metadata:rebuilt", "engine:rebuilt", "onnx:rebuilt", "ort:rebuilt", "index:hit"}, \
        outcomes


def test_deleted_metadata_with_old_blobs_is_rebuilt_with_a_warning(tmp_path: Path) -> None:
    counts, d = run(faults.deleted_metadata, tmp_path)
    assert counts == clean(1)
    assert d["rebuilt"]
    (msg,) = d["warnings"]
    assert "metadata missing" in msg and "rebuilding" in msg


def test_deleted_metadata_with_young_blobs_is_rebuilt_quietly(tmp_path: Path) -> None:
    # Young blobs without metadata look exactly like another process's write in progress, so the
    # store leaves them alone and says nothing; compile() must still rebuild and give correct outputs.
    tr = faults.Tracker(tmp_path / "cache")
    tr.add(0, 1)
    tr.metadata(0).unlink()
    counts = Counts(injected=1)
    with faults.capture_warnings() as warned:
        result = tr.recover(0, counts)
    assert counts == clean(1) and result["rebuilt"]
    assert warned == []


def test_metadata_of_another_format_version_is_rebuilt_with_a_warning(tmp_path: Path) -> None:
    counts, d = run(faults.other_version_metadata, tmp_path)
    assert counts == clean(1)
    assert d["rebuilt"]
    (msg,) = d["warnings"]
    assert f"format version {faults.CACHE_FORMAT_VERSION + 1} != {faults.CACHE_FORMAT_VERSION}" in msg


# The default suite runs the smaller forms (each ordering, each phase); the counts of
# benchmarks/fault_injection.py are the slow ones (processes importing torch on a 2-core CI machine).
@pytest.mark.parametrize("n", [4, pytest.param(8, marks=pytest.mark.slow)])
def test_processes_writing_at_once(tmp_path: Path, n: int) -> None:
    counts, d = run(lambda root, c: faults.concurrent_writers(root, c, n=n), tmp_path)
    assert counts == clean(n), d
    assert d["overlapped"], "the processes did not run compile() at the same time; the test proves nothing"
    assert d["builds"] == {20: 1, 21: 1}  # one build per model among n processes (half take them in reverse)
    assert d["exports"] == d["builds"]


@pytest.mark.parametrize("n", [4, pytest.param(10, marks=pytest.mark.slow)])
def test_sigkills_in_the_middle_of_builds(tmp_path: Path, n: int) -> None:
    counts, d = run(lambda root, c: faults.kill9_mid_build(root, c, n=n), tmp_path)
    assert counts == clean(n), d
    rounds = d["rounds"]
    assert {r["phase"] for r in rounds} == {"export", "build", "built", "put"}
    assert all(r["committed_by_killed"] == 0 for r in rounds), "a killed writer left something taken for an entry"
    assert all(r["rebuilt"] for r in rounds)
    assert d["entries"] == 2 + n  # the 2 entries from before and one per killed build, all whole


def test_read_only_directory_simulated(tmp_path: Path) -> None:
    # (A real chmod'ed directory, for non-root runs, is in tests/test_compile_cache.py.)
    counts, d = run(faults.read_only_dir, tmp_path)
    assert counts == clean(1), d
    assert d["unchanged"]
    for warned in d["warnings"]:  # a hit, then a miss: one WARNING each, naming the problem
        (msg,) = warned
        assert "is not writable" in msg and "Read-only file system" in msg and "continuing without caching" in msg


def test_disk_full_while_storing(tmp_path: Path) -> None:
    counts, d = run(faults.disk_full_on_write, tmp_path)
    assert counts == clean(1), d
    assert d["unchanged"], "a failed write left a partial entry or a temp file"
    assert d["stored_later"]
    (msg,) = d["warnings"]
    assert "No space left on device" in msg and "continuing without caching" in msg


def test_summary_line_format() -> None:
    # benchmarks/fault_injection.py prints this line and docs/reliability.md quotes it.
    c = Counts(injected=3, recovered=3)
    assert c.line() == "faults injected: 3, recovered: 3, wrong results: 0, corrupt served: 0, lost entries: 0"
    assert c.clean and not Counts().clean and not Counts(injected=2, recovered=1).clean
