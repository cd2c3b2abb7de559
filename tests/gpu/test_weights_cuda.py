"""Weight following on a CUDA device (issue 20): fused optimizers on CUDA, and ``p.data = w`` twice
between calls, where PyTorch's caching allocator hands the second tensor the block the first one
freed (the same address: only the death of the old memory shows the change). Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_trt_module as ttm

pytestmark = pytest.mark.gpu


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval().cuda()


def _close(fast: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        want = model(x)
    assert (fast(x) - want).abs().max().item() < 1e-3, "stale weights"


@pytest.mark.parametrize("kind", ["AdamW", "Adam", "SGD"])
def test_fused_optimizers_on_cuda_are_followed(kind: str) -> None:
    model = _model()
    x = torch.randn(4, 16, device="cuda")
    fast = ttm.compile(model, x, cache=False)
    opt = getattr(torch.optim, kind)(model.parameters(), lr=0.1, fused=True)
    for _ in range(2):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        _close(fast, model, x)


def test_new_memory_at_a_freed_address_is_seen_on_cuda() -> None:
    model = _model()
    x = torch.randn(4, 16, device="cuda")
    fast = ttm.compile(model, x, cache=False)
    _close(fast, model, x)
    w = model[0].weight
    before = w.data_ptr()
    w.data = w.data * 0.5  # new block; the old one goes back to the cache
    w.data = w.data + 1.0  # the cache gives the old block back
    if w.data_ptr() != before:
        pytest.skip("the caching allocator did not reuse the block here; nothing to show")
    _close(fast, model, x)


@pytest.mark.parametrize("write", ["mul_", "normal_", "copy_"])
def test_exact_mode_follows_writes_through_data_on_cuda(write: str) -> None:
    # The GPU path of weights="exact": one batched reduction over the watched tensors per call
    # (the CPU uses memcmp). "follow" cannot see these writes; "exact" must, with one refit each.
    model = _model()
    x = torch.randn(4, 16, device="cuda")
    fast = ttm.compile(model, x, cache=False, weights="exact")
    _close(fast, model, x)
    w = model[2].weight
    if write == "mul_":
        w.data.mul_(2)
    elif write == "normal_":
        w.data.normal_()
    else:
        w.data.copy_(torch.randn_like(w))
    _close(fast, model, x)
    assert fast.weights_version == 1
    _close(fast, model, x)
    assert fast.weights_version == 1  # no change, no refit
