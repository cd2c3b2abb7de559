"""CudaGraphRunner: shape-keyed capture, replay over static buffers, LRU, output contract, threads.

On a machine without a GPU the runner wraps a real ``TensorRTRunner`` driving the
execution-context test double (tests/trt_double.py), and capture/replay go through
:class:`RecordingGraphs`, a TEST DOUBLE of ``TorchCudaGraphs`` described below. That shows
the wrapper's own logic (which graph serves which shapes, that inputs are copied in, that
each graph has its own context, that outputs are fresh) and nothing about CUDA itself.
The ``gpu`` tests capture real CUDA graphs (of torch kernels); the ``trt_runtime`` test
captures a real TensorRT engine where one can run.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Sequence

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module._errors import BackendUnavailable, RuntimeFailure
from torch_trt_module._core.spec import TensorSpec
from torch_trt_module.backends import _cudagraphs
from torch_trt_module.backends._cudagraphs import CudaGraphRunner
from torch_trt_module.backends._tensorrt import TensorRTRunner

from .._support import in_threads


# --------------------------------------------------------------------------- test doubles

class HostDriver:
    """What both CUDA-graph driver doubles below share: no streams to order, a capture stream that
    is the current one, and a count of the synchronisations asked for."""

    def __init__(self) -> None:
        self.syncs = 0

    def order(self) -> None:
        pass

    @contextlib.contextmanager
    def capture_stream(self) -> Iterator[None]:
        yield

    def synchronize(self) -> None:
        self.syncs += 1

    def stream_handle(self) -> int:
        return 0


class RecordingGraphs(HostDriver):
    """TEST DOUBLE of ``TorchCudaGraphs`` for a CPU machine.

    ``capture`` runs ``fn`` but has the engine double record, instead of executing, every
    ``execute_async_v3`` it enqueues (``Knobs.record``), as stream capture records kernels
    without running them. ``replay`` re-issues the recorded calls on the same contexts, which
    read the inputs and write the outputs at the addresses bound at capture time, as a
    graph's kernels do.
    """

    def __init__(self, knobs: Any = None, streams: Any = None) -> None:
        super().__init__()
        self.knobs, self.streams = knobs, streams

    def capture(self, fn: Callable[[], list[torch.Tensor]]) -> tuple[Any, list[torch.Tensor]]:
        from .trt_double import replay

        calls: list[tuple[Any, int]] = []
        self.knobs.record = calls
        try:
            outputs = fn()
        finally:
            self.knobs.record = None
        assert calls, "the captured function enqueued no work"
        streams = self.streams

        class Replay:
            def replay(self) -> None:
                for ctx, handle in calls:
                    assert replay(ctx, handle)
                    streams.synchronize(handle)

        return Replay(), outputs


class Affine(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2 + 1, x.sum(-1)


class Masked(torch.nn.Module):  # a data-dependent output shape
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[x > 0]


def _runner_on_double(model: torch.nn.Module, example: torch.Tensor, dynamic: Any = "batch",
                      dds: tuple[str, ...] = (), real: str = "tensorrt_rtx"
                      ) -> tuple[TensorRTRunner, Any, ttm.TRTModule, Any]:
    """A real TensorRTRunner over the strict engine double (its knobs), and the ONNX Runtime reference.
    ``real``: the module whose classes the double mirrors (tensorrt_rtx, or TensorRT's tensorrt_lean)."""
    trt = pytest.importorskip(real, reason=f"{real} supplies the real classes the double mirrors")
    pytest.importorskip("onnxruntime")
    from .trt_double import HostStreams, Knobs, doubles, ort_compute

    reference = ttm.compile(model.eval(), example, dynamic=dynamic, backend="onnxruntime", cache=False,
                            verify=False)
    engine = reference.engine
    assert engine is not None
    ex = engine.exported
    knobs, streams = Knobs(), HostStreams()
    fake = doubles(trt)[0](ex.inputs, ex.outputs, ort_compute(engine.onnx, ex.output_names), knobs=knobs,
                           streams=streams, dds_outputs=dds)
    backend = "tensorrt_rtx" if real == "tensorrt_rtx" else "tensorrt"
    runner = TensorRTRunner(fake, ex.inputs, ex.outputs, "cpu", trt=trt, backend=backend, streams=streams)
    return runner, knobs, reference, streams


def _check(outs: list[torch.Tensor], reference: ttm.TRTModule, x: torch.Tensor) -> None:
    expected = reference(x)
    assert len(outs) == len(expected)
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture
def affine() -> tuple[CudaGraphRunner, Any, ttm.TRTModule, RecordingGraphs]:
    runner, knobs, reference, streams = _runner_on_double(Affine(), torch.randn(4, 6))
    driver = RecordingGraphs(knobs, streams)
    return CudaGraphRunner(runner, device="cpu", max_graphs=2, driver=driver), knobs, reference, driver


# --------------------------------------------------------------------------- construction

def test_no_cuda_is_a_clear_error_at_construction() -> None:
    class Inner:  # TEST DOUBLE: the runner surface only
        backend, device, inputs, outputs = "tensorrt", torch.device("cpu"), [], []

        def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            raise AssertionError("never called")

    with pytest.raises(BackendUnavailable, match=r"cuda_graphs=True needs a CUDA device.*cuda_graphs=False"):
        CudaGraphRunner(Inner(), device="cpu")
    with pytest.raises(ValueError, match="max_graphs"):
        CudaGraphRunner(Inner(), device="cpu", max_graphs=0, driver=RecordingGraphs())


# --------------------------------------------------------------------------- shape-keyed graphs (double)

def test_one_capture_per_shape_and_inputs_copied_in(affine: Any) -> None:
    graphs, fake, reference, _ = affine
    for _ in range(3):  # same shape, new values each time: a replay must see the new values
        x = torch.randn(4, 6)
        _check(graphs.run([x]), reference, x)
    assert graphs.stats == {"captures": 1, "replays": 3, "evictions": 0}
    # The wrapped runner's own per-thread context was never used: only the graph's.
    assert len(fake.contexts) == 1


def test_outputs_are_fresh_tensors(affine: Any) -> None:
    graphs, _, reference, _ = affine
    x1, x2 = torch.randn(4, 6), torch.randn(4, 6)
    first = graphs.run([x1])
    kept = [t.clone() for t in first]
    (entry,) = graphs._graphs.values()
    static = {t.untyped_storage().data_ptr() for t in entry.outputs}
    assert not static & {t.untyped_storage().data_ptr() for t in first}
    graphs.run([x2])  # overwrites the static outputs...
    for a, b in zip(first, kept):  # ...but not what the first call returned
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    first[0].fill_(123.0)  # and writing to a result does not corrupt the next replay
    _check(graphs.run([x2]), reference, x2)


def test_each_shape_gets_its_own_graph_and_context(affine: Any) -> None:
    graphs, fake, reference, _ = affine
    a, b = torch.randn(2, 6), torch.randn(5, 6)
    graphs.run([a])
    graphs.run([b])
    assert graphs.stats["captures"] == 2 and len(fake.contexts) == 2
    name = reference.input_names[0]
    assert {c._c.shapes[name] for c in fake.contexts} == {(2, 6), (5, 6)}
    # Replaying the first shape after capturing the second: its context still holds its own
    # shapes, which a context shared between graphs would not.
    a2 = torch.randn(2, 6)
    _check(graphs.run([a2]), reference, a2)
    assert graphs.stats["captures"] == 2


def test_least_recently_used_graph_is_dropped(affine: Any) -> None:
    graphs, _, reference, driver = affine  # max_graphs=2
    shape = {n: torch.randn(n, 6) for n in (1, 2, 3, 4)}
    key = lambda n: (((n, 6), torch.float32),)  # noqa: E731
    graphs.run([shape[1]])
    graphs.run([shape[2]])
    graphs.run([shape[1]])  # 1 is now the most recently used
    syncs = driver.syncs
    graphs.run([shape[3]])  # drops 2
    assert graphs.shapes == [key(1), key(3)]
    assert graphs.stats["evictions"] == 1
    assert driver.syncs > syncs  # waited for pending replays before freeing the dropped graph
    graphs.run([shape[2]])  # recaptured, drops 1
    assert graphs.shapes == [key(3), key(2)]
    assert graphs.stats == {"captures": 4, "replays": 5, "evictions": 2}
    x = torch.randn(3, 6)
    _check(graphs.run([x]), reference, x)
    graphs.reset()
    assert graphs.shapes == []


def test_captures_and_drops_are_logged_with_their_shapes(affine: Any, caplog: pytest.LogCaptureFixture) -> None:
    graphs, _, _, _ = affine  # max_graphs=2
    with caplog.at_level(logging.INFO, logger="torch_trt_module.backends._cudagraphs"):
        for n in (1, 2, 3):
            graphs.run([torch.randn(n, 6)])
    assert [r.getMessage() for r in caplog.records] == [
        "CUDA graphs: captured a graph for input shapes x=(1, 6) (1 kept)",
        "CUDA graphs: captured a graph for input shapes x=(2, 6) (2 kept)",
        "CUDA graphs: dropped the graph for input shapes [(1, 6)] (least recently used; max_graphs=2)",
        "CUDA graphs: captured a graph for input shapes x=(3, 6) (2 kept)",
    ]


def test_a_tensorrt_context_which_cannot_say_whether_it_is_capturable_is_captured() -> None:
    # tensorrt_lean's IExecutionContext has no is_stream_capturable (TensorRT-RTX's has): not asked.
    runner, knobs, reference, streams = _runner_on_double(Affine(), torch.randn(4, 6), real="tensorrt_lean")
    graphs = CudaGraphRunner(runner, device="cpu", driver=RecordingGraphs(knobs, streams))
    x = torch.randn(3, 6)
    _check(graphs.run([x]), reference, x)
    assert graphs.stats["captures"] == 1 and knobs.capturable_asked == []


def test_data_dependent_output_cannot_be_captured() -> None:
    runner, knobs, _, streams = _runner_on_double(Masked(), torch.randn(4, 6), dds=("output",))
    graphs = CudaGraphRunner(runner, device="cpu", driver=RecordingGraphs(knobs, streams))
    with pytest.raises(RuntimeFailure, match=r"output 'output' has a data-dependent shape.*cuda_graphs=False"):
        graphs.run([torch.randn(4, 6)])
    assert graphs.shapes == []


def test_threads_share_graphs_safely(affine: Any) -> None:
    graphs, _, reference, _ = affine
    graphs.max_graphs = 3

    def work(i: int) -> None:
        rows = i % 3 + 1  # 1, 2, 3, 1, 2, 3
        for _ in range(5):
            x = torch.randn(rows, 6)
            _check(graphs.run([x]), reference, x)

    in_threads(work, 6)
    assert graphs.stats["captures"] == 3 and graphs.stats["replays"] == 30


def test_mirrors_the_runner_surface(affine: Any) -> None:
    graphs, _, reference, _ = affine
    assert graphs.backend == "tensorrt_rtx"
    assert graphs.device == torch.device("cpu")
    assert [s.name for s in graphs.inputs] == reference.input_names
    assert [s.name for s in graphs.outputs] == reference.output_names


class HostGraphs(HostDriver):
    """TEST DOUBLE of ``TorchCudaGraphs`` for a runner whose work is torch ops on the CPU (no engine
    double to record): ``capture`` runs ``fn`` once and the "graph" re-runs it into the outputs it
    returned then, as a replay rewrites a graph's static outputs from its static inputs."""

    def __init__(self, fail: BaseException | None = None) -> None:
        super().__init__()
        self.fail = fail

    def capture(self, fn: Callable[[], list[torch.Tensor]]) -> tuple[Any, list[torch.Tensor]]:
        if self.fail is not None:
            raise self.fail
        outputs = fn()

        class Replay:
            def replay(self) -> None:
                # A replay's kernels write the static outputs' memory, with no autograd or inference-mode
                # checks: write them as inference mode allows (outputs captured under it are inference tensors).
                news = fn()
                with torch.inference_mode():
                    for static, new in zip(outputs, news):
                        static.copy_(new)

        return Replay(), outputs


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "2", None])
def test_max_graphs_must_be_an_int_of_at_least_one(bad: Any) -> None:
    inner = TorchAffineRunner(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"max_graphs got .*; expected an int >= 1"):
        CudaGraphRunner(inner, device="cpu", max_graphs=bad, driver=HostGraphs())
    assert CudaGraphRunner(inner, device="cpu", max_graphs=1, driver=HostGraphs()).max_graphs == 1
    assert CudaGraphRunner(inner, device="cpu", driver=HostGraphs()).max_graphs == 4  # the documented default


