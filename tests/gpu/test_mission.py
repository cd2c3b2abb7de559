"""The mission's own lines on a CUDA GPU, with the framework defaults a user has (PyTorch's
TF32 for cuDNN convolutions left as it ships): ``compile(resnet18())``, lazy and with CUDA
example inputs, checked with ``assert_parity`` against eager."""

from __future__ import annotations

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module._core.numerics import tf32_state

pytestmark = pytest.mark.gpu
torchvision = pytest.importorskip("torchvision")


@pytest.fixture
def resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval().cuda()


def test_defaults_are_pytorch_s(resnet18: torch.nn.Module) -> None:
    # What a user's machine does: the rest of this file relies on it, and compile() never changes it.
    before = tf32_state()
    ttm.compile(resnet18, torch.randn(2, 3, 64, 64, device="cuda"), dynamic=None, cache=False)
    assert tf32_state() == before
    assert torch.backends.cudnn.conv.fp32_precision == "tf32" if hasattr(torch.backends.cudnn, "conv") else True


def test_compile_resnet18_with_cuda_example_inputs(resnet18: torch.nn.Module) -> None:
    fast = ttm.compile(resnet18, torch.randn(8, 3, 224, 224, device="cuda"))
    x = torch.randn(6, 3, 224, 224, device="cuda")
    out = fast(x)
    assert out.device == x.device and out.shape == (6, 1000)
    report = ttm.assert_parity(resnet18, fast, x)
    assert "tf32" in (report.numerics or "")


def test_compile_resnet18_lazily(resnet18: torch.nn.Module) -> None:
    fast = ttm.compile(resnet18)
    x = torch.randn(8, 3, 224, 224, device="cuda")
    out = fast(x)
    assert out.device == x.device
    ttm.assert_parity(resnet18, fast, x)
    ttm.assert_parity(resnet18, fast, torch.randn(3, 3, 224, 224, device="cuda"))


def test_compile_resnet18_as_written_in_training_mode() -> None:
    # Issue 20: torchvision.models.resnet18() is in training mode; compile() compiles its inference
    # semantics, as torch.onnx.export does, and leaves it in training mode.
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).cuda()
    assert model.training
    fast = ttm.compile(model, torch.randn(4, 3, 224, 224, device="cuda"))
    assert model.training and all(m.training for m in model.modules())
    x = torch.randn(6, 3, 224, 224, device="cuda")
    model.eval()
    ttm.assert_parity(model, fast, x)
