"""Latency measurement: timing callables side by side, and the backends ``torch-trt-module bench`` and
``benchmarks/bench_latency.py`` compare (eager, torch.compile, ONNX Runtime, TRTModule on each runtime).

Only the standard library and torch are imported at module level, so a benchmark can use
:func:`measure` on a machine that has nothing else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from .._build.build import build_engine
from .._core.dtypes import numpy_dtype
from .._errors import BackendUnavailable, UsageError
from .._runtime.module import TRTModule
from .._verify.compare import percentile
from ..backends import select_backend
from ..backends._onnxruntime import OnnxRuntimeRunner, session_options

__all__ = ["BACKENDS", "Candidate", "Timing", "make_candidates", "markdown_table", "measure", "time_candidates"]


@dataclass(frozen=True)
class Timing:
    """Latency statistics of one measured callable, in milliseconds."""

    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    iters: int
    warmup: int
    timer: str
    first_ms: float  # the first call alone (torch.compile compiles there)


def _timed(fn: Callable[[], Any], cuda: torch.device | None) -> float:
    if cuda is None:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    fn()
    t1.record()
    t1.synchronize()
    return float(t0.elapsed_time(t1))


def measure(fns: Mapping[str, Callable[[], Any]], *, warmup: int = 5, iters: int = 50,
            max_seconds: float | None = None, min_iters: int = 5,
            cuda: Mapping[str, torch.device | None] | None = None) -> dict[str, Timing | str]:
    """Time several callables side by side, in rounds, so background load hits them alike.

    Each callable: its first call timed alone (torch.compile compiles there), ``warmup - 1``
    more calls, then up to 5 rounds in turn; a round is one untimed call (other backends'
    thread pools settle) and a block of timed calls, until ``iters`` are timed, or until
    ``max_seconds`` per callable have passed and ``min_iters`` are done (checked before every
    timed call, so a long round does not overrun the budget). ``cuda[name]``:
    time that callable with CUDA events on its device's current stream, else perf_counter.
    A callable that raises gets its error message instead of a :class:`Timing`.

    Example:
        >>> measure({"sum": lambda: sum(range(100))}, warmup=1, iters=10)["sum"].iters
        10
    """
    cuda = cuda or {}
    out: dict[str, Timing | str] = {}
    times: dict[str, list[float]] = {}
    first: dict[str, float] = {}
    for name, fn in fns.items():
        try:
            first[name] = _timed(fn, cuda.get(name))
            for _ in range(warmup - 1):
                fn()
            times[name] = []
        except Exception as e:  # noqa: BLE001 - reported in its row
            out[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    rounds = max(1, min(5, iters // 4))
    per_round = -(-iters // rounds)
    start = time.perf_counter()
    budget = None if max_seconds is None else max_seconds * max(len(times), 1)
    need = min(min_iters, iters)

    def done(name: str) -> bool:
        """Out of time and ``min_iters`` timed: checked before each timed call, not only between
        rounds, since one round of a slow callable can take far longer than the budget."""
        return budget is not None and len(times[name]) >= need and time.perf_counter() - start > budget

    while times and any(len(v) < iters for v in times.values()):
        for name in list(times):
            if done(name):  # a callable that still lacks min_iters gets its calls; this one is finished
                continue
            try:
                fns[name]()
                for _ in range(min(per_round, iters - len(times[name]))):
                    if done(name):
                        break
                    times[name].append(_timed(fns[name], cuda.get(name)))
            except Exception as e:  # noqa: BLE001
                out[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                del times[name]
        if budget is not None and time.perf_counter() - start > budget and \
                all(len(v) >= need for v in times.values()):
            break
    for name, ts in times.items():
        out[name] = Timing(percentile(ts, 50), percentile(ts, 90), percentile(ts, 99), sum(ts) / len(ts), min(ts), len(ts),
                           max(warmup, 1), "cuda-events" if cuda.get(name) is not None else "perf_counter",
                           first[name])
    return {name: out[name] for name in fns}


#: Every backend ``bench`` knows, in table order: ``trtmodule-<runtime>`` is a TRTModule on that runtime.
BACKENDS = ("eager", "torch.compile", "onnxruntime", "onnxruntime-cuda", "trtmodule-tensorrt",
            "trtmodule-tensorrt_rtx", "trtmodule-onnxruntime", "trtmodule-torch", "trtmodule-torch+cudagraphs")


@dataclass
class Candidate:
    """One backend to time: ``call(inputs)``, or ``reason`` why it cannot run here."""

    name: str
    device: torch.device
    call: Callable[[Mapping[str, torch.Tensor]], Any] | None = None
    reason: str | None = None


def make_candidates(backends: Sequence[str], *, model: torch.nn.Module | None, exported: Any,
                    device: torch.device, export_error: str | None = None,
                    ort_threads: int | None = None) -> list[Candidate]:
    """Set up each backend for timing; one that cannot run gets a reason instead of a callable.
    ``exported`` (the ONNX graph) may be None if the export failed (``export_error`` says why).
    ``ort_threads`` sets ONNX Runtime's intra-op threads (raw and TRTModule) instead of its default."""
    out = []
    for name in backends:
        if exported is None and name not in ("eager", "torch.compile"):
            out.append(Candidate(name, device, reason=f"no ONNX graph: the export failed ({export_error})"))
            continue
        try:
            out.append(_candidate(name, model, exported, device, ort_threads))
        except BackendUnavailable as e:
            out.append(Candidate(name, device, reason=f"not runnable on this machine: {e}"))
        except Exception as e:  # noqa: BLE001 - one backend failing must not lose the others' rows
            out.append(Candidate(name, device, reason=f"failed to set up: {type(e).__name__}: {e}".splitlines()[0]))
    return out