@pytest.mark.parametrize("device, available, why", [
    ("cpu", False, "no CUDA device is available"),
    ("cuda", False, "no CUDA device is available"),
    ("cpu", True, "the module runs on cpu"),
])
def test_without_a_driver_cuda_graphs_need_a_cuda_device_and_say_why(device: str, available: bool, why: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    inner = TorchAffineRunner(torch.device(device))
    with pytest.raises(BackendUnavailable) as err:
        CudaGraphRunner(inner, device=device)
    assert str(err.value) == (f"cuda_graphs=True needs a CUDA device to capture graphs on, but {why}. "
                              "Fix: pass cuda_graphs=False, or run the module on a GPU (device='cuda').")


def test_the_wrapped_runner_must_be_on_the_same_device() -> None:
    with pytest.raises(ValueError, match=r"the wrapped runner is on cpu but device=meta; pass the same device"):
        CudaGraphRunner(TorchAffineRunner(torch.device("cpu")), device="meta", driver=HostGraphs())


def test_a_runner_that_does_not_say_its_device_is_taken_to_be_on_the_given_one() -> None:
    class Inner:  # TEST DOUBLE: the runner surface, no device attribute
        backend, inputs, outputs = "test", [], []

    graphs = CudaGraphRunner(Inner(), device="cpu", driver=HostGraphs())  # type: ignore[arg-type]
    assert graphs.device == torch.device("cpu")


@pytest.mark.parametrize("captured_in", ["inference_mode", "no_grad", "grad"])
def test_a_graph_captured_in_one_grad_mode_replays_in_every_other(captured_in: str) -> None:
    # A graph captured under torch.inference_mode() held inference tensors as its static inputs, and
    # the next call made outside inference mode failed to copy into them ("Inplace update to
    # inference tensor outside InferenceMode is not allowed").
    modes = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}
    graphs = CudaGraphRunner(TorchAffineRunner(torch.device("cpu")), device="cpu", driver=HostGraphs())
    with modes[captured_in]():
        graphs.run([torch.randn(4, 6)])
    for name, mode in modes.items():
        with mode():
            x = torch.randn(4, 6)
            y, s = graphs.run([x])
        torch.testing.assert_close(y, x * 2 + 1, msg=f"captured under {captured_in}, replayed under {name}")
        assert not y.requires_grad and y.grad_fn is None
    assert graphs.stats["captures"] == 1


