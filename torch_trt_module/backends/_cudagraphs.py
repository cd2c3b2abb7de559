"""CUDA graphs over a TensorRT runner: capture one graph per input-shape signature, replay it.

A CUDA graph replays the kernels TensorRT enqueued at capture time, with the same
arguments: the same shapes, the same tensor addresses, the same execution context.
So :class:`CudaGraphRunner`

- keys graphs by the inputs' shapes and dtypes and keeps the few most recently used
  (an LRU); a new shape captures a new graph, and the least recently used one is
  dropped once there are more than ``max_graphs``;
- gives each graph its own static input buffers (the caller's inputs are copied in
  before each replay), its own static outputs (allocated during capture, from the
  graph's private memory pool) and its own execution context, which nothing else
  uses, so no later ``set_input_shape`` can change what a captured graph reads;
- takes the caller's dtypes at both ends (``takes_caller_dtypes``): the static inputs
  have the engine's dtypes, and the copy into them casts (an fp32 input to an fp16
  engine: one kernel, where a cast before the copy is two, and a launch more on the
  host); outputs come back in ``out_dtypes``, cast inside the graph. On mobilenet_v3_small
  at batch 32 (H100) the module's own casts around the graph cost its fp16 call 0.06 ms
  of 0.58 (benchmarks/RESULTS.md);
- enqueues once after setting the shapes and waits, before capturing (TensorRT
  does deferred, shape-dependent work at the first enqueue after a shape change);
- returns fresh tensors (clones of the static outputs), never the static buffers,
  which the next replay overwrites;
- replays on the caller's current stream (copy-in, replay, copy-out: three
  launches), under a lock; when a call comes from another stream than the last
  one (another thread), that stream first waits for the last one's work, since
  the static buffers are shared. Warm-up and capture use a side stream, as CUDA
  graph capture requires.

Engines with data-dependent output shapes cannot be captured (their output size is
only known after running); nor can a TensorRT-RTX engine built without
``BuilderFlag.REQUIRE_USER_ALLOCATION`` (its context allocates while it runs). Both
fail with a clear :class:`RuntimeFailure` at the first call of that shape.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch

from .._core.spec import TensorSpec
from .._errors import BackendUnavailable, RuntimeFailure

__all__ = ["FORWARDED", "CudaGraphRunner", "GraphDriver", "SaysWhatRuns", "TorchCudaGraphs", "shape_key"]

log = logging.getLogger(__name__)

ShapeKey = tuple[tuple[tuple[int, ...], torch.dtype], ...]
#: The wrapped runner's attributes a graph runner answers for it (TorchRunner's description of its program).
FORWARDED = frozenset({"program_format", "weight_names"})
#: Off by default: "runner" makes static inputs in the runner's input_memory_formats (bench_latency.py --graph-inputs).
STATIC_INPUT_LAYOUT = "caller"


def shape_key(inputs: Sequence[torch.Tensor]) -> ShapeKey:
    """The signature a graph is captured for: each input's shape and dtype."""
    return tuple((tuple(t.shape), t.dtype) for t in inputs)


class Runner(Protocol):
    """What CudaGraphRunner wraps: TensorRTRunner, or anything with the same surface."""

    backend: str
    device: torch.device
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...


class Graph(Protocol):
    def replay(self) -> None: ...


class GraphDriver(Protocol):
    """How graphs are captured and where their work runs. :class:`TorchCudaGraphs` is the real
    one; tests pass a CPU double that stands in for capture and replay."""

    def order(self) -> None:
        """Order the caller's stream after the previous call's work (made on any stream)."""

    def capture_stream(self) -> contextlib.AbstractContextManager[None]:
        """Run the block (warm-up and capture) on the capture stream, after the caller's
        pending work and before its next."""

    def synchronize(self) -> None:
        """Wait for all work that may use a graph's buffers (before freeing them)."""

    def stream_handle(self) -> int: ...

    def capture(self, fn: Callable[[], list[torch.Tensor]]) -> tuple[Graph, list[torch.Tensor]]:
        """Capture ``fn`` (which enqueues work and returns its output tensors) into a graph."""

    def capturing(self) -> bool:
        """Whether the caller's stream is being captured (into the caller's own graph)."""

    def time(self, fn: Callable[[], list[torch.Tensor]], *, repeats: int, label: str
             ) -> tuple[list[torch.Tensor], float, float]:
        """Run ``fn`` ``repeats`` times on the caller's stream, each after a sync: its last outputs,
        and the medians of the host's time to enqueue it and of the wall time to its end, in
        seconds. ``label`` ("plain" or "graph") says what ``fn`` runs."""


