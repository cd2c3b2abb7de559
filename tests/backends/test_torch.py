"""The PyTorch runtime (backends/_torch.py): the program torch.export captured at compile time,
stored without pickle with the engine, run where no TensorRT runtime and no ONNX Runtime CUDA
provider can. On this CPU machine it runs on the CPU (``runtime="torch"``); tests/gpu/ runs it on
a GPU, where the runtime chain picks it by itself."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module._pipeline import compile as _compile
from torch_trt_module._core.io import pack, unpack
from torch_trt_module._formats.program import load_program, save_program
from torch_trt_module.backends._torch import TorchRunner

from harness import faults


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(h), h


class Views(torch.nn.Module):
    # Both outputs are views of the input in the program; an engine returns new tensors.
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.t(), x[:, :2]


def _net() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # non-trivial statistics, so a lost buffer would show
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


def test_the_torch_runtime_matches_eager_exactly_and_takes_no_gradients() -> None:
    model = _net()
    # optimize="none": the program as captured (the passes change rounding: test_torch_passes.py)
    module = ttm.compile(model, torch.randn(2, 3, 16, 16), runtime="torch", cache=False, optimize="none")
    assert module.backend == "torch" and isinstance(module.runner, TorchRunner)
    for batch in (1, 5, 32):
        x = torch.randn(batch, 3, 16, 16)
        got, want = module(x), model(x)
        for g, w in zip(got, want):
            assert torch.equal(g, w.detach())  # the same kernels on the same device: bit for bit
            assert g.grad_fn is None and not g.requires_grad


def test_the_program_is_a_copy_the_live_model_cannot_change() -> None:
    model = _net()
    module = ttm.compile(model, torch.randn(2, 3, 16, 16), runtime="torch", cache=False, weights="snapshot")
    x = torch.randn(3, 3, 16, 16)
    before = module(x)[0].clone()
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    assert torch.equal(module(x)[0], before)  # snapshot: the captured weights, not the live ones


def test_outputs_never_alias_inputs_or_each_other() -> None:
    module = ttm.compile(Views().eval(), torch.randn(2, 4), runtime="torch", cache=False)
    x = torch.randn(3, 4)
    a, b = module(x)
    assert torch.equal(a, x.t()) and torch.equal(b, x[:, :2])
    a.fill_(7.0)
    assert not torch.equal(x.t(), a) and not torch.equal(b, a.t()[:, :2])  # new tensors, as an engine returns


def test_a_saved_module_reloads_onto_the_torch_runtime_with_weights_only(tmp_path: Path) -> None:
    model = _net()
    module = ttm.compile(model, torch.randn(2, 3, 16, 16), cache=False, optimize="none")  # bit for bit below
    assert module.engine is not None and module.engine.has_program
    path = tmp_path / "m.pt"
    ttm.save(module, path)
    state = torch.load(path, weights_only=True)  # plain data and uint8 tensors only
    assert {type(v) for v in state["_extra_state"].values()} <= {int, torch.Tensor}
    loaded = ttm.TRTModule(runtime="torch")
    loaded.load_state_dict(state)
    x = torch.randn(4, 3, 16, 16)
    for g, w in zip(loaded(x), model(x)):
        assert torch.equal(g, w.detach())


def test_a_program_blob_holding_a_pickle_payload_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[object, ...]:
            import os

            return (os.system, (f"touch {marker}",))

    program = torch.export.export(torch.nn.Linear(2, 2).eval(), (torch.randn(1, 2),))
    header, blobs = unpack(save_program(program), kind="torch-program")
    buf = io.BytesIO()
    pickle.dump({"weight": Payload()}, buf)  # what an attacker would put where the weights go
    blobs["state_dict"] = buf.getvalue()
    with pytest.raises(ttm.EngineLoadError, match="hold more than tensors and plain data"):
        load_program(pack("torch-program", header, blobs))
    assert not marker.exists()


def test_an_engine_without_a_program_cannot_be_forced_onto_the_torch_runtime() -> None:
    model = torch.nn.Linear(4, 2).eval()
    module = ttm.compile(model, torch.randn(2, 4), exporter="torchscript", cache=False)
    assert module.engine is not None and not module.engine.has_program
    with pytest.raises(ttm.BackendUnavailable, match="runtime='torch' needs the PyTorch program.*exporter='dynamo'"):
        ttm.TRTModule(module.engine, runtime="torch")


def test_a_corrupt_program_in_the_cache_is_rebuilt_never_run(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    model = _net()
    x = torch.randn(2, 3, 16, 16)
    ttm.compile(model, x, runtime="torch", cache_dir=root, optimize="none")  # bit for bit below
    (blob,) = (root / "entries").glob("*+program+*.blob")
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x40
    blob.write_bytes(bytes(data))
    builds = _compile.STATS["builds"]
    with faults.capture_warnings() as warned:
        module = ttm.compile(model, x, runtime="torch", cache_dir=root, optimize="none")
    assert _compile.STATS["builds"] == builds + 1
    assert any("checksum mismatch for blob 'program'" in w for w in warned), warned
    y = torch.randn(3, 3, 16, 16)
    assert torch.equal(module(y)[0], model(y)[0].detach())


class MaskFromPositions(torch.nn.Module):
    """Builds tensors with device= in the graph (arange, a bool cast), as BERT's mask code does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=x.device)
        keep = (pos < 3).to(torch.bool)
        return x * keep


def test_every_device_argument_of_a_cpu_captured_program_is_moved() -> None:
    # move_to_device_pass rewrites the nodes but not the graph module's code, and BERT's program then
    # failed on the lent H200 ("Tensor device mismatch! Expected: cpu, Got: cuda:0").
    from torch_trt_module._formats.program import load_program
    from torch_trt_module.backends._torch import _retarget

    module = ttm.compile(MaskFromPositions().eval(), torch.randn(2, 5), runtime="torch", cache=False)
    assert module.engine is not None and module.engine.program is not None
    program = load_program(module.engine.program)
    before = [n.kwargs["device"] for n in program.graph.nodes if n.op == "call_function" and "device" in n.kwargs]
    assert before and all(d == torch.device("cpu") for d in before)
    _retarget(program.graph_module, torch.device("meta"))
    after = [n.kwargs["device"] for n in program.graph.nodes if n.op == "call_function" and "device" in n.kwargs]
    assert after == [torch.device("meta")] * len(before)
    assert "device(type='meta')" in program.graph_module.code


def test_a_cpu_captured_program_runs_on_another_device() -> None:
    # "meta" stands in for a GPU here: a device= argument left on the CPU fails as it did on CUDA.
    from torch_trt_module.backends._torch import TorchRunner

    module = ttm.compile(MaskFromPositions().eval(), torch.randn(2, 5), runtime="torch", cache=False)
    runner = TorchRunner(module.engine, "meta")
    (out,) = runner.run([torch.randn(3, 5, device="meta")])
    assert out.device.type == "meta" and out.shape == (3, 5)