def test_a_runner_without_a_dedicated_context_is_captured_as_it_is() -> None:
    # Runners other than TensorRTRunner keep no per-thread state: no dedicated(), no context to check.
    inner = TorchAffineRunner(torch.device("cpu"))
    graphs = CudaGraphRunner(inner, device="cpu", driver=HostGraphs())
    for rows in (4, 4, 2):
        x = torch.randn(rows, 6)
        y, s = graphs.run([x])
        torch.testing.assert_close(y, x * 2 + 1)
        torch.testing.assert_close(s, x.sum(-1))
    assert graphs.stats == {"captures": 2, "replays": 3, "evictions": 0}


def test_a_failed_capture_is_a_runtime_failure_that_names_the_shapes_and_the_fix(affine: Any) -> None:
    graphs, knobs, _, _ = affine
    error = RuntimeError("CUDA error: operation not permitted when stream is capturing")
    graphs._driver = HostGraphs(fail=error)
    with pytest.raises(RuntimeFailure) as err:
        graphs.run([torch.randn(3, 6)])
    assert str(err.value) == (
        "could not capture a CUDA graph of the engine for input shapes x=(3, 6): CUDA error: operation not "
        "permitted when stream is capturing. Engines with data-dependent output shapes, or TensorRT-RTX engines "
        "built without REQUIRE_USER_ALLOCATION, cannot be captured. Fix: pass cuda_graphs=False.")
    assert err.value.__cause__ is error and graphs.shapes == []
    failure = RuntimeFailure("raised by the capture itself")  # passed on as it is
    graphs._driver = HostGraphs(fail=failure)
    with pytest.raises(RuntimeFailure) as err2:
        graphs.run([torch.randn(3, 6)])
    assert err2.value is failure


