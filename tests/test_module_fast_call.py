"""The fast call (TRTModule.__call__ straight to the runner's per-shape plan), on ONNX Runtime.

The fast path skips nn.Module's hook dispatch and forward()'s full checks once a call at the
same input shapes has succeeded. These tests pin what it must not change: every check and
error of the full path, hooks, fresh outputs, and recovery when ONNX Runtime fails.
"""

from __future__ import annotations

import logging

import pytest
import torch

import torch_trt_module as ttm


class Gather(torch.nn.Module):
    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.index_select(x, 0, idx) * 2


@pytest.fixture(scope="module")
def linear() -> tuple[torch.nn.Module, ttm.TRTModule]:
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8).eval()
    return model, ttm.compile(model, torch.randn(2, 16), cache=False, backend="onnxruntime")


def _planned(module: ttm.TRTModule) -> int:
    return len(module.runner._plans)


def test_repeated_calls_take_the_plan_and_return_fresh_outputs(linear: tuple) -> None:
    model, module = linear
    x = torch.randn(3, 16)
    a, b = module(x), module(x)
    assert _planned(module) >= 1 and (x.shape,) in module._fast  # the second call was a fast one
    torch.testing.assert_close(a, model(x).detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    a.zero_()  # the caller owns its output: writing to it touches nothing else
    assert b.abs().sum() > 0 and torch.equal(module(x), b)


def test_new_tensors_in_place_updates_and_alternating_shapes_all_match_eager(linear: tuple) -> None:
    model, module = linear
    x = torch.randn(1, 16)
    for step in range(12):
        if step % 3 == 0:
            x.mul_(-1.5)  # same address, new values: must not be served from a stale binding
        else:
            x = torch.randn(1 + step % 4, 16)  # new address, often a new shape
        with torch.inference_mode():
            got = module(x)
        torch.testing.assert_close(got, model(x).detach(), rtol=1e-5, atol=1e-5)


def test_every_input_check_still_applies_after_fast_calls(linear: tuple) -> None:
    _, module = linear
    x = torch.randn(2, 16)
    module(x), module(x)
    with pytest.raises(ttm.InputError, match=r"input 'input' has dtype torch.float64 but the module was compiled "
                                             r"for torch.float32; pass .to\(torch.float32\)"):
        module(x.double())
    with pytest.raises(ttm.InputError, match=r"input 'input' requires grad, .* pass .detach\(\)"):
        module(x.clone().requires_grad_())
    with pytest.raises(ttm.InputError, match=r"input 'input' is on meta but this module runs on cpu"):
        module(torch.empty(2, 16, device="meta"))
    with pytest.raises(ttm.InputError, match=r"input 'input' .*16"):
        module(torch.randn(2, 15))
    module.train()
    try:
        with pytest.raises(ttm.InputError, match="inference-only and is in training mode"):
            module(x)
    finally:
        module.eval()
    wide = torch.randn(16, 4)  # non-contiguous view of the right shape: copied, not misread
    torch.testing.assert_close(module(wide.t()), module(wide.t().contiguous()))


def test_hooks_registered_after_fast_calls_run(linear: tuple) -> None:
    _, module = linear
    x = torch.randn(2, 16)
    module(x), module(x)
    seen: list[str] = []
    pre = module.register_forward_pre_hook(lambda m, args: seen.append("pre"))
    post = module.register_forward_hook(lambda m, args, out: out * 0)
    glob = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append("global"))
    try:
        out = module(x)
        assert seen == ["pre", "global"] and not out.any()  # the forward hook replaced the output
    finally:
        pre.remove(), post.remove(), glob.remove()
    assert module(x).any()


def test_a_runtime_failure_on_the_plan_raises_and_the_next_call_recovers() -> None:
    model = Gather().eval()
    x, idx = torch.randn(5, 3), torch.tensor([0, 4], dtype=torch.int64)
    module = ttm.compile(model, (x, idx), cache=False, backend="onnxruntime")
    module(x, idx), module(x, idx)
    assert _planned(module) == 1
    with pytest.raises(ttm.RuntimeFailure, match="onnxruntime failed to run the graph"):
        module(x, torch.tensor([0, 9]))  # same shapes, planned call: ORT rejects the index
    assert torch.equal(module(x, idx), model(x, idx))
    assert _planned(module) == 1  # planned again after the failure dropped it


def test_wrong_predicted_output_shape_falls_back_to_ort_allocation(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8).eval()
    module = ttm.compile(model, torch.randn(2, 16), cache=False, backend="onnxruntime")
    runner = module.runner
    runner._shapes = lambda shapes: [(shapes[0][0], 7)]  # a wrong symbolic shape from "the exporter"
    runner._shape_memo.clear(), runner._plans.clear()
    x = torch.randn(3, 16)
    with caplog.at_level(logging.INFO, logger="torch_trt_module"):
        got = [module(x) for _ in range(3)]
    assert "output shapes not predictable" in caplog.text
    for g in got:
        torch.testing.assert_close(g, model(x).detach(), rtol=1e-5, atol=1e-5)
    assert _planned(module) == 0  # outputs ORT allocates are never planned
