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
import threading
from typing import Any, Callable, Iterator, Sequence

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module._errors import BackendUnavailable, RuntimeFailure
from torch_trt_module._spec import TensorSpec
from torch_trt_module.backends._cudagraphs import CudaGraphRunner
from torch_trt_module.backends._tensorrt import TensorRTRunner


# --------------------------------------------------------------------------- test doubles

class RecordingGraphs:
    """TEST DOUBLE of ``TorchCudaGraphs`` for a CPU machine.

    ``capture`` runs ``fn`` but has the engine double record, instead of executing, every
    ``execute_async_v3`` it enqueues (``Knobs.record``), as stream capture records kernels
    without running them. ``replay`` re-issues the recorded calls on the same contexts, which
    read the inputs and write the outputs at the addresses bound at capture time, as a
    graph's kernels do.
    """

    def __init__(self, knobs: Any = None, streams: Any = None) -> None:
        self.syncs = 0
        self.knobs, self.streams = knobs, streams

    def order(self) -> None:
        pass

    @contextlib.contextmanager
    def capture_stream(self) -> Iterator[None]:
        yield

    def synchronize(self) -> None:
        self.syncs += 1

    def stream_handle(self) -> int:
        return 0

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
                      dds: tuple[str, ...] = ()) -> tuple[TensorRTRunner, Any, ttm.TRTModule, Any]:
    """A real TensorRTRunner over the strict engine double (its knobs), and the ONNX Runtime reference."""
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx supplies the real classes the double mirrors")
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
    runner = TensorRTRunner(fake, ex.inputs, ex.outputs, "cpu", trt=trt, backend="tensorrt_rtx", streams=streams)
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


def test_data_dependent_output_cannot_be_captured() -> None:
    runner, knobs, _, streams = _runner_on_double(Masked(), torch.randn(4, 6), dds=("output",))
    graphs = CudaGraphRunner(runner, device="cpu", driver=RecordingGraphs(knobs, streams))
    with pytest.raises(RuntimeFailure, match=r"output 'output' has a data-dependent shape.*cuda_graphs=False"):
        graphs.run([torch.randn(4, 6)])
    assert graphs.shapes == []


def test_threads_share_graphs_safely(affine: Any) -> None:
    graphs, _, reference, _ = affine
    graphs.max_graphs = 3
    errors: list[BaseException] = []

    def work(rows: int) -> None:
        try:
            for _ in range(5):
                x = torch.randn(rows, 6)
                _check(graphs.run([x]), reference, x)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in (1, 2, 3, 1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert graphs.stats["captures"] == 3 and graphs.stats["replays"] == 30


def test_mirrors_the_runner_surface(affine: Any) -> None:
    graphs, _, reference, _ = affine
    assert graphs.backend == "tensorrt_rtx"
    assert graphs.device == torch.device("cpu")
    assert [s.name for s in graphs.inputs] == reference.input_names
    assert [s.name for s in graphs.outputs] == reference.output_names


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
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            stream = torch.cuda.Stream(dev)
            gen = torch.Generator(device=dev).manual_seed(seed)
            with torch.cuda.stream(stream):
                for _ in range(50):  # one shape: every thread replays the same graph and buffers
                    x = torch.randn(4, 6, device=dev, generator=gen)
                    y, s = graphs.run([x])
                    torch.testing.assert_close(y, x * 2 + 1)
                    torch.testing.assert_close(s, x.sum(-1))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
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