def test_capture_failures_name_every_input_s_shape() -> None:
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx supplies the real classes the double mirrors")
    from .trt_double import HostStreams, Knobs, doubles

    inputs = [TensorSpec("a", "float32", ("b", 4), (1, 4), (2, 4), (8, 4)),
              TensorSpec("b", "float32", ("c", 4), (1, 4), (1, 4), (8, 4))]
    outputs = [TensorSpec("y", "float32", ("b", 4))]
    knobs, streams = Knobs(), HostStreams()
    fake = doubles(trt)[0](inputs, outputs, lambda f: {"y": f["a"] + f["b"]}, knobs=knobs, streams=streams)
    runner = TensorRTRunner(fake, inputs, outputs, "cpu", trt=trt, streams=streams)
    graphs = CudaGraphRunner(runner, device="cpu", driver=HostGraphs(fail=RuntimeError("no")))
    with pytest.raises(RuntimeFailure, match=r"for input shapes a=\(3, 4\), b=\(1, 4\): no\. "):
        graphs.run([torch.ones(3, 4), torch.ones(1, 4)])


def test_a_context_tensorrt_rtx_cannot_capture_is_refused_with_the_fix(affine: Any) -> None:
    graphs, knobs, reference, driver = affine
    knobs.stream_capturable = False  # a TensorRT-RTX engine built without REQUIRE_USER_ALLOCATION
    with pytest.raises(RuntimeFailure) as err:
        graphs.run([torch.randn(3, 6)])
    assert str(err.value) == (
        "TensorRT says this execution context cannot be captured into a CUDA graph (input shapes x=(3, 6)); a "
        "TensorRT-RTX engine must be built with BuilderFlag.REQUIRE_USER_ALLOCATION. Fix: pass cuda_graphs=False, "
        "or rebuild the engine with that flag.")
    assert knobs.capturable_asked == [driver.stream_handle()] and graphs.shapes == []
    knobs.stream_capturable = True
    x = torch.randn(3, 6)
    _check(graphs.run([x]), reference, x)


