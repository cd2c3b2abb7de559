"""Depthwise convolutions as shifted slices (backends/_depthwise.py), an Inductor experiment off by
default: against the convolution, in the passes' graph, and compiled by real Inductor on this CPU."""

from __future__ import annotations

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module.backends import _depthwise
from torch_trt_module.backends._depthwise import conv_taps
from torch_trt_module.backends._torch_passes import optimize_graph

from .test_torch_passes import _program, _stats


@pytest.mark.parametrize("k,stride,padding,dilation", [(3, 1, 1, 1), (5, 2, 2, 1), (3, 2, 1, 1), (3, 1, 2, 2),
                                                        (3, (2, 1), (1, 0), 1), (3, 1, 0, 1)])
def test_taps_match_the_depthwise_convolution(k: int, stride: object, padding: object, dilation: object) -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 8, 11, 13), torch.randn(8, 1, k, k), torch.randn(8)
    want = torch.nn.functional.conv2d(x, w, b, stride, padding, dilation, 8)
    got = conv_taps(x, w, b, stride, padding, dilation, 8)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    x_nhwc = x.to(memory_format=torch.channels_last)  # the layout Inductor gives a conv net's activations
    torch.testing.assert_close(conv_taps(x_nhwc, w, None, stride, padding, dilation, 8),
                               torch.nn.functional.conv2d(x, w, None, stride, padding, dilation, 8),
                               rtol=1e-5, atol=1e-5)


def test_what_is_not_depthwise_runs_as_the_convolution() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9)
    for w, groups, padding in [(torch.randn(8, 4, 3, 3), 2, 1),      # 4 channels a group
                               (torch.randn(8, 1, 7, 7), 8, 3),      # 49 taps > MAX_TAPS
                               (torch.randn(8, 1, 3, 3), 8, "same")]:
        want = torch.nn.functional.conv2d(x, w, None, 1, padding, 1, groups)
        torch.testing.assert_close(conv_taps(x, w, None, 1, padding, 1, groups), want, rtol=0, atol=0)


class _Separable(torch.nn.Module):
    """mobilenet's block: pointwise conv, BN, hardswish, depthwise conv, BN, then a grouped conv
    that is not depthwise."""

    def __init__(self) -> None:
        super().__init__()
        self.pw, self.b1 = torch.nn.Conv2d(3, 16, 1, bias=False), torch.nn.BatchNorm2d(16)
        self.dw, self.b2 = torch.nn.Conv2d(16, 16, 5, stride=2, padding=2, groups=16, bias=False), torch.nn.BatchNorm2d(16)
        self.gc = torch.nn.Conv2d(16, 16, 3, padding=1, groups=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.hardswish(self.b1(self.pw(x)))
        return self.gc(torch.relu(self.b2(self.dw(h))))


def test_the_pass_points_grouped_convolutions_at_the_taps_and_matches_the_program() -> None:
    model = _stats(_Separable())
    _, gm, names, weights = _program(model, torch.randn(2, 3, 16, 16))
    plain, _ = optimize_graph(gm, names)
    opt, plan = optimize_graph(gm, names, depthwise=True)
    assert plan.taps == 2 and plan.folds == 2  # the depthwise conv and the grouped one (which stays a conv)
    assert sum(n.target is conv_taps for n in opt.graph.nodes) == 2
    assert not any(n.target is conv_taps for n in plain.graph.nodes)
    derived = plan.derive(dict(zip(names, weights)))
    for batch in (1, 3):
        xb = torch.randn(batch, 3, 16, 16)
        (got,) = opt(*derived, xb)
        torch.testing.assert_close(got, model(xb), rtol=1e-5, atol=1e-5)


def test_inductor_compiles_the_taps_when_the_experiment_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_depthwise, "DEPTHWISE_TAPS", True)
    model = _stats(_Separable())
    x = torch.randn(2, 3, 16, 16)
    fast = ttm.compile(model, x, cache=False, runtime="torch", optimize="inductor", verify=False)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    assert "2 grouped convolutions as taps" in fast.runner.optimized
    # Without Inductor the graph runs eagerly, where k*k small kernels would be slower: no taps.
    eager = ttm.compile(model, x, cache=False, runtime="torch", optimize="passes", verify=False)
    torch.testing.assert_close(eager(x), model(x), rtol=1e-4, atol=1e-4)
    assert "as taps" not in eager.runner.optimized
