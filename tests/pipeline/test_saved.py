"""_saved: save() and load() write and read torch.load(weights_only=True) archives only.
(Round trips of whole modules: test_module.py, test_split.py, reliability/test_safe_loading.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module._core.io import from_u8, to_u8


@pytest.mark.parametrize("data", [b"", b"\x00\xff" * 3, bytes(range(256))])
def test_bytes_round_trip_through_a_uint8_tensor(data: bytes) -> None:
    t = to_u8(data)
    assert t.dtype == torch.uint8 and t.numel() == len(data)
    assert from_u8(t) == data


def test_save_refuses_what_compile_did_not_make(tmp_path: Path) -> None:
    with pytest.raises(ttm.UsageError, match="save\\(\\) takes a module from compile\\(\\); got Linear"):
        ttm.save(torch.nn.Linear(2, 2), tmp_path / "m.pt")  # type: ignore[arg-type]
    assert not (tmp_path / "m.pt").exists()


def test_a_saved_module_is_read_with_weights_only(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2).eval()
    ttm.save(ttm.compile(model, torch.randn(2, 3), cache=False), tmp_path / "m.pt")
    torch.load(tmp_path / "m.pt", weights_only=True)
    loaded = ttm.load(tmp_path / "m.pt")
    x = torch.randn(4, 3)
    torch.testing.assert_close(loaded(x), model(x))


def test_a_truncated_saved_module_raises_engine_load_error_naming_it(tmp_path: Path) -> None:
    """Issue 24: 12 of 25 cut points raised a bare ``OSError: [Errno 22] Invalid argument``."""
    from harness.faults import compile_tiny

    ttm.save(compile_tiny(0, tmp_path / "cache"), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    for i in range(1, 26):
        cut.write_bytes(data[:len(data) * i // 26])
        with pytest.raises(ttm.EngineLoadError) as info:
            ttm.load(cut)
        assert str(info.value).startswith(f"{cut} is truncated or corrupt: it is not a complete torch.save archive")
        assert str(info.value).endswith("copy it again, or save the module again")
    with pytest.raises(FileNotFoundError):  # a missing file is not called corrupt
        ttm.load(tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ttm.EngineLoadError, match="list.pt holds a list, not a module saved by"):
        ttm.load(tmp_path / "list.pt")


def test_inspect_calls_a_truncated_file_truncated_and_a_directory_a_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from harness.faults import compile_tiny
    from torch_trt_module.cli import main

    ttm.save(compile_tiny(0, tmp_path / "cache"), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    assert main(["inspect", str(tmp_path / "cut.pt")]) != 0
    err = capsys.readouterr().err
    assert f"{tmp_path / 'cut.pt'} is truncated or corrupt" in err and "not an engine file" not in err
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is a directory; give an engine file, a saved module or an .onnx file" in err
    assert "does not exist" not in err