def test_an_empty_batch_is_captured_not_mistaken_for_a_data_dependent_shape() -> None:
    runner, knobs, reference, streams = _runner_on_double(Affine(), torch.randn(4, 6), dynamic={"x": {0: (0, 4, 8)}})
    graphs = CudaGraphRunner(runner, device="cpu", driver=RecordingGraphs(knobs, streams))
    x = torch.randn(0, 6)
    _check(graphs.run([x]), reference, x)
    assert graphs.stats["captures"] == 1


def test_a_graph_keeps_its_runner_and_context_alive_until_it_is_dropped(affine: Any) -> None:
    import gc
    import weakref

    graphs, _, _, _ = affine
    made: list[Any] = []
    dedicated = graphs.inner.dedicated

    def tracked() -> Any:
        runner, engine = dedicated()
        made.append((weakref.ref(runner), weakref.ref(engine)))
        return runner, engine

    graphs.inner.dedicated = tracked  # type: ignore[method-assign]
    graphs.run([torch.randn(3, 6)])
    gc.collect()
    ((runner, engine),) = made
    # The graph's kernels use the dedicated context: it must live as long as the graph does.
    assert runner() is not None and engine() is not None
    graphs.reset()
    gc.collect()
    assert runner() is None and engine() is None


def test_refit_drops_the_graphs_and_the_next_call_captures_over_the_new_weights() -> None:
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx supplies the real classes the double mirrors")
    from .trt_double import HostStreams, Knobs, doubles, runtime_module

    inputs = [TensorSpec("x", "float32", ("b", 3), (1, 3), (2, 3), (4, 3))]
    outputs = [TensorSpec("y", "float32", ("b", 2))]
    knobs, streams = Knobs(), HostStreams()
    fake = doubles(trt)[0](inputs, outputs, lambda feeds, w: {"y": feeds["x"] @ w["w"].T + w["b"]}, knobs=knobs,
                           streams=streams, weights={"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2)})
    runner = TensorRTRunner(fake, inputs, outputs, "cpu", trt=runtime_module(trt), streams=streams)
    driver = RecordingGraphs(knobs, streams)
    graphs = CudaGraphRunner(runner, device="cpu", driver=driver)
    x = torch.ones(2, 3)
    torch.testing.assert_close(graphs.run([x])[0], torch.tensor([[3.0, 12.0], [3.0, 12.0]]))
    syncs = driver.syncs
    new = {"w": torch.ones(2, 3), "b": torch.tensor([1.0, 2.0])}
    assert graphs.refit(new) is graphs and graphs.inner is runner
    assert graphs.shapes == [] and driver.syncs > syncs and knobs.refits == [["b", "w"]]
    torch.testing.assert_close(graphs.run([x])[0], torch.tensor([[4.0, 5.0], [4.0, 5.0]]))
    assert graphs.stats["captures"] == 2


def test_refit_of_a_runner_that_cannot_take_weights_says_so() -> None:
    graphs = CudaGraphRunner(TorchAffineRunner(torch.device("cpu")), device="cpu", driver=HostGraphs())
    graphs.run([torch.randn(2, 6)])
    with pytest.raises(RuntimeFailure, match=r"^the test runner cannot take new weights$"):
        graphs.refit({"w": torch.zeros(1)})
    assert graphs.shapes == [(((2, 6), torch.float32),)]  # nothing dropped


# --------------------------------------------------------------------------- real CUDA graphs

class TorchAffineRunner:
    """TEST DOUBLE of a runner whose work is torch kernels (capturable without TensorRT)."""

    backend = "test"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.inputs = [TensorSpec("x", "float32", ("b", 6), (1, 6), (4, 6), (8, 6))]
        self.outputs = [TensorSpec("y", "float32", ("b", 6)), TensorSpec("s", "float32", ("b",))]
        self.calls = 0

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self.calls += 1
        (x,) = inputs
        return [x * 2 + 1, x.sum(-1)]


@pytest.mark.gpu
def test_real_cuda_graph_capture_and_replay() -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    inner = TorchAffineRunner(dev)
    graphs = CudaGraphRunner(inner, device=dev, max_graphs=2)
    for rows in (4, 4, 2, 8, 4):
        x = torch.randn(rows, 6, device=dev)
        y, s = graphs.run([x])
        torch.testing.assert_close(y, x * 2 + 1)
        torch.testing.assert_close(s, x.sum(-1))
    # 4 captured, replayed; 2 captured; 8 captured, dropping 4; 4 captured again, dropping 2.
    assert graphs.stats == {"captures": 4, "replays": 5, "evictions": 2}
    # Python ran only for warm-ups and captures (two calls each), never for a replay.
    assert inner.calls == 2 * graphs.stats["captures"]
    first = graphs.run([torch.ones(8, 6, device=dev)])[0]
    graphs.run([torch.zeros(8, 6, device=dev)])
    torch.cuda.synchronize()
    assert bool((first == 3).all())  # not overwritten by the next replay


@pytest.mark.gpu
def test_real_cuda_graphs_from_another_stream() -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    graphs = CudaGraphRunner(TorchAffineRunner(dev), device=dev)
    side = torch.cuda.Stream(dev)
    with torch.cuda.stream(side):
        x = torch.randn(4, 6, device=dev)
        y, _ = graphs.run([x])
        z = y + 0  # work the caller enqueues on its own stream after run()
    side.synchronize()
    torch.testing.assert_close(z, x * 2 + 1)


@pytest.mark.gpu
def test_real_cuda_graphs_threads_with_their_own_streams() -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    graphs = CudaGraphRunner(TorchAffineRunner(dev), device=dev)

    def work(seed: int) -> None:
        stream = torch.cuda.Stream(dev)
        gen = torch.Generator(device=dev).manual_seed(seed)
        with torch.cuda.stream(stream):
            for _ in range(50):  # one shape: every thread replays the same graph and buffers
                x = torch.randn(4, 6, device=dev, generator=gen)
                y, s = graphs.run([x])
                torch.testing.assert_close(y, x * 2 + 1)
                torch.testing.assert_close(s, x.sum(-1))

    in_threads(work, 4)
    assert graphs.stats == {"captures": 1, "replays": 200, "evictions": 0}


@pytest.mark.gpu
@pytest.mark.trt_runtime
def test_real_tensorrt_engine_under_cuda_graphs() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval().cuda()
    module = ttm.compile(model, torch.randn(4, 16, device="cuda"), cache=False)
    inner = module.runner
    assert isinstance(inner, TensorRTRunner)
    graphs = CudaGraphRunner(inner, device=inner.device)
    for rows in (4, 4, 7):
        x = torch.randn(rows, 16, device="cuda")
        (got,) = graphs.run([x])
        torch.testing.assert_close(got, inner.run([x])[0], rtol=1e-3, atol=1e-3)
    assert graphs.stats["captures"] == 2


def test_a_module_over_graphs_replays_them_at_every_call_and_never_takes_the_inner_runners_call(
        affine: Any) -> None:
    # TRTModule's fast path calls a runner's call_for(shape) where it has one (OnnxRuntimeRunner
    # does); a graph runner that handed out its inner runner's would have the module skip its graphs
    # from the second call on.
    graphs, knobs, reference, driver = affine
    graphs.inner.call_for = lambda shapes: graphs.inner.run  # a runner that plans its calls
    module = ttm.TRTModule(reference.engine, runner=graphs)
    for _ in range(4):
        x = torch.randn(4, 6)
        _check(list(module(x)), reference, x)
    assert graphs.stats == {"captures": 1, "replays": 4, "evictions": 0}


# --------------------------------------------------------------------------- the caller's dtypes at both ends

class HalfRunner:
    """TEST DOUBLE of an fp16 engine's runner (torch ops): it records the dtypes it is given."""

    backend = "test"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.inputs = [TensorSpec("x", "float16", ("b", 6), (1, 6), (4, 6), (8, 6))]
        self.outputs = [TensorSpec("y", "float16", ("b", 6))]
        self.seen: list[torch.dtype] = []

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        (x,) = inputs
        self.seen.append(x.dtype)
        return [x * 2 + 1]


def _half_expected(x: torch.Tensor) -> torch.Tensor:
    return (x.half() * 2 + 1).float()


def test_an_fp32_callers_input_is_cast_by_the_copy_in_and_the_output_comes_back_in_its_dtype() -> None:
    inner = HalfRunner(torch.device("cpu"))
    graphs = CudaGraphRunner(inner, device="cpu", driver=HostGraphs(), out_dtypes=[torch.float32])
    assert graphs.takes_caller_dtypes and graphs.out_dtypes == [torch.float32]
    for _ in range(3):  # a capture, then replays: each copy-in casts the new values
        x = torch.randn(4, 6)
        (y,) = graphs.run([x])
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, _half_expected(x), rtol=0, atol=0)
    assert set(inner.seen) == {torch.float16}  # the engine only ever saw its own dtype
    assert graphs.stats["captures"] == 1 and graphs.stats["replays"] == 3
    x = torch.randn(2, 6)
    (plain,) = graphs.plain([x])  # the same casts without a graph
    assert plain.dtype == torch.float32 and graphs.stats["captures"] == 1
    torch.testing.assert_close(plain, _half_expected(x), rtol=0, atol=0)
    # an input already in the engine's dtype (a module's full path may pass one) is a graph of its own
    (y16,) = graphs.run([x.half()])
    torch.testing.assert_close(y16, _half_expected(x), rtol=0, atol=0)


def test_without_out_dtypes_the_outputs_keep_the_engines_dtype_and_a_wrong_count_is_refused() -> None:
    graphs = CudaGraphRunner(HalfRunner(torch.device("cpu")), device="cpu", driver=HostGraphs())
    (y,) = graphs.run([torch.randn(4, 6)])
    assert y.dtype == torch.float16 and graphs.out_dtypes == [torch.float16]
    with pytest.raises(ValueError, match=r"out_dtypes has 2 dtypes for the runner's 1 outputs; pass one per output"):
        CudaGraphRunner(HalfRunner(torch.device("cpu")), device="cpu", driver=HostGraphs(),
                        out_dtypes=[torch.float32, torch.float32])


def _fp16_module() -> ttm.TRTModule:
    """A small fp16 module on ONNX Runtime (fp32 in and out, fp16 inside), whose runner tests wrap."""
    pytest.importorskip("onnxruntime")
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU()).eval()
    return ttm.compile(model, torch.randn(4, 6), precision="fp16", backend="onnxruntime", cache=False)


