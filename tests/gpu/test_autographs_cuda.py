"""``cuda_graphs="auto"`` on a CUDA GPU: real timing, capture and replay (backends/_autographs.py).

- a runner of many tiny kernels (launch-bound by construction) is judged worth a graph, and its
  replays give the right answers for new inputs;
- a runner of one large matmul (GPU-bound by construction) is judged not, and nothing is captured;
- compile(..., cuda_graphs="auto") against eager at several batches, and in follow mode through a
  training loop: 0 stale evaluations.
"""

from __future__ import annotations

from typing import Sequence

import pytest
import torch
from torch import nn

import torch_trt_module as ttm
from torch_trt_module._core.numerics import eager_uses_tf32, policy_for
from torch_trt_module._core.spec import TensorSpec
from torch_trt_module._verify.compare import compare_outputs
from torch_trt_module.backends._autographs import AutoGraphRunner

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - the marker's skip, made explicit for collection
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

DEV = torch.device("cuda", torch.cuda.current_device())


class ManyKernels:
    """A runner of 300 tiny element-wise kernels: the host's launches are the limit."""

    backend = "test"

    def __init__(self) -> None:
        self.device = DEV
        self.inputs = [TensorSpec("x", "float32", ("b", 64), (1, 64), (4, 64), (8, 64))]
        self.outputs = [TensorSpec("y", "float32", ("b", 64))]

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        y = inputs[0]
        for _ in range(300):
            y = y * 1.0001 + 0.001
        return [y]


def _many_kernels_reference(x: torch.Tensor) -> torch.Tensor:
    return ManyKernels().run([x])[0]


class BigMatmul:
    """A runner of one 8192 x 8192 fp32 matmul: the GPU is the limit."""

    backend = "test"

    def __init__(self) -> None:
        self.device = DEV
        self.inputs = [TensorSpec("x", "float32", ("b", 8192), (1, 8192), (4096, 8192), (8192, 8192))]
        self.outputs = [TensorSpec("y", "float32", ("b", 8192))]
        self.w = torch.randn(8192, 8192, device=DEV) / 90

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [inputs[0] @ self.w]


def test_a_launch_bound_runner_is_replayed_and_right_for_new_inputs() -> None:
    auto = AutoGraphRunner(ManyKernels(), device=DEV)
    for rows in (4, 4, 4, 4, 2, 2, 2):
        x = torch.randn(rows, 64, device=DEV)
        (y,) = auto.run([x])
        torch.testing.assert_close(y, _many_kernels_reference(x))
    assert set(auto.verdicts.values()) == {"graph"}, auto.verdicts
    assert auto.graphs.stats["captures"] == 2 and auto.graphs.stats["replays"] >= 2 * 3 + 3
    first = auto.run([torch.ones(4, 64, device=DEV)])[0]
    auto.run([torch.zeros(4, 64, device=DEV)])
    torch.cuda.synchronize()
    torch.testing.assert_close(first, _many_kernels_reference(torch.ones(4, 64, device=DEV)))  # not overwritten


def test_a_gpu_bound_runner_runs_plain_and_captures_nothing() -> None:
    inner = BigMatmul()
    auto = AutoGraphRunner(inner, device=DEV)
    x = torch.randn(4096, 8192, device=DEV)
    for _ in range(3):
        (y,) = auto.run([x])
    torch.testing.assert_close(y, x @ inner.w, rtol=1e-2, atol=1e-2)  # TF32 where the user's flags allow it
    assert list(auto.verdicts.values()) == ["plain"] and auto.graphs.stats["captures"] == 0


def _policy() -> object:
    return policy_for("tf32") if eager_uses_tf32("cuda") else policy_for("fp32")


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.Hardswish(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).cuda()


def test_compile_with_auto_graphs_matches_eager_at_several_batches() -> None:
    model = _convnet().eval()
    fast = ttm.compile(model, torch.randn(4, 3, 32, 32, device="cuda"), max_batch=16, cache=False,
                       cuda_graphs="auto")
    assert isinstance(fast.runner, AutoGraphRunner)
    for batch in (4, 4, 4, 1, 1, 1, 16, 16, 16, 4):
        x = torch.randn(batch, 3, 32, 32, device="cuda")
        with torch.no_grad():
            want = model(x)
        report = compare_outputs(fast(x), want, tolerance=_policy())
        assert report.passed, f"batch {batch}: {report}"
    assert len(fast.runner.verdicts) == 3


def test_follow_mode_under_auto_graphs_is_never_stale_through_a_training_loop() -> None:
    model = _convnet()
    fast = ttm.compile(model.eval(), torch.randn(4, 3, 32, 32, device="cuda"), max_batch=16, cache=False,
                       cuda_graphs="auto")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3, 32, 32, device="cuda")
    stale = 0
    for step in range(6):
        model.train()
        loss = model(torch.randn(8, 3, 32, 32, device="cuda")).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()
        for _ in range(3):  # several evaluations per step: the second one onwards may replay a graph
            with torch.no_grad():
                want = model(x)
            stale += not compare_outputs(fast(x), want, tolerance=_policy()).passed
    assert stale == 0


@pytest.mark.parametrize("cuda_graphs", [True, "auto"])
def test_a_graph_captured_under_inference_mode_serves_calls_made_outside_it(cuda_graphs: object) -> None:
    model = _convnet().eval()
    fast = ttm.compile(model, torch.randn(4, 3, 32, 32, device="cuda"), max_batch=16, cache=False,
                       cuda_graphs=cuda_graphs)
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        want = model(x)
    with torch.inference_mode():  # captured here (at the first call, or judged at the second)
        for _ in range(3):
            fast(x)
    for mode in (torch.no_grad, torch.enable_grad, torch.inference_mode):
        with mode():
            report = compare_outputs(fast(x), want, tolerance=_policy())
        assert report.passed, f"{mode.__name__}: {report}"
