"""The TensorRT runtime adapter on real CUDA streams, against the strict double of TensorRT's
engine and context (tests/backends/trt_double.py) running asynchronously: its writes land on
the stream handle it was given, behind a sleep kernel of at least ``Knobs.sleep_ms`` (50 ms on
any GPU), and the output buffers hold NaN until then. A runner that enqueued on the wrong
stream, or let the caller read before its stream was ordered after the work, returns NaN here.
(The double stands in for TensorRT, which cannot execute an engine anywhere in this workplace.)
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module._core.spec import TensorSpec
from torch_trt_module.backends._tensorrt import TensorRTRunner

from ..backends.trt_double import Knobs, doubles, runtime_module, torch_compute, torch_weighted_compute

pytestmark = pytest.mark.gpu
REAL = [m for m in ("tensorrt_lean", "tensorrt_rtx") if importlib.util.find_spec(m) is not None]
if not REAL:
    pytest.skip("the double is derived from tensorrt_lean or tensorrt_rtx; neither is installed",
                allow_module_level=True)


@pytest.fixture(params=REAL)
def trt(request: pytest.FixtureRequest) -> Any:
    return importlib.import_module(request.param)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.conv(x)
        return c, c.relu().mean((2, 3))


def _setup(trt: Any, knobs: Knobs | None = None) -> tuple[TensorRTRunner, Net, Knobs]:
    model = Net().eval().cuda()
    inputs = [TensorSpec("x", "float32", ("b", 3, 16, 16), (1, 3, 16, 16), (2, 3, 16, 16), (8, 3, 16, 16))]
    outputs = [TensorSpec("c", "float32", ("b", 8, 14, 14)), TensorSpec("m", "float32", ("b", 8))]
    knobs = knobs or Knobs()
    fake = doubles(trt)[0](inputs, outputs, torch_compute(model, ["x"], ["c", "m"]), knobs=knobs, device="cuda")
    return TensorRTRunner(fake, inputs, outputs, "cuda", trt=trt, backend="tensorrt"), model, knobs


def test_the_double_is_asynchronous_a_read_that_does_not_wait_sees_poison(trt: Any) -> None:
    # Positive control: what a missing wait looks like with this double. A copy on another stream that
    # is not ordered after the runner's stream must read the poison (NaN), not the results.
    runner, model, knobs = _setup(trt)
    side, other = torch.cuda.Stream(), torch.cuda.Stream()
    x = torch.randn(2, 3, 16, 16, device="cuda")
    host = torch.empty((2, 8, 14, 14), pin_memory=True)  # allocated now: a pinned allocation can synchronise
    # Warm up what the unordered read does (the copy, the streams, the allocator's blocks), waiting this
    # time: a kernel's first launch loads its module, which can wait for all running work (CUDA lazy
    # loading), and a first allocation can synchronise too; either would let the read see the results.
    for _ in range(2):
        with torch.cuda.stream(side):
            c, _ = runner.run([x])
        other.wait_stream(side)
        with torch.cuda.stream(other):
            host.copy_(c, non_blocking=True)
        other.synchronize()
        assert not torch.isnan(host).any()  # a read that waits sees the results
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(side)
    with torch.cuda.stream(side):
        c, _ = runner.run([x])
    end.record(side)
    with torch.cuda.stream(other):  # neither waits for `side` nor is ordered after it
        host.copy_(c, non_blocking=True)
    other.synchronize()
    in_flight = not side.query()
    side.synchronize()
    took = start.elapsed_time(end)
    assert took >= knobs.sleep_ms, f"the double's work took {took:.1f} ms here, less than its {knobs.sleep_ms} ms"
    assert in_flight, "the double's work had landed before the unordered read finished"
    assert torch.isnan(host).all(), "a read that did not wait saw results: the double is not asynchronous"
    with torch.inference_mode():
        torch.testing.assert_close(c, model(x)[0], rtol=1e-4, atol=1e-5)  # the results, once waited for
    assert knobs.handles == [side.cuda_stream] * 3


def test_runs_on_the_caller_s_stream(trt: Any) -> None:
    runner, model, knobs = _setup(trt)
    side = torch.cuda.Stream()
    x = torch.randn(4, 3, 16, 16, device="cuda")
    with torch.cuda.stream(side):
        side.wait_stream(torch.cuda.current_stream())
        c, m = runner.run([x])
        got = (c * 1, m * 1)  # consumed on the same stream, with no host synchronisation
    side.synchronize()
    with torch.inference_mode():
        want = model(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert knobs.handles == [side.cuda_stream]


def test_the_legacy_default_stream_is_replaced_by_a_side_stream_ordered_both_ways(trt: Any) -> None:
    runner, model, knobs = _setup(trt)
    assert torch.cuda.current_stream().cuda_stream == 0
    for batch in (2, 5, 2):
        x = torch.randn(batch, 3, 16, 16, device="cuda")
        c, m = runner.run([x])
        got = m * 1  # the caller's next work, on the default stream, must see the results
        with torch.inference_mode():
            torch.testing.assert_close(got, model(x)[1], rtol=1e-4, atol=1e-5)
    assert 0 not in knobs.handles and len(set(knobs.handles)) == 1


def test_module_casts_and_structure_stay_stream_ordered(trt: Any) -> None:
    # fp16 engine I/O: TRTModule casts outputs back to fp32 on the caller's stream after the run.
    inputs = [TensorSpec("x", "float16", ("b", 6), (1, 6), (2, 6), (8, 6))]
    outputs = [TensorSpec("y", "float16", ("b", 6))]
    engine_cls, _ = doubles(trt)
    fake = engine_cls(inputs, outputs, torch_compute(lambda x: x * 2 + 1, ["x"], ["y"]), device="cuda")
    runner = TensorRTRunner(fake, inputs, outputs, "cuda", trt=trt)
    side = torch.cuda.Stream()
    x = torch.randn(3, 6, device="cuda", dtype=torch.float16)
    with torch.cuda.stream(side):
        (y,) = runner.run([x])
        z = y.float()
    side.synchronize()
    torch.testing.assert_close(z, (x * 2 + 1).float())


def test_data_dependent_outputs_on_cuda(trt: Any) -> None:
    inputs = [TensorSpec("x", "float32", ("b", 8), (1, 8), (2, 8), (8, 8))]
    outputs = [TensorSpec("y", "float32", ("n",))]
    engine_cls, _ = doubles(trt)
    fake = engine_cls(inputs, outputs, torch_compute(lambda x: x[x > 0], ["x"], ["y"]), device="cuda",
                      dds_outputs=("y",))
    runner = TensorRTRunner(fake, inputs, outputs, "cuda", trt=trt)
    kept = []
    for _ in range(3):
        x = torch.randn(4, 8, device="cuda")
        (y,) = runner.run([x])
        kept.append((y, x[x > 0]))
    for got, want in kept:  # earlier results are copies, not TensorRT's reused buffer
        assert torch.equal(got, want)


def test_a_runner_on_the_second_gpu_keeps_the_current_device() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    trt = importlib.import_module(REAL[0])
    inputs = [TensorSpec("x", "float32", ("b", 4), (1, 4), (2, 4), (8, 4))]
    outputs = [TensorSpec("y", "float32", ("b", 4))]
    # The double fails any context creation, run or refit made while cuda:0 is current (TensorRT would
    # make it on cuda:0): the runner must enter its own device for each, and leave the current one as it was.
    model = torch.nn.Linear(4, 4).cuda(1)
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    fake = doubles(trt)[0](inputs, outputs, torch_weighted_compute(model, ["x"], ["y"]), device="cuda:1",
                           weights=old)
    runner = TensorRTRunner(fake, inputs, outputs, "cuda:1", trt=runtime_module(trt))
    torch.cuda.set_device(0)
    x = torch.randn(2, 4, device="cuda:1")
    (y,) = runner.run([x])
    assert y.device == torch.device("cuda:1") and torch.cuda.current_device() == 0
    with torch.inference_mode():
        torch.testing.assert_close(y, model(x))
    new = {n: torch.randn_like(w) for n, w in old.items()}
    runner.refit(new)
    assert torch.cuda.current_device() == 0
    (y,) = runner.run([x])
    with torch.inference_mode():
        torch.testing.assert_close(y, torch.func.functional_call(model, new, (x,)))


def test_a_real_module_pattern_with_the_double(trt: Any) -> None:
    # TRTModule around the adapter, called the way a user calls it, on a side stream.
    model = Net().eval().cuda()
    compiled = ttm.compile(model, torch.randn(2, 3, 16, 16, device="cuda"), backend="onnxruntime", cache=False)
    engine = compiled.engine
    assert engine is not None
    ex = engine.exported
    fake = doubles(trt)[0](ex.inputs, ex.outputs, torch_compute(model, ex.input_names, ex.output_names),
                           device="cuda")
    module = ttm.TRTModule(engine, runner=TensorRTRunner(fake, ex.inputs, ex.outputs, "cuda", trt=trt))
    side = torch.cuda.Stream()
    x = torch.randn(6, 3, 16, 16, device="cuda")
    with torch.cuda.stream(side):
        side.wait_stream(torch.cuda.current_stream())
        out = module(x)
        res = [o * 1 for o in out]
    side.synchronize()
    with torch.inference_mode():
        for g, w in zip(res, model(x)):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_refit_waits_for_the_work_in_flight_and_the_next_run_computes_with_the_new_weights(trt: Any) -> None:
    # The double's refit_cuda_engine fails the test if the engine's work is still in flight (undefined in
    # TensorRT): the run before it holds the stream for at least Knobs.sleep_ms, so the runner must wait.
    model = Net().eval().cuda()
    inputs = [TensorSpec("x", "float32", ("b", 3, 16, 16), (1, 3, 16, 16), (2, 3, 16, 16), (8, 3, 16, 16))]
    outputs = [TensorSpec("c", "float32", ("b", 8, 14, 14)), TensorSpec("m", "float32", ("b", 8))]
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    knobs = Knobs()
    fake = doubles(trt)[0](inputs, outputs, torch_weighted_compute(model, ["x"], ["c", "m"]), knobs=knobs,
                           device="cuda", weights=old)
    runner = TensorRTRunner(fake, inputs, outputs, "cuda", trt=runtime_module(trt), backend="tensorrt")
    # In host memory (a checkpoint): copying CUDA weights to the host on `side` would itself wait for the run.
    new = {n: torch.randn_like(w).cpu() for n, w in old.items()}
    side = torch.cuda.Stream()
    x = torch.randn(4, 3, 16, 16, device="cuda")
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        before, _ = runner.run([x])
        runner.refit(new)
        after, _ = runner.run([x])
    side.synchronize()
    with torch.inference_mode():
        torch.testing.assert_close(before, torch.func.functional_call(model, old, (x,))[0], rtol=1e-4, atol=1e-5)
        want = torch.func.functional_call(model, {n: w.cuda() for n, w in new.items()}, (x,))[0]
        torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-5)
    assert knobs.refits == [sorted(new)]