def _calls_in_fp32(module: ttm.TRTModule, ref: ttm.TRTModule, calls: int = 3) -> None:
    """fp32 in, fp32 out, and the same values as the module's own runner, call after call."""
    for _ in range(calls):
        x = torch.randn(4, 6)
        y = module(x)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, ref(x), rtol=0, atol=0)


def test_an_fp16_module_over_graphs_leaves_the_casts_to_them_on_both_paths() -> None:
    # An fp16 engine called with fp32 tensors: the module passes them on uncast (its full path and
    # its fast path), the graph's copy-in casts, and the outputs come back fp32 from the graph.
    ref = _fp16_module()
    assert ref.input_specs[0].dtype == "float16"
    graphs = CudaGraphRunner(ref.runner, device="cpu", driver=HostGraphs(), out_dtypes=[torch.float32])
    given: list[torch.dtype] = []
    run = graphs.run
    graphs.run = lambda inputs: given.append(inputs[0].dtype) or run(inputs)  # type: ignore[method-assign]
    module = ttm.TRTModule(ref.engine, runner=graphs)
    _calls_in_fp32(module, ref)
    assert given == [torch.float32] * 3
    assert graphs.stats == {"captures": 1, "replays": 3, "evictions": 0}


@pytest.mark.gpu
def test_real_cuda_graph_casts_the_callers_dtypes_at_both_ends() -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    inner = HalfRunner(dev)
    graphs = CudaGraphRunner(inner, device=dev, out_dtypes=[torch.float32])
    for _ in range(3):
        x = torch.randn(4, 6, device=dev)
        (y,) = graphs.run([x])
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, _half_expected(x), rtol=0, atol=0)
    assert set(inner.seen) == {torch.float16} and graphs.stats["replays"] == 3