def _candidate(name: str, model: torch.nn.Module | None, exported: Any, device: torch.device,
               ort_threads: int | None) -> Candidate:
    if name in ("eager", "torch.compile"):
        if model is None:
            raise BackendUnavailable("the model is an ONNX file; there is no PyTorch module to run")
        m = model.to(device)
        # One graph per batch size (dynamic=False): the fastest code, compiled at each size's first call.
        fn = torch.compile(m, dynamic=False) if name == "torch.compile" else m
        return Candidate(name, device, lambda kw: fn(**kw))
    if name in ("onnxruntime", "onnxruntime-cuda"):
        return _ort_candidate(name, exported, torch.device("cuda" if name.endswith("cuda") else "cpu"), ort_threads)
    if name.startswith("trtmodule-"):
        runtime, _, extra = name.split("-", 1)[1].partition("+")
        build = runtime if runtime in ("tensorrt", "tensorrt_rtx") else "onnxruntime"
        run_dev = device if runtime != "onnxruntime" else _ort_device(device)
        if build != "onnxruntime":
            select_backend(build, run_dev)  # raises BackendUnavailable with the reason
        if runtime == "torch" and run_dev.type != "cuda":
            raise BackendUnavailable("the PyTorch runtime is the chain's runtime for CUDA GPUs; this run has none")
        engine = build_engine(exported, backend=build, device=run_dev, progress=False)
        runner = None
        if ort_threads and runtime == "onnxruntime":  # a runner with the same threads as the raw ORT row

            runner = OnnxRuntimeRunner(engine.onnx, exported.inputs, exported.outputs, run_dev, threads=ort_threads)
        graphs = {"cuda_graphs": True} if extra == "cudagraphs" else {}  # else TRTModule's default
        module = TRTModule(engine, device=run_dev, runtime=runtime, runner=runner, **graphs)
        return Candidate(name, run_dev, lambda kw: module(**kw))
    raise UsageError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def _ort_device(device: torch.device) -> torch.device:
    import onnxruntime as ort

    cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    return device if device.type == "cuda" and cuda_ep else torch.device("cpu")


def _ort_candidate(name: str, exported: Any, device: torch.device, threads: int | None) -> Candidate:
    import onnxruntime as ort

    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable("no CUDA GPU")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable("onnxruntime has no CUDA execution provider (pip install onnxruntime-gpu)")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(exported.onnx, session_options(threads), providers=providers)
    ins = [i.name for i in sess.get_inputs()]
    outs = [o.name for o in sess.get_outputs()]
    where = "cuda" if device.type == "cuda" else "cpu"

    def call(kw: Mapping[str, torch.Tensor]) -> Any:
        binding = sess.io_binding()  # inputs bound to torch memory, outputs allocated by ORT
        for n in ins:
            t = kw[n]
            binding.bind_input(n, where, device.index or 0, numpy_dtype(t.dtype), tuple(t.shape), t.data_ptr())
        for n in outs:
            binding.bind_output(n, where)
        sess.run_with_iobinding(binding)
        return binding.get_outputs()

    return Candidate(name, device, call)


def time_candidates(cands: Sequence[Candidate], inputs: Mapping[str, torch.Tensor], **options: Any
                    ) -> dict[str, Timing | str]:
    """:func:`measure` every runnable candidate on ``inputs`` (moved to its device), under inference mode."""
    runnable = [c for c in cands if c.call is not None]
    kws = {c.name: {k: v.to(c.device) for k, v in inputs.items()} for c in runnable}
    fns = {c.name: (lambda c=c: c.call(kws[c.name])) for c in runnable}  # type: ignore[misc]
    with torch.inference_mode():
        return measure(fns, cuda={c.name: c.device if c.device.type == "cuda" else None for c in runnable},
                       **options)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)
