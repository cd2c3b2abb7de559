"""_saved: save() and load() write and read torch.load(weights_only=True) archives only.
(Round trips of whole modules: test_module.py, test_split.py, reliability/test_safe_loading.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module._saved import from_u8, to_u8


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
