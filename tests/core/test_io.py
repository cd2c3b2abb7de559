"""torch_trt_module._core.io: the atomic writer (all or nothing, no temp file left behind) and the one
checksummed container (pack/unpack round trip; every kind of corruption is an EngineLoadError that
names the source and the problem)."""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

import pytest

from torch_trt_module import EngineLoadError
from torch_trt_module._core import io as _io
from torch_trt_module._core.io import (
    CONTAINER_FORMAT,
    atomic_write,
    blob_index,
    blob_problem,
    canonical_json,
    header_problem,
    pack,
    seal,
    sha256_bytes,
    unpack,
)

MAGIC, HEAD = _io._MAGIC, _io._HEAD


def leftovers(directory: Path) -> list[str]:
    """Temp files atomic_write leaves behind (it names them ``.<file>.<random>.tmp``)."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def raw(head: Any, tail: bytes = b"") -> bytes:
    """A container whose header is ``head`` (JSON, not sealed unless the caller sealed it)."""
    body = head if isinstance(head, bytes) else json.dumps(head).encode()
    return MAGIC + struct.pack("<Q", len(body)) + body + tail


def load_error(data: bytes, kind: str = "k") -> str:
    with pytest.raises(EngineLoadError) as info:
        unpack(data, kind=kind, source="f.bin")
    return str(info.value)


# --------------------------------------------------------------------------- atomic_write

def test_atomic_write_writes_every_byte_private_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    data = os.urandom(1 << 20)
    atomic_write(target, memoryview(data))
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # mkstemp's mode: never readable by others
    atomic_write(target, bytearray(b"second"))  # replaces an existing file
    assert target.read_bytes() == b"second" and leftovers(tmp_path) == []


def test_short_writes_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.write
    # os.write may write less than asked (signals, pipes, some filesystems): the rest must follow.
    monkeypatch.setattr(os, "write", lambda fd, view: real(fd, view[:3]))
    atomic_write(tmp_path / "f", b"0123456789")
    assert (tmp_path / "f").read_bytes() == b"0123456789"


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace", "interrupt"])
def test_a_failed_write_keeps_the_old_file_and_removes_the_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     fail_at: str) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    seen_tmp: list[str] = []

    def fail(*args: Any, **kwargs: Any) -> Any:
        seen_tmp.extend(leftovers(tmp_path))  # the temp file exists while the write is under way
        if fail_at == "interrupt":
            raise KeyboardInterrupt  # a BaseException: cleaned up all the same
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, {"write": "write", "fsync": "fsync", "replace": "replace", "interrupt": "write"}[fail_at],
                        fail)
    with pytest.raises(KeyboardInterrupt if fail_at == "interrupt" else OSError):
        atomic_write(target, b"new contents")
    assert seen_tmp and seen_tmp[0].startswith(".out.bin.")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_a_directory_that_cannot_be_fsynced_is_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def no_dirs(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(path) == tmp_path and flags == os.O_RDONLY:
            raise OSError(errno.EINVAL, "Invalid argument")  # some filesystems refuse to open/fsync a directory
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_dirs)
    atomic_write(tmp_path / "f", b"data")
    assert (tmp_path / "f").read_bytes() == b"data"


def test_a_missing_directory_raises_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "no" / "f", b"x")
    assert not (tmp_path / "no").exists()


# --------------------------------------------------------------------------- index and seal

def test_canonical_json_is_sorted_compact_ascii_and_refuses_nan() -> None:
    assert canonical_json({"b": 1, "a": ["é", 2.5]}) == b'{"a":["\\u00e9",2.5],"b":1}'
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_blob_index_and_blob_problem() -> None:
    index = blob_index({"a": b"123", "empty": b""})
    assert index == {"a": {"size": 3, "sha256": sha256_bytes(b"123")},
                     "empty": {"size": 0, "sha256": sha256_bytes(b"")}}
    assert blob_problem("a", index["a"], b"123") is None
    assert blob_problem("a", index["a"], b"12") == "blob 'a' is 2 bytes, expected 3 (truncated?)"
    assert blob_problem("a", index["a"], b"124") == "checksum mismatch for blob 'a'"


def test_seal_and_header_problem() -> None:
    sealed = seal({"x": 1, "header_sha256": "stale"})  # an old seal is replaced, not hashed
    assert sealed["header_sha256"] == sha256_bytes(canonical_json({"x": 1}))
    assert header_problem(dict(sealed)) is None
    edited = {**sealed, "x": 2}
    assert header_problem(edited) == "the header's checksum does not match its contents"
    assert "header_sha256" not in edited  # header_problem removes the field it checked
    assert header_problem({"x": 1}) == "the header's checksum does not match its contents"  # never sealed
    other = seal({"x": 1}, field="seal")
    assert header_problem(dict(other), field="seal") is None and "header_sha256" not in other


# --------------------------------------------------------------------------- pack / unpack

def test_pack_unpack_round_trip_keeps_order_empty_blobs_and_header() -> None:
    blobs = {"z": os.urandom(1000), "empty": b"", "a": b"\x00" * 7}
    header = {"note": "héllo", "n": [1, 2.5, None, True]}
    data = pack("example", header, blobs)
    assert data.startswith(MAGIC)
    got_header, got_blobs = unpack(bytearray(data), kind="example")
    assert got_header == header
    assert got_blobs == blobs and list(got_blobs) == ["z", "empty", "a"]
    assert unpack(memoryview(data), kind="example")[1] == blobs
    assert pack("example", header, blobs) == data  # deterministic: the same input, the same bytes


def test_nothing_in_the_container_is_pickled() -> None:
    data = pack("k", {"a": 1}, {"b": b"xyz"})
    (n,) = struct.unpack("<Q", data[len(MAGIC):HEAD])
    head = json.loads(data[HEAD:HEAD + n])  # the header is plain JSON
    assert head["kind"] == "k" and head["format"] == CONTAINER_FORMAT and head["order"] == ["b"]
    assert data[HEAD + n:] == b"xyz"  # and the blobs are the raw bytes, nothing else


@pytest.mark.parametrize("data", [b"", b"junk", b"TTM", b"PK\x03\x04" + b"\x00" * 40])
def test_not_a_container(data: bytes) -> None:
    assert load_error(data) == "f.bin is not a torch_trt_module k (bad header: bad magic)"


@pytest.mark.parametrize("data", [MAGIC, MAGIC + b"\x00" * 7])
def test_a_container_cut_inside_its_length_field_is_refused(data: bytes) -> None:
    assert load_error(data).startswith("f.bin is not a torch_trt_module k (bad header: bad magic)")


def test_a_truncated_current_container_is_not_called_another_version() -> None:
    assert "another version" not in load_error(pack("k", {}, {})[:HEAD - 1])


@pytest.mark.parametrize("magic", [b"TTMENG01", b"TTMENG02", b"TTMBOX02"])
def test_another_version_s_container_says_so(magic: bytes) -> None:
    data = magic + pack("k", {}, {})[len(MAGIC):]
    assert load_error(data) == ("f.bin is not a torch_trt_module k (bad header: bad magic); it was written by another "
                                "version of torch_trt_module: build and save it again")


def test_what_names_the_file_type() -> None:
    with pytest.raises(EngineLoadError, match=r"^e.ttm is not a torch_trt_module engine file \(bad header"):
        unpack(b"nope" * 10, kind="engine", source="e.ttm", what="torch_trt_module engine file")


def test_truncated_blob() -> None:
    data = pack("k", {}, {"x": b"123", "y": b""})
    assert load_error(data[:-1]) == ("f.bin: checksum mismatch in the 'x' blob (blob 'x' is 2 bytes, expected 3 "
                                     "(truncated?); corrupt file)")


def test_flipped_byte_in_a_blob() -> None:
    data = bytearray(pack("k", {}, {"x": b"123", "y": b"abc"}))
    data[-1] ^= 1
    assert load_error(bytes(data)) == "f.bin: checksum mismatch in the 'y' blob (checksum mismatch for blob 'y'; corrupt file)"


def test_flipped_byte_in_the_header() -> None:
    data = bytearray(pack("k", {"note": "abcdef"}, {"x": b"1"}))
    data[bytes(data).index(b"abcdef")] ^= 1
    assert load_error(bytes(data)) == ("f.bin: checksum mismatch in the header: the header's checksum does not match "
                                       "its contents (corrupt file)")


def test_a_flip_that_overflows_a_float_is_a_checksum_mismatch() -> None:
    # 1e-05 -> 1e905 parses as infinity, which canonical JSON cannot write: still just corrupt.
    data = pack("k", {"eps": 1e-05}, {})
    assert b"1e-05" in data
    assert load_error(data.replace(b"1e-05", b"1e905")) == (
        "f.bin: checksum mismatch in the header: the header's checksum does not match its contents (corrupt file)")


@pytest.mark.parametrize("body,what", [(b"{not json", "not JSON"), (b"[" * 100_000, "not JSON"),
                                       (b"[1, 2]", "not an object"), (b'"text"', "not an object")])
def test_a_header_that_is_no_json_object(body: bytes, what: str) -> None:
    assert load_error(raw(body)) == f"f.bin: corrupt header (checksum mismatch in the header: {what})"


def test_a_length_beyond_the_data_is_corrupt() -> None:
    data = pack("k", {}, {"x": b"1"})
    huge = data[:len(MAGIC)] + struct.pack("<Q", 2**62) + data[HEAD:]
    assert load_error(huge) == "f.bin: corrupt header (checksum mismatch in the header: not JSON)"


def test_another_kind_or_format_is_refused_with_the_fix() -> None:
    assert load_error(pack("engine", {}, {}), kind="torch-program") == (
        "f.bin holds a 'engine' of format 3, not a 'torch-program' of format 3; write it again with this version")
    old = raw(seal({"kind": "k", "format": 2, "header": {}, "blobs": {}, "order": []}))
    assert load_error(old) == "f.bin holds a 'k' of format 2, not a 'k' of format 3; write it again with this version"


@pytest.mark.parametrize("head,error", [
    ({"kind": "k", "format": 3, "blobs": {}}, "KeyError: 'order'"),
    ({"kind": "k", "format": 3, "header": {}, "blobs": {}, "order": ["x"]}, "KeyError: 'x'"),
    ({"kind": "k", "format": 3, "header": {}, "blobs": {"x": {"size": "3"}}, "order": ["x"]}, "TypeError"),
])
def test_a_sealed_header_that_lacks_a_field_is_malformed(head: dict[str, Any], error: str) -> None:
    # Only a writer that knows the seal can make these; they must still fail cleanly, not with a KeyError.
    assert load_error(raw(seal(head))).startswith(f"f.bin: malformed header ({error}")


def test_every_single_byte_flip_is_detected() -> None:
    data = pack("k", {"note": "x"}, {"a": b"payload", "b": b"more"})
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x40
        with pytest.raises(EngineLoadError):
            unpack(bytes(flipped), kind="k", source="f.bin")


def test_bytes_after_the_last_blob_are_refused() -> None:
    load_error(pack("k", {}, {"x": b"1"}) + b"appended")


def test_unpack_only_reads_the_named_blobs_and_still_checks_the_end() -> None:
    from torch_trt_module._core.io import pack as _pack, unpack as _unpack

    data = _pack("k", {"n": 1}, {"a": b"1" * 10, "b": b"2" * 10, "c": b"3"})
    assert _unpack(data, kind="k", only=("b",)) == ({"n": 1}, {"b": b"2" * 10})
    bad_a = data[:-21] + b"X" + data[-20:]  # a flip in blob "a": not read, so not seen
    assert _unpack(bad_a, kind="k", only=("b", "c"))[1] == {"b": b"2" * 10, "c": b"3"}
    with pytest.raises(EngineLoadError, match="checksum mismatch in the 'a' blob"):
        _unpack(bad_a, kind="k")
    with pytest.raises(EngineLoadError, match="1 unexpected bytes after the last blob"):
        _unpack(data + b"!", kind="k", only=("a",))