def test_a_graph_runner_made_without_the_modules_out_dtypes_still_gives_the_caller_its_dtype() -> None:
    # A runner built by hand (no out_dtypes) returns the engine's fp16: the module casts around it, as
    # it casts around any runner, so the caller still gets fp32.
    ref = _fp16_module()
    graphs = CudaGraphRunner(ref.runner, device="cpu", driver=HostGraphs())
    module = ttm.TRTModule(ref.engine, runner=graphs)
    _calls_in_fp32(module, ref)


# --------------------------------------------------------------------------- the static inputs' layout (an experiment)

class ImageRunner:
    """TEST DOUBLE of a runner that prefers a channels_last image (the PyTorch runtime's
    ``input_memory_formats``): it records the strides it is given."""

    backend = "test"

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.inputs = [TensorSpec("x", "float32", ("b", 3, 4, 4), (1, 3, 4, 4), (2, 3, 4, 4), (4, 3, 4, 4))]
        self.outputs = [TensorSpec("y", "float32", ("b", 3))]
        self.input_memory_formats = [torch.channels_last]
        self.seen: list[tuple[int, ...]] = []

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        (x,) = inputs
        self.seen.append(x.stride())
        return [x.mean((2, 3)) * 2]


@pytest.mark.parametrize("layout", ["caller", "runner"])
def test_static_inputs_take_the_runner_s_layout_only_when_asked(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cudagraphs, "STATIC_INPUT_LAYOUT", layout)
    inner = ImageRunner()
    graphs = CudaGraphRunner(inner, device="cpu", driver=HostGraphs())
    for _ in range(2):
        x = torch.randn(2, 3, 4, 4)  # the caller's NCHW
        (y,) = graphs.run([x])
        torch.testing.assert_close(y, x.mean((2, 3)) * 2)  # the copy-in transposed, values kept
    nhwc = torch.empty(2, 3, 4, 4).contiguous(memory_format=torch.channels_last).stride()
    want = nhwc if layout == "runner" else (48, 16, 4, 1)
    assert set(inner.seen) == {want}
