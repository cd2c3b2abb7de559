"""The stream ordering of the CUDA paths (``CudaStreams`` in backends/_tensorrt.py, ``TorchCudaGraphs`` in
backends/_cudagraphs.py) on a machine without a GPU: ``torch.cuda``'s stream API is replaced by
:class:`FakeCuda`, a TEST DOUBLE that records every call (which stream waits for which, which stream is
current, which tensors are recorded on which stream). It shows the order of the calls the adapter makes,
which is its documented contract; nothing about CUDA itself (tests/gpu/ runs these on real streams).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pytest
import torch

from torch_trt_module.backends._cudagraphs import TorchCudaGraphs
from torch_trt_module.backends._tensorrt import CudaStreams

DEVICE = torch.device("cuda", 1)


class FakeStream:
    """TEST DOUBLE of ``torch.cuda.Stream``: a handle, and its calls in the shared log."""

    def __init__(self, cuda: "FakeCuda", handle: int) -> None:
        self.cuda, self.cuda_stream = cuda, handle

    def wait_stream(self, other: "FakeStream") -> None:
        self.cuda.log.append(("wait", self.cuda_stream, other.cuda_stream))

    def __repr__(self) -> str:
        return f"FakeStream({self.cuda_stream})"


class FakeTensor:
    """Only what the adapter calls on the tensors it enqueues for."""

    def __init__(self, cuda: "FakeCuda", name: str) -> None:
        self.cuda, self.name = cuda, name

    def record_stream(self, stream: FakeStream) -> None:
        self.cuda.log.append(("record", self.name, stream.cuda_stream))


class FakeCuda:
    """TEST DOUBLE of the ``torch.cuda`` stream API (installed with monkeypatch): ``current_stream``
    (and ``torch._C._cuda_getCurrentStream``, the raw id it reads), ``Stream``, ``stream``, ``synchronize``, ``CUDAGraph`` and ``graph``, logging each call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, caller: int) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.current = FakeStream(self, caller)
        self.created: list[FakeStream] = []
        self.captured_into: list[Any] = []  # the graphs torch.cuda.graph captured into
        self.stream_objects = 0  # current_stream() calls (each makes a Stream object)
        cuda = self

        def current_stream(device: Any = None) -> FakeStream:
            assert torch.device(device) == DEVICE, f"the stream of {device}, not of the runner's {DEVICE}"
            cuda.stream_objects += 1
            return cuda.current

        def raw_current_stream(index: int) -> tuple[int, int, int]:  # torch._C's: (id, device index, type)
            assert index == DEVICE.index, f"the stream of device {index}, not of the runner's {DEVICE}"
            return cuda.current.cuda_stream, index, 1

        def new_stream(device: Any = None, *args: Any, **kwargs: Any) -> FakeStream:
            assert torch.device(device) == DEVICE, f"a stream on {device}, not on the runner's {DEVICE}"
            stream = FakeStream(cuda, 100 + len(cuda.created))
            cuda.created.append(stream)
            return stream

        @contextlib.contextmanager
        def use(stream: FakeStream) -> Iterator[None]:
            before, cuda.current = cuda.current, stream
            cuda.log.append(("enter", stream.cuda_stream))
            try:
                yield
            finally:
                cuda.current = before
                cuda.log.append(("exit", stream.cuda_stream))

        def synchronize(device: Any = None) -> None:
            cuda.log.append(("synchronize", torch.device(device)))

        class Graph:
            pass

        @contextlib.contextmanager
        def graph(g: Any, *, stream: FakeStream, capture_error_mode: str) -> Iterator[None]:
            cuda.log.append(("capture", stream.cuda_stream, capture_error_mode))
            cuda.captured_into.append(g)
            with use(stream):
                yield

        monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
        monkeypatch.setattr(torch._C, "_cuda_getCurrentStream", raw_current_stream)
        monkeypatch.setattr(torch.cuda, "Stream", new_stream)
        monkeypatch.setattr(torch.cuda, "stream", use)
        monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", graph)


# --------------------------------------------------------------------------- CudaStreams (the TensorRT runner's)