class TorchCudaGraphs:
    """CUDA graphs through ``torch.cuda.CUDAGraph``: captured on a side stream of ``device``,
    replayed on the caller's stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._last: torch.cuda.Stream | None = None
        self._last_id: Any = None  # the last stream's raw (id, device index, type): see order()
        self._raw = device.index is not None and hasattr(torch._C, "_cuda_getCurrentStream")

    def order(self) -> None:
        # Before every copy-in, on the host's path to the GPU's start: the raw stream id is compared
        # first, and a Stream object (about 2 µs) is made only when the stream is another one.
        now = torch._C._cuda_getCurrentStream(self.device.index) if self._raw else None
        if now is not None and now == self._last_id:
            return
        current = torch.cuda.current_stream(self.device)
        if self._last is not None and self._last != current:
            # The static buffers are shared: another stream's replay (another thread's) must
            # be done with them before this stream copies new inputs in.
            current.wait_stream(self._last)
        self._last, self._last_id = current, now

    @contextlib.contextmanager
    def capture_stream(self) -> Iterator[None]:
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            yield
        # The caller's next work (and the reuse of its inputs' memory, which the caching
        # allocator gives only to work on the caller's stream) comes after the warm-up.
        caller.wait_stream(self.stream)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def capture(self, fn: Callable[[], list[torch.Tensor]]) -> tuple[Graph, list[torch.Tensor]]:
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls other threads make meanwhile (their own inference) must
        # not invalidate this capture, nor fail because of it.
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            outputs = fn()
        return graph, outputs

    def capturing(self) -> bool:
        return bool(torch.cuda.is_current_stream_capturing())

    def time(self, fn: Callable[[], list[torch.Tensor]], *, repeats: int, label: str
             ) -> tuple[list[torch.Tensor], float, float]:
        stream = torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        hosts, walls = [], []
        outputs: list[torch.Tensor] = []
        for _ in range(repeats):
            stream.synchronize()  # an idle GPU: the wall time is this call's alone
            start.record(stream)
            t0 = time.perf_counter()
            outputs = fn()
            hosts.append(time.perf_counter() - t0)
            end.record(stream)
            end.synchronize()
            walls.append(start.elapsed_time(end) / 1e3)
        return outputs, statistics.median(hosts), statistics.median(walls)


def _dedicated(inner: Runner) -> tuple[Runner, Any]:
    """A runner for one graph with its own execution context (TensorRTRunner.dedicated), or
    ``inner`` itself with no context to check (other runners keep no per-thread state)."""
    dedicated = getattr(inner, "dedicated", None)
    if dedicated is None:
        return inner, None
    return dedicated()  # type: ignore[no-any-return]


@dataclass
class _Captured:
    graph: Graph
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    keep: list[Any] = field(default_factory=list)  # the runner and context the graph's kernels use


class SaysWhatRuns:
    """What a graph runner answers for the runner it wraps (``inner``): the description of its
    program, with ``GRAPHS`` said after it. Graphs change how a program is launched, not what it is."""

    inner: Any
    backend: str
    GRAPHS = "CUDA graphs"

    def __getattr__(self, name: str) -> Any:
        # Only FORWARDED: a runner's planned calls (call_for) would bypass the graphs.
        inner = self.__dict__.get("inner")
        if inner is None or name not in FORWARDED:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(inner, name)

    @property
    def optimized(self) -> str:
        """What the wrapped runtime does with its program (``TorchRunner.optimized``), and the graphs."""
        return f"{getattr(self.inner, 'optimized', self.backend)}, {self.GRAPHS}"


class CudaGraphRunner(SaysWhatRuns):
    """Wraps a TensorRT runner: one CUDA graph per input-shape signature, replayed over
    static buffers (this module's docstring says how and why).

    Args:
        inner: the runner to capture (``TensorRTRunner``, or one with the same surface).
        device: the CUDA device it runs on.
        max_graphs: how many shape signatures keep a graph (least recently used dropped).
        driver: how graphs are captured; None is :class:`TorchCudaGraphs`, the real one.
        out_dtypes: the dtypes to return the outputs in, cast inside the graph (a module's user
            dtypes around an fp16 engine); None: the engine's.

    Example:
        >>> runner = TensorRTRunner(engine, inputs, outputs, "cuda:0", trt=trt)   # doctest: +SKIP
        >>> graphs = CudaGraphRunner(runner, device="cuda:0")                      # doctest: +SKIP
        >>> out = graphs.run([x])   # captures at the first call of a shape, replays after  # doctest: +SKIP
    """

    #: run() takes inputs in any dtype the copy casts from and returns outputs in ``out_dtypes``.
    takes_caller_dtypes = True

    def __init__(self, inner: Runner, *, device: str | torch.device, max_graphs: int = 4,
                 driver: GraphDriver | None = None, out_dtypes: Sequence[torch.dtype] | None = None) -> None:
        self.inner = inner
        self.device = torch.device(device)
        if not isinstance(max_graphs, int) or isinstance(max_graphs, bool) or max_graphs < 1:
            raise ValueError(f"max_graphs got {max_graphs!r}; expected an int >= 1")
        if driver is None:
            if self.device.type != "cuda" or not torch.cuda.is_available():
                where = "no CUDA device is available" if not torch.cuda.is_available() else \
                    f"the module runs on {self.device}"
                raise BackendUnavailable(
                    f"cuda_graphs=True needs a CUDA device to capture graphs on, but {where}. "
                    "Fix: pass cuda_graphs=False, or run the module on a GPU (device='cuda').")
            driver = TorchCudaGraphs(self.device)
        inner_device = getattr(inner, "device", self.device)
        if torch.device(inner_device) != self.device:
            raise ValueError(f"the wrapped runner is on {inner_device} but device={self.device}; pass the same device")
        self.backend: str = inner.backend
        self.inputs = list(inner.inputs)
        self.outputs = list(inner.outputs)
        self._in_dtypes = [s.torch_dtype for s in self.inputs]
        engine_out = [s.torch_dtype for s in self.outputs]
        if out_dtypes is not None and len(out_dtypes) != len(engine_out):
            raise ValueError(f"out_dtypes has {len(out_dtypes)} dtypes for the runner's {len(engine_out)} outputs; "
                             "pass one per output")
        #: The dtypes run() returns the outputs in (the caller's; the engine's where none was given).
        self.out_dtypes = list(out_dtypes) if out_dtypes is not None else engine_out
        self._out_cast = self.out_dtypes != engine_out
        self.max_graphs = max_graphs
        self._driver = driver
        self._graphs: OrderedDict[ShapeKey, _Captured] = OrderedDict()
        self._lock = threading.Lock()
        #: Counters for tests and benchmarks: graphs captured, replays, graphs dropped.
        self.stats = {"captures": 0, "replays": 0, "evictions": 0}

    @property
    def shapes(self) -> list[ShapeKey]:
        """The shape signatures that have a graph, least recently used first."""
        with self._lock:
            return list(self._graphs)

    def run(self, inputs: Sequence[torch.Tensor], key: ShapeKey | None = None) -> list[torch.Tensor]:
        """Run on validated, contiguous inputs on ``self.device``, in the engine's dtypes or ones the
        copy-in casts from; returns new output tensors, in ``out_dtypes``. ``key``: the inputs'
        :func:`shape_key`, where the caller has it."""
        if key is None:
            key = shape_key(inputs)
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture(key, inputs)
            else:
                self._graphs.move_to_end(key)
            self._driver.order()
            # inference mode: the one mode that writes to inference tensors too (see _capture); a
            # caller's own torch.inference_mode() needs no second one around the copies
            with contextlib.nullcontext() if torch.is_inference_mode_enabled() else torch.inference_mode():
                for static, t in zip(entry.inputs, inputs):
                    static.copy_(t, non_blocking=True)
            entry.graph.replay()
            # Fresh tensors: the static outputs are overwritten by the next replay.
            outs = [o.clone() for o in entry.outputs]
            self.stats["replays"] += 1
            return outs

    def plain(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """What run() computes, without a graph: the wrapped runner, with the casts at both ends."""
        inputs = [t if t.dtype == d else t.to(d) for t, d in zip(inputs, self._in_dtypes)]
        return self._as_out(self.inner.run(inputs))

    def _as_out(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self._out_cast:
            return outs
        return [o if o.dtype == d else o.to(d) for o, d in zip(outs, self.out_dtypes)]

    def refit(self, values: Any) -> "CudaGraphRunner":
        """New weights for the wrapped runner; the graphs captured over the old ones are dropped."""
        refit = getattr(self.inner, "refit", None)
        if refit is None:
            raise RuntimeFailure(f"the {self.backend} runner cannot take new weights")
        self.reset()
        self.inner = refit(values)
        return self

    def has(self, key: ShapeKey) -> bool:
        """Whether a graph is kept for this shape signature."""
        return key in self._graphs

    def drop(self, key: ShapeKey) -> None:
        """Drop the graph of one shape signature (and its buffers and memory pool), if kept."""
        with self._lock:
            if key in self._graphs:
                self._driver.synchronize()  # no replay may still be using what is freed
                del self._graphs[key]

    def reset(self) -> None:
        """Drop every graph (and its buffers and context)."""
        with self._lock:
            if self._graphs:
                self._driver.synchronize()  # no replay may still be using what is freed
            self._graphs.clear()

    def _capture(self, key: ShapeKey, inputs: Sequence[torch.Tensor]) -> _Captured:
        while len(self._graphs) >= self.max_graphs:
            self._driver.synchronize()
            old, _ = self._graphs.popitem(last=False)
            self.stats["evictions"] += 1
            log.info("CUDA graphs: dropped the graph for input shapes %s (least recently used; max_graphs=%d)",
                     [s for s, _ in old], self.max_graphs)
        runner, engine = _dedicated(self.inner)
        shapes = ", ".join(f"{s.name}={tuple(t.shape)}" for s, t in zip(self.inputs, inputs))
        with self._driver.capture_stream():
            # Each static input is the same kind of tensor as the caller's (an inference tensor or
            # not), and the warm-up and the capture run in the caller's mode, as its plain calls do: a
            # compiled program (Dynamo) guards on both and would compile again for the other kind.
            # The copy-ins are made under inference mode, the one mode that writes to both kinds, so a
            # graph captured under torch.inference_mode() serves calls made outside it.
            static = []
            formats = getattr(self.inner, "input_memory_formats", None) if STATIC_INPUT_LAYOUT == "runner" else None
            for i, (t, dtype) in enumerate(zip(inputs, self._in_dtypes)):
                with torch.inference_mode(t.is_inference()):
                    static.append(torch.empty_like(t, dtype=dtype, memory_format=formats[i] if formats
                                                   else torch.preserve_format))
            with torch.inference_mode():
                for s, t in zip(static, inputs):
                    s.copy_(t)
            # TensorRT defers shape-dependent work to the first enqueue after set_input_shape;
            # that work must not land in the graph, so enqueue once and wait first.
            runner.run(static)
            self._driver.synchronize()
            self._check_capturable(engine, shapes)
            try:
                graph, outputs = self._driver.capture(lambda: self._as_out(runner.run(static)))
            except RuntimeFailure:
                raise
            except Exception as e:  # noqa: BLE001 - CUDA and TensorRT report capture failures many ways
                raise RuntimeFailure(
                    f"could not capture a CUDA graph of the engine for input shapes {shapes}: {e}. "
                    "Engines with data-dependent output shapes, or TensorRT-RTX engines built without "
                    "REQUIRE_USER_ALLOCATION, cannot be captured. Fix: pass cuda_graphs=False.") from e
        entry = _Captured(graph, static, list(outputs), keep=[runner, engine])
        self._graphs[key] = entry
        self.stats["captures"] += 1
        log.info("CUDA graphs: captured a graph for input shapes %s (%d kept)", shapes, len(self._graphs))
        return entry

    def _check_capturable(self, engine: Any, shapes: str) -> None:
        ctx = engine.context if engine is not None else None
        if ctx is None:
            return
        for spec in self.outputs:
            if any(d < 0 for d in tuple(ctx.get_tensor_shape(spec.name))):
                raise RuntimeFailure(
                    f"output {spec.name!r} has a data-dependent shape, which a CUDA graph cannot capture "
                    f"(input shapes {shapes}). Fix: pass cuda_graphs=False for this model.")
        capturable = getattr(ctx, "is_stream_capturable", None)
        if capturable is not None and not capturable(self._driver.stream_handle()):
            raise RuntimeFailure(
                f"TensorRT says this execution context cannot be captured into a CUDA graph (input shapes "
                f"{shapes}); a TensorRT-RTX engine must be built with BuilderFlag.REQUIRE_USER_ALLOCATION. "
                "Fix: pass cuda_graphs=False, or rebuild the engine with that flag.")
