"""``cuda_graphs="auto"``: a CUDA graph for each input shape where it makes the call faster.

A call is launch-bound where the host enqueues its kernels more slowly than the GPU runs them.
mobilenet_v3_small at batch 32 on an H100, on the PyTorch runtime, took 1.72 ms a call for 0.48 ms
of GPU work (116 kernels, 52 of them cuDNN convolutions with their per-call setup): its fp16
program, half the GPU work of fp32, was no faster. A graph's replay costs the host a few launches,
so such a call drops towards its GPU time. Where the GPU is the limit (resnet50 at batch 128) a
graph saves nothing and holds its activations' memory for good. ``cuda_graphs=True`` captures every
shape; ``"auto"`` measures first. For each input-shape signature, :class:`AutoGraphRunner`

1. runs the first call plain (a runtime may still compile or tune for a new shape);
2. at the second, times ``REPEATS`` plain runs, each after a sync: the host's time to enqueue one
   against its wall time to the end of its last kernel (CUDA events). A host that took less than
   ``LAUNCH_BOUND`` of the wall time was ahead of the GPU, which a graph cannot change: the shape
   runs plain for good, and nothing is captured;
3. otherwise captures a graph (:class:`CudaGraphRunner`: static buffers, fresh outputs) and times
   ``REPEATS`` replays the same way. The graph is kept where its call takes at most ``KEEP`` of the plain
   call's wall time; else it is dropped and its memory freed, and the shape runs plain for good.

That call returns the plain run's outputs; later calls of a shape with a kept graph replay it. The
judgement syncs the caller's stream about ``2 * REPEATS`` times, once per shape.

Never wrong, never stuck:

- a refit (follow mode) drops the graphs, which read the old weights' memory. A shape is captured
  again at its second call after the refit, so a module refit before every call (evaluation in a
  training loop) runs plain rather than pay a capture each step;
- a capture or replay that fails turns graphs off for this module, with one INFO, and the call runs
  plain (``cuda_graphs=True`` raises instead: there the user asked for graphs);
- a call made while the caller's own stream is being captured (the caller's graph) runs plain, into
  that graph;
- at most ``max_graphs`` shapes keep a graph, the least recently used dropped first, and after
  ``EVICTIONS_PER_GRAPH * max_graphs`` drops (shapes that keep changing, or take turns in too few
  slots) a shape that needs a capture runs plain instead: those that kept their graph keep it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

import torch

from .._errors import BackendUnavailable
from ._cudagraphs import CudaGraphRunner, GraphDriver, Runner, SaysWhatRuns, ShapeKey, TorchCudaGraphs, shape_key

__all__ = ["AutoGraphRunner", "EVICTIONS_PER_GRAPH", "KEEP", "LAUNCH_BOUND", "REPEATS"]

log = logging.getLogger(__name__)

#: Host time / wall time of a plain call at or above which a graph is tried.
LAUNCH_BOUND = 0.5
#: A graph is kept where its call's wall time is at most this share of the plain call's.
KEEP = 0.85
#: Timed runs per judgement (medians), plain and replayed each.
REPEATS = 3
#: Graphs dropped to make room, per graph kept, after which a shape that needs a capture runs plain.
EVICTIONS_PER_GRAPH = 4
#: Shapes counted at once; a shape beyond them is counted again from its next call.
_MAX_COUNTED = 256


class AutoGraphRunner(SaysWhatRuns):
    """Wraps a runner: replays a CUDA graph for each input shape where that was measured to be
    faster, runs the others plain (this module's docstring says how and why).

    Args:
        inner: the runner to wrap (``TorchRunner``, ``TensorRTRunner``, or one with that surface).
        device: the CUDA device it runs on.
        max_graphs: how many shape signatures keep a graph at once.
        driver: how graphs are captured and timed; None is :class:`TorchCudaGraphs`, the real one.
        out_dtypes: the dtypes to return the outputs in (see :class:`CudaGraphRunner`); None: the engine's.

    Example:
        >>> auto = AutoGraphRunner(runner, device="cuda:0")   # doctest: +SKIP
        >>> for x in batches:                                  # doctest: +SKIP
        ...     (y,) = auto.run([x])  # plain, then judged, then replayed where that is faster
        >>> auto.verdicts                                      # doctest: +SKIP
        {(((32, 3, 224, 224), torch.float32),): 'graph'}
    """

    GRAPHS = "CUDA graphs where faster"

    #: run() takes inputs in any dtype the copy casts from and returns outputs in ``out_dtypes``
    #: (CudaGraphRunner's; its plain runs cast the same).
    takes_caller_dtypes = True

    def __init__(self, inner: Runner, *, device: str | torch.device, max_graphs: int = 4,
                 driver: GraphDriver | None = None, out_dtypes: Sequence[torch.dtype] | None = None) -> None:
        self.device = torch.device(device)
        if driver is None:
            if self.device.type != "cuda" or not torch.cuda.is_available():
                raise BackendUnavailable(
                    f"cuda_graphs='auto' captures graphs on a CUDA device; this runner is on {self.device}. "
                    "Fix: pass cuda_graphs=False for a module that does not run on a GPU.")
            driver = TorchCudaGraphs(self.device)
        self.graphs = CudaGraphRunner(inner, device=self.device, max_graphs=max_graphs, driver=driver,
                                      out_dtypes=out_dtypes)
        self.out_dtypes = self.graphs.out_dtypes
        self.inner = inner
        self.backend: str = inner.backend
        self.inputs = list(inner.inputs)
        self.outputs = list(inner.outputs)
        self._driver = driver
        self._lock = threading.Lock()
        self._seen: dict[ShapeKey, int] = {}  # calls since the last refit, per shape
        self._verdicts: dict[ShapeKey, str] = {}  # "graph" or "plain", kept across refits
        #: Why graphs are off for this module (None while they are on).
        self.off: str | None = None
        #: Counters for tests and benchmarks.
        self.stats = {"judged": 0, "kept": 0, "plain": 0, "failed": 0}

    @property
    def verdicts(self) -> dict[ShapeKey, str]:
        """What each judged shape signature runs as: "graph" or "plain"."""
        with self._lock:
            return dict(self._verdicts)

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run on validated, contiguous inputs on ``self.device``; returns new output tensors."""
        if self.off is not None or self._driver.capturing():
            return self.graphs.plain(inputs)
        key = shape_key(inputs)
        verdict = self._verdicts.get(key)
        if verdict == "plain":
            return self.graphs.plain(inputs)
        if verdict == "graph" and self.graphs.has(key):
            return self._replay(key, inputs)  # the common call: a graph kept for this shape
        with self._lock:
            n = self._seen.get(key, 0) + 1
            if n == 1 and len(self._seen) >= _MAX_COUNTED:
                self._seen.clear()
            self._seen[key] = n
            verdict = self._verdicts.get(key)
            if n < 2 or self.off is not None:
                pass  # a first call (since a refit): the runtime may still compile for this shape
            elif verdict == "graph":
                if not self._thrashing(key):
                    return self._replay(key, inputs)  # dropped by a refit or the LRU: captured again
            elif verdict is None:
                return self._judge(key, inputs)
        return self.graphs.plain(inputs)

    def refit(self, values: Any) -> "AutoGraphRunner":
        """New weights for the wrapped runner; graphs captured over the old ones are dropped."""
        with self._lock:
            self.graphs.refit(values)  # raises for a runner that takes no weights
            self.inner = self.graphs.inner
            self._seen.clear()
        return self

    def reset(self) -> None:
        """Drop every graph; the shapes' verdicts stay."""
        self.graphs.reset()

    # ------------------------------------------------------------------ internals

    def _replay(self, key: ShapeKey, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        try:
            return self.graphs.run(inputs, key)
        except Exception as e:  # noqa: BLE001 - CUDA reports capture and replay failures many ways
            self._turn_off(key, e)
            return self.graphs.plain(inputs)

    def _judge(self, key: ShapeKey, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Time plain runs, and replays where the host was the limit; keep the faster (under the lock)."""
        self.stats["judged"] += 1
        shapes = _describe(key)
        outputs, host, wall = self._driver.time(lambda: self.graphs.plain(inputs), repeats=REPEATS, label="plain")
        if host < LAUNCH_BOUND * wall:
            self._decide(key, "plain", f"{shapes}: plain ({_ms(wall)} a call, the host ahead of the GPU: "
                                       f"{_ms(host)} to enqueue)")
            return outputs
        if self._thrashing(key):
            return outputs
        try:
            self.graphs.run(inputs)  # the capture (a warm-up run, then the capture), outside the timing
            _, _, replayed = self._driver.time(lambda: self.graphs.run(inputs), repeats=REPEATS, label="graph")
        except Exception as e:  # noqa: BLE001 - CUDA reports capture failures many ways
            self._turn_off(key, e)
            return outputs
        if replayed <= KEEP * wall:
            self._decide(key, "graph", f"{shapes}: a CUDA graph ({_ms(replayed)} a call, plain {_ms(wall)}, "
                                       f"{_ms(host)} of it to enqueue)")
        else:
            self.graphs.drop(key)
            self._decide(key, "plain", f"{shapes}: plain (a CUDA graph took {_ms(replayed)} a call, plain "
                                       f"{_ms(wall)}: not faster by {1 - KEEP:.0%})")
        return outputs

    def _thrashing(self, key: ShapeKey) -> bool:
        """Whether so many graphs were dropped for room that this shape, launch-bound, runs plain
        from now on (a capture costs two runs; shapes that keep changing would pay it at every call)."""
        limit = EVICTIONS_PER_GRAPH * self.graphs.max_graphs
        if self.graphs.stats["evictions"] < limit:
            return False
        self._decide(key, "plain", f"{_describe(key)}: plain (launch-bound, but {limit} graphs were dropped to make "
                                   "room for new shapes already: the shapes keep changing)")
        return True

    def _decide(self, key: ShapeKey, verdict: str, why: str) -> None:
        self._verdicts[key] = verdict
        self.stats["kept" if verdict == "graph" else "plain"] += 1
        log.info("cuda_graphs='auto' on %s: %s", self.backend, why)

    def _turn_off(self, key: ShapeKey, error: BaseException) -> None:
        self.stats["failed"] += 1
        self.off = f"a CUDA graph failed for input shapes {_describe(key)}: {error}"
        self.graphs.reset()
        log.info("cuda_graphs='auto' on %s: graphs are off for this module, which runs plain (%s)",
                 self.backend, self.off)


def _describe(key: ShapeKey) -> str:
    return ", ".join(f"{tuple(shape)} {str(dtype).replace('torch.', '')}" for shape, dtype in key)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"