def test_on_the_caller_s_own_stream_the_work_is_enqueued_there_with_nothing_else() -> None:
    with pytest.MonkeyPatch.context() as mp:
        cuda = FakeCuda(mp, caller=5)
        streams = CudaStreams(DEVICE)
        with streams.enqueue([FakeTensor(cuda, "x")]) as handle:
            assert handle == 5 and cuda.current.cuda_stream == 5
        assert streams.wait(handle) is None
        assert cuda.log == [] and cuda.created == []  # no side stream, no waits, no record_stream


def test_on_the_legacy_default_stream_a_side_stream_ordered_both_ways_takes_the_work() -> None:
    with pytest.MonkeyPatch.context() as mp:
        cuda = FakeCuda(mp, caller=0)
        streams = CudaStreams(DEVICE)
        for _ in range(2):
            with streams.enqueue([FakeTensor(cuda, "x"), FakeTensor(cuda, "y")]) as handle:
                assert handle == 100 and cuda.current.cuda_stream == 100  # enqueued on the side stream, current
                cuda.log.append(("work", handle))
            assert cuda.current.cuda_stream == 0
        assert len(cuda.created) == 1  # one side stream, reused
        once = [("wait", 100, 0), ("enter", 100), ("work", 100), ("exit", 100), ("wait", 0, 100),
                ("record", "x", 100), ("record", "y", 100)]
        assert cuda.log == once + once


def test_the_caller_s_stream_is_ordered_after_the_side_stream_even_when_the_work_fails() -> None:
    with pytest.MonkeyPatch.context() as mp:
        cuda = FakeCuda(mp, caller=0)
        streams = CudaStreams(DEVICE)
        with pytest.raises(RuntimeError, match="enqueue failed"):
            with streams.enqueue([FakeTensor(cuda, "x")]):
                raise RuntimeError("enqueue failed")
        assert cuda.log == [("wait", 100, 0), ("enter", 100), ("exit", 100), ("wait", 0, 100), ("record", "x", 100)]
        assert cuda.current.cuda_stream == 0


# --------------------------------------------------------------------------- TorchCudaGraphs (the CUDA graph driver)

def test_the_graph_driver_captures_on_its_side_stream_ordered_both_ways() -> None:
    with pytest.MonkeyPatch.context() as mp:
        cuda = FakeCuda(mp, caller=7)
        driver = TorchCudaGraphs(DEVICE)
        assert driver.stream_handle() == 100 and len(cuda.created) == 1
        with driver.capture_stream():
            assert cuda.current.cuda_stream == 100
            graph, outputs = driver.capture(lambda: [torch.ones(2)])
        assert isinstance(graph, torch.cuda.CUDAGraph) and torch.equal(outputs[0], torch.ones(2))
        assert cuda.captured_into == [graph]  # the graph returned is the one captured into
        # thread_local: other threads' CUDA calls during the capture neither invalidate it nor fail.
        assert cuda.log == [("wait", 100, 7), ("enter", 100), ("capture", 100, "thread_local"), ("enter", 100),
                            ("exit", 100), ("exit", 100), ("wait", 7, 100)]
        cuda.log.clear()
        driver.synchronize()
        assert cuda.log == [("synchronize", DEVICE)]


def test_the_graph_driver_orders_a_call_from_another_stream_after_the_last_one() -> None:
    with pytest.MonkeyPatch.context() as mp:
        cuda = FakeCuda(mp, caller=7)
        driver = TorchCudaGraphs(DEVICE)
        driver.order()
        driver.order()  # the same stream again: already ordered, seen from its raw id alone
        assert cuda.log == [] and cuda.stream_objects == 1
        seven, cuda.current = cuda.current, FakeStream(cuda, 8)  # another thread's stream
        driver.order()
        assert cuda.log == [("wait", 8, 7)]
        cuda.current = seven
        driver.order()
        assert cuda.log == [("wait", 8, 7), ("wait", 7, 8)]


def test_without_a_driver_a_cuda_graph_runner_on_a_gpu_captures_through_torch_cuda_graphs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from torch_trt_module.backends._cudagraphs import CudaGraphRunner

    class Inner:  # TEST DOUBLE: the runner surface only
        backend, device, inputs, outputs = "test", DEVICE, [], []

    FakeCuda(monkeypatch, caller=7)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    graphs = CudaGraphRunner(Inner(), device=DEVICE)  # type: ignore[arg-type]
    driver = graphs._driver
    assert isinstance(driver, TorchCudaGraphs) and driver.device == DEVICE and driver.stream_handle() == 100
