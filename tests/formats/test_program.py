"""torch_trt_module._formats.program: torch.export's program stored without pickle. save_program/load_program
round-trip a small program (the loaded one computes the same outputs), and a stored program whose
tensor archives hold a pickle payload is refused before the payload can run."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch

from torch_trt_module import EngineLoadError
from torch_trt_module._core.io import pack, unpack
from torch_trt_module._formats.program import load_program, save_program


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.register_buffer("shift", torch.arange(3, dtype=torch.float32))
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x)) * self.scale + self.shift


@pytest.fixture(scope="module")
def program() -> Any:
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=16)
    return torch.export.export(Small().eval(), (torch.randn(2, 4),), dynamic_shapes=({0: batch},))


@pytest.fixture(scope="module")
def saved(program: Any) -> bytes:
    return save_program(program)


class Payload:
    """Runs code when unpickled: it touches ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).touch()",))


def archive(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def replaced(saved: bytes, **blobs: bytes) -> bytes:
    header, parts = unpack(saved, kind="torch-program")
    return pack("torch-program", header, {**parts, **blobs})


def test_round_trip_computes_the_same_outputs(program: Any, saved: bytes) -> None:
    loaded = load_program(saved)
    for batch in (1, 2, 7, 16):
        x = torch.randn(batch, 4)
        torch.testing.assert_close(loaded.module()(x), program.module()(x), rtol=0, atol=0)
    state = loaded.state_dict
    assert set(state) == set(program.state_dict)
    assert all(torch.equal(state[k], program.state_dict[k]) for k in state)


def test_the_container_holds_json_and_tensor_archives(saved: bytes) -> None:
    header, blobs = unpack(saved, kind="torch-program")
    assert header == {"torch": torch.__version__}
    assert set(blobs) == {"program", "graph", "state_dict", "constants", "example_inputs"}  # graph: _formats.graph
    assert blobs["program"].lstrip().startswith(b"{")  # torch.export's own JSON schema
    weights = torch.load(io.BytesIO(blobs["state_dict"]), weights_only=True)
    assert set(weights) == {"lin.weight", "lin.bias", "scale", "shift"}


def test_save_is_deterministic(program: Any, saved: bytes) -> None:
    assert save_program(program) == saved  # the engine cache's content key hashes these bytes


@pytest.mark.parametrize("blob,what", [("state_dict", "weights"), ("constants", "constants"),
                                       ("example_inputs", "example inputs")])
def test_a_pickle_payload_is_refused_without_running(saved: bytes, tmp_path: Path, blob: str, what: str) -> None:
    marker = tmp_path / "ran"
    evil = replaced(saved, **{blob: archive({"lin.weight": Payload(marker)})})
    with pytest.raises(EngineLoadError) as info:
        load_program(evil)
    assert str(info.value).startswith(f"the saved PyTorch program's {what} hold more than tensors and plain data, "
                                      "or are corrupt (")
    assert str(info.value).endswith("); compile the model again")
    assert not marker.exists(), "the payload ran"


def test_payload_would_run_under_a_plain_load(tmp_path: Path) -> None:
    # The check above means something only if the payload is live: torch.load without weights_only runs it.
    marker = tmp_path / "ran"
    torch.load(io.BytesIO(archive(Payload(marker))), weights_only=False)
    assert marker.exists()


def test_a_corrupt_blob_is_refused_by_its_checksum(saved: bytes) -> None:
    data = bytearray(saved)
    data[-5] ^= 0xFF
    with pytest.raises(EngineLoadError, match=r"^prog.bin: checksum mismatch in the '\w+' blob"):
        load_program(bytes(data), source="prog.bin")


def test_another_container_kind_is_refused() -> None:
    with pytest.raises(EngineLoadError, match=r"^the saved PyTorch program holds a 'engine' of format 3, "
                                              r"not a 'torch-program'"):
        load_program(pack("engine", {}, {}))


def test_a_program_this_torch_cannot_read_names_both_versions(saved: bytes) -> None:
    bad = replaced(saved, program=b'{"schema_version": {"major": 999, "minor": 0}}')
    with pytest.raises(EngineLoadError) as info:
        load_program(bad, source="entry 1234")
    assert str(info.value).startswith(f"entry 1234 (saved by torch {torch.__version__}) cannot be read by torch "
                                      f"{torch.__version__}: ")
