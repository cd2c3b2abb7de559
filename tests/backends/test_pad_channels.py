"""Few input channels zero-padded to an aligned count (backends/_pad_channels.py, on by default
where Inductor compiles for a GPU), against the program as captured, on the CPU. Its speed is the
GPU's question (benchmarks/bench_first_conv.py, bench_latency.py --pad-channels on|off)."""

from __future__ import annotations

import pytest
import torch

from torch_trt_module.backends import _pad_channels, _torch_opt
from torch_trt_module.backends._torch_passes import optimize_graph

from .test_torch_passes import ConvAndSkip, ConvBN, _count, _program, _stats


def _padded_weights(opt: torch.fx.GraphModule, derived: list[torch.Tensor]) -> list[torch.Tensor]:
    """The derived weights that the padded convolutions read."""
    places = [n for n in opt.graph.nodes if n.op == "placeholder"]
    return [derived[places.index(n.args[1])] for n in opt.graph.nodes
            if n.op == "call_function" and n.target is torch.ops.aten.conv2d.default
            and isinstance(n.args[0], torch.fx.Node) and n.args[0].target is torch.ops.aten.constant_pad_nd.default]


def test_a_three_channel_convolution_is_padded_and_computes_the_same() -> None:
    model = _stats(ConvBN())
    _, gm, names, weights = _program(model, torch.randn(2, 3, 12, 12))
    plain, plain_plan = optimize_graph(gm, names, weights=dict(zip(names, weights)))
    opt, plan = optimize_graph(gm, names, weights=dict(zip(names, weights)), pad_channels=True)
    assert plan.padded == 1 and plain_plan.padded == 0  # c1 (3 channels); c2, c3 read 8; c4 is 1-d
    assert _count(opt, "constant_pad_nd") == 1 and _count(plain, "constant_pad_nd") == 0
    assert plan.folds == plain_plan.folds == 3 and plan.sources == plain_plan.sources
    derived = plan.derive(dict(zip(names, weights)))
    (w,) = _padded_weights(opt, derived)
    assert w.shape == (8, 4, 3, 3)  # fp32: aligned to 4
    assert torch.count_nonzero(w[:, 3:]) == 0 and torch.count_nonzero(w[:, :3]) > 0
    for batch in (1, 5):
        x = torch.randn(batch, 3, 12, 12)
        (want,) = gm(*weights, x)
        (got,) = opt(*derived, x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_padded_weight_follows_a_refit() -> None:
    """The padded weight is derived (from the fold of c1 and b1): new source weights, new padding."""
    model = _stats(ConvBN())
    _, gm, names, weights = _program(model, torch.randn(2, 3, 12, 12))
    opt, plan = optimize_graph(gm, names, weights=dict(zip(names, weights)), pad_channels=True)
    changed = {n: (w * 1.7 if n.endswith(("c1.weight", "b1.running_var")) else w) for n, w in zip(names, weights)}
    x = torch.randn(3, 3, 12, 12)
    (want,) = gm(*[changed[n] for n in names], x)
    (stale,) = opt(*plan.derive(dict(zip(names, weights))), x)
    (got,) = opt(*plan.derive(changed), x)
    assert not torch.allclose(stale, want, rtol=1e-3, atol=1e-3)  # the change shows in the output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_a_half_precision_convolution_is_padded_to_eight_channels(precision: str, dtype: torch.dtype) -> None:
    model = _stats(ConvBN())
    _, gm, names, weights = _program(model, torch.randn(2, 3, 12, 12), precision=precision)
    opt, plan = optimize_graph(gm, names, weights=dict(zip(names, weights)), pad_channels=True)
    derived = plan.derive(dict(zip(names, weights)))
    (w,) = _padded_weights(opt, derived)
    assert w.dtype == dtype and w.shape == (8, 8, 3, 3)
    x = torch.randn(3, 3, 12, 12).to(dtype)
    (want,) = gm(*weights, x)
    (got,) = opt(*derived, x)
    tol = 1e-2 if dtype == torch.float16 else 5e-2  # bf16 keeps 8 bits of mantissa
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


class Grouped(torch.nn.Module):
    """A depthwise convolution over 3 channels (one group each): not a candidate."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = torch.nn.Conv2d(3, 3, 3, padding=1, groups=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dw(x)


def test_a_grouped_convolution_is_left_alone() -> None:
    _, gm, names, weights = _program(Grouped().eval(), torch.randn(2, 3, 8, 8))
    _, plan = optimize_graph(gm, names, weights=dict(zip(names, weights)), pad_channels=True)
    assert plan.padded == 0


def test_it_is_on_by_default_on_a_gpu_s_inductor_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Made for a GPU's device (no CUDA call is made). With the padding the image is read by the
    pad, not only by a convolution, so a graph runner's static input stays in the caller's layout
    (Inductor fuses the pad into the copy that lays it out channels_last)."""
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    _, gm, names, weights = _program(ConvAndSkip().eval(), (x, y))
    on = _torch_opt.Optimized.make(gm, names, weights, "inductor", torch.device("cuda"))
    assert on is not None and on.plan.padded == 2 and on.conv_inputs == []
    assert "2 convolutions' input channels padded" in on.describe()
    padded = _padded_weights(on.graph, on.weights)
    assert all(w.shape[1] == 4 and w.is_contiguous(memory_format=torch.channels_last) for w in padded)
    for device, mode in ((torch.device("cpu"), "inductor"), (torch.device("cuda"), "passes")):
        other = _torch_opt.Optimized.make(gm, names, weights, mode, device)
        assert other is not None and other.plan.padded == 0, (device, mode)
    monkeypatch.setattr(_pad_channels, "PAD_INPUT_CHANNELS", False)  # the switch turns it off
    off = _torch_opt.Optimized.make(gm, names, weights, "inductor", torch.device("cuda"))
    assert off is not None and off.plan.padded == 0 and off.conv_inputs == [0]
