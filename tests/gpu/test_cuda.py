"""CUDA-side behaviour (device placement, wrong-device errors, GPU identity). Marked `gpu`:
skipped here, run on the lent GPU machine. No TensorRT runs there, so these use the
ONNX Runtime path with CUDA tensors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module.backends import gpu_identity

pytestmark = pytest.mark.gpu


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.LazyLinear(4)).eval()


def test_cuda_model_gives_cuda_outputs_that_match_eager() -> None:
    model = _model()
    model(torch.randn(1, 3, 16, 16))  # materialise the lazy layer
    model = model.cuda()
    x = torch.randn(4, 3, 16, 16, device="cuda")
    module = ttm.compile(model, x, cache=False)
    assert module.device.type == "cuda"
    y = torch.randn(6, 3, 16, 16, device="cuda")
    out = module(y)
    assert out.device == y.device
    ttm.assert_parity(model, module, y, rtol=1e-3, atol=1e-4)


def test_inputs_on_the_wrong_device_are_refused_with_the_fix() -> None:
    model = torch.nn.Linear(4, 2).eval().cuda()
    module = ttm.compile(model, torch.randn(2, 4, device="cuda"), cache=False)
    with pytest.raises(ttm.InputError, match=r"input 'input' is on cpu but this module runs on cuda:0; move it"):
        module(torch.randn(2, 4))
    cpu_module = ttm.compile(model.cpu(), torch.randn(2, 4), cache=False)
    with pytest.raises(ttm.InputError, match=r"is on cuda:0 but this module runs on cpu"):
        cpu_module(torch.randn(2, 4, device="cuda"))


def test_module_moves_between_devices() -> None:
    model = torch.nn.Linear(4, 2).eval()
    module = ttm.compile(model, torch.randn(2, 4), cache=False).to("cuda")
    x = torch.randn(3, 4, device="cuda")
    assert module(x).device.type == "cuda"
    ttm.assert_parity(model.cuda(), module, x, rtol=1e-3, atol=1e-4)


def test_gpu_identity_has_no_index_and_is_stable_across_processes() -> None:
    ident = gpu_identity("cuda:0")
    assert ident is not None and set(ident) == {"name", "compute_capability", "sm_count", "total_memory"}
    code = "from torch_trt_module.backends import gpu_identity; print(gpu_identity('cuda'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == str(ident)


def test_cuda_streams_work_with_the_module() -> None:
    model = torch.nn.Linear(16, 16).eval().cuda()
    module = ttm.compile(model, torch.randn(2, 16, device="cuda"), cache=False)
    side = torch.cuda.Stream()
    x = torch.randn(8, 16, device="cuda")
    with torch.cuda.stream(side):
        out = module(x)
    side.synchronize()
    ttm.assert_parity(model, module, x, rtol=1e-3, atol=1e-4)
    assert torch.allclose(out, model(x), rtol=1e-3, atol=1e-4)


def test_repeated_cuda_calls_stay_correct_and_keep_the_device_check() -> None:
    # The fast call (a call like an earlier successful one) compares devices on CUDA, where the
    # CPU shortcut (t.is_cpu) does not apply; CUDA inputs are staged through ORT's CPU provider here.
    model = torch.nn.Linear(16, 8).eval().cuda()
    module = ttm.compile(model, torch.randn(2, 16, device="cuda"), cache=True)
    for batch in (3, 3, 5, 3):
        x = torch.randn(batch, 16, device="cuda")
        out = module(x)
        assert out.device == x.device
        torch.testing.assert_close(out, model(x).detach(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ttm.InputError, match=r"input 'input' is on cpu but this module runs on cuda:0"):
        module(torch.randn(3, 16))
    if torch.cuda.device_count() > 1:
        with pytest.raises(ttm.InputError, match=r"is on cuda:1 but this module runs on cuda:0"):
            module(torch.randn(3, 16, device="cuda:1"))
