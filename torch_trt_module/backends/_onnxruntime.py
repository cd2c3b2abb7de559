"""ONNX Runtime: the accuracy reference and the runtime of last resort.

The runner binds torch tensors' memory to the session through IOBinding, so the
inputs are not copied, and torch allocates the outputs whenever their shapes
follow from the input shapes (known from the graph's symbolic dims). Outputs
whose shape depends on the data (``x[x > 0]``) are allocated by ONNX Runtime
and copied once, which is the analogue of TensorRT's ``IOutputAllocator``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import threading
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .._core.dtypes import numpy_dtype
from .._core.spec import TensorSpec
from .._errors import BackendUnavailable, RuntimeFailure
from .._formats.onnx import with_initializers
from ._ort_shapes import shape_function

__all__ = ["OnnxRuntimeRunner", "optimized_graph_name", "ort_version", "run_onnx_cpu", "shape_function"]

log = logging.getLogger(__name__)
_announced: set[str] = set()



def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailable(
            "backend 'onnxruntime' needs the onnxruntime package: pip install onnxruntime "
            "(or onnxruntime-gpu for CUDA)"
        ) from e
    return onnxruntime


def ort_version() -> str:
    return str(_ort().__version__)


def _np_dtype(t: torch.dtype) -> Any:
    np_t = numpy_dtype(t)
    if np_t is None:
        raise BackendUnavailable(
            f"ONNX Runtime's Python binding cannot bind {t} tensors; use precision='fp16' or 'fp32', "
            "or a TensorRT backend"
        )
    return np_t


def session_options(threads: int | None = None, half: bool = False) -> Any:
    ort = _ort()
    so = ort.SessionOptions()
    # ORT writes its log to stderr from C++, outside logging. Its warnings are noise, and each error
    # is also the exception's text, which RuntimeFailure carries (a retried call printed it twice):
    # fatal only.
    so.log_severity_level = 4
    if half:
        # ORT 1.32's CPU layout optimizer segfaults (kills the process) on some fp16 graphs,
        # e.g. Transpose -> MatMul with a constant weight; EXTENDED skips that pass.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if threads:
        so.intra_op_num_threads = threads
    return so


@functools.lru_cache(maxsize=1)
def _cpu_identity() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            first = f.read().split("\n\n", 1)[0]
    except OSError:
        return None
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    wanted = [fields.get(k, "") for k in ("vendor_id", "model name", "flags", "Features", "CPU part")]
    if not any(wanted):
        return None
    return hashlib.sha256("|".join([platform.machine(), *wanted]).encode()).hexdigest()[:16]


def optimized_graph_name(*, half: bool) -> str | None:
    """The cache blob name for ONNX Runtime's own optimized copy of a graph, on this machine; None
    where the CPU cannot be identified (then no copy is made or used).

    A fully optimized graph (ORT_ENABLE_ALL) holds layouts chosen for this CPU (the NCHWc block
    size follows its vector width) by this ONNX Runtime version, so the name holds the version,
    the optimization level and a hash of the CPU's model and feature flags.
    """
    cpu = _cpu_identity()
    return None if cpu is None else f"ort-{ort_version()}-{'extended' if half else 'all'}-cpu-{cpu}"


def run_onnx_cpu(onnx: bytes, input_names: Sequence[str], output_names: Sequence[str],
                 inputs: Sequence[torch.Tensor], *, half: bool = False) -> list[torch.Tensor]:
    """Run a graph once on the CPU provider with numpy copies (the reference path)."""
    ort = _ort()
    sess = ort.InferenceSession(onnx, session_options(half=half), providers=["CPUExecutionProvider"])
    feeds = {n: t.detach().cpu().contiguous().numpy() for n, t in zip(input_names, inputs)
             if n in {i.name for i in sess.get_inputs()}}
    outs = sess.run(list(output_names), feeds)
    return [torch.from_numpy(np.asarray(o)) for o in outs]


# --------------------------------------------------------------------------- symbolic output shapes

_REUSE_MAX_BYTES = 64 * 1024  # outputs up to this size are copied out of buffers bound once (see _plan)


class OnnxRuntimeRunner:
    """Runs an ONNX graph through IOBinding over torch memory.

    ``device`` is where inputs and outputs live. On a CUDA device without the
    CUDA execution provider, inputs are staged through the CPU (logged once).

    On the CPU provider, ``optimized`` is ONNX Runtime's own optimized copy of ``onnx``
    (made with ``save_optimized`` by the same ONNX Runtime on the same kind of CPU, see
    :func:`optimized_graph_name`): it loads with graph optimizations off, about twice as
    fast. ``save_optimized`` is a path where ONNX Runtime writes that copy.

    ``initializers`` replace graph initializers by name (new weights: :meth:`refit`). They are
    written into the graph's bytes, not passed with ``SessionOptions.add_initializer``: ONNX
    Runtime 1.32's graph optimizer fuses a BatchNormalization into its Conv from the graph's own
    values and ignores such an override (a stale result, pinned by tests/runtime/test_refit.py), and the
    bytes are as fast to load (benchmarks/bench_refit.py).
    """

    backend = "onnxruntime"

    def __init__(self, onnx: bytes, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 device: torch.device | str = "cpu", *, threads: int | None = None, half: bool = False,
                 optimized: bytes | None = None, save_optimized: str | os.PathLike[str] | None = None,
                 initializers: Mapping[str, torch.Tensor] | None = None) -> None:
        ort = _ort()
        self._config = (onnx, threads, half)
        self.initializers = dict(initializers or {})
        self.device = torch.device(device)
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        available = ort.get_available_providers()
        use_cuda = self.device.type == "cuda" and "CUDAExecutionProvider" in available
        if use_cuda:
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}),
                                    "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
            if self.device.type == "cuda" and "no-cuda-ep" not in _announced:
                _announced.add("no-cuda-ep")
                log.warning("onnxruntime has no CUDA provider here (install onnxruntime-gpu); "
                            "CUDA inputs are copied to the CPU and back")
        so = session_options(threads, half)
        if self.initializers:
            onnx = with_initializers(onnx, self.initializers)
            optimized = save_optimized = None  # ORT's optimized copy holds the old weights, folded
        self.used_optimized = False
        if optimized is not None and not use_cuda:
            pre = session_options(threads, half)
            pre.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # done when it was saved
            try:
                self.session = ort.InferenceSession(optimized, pre, providers=providers)
                self.used_optimized = True
            except Exception as e:  # noqa: BLE001 - the original graph still loads; say why once
                log.warning("onnxruntime could not load its optimized copy of the graph (%s); using the original", e)
        elif save_optimized is not None and not use_cuda:
            so.optimized_model_filepath = os.fspath(save_optimized)
        if not self.used_optimized:
            self.session = ort.InferenceSession(onnx, so, providers=providers)
        self._ort_device = ("cuda", self.device.index or 0) if use_cuda else ("cpu", 0)
        self._run_device = self.device if use_cuda else torch.device("cpu")
        graph_inputs = {i.name for i in self.session.get_inputs()}
        self._np_in = [_np_dtype(s.torch_dtype) for s in self.inputs]
        self._np_out = [_np_dtype(s.torch_dtype) for s in self.outputs]
        self._out_dtypes = [s.torch_dtype for s in self.outputs]
        self._shapes = shape_function(self.inputs, self.outputs)
        self._shape_memo: dict[tuple[tuple[int, ...], ...], list[tuple[int, ...] | None]] = {}
        self._distrusted: set[int] = set()
        # Per input-shape plans for the common call (every output's shape known, nothing empty,
        # no staging): what a call binds, worked out once. Filled after a call succeeds.
        self._plans: dict[tuple[tuple[int, ...], ...], Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]] = {}
        # Inputs the graph reads (an exporter may drop one the model ignores), by position.
        self._used = [(i, s.name, np_t) for i, (s, np_t) in enumerate(zip(self.inputs, self._np_in))
                      if s.name in graph_inputs]
        self._local = threading.local()

    def refit(self, values: Mapping[str, torch.Tensor]) -> "OnnxRuntimeRunner":
        """A new runner (a new session) over the same graph with these initializers replaced; this one
        keeps working until the caller swaps it out."""
        onnx, threads, half = self._config
        return OnnxRuntimeRunner(onnx, self.inputs, self.outputs, self.device, threads=threads, half=half,
                                 initializers={**self.initializers, **values})

    def _state(self) -> "_BindState":
        # An IOBinding is not thread-safe; the session is, so each thread gets its own binding.
        st = getattr(self._local, "state", None)
        if st is None:
            st = self._local.state = _BindState(self.session, self._ort_device)
        return st

    def output_shapes(self, shapes: tuple[tuple[int, ...], ...]) -> list[tuple[int, ...] | None]:
        got = self._shape_memo.get(shapes)
        if got is None:
            got = self._shapes(shapes)
            if len(self._shape_memo) < 256:
                self._shape_memo[shapes] = got
        return got

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run on validated, contiguous inputs already on ``self.device``."""
        shapes = tuple([t.shape for t in inputs])
        planned = self._plans.get(shapes)
        return planned(inputs) if planned is not None else self._run(inputs, shapes)

    def call_for(self, shapes: tuple[tuple[int, ...], ...]) -> Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]:
        """The cheapest way to run inputs of these shapes: :meth:`run`, or once a call at
        these shapes has succeeded, a call planned for them (same checks and errors)."""
        return self._plans.get(shapes) or self.run

    def _plan(self, shapes: tuple[tuple[int, ...], ...], results: Sequence[torch.Tensor]
              ) -> Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]:
        """A call for one tuple of input shapes: what _run decides per call (which inputs the
        graph uses, output shapes and dtypes, staging, empty tensors) is decided here once."""
        used = [(i, name, np_t, tuple(shapes[i])) for i, name, np_t in self._used]
        outputs = [(s.name, np_t, tuple(r.shape), r.dtype) for s, np_t, r in zip(self.outputs, self._np_out, results)]
        device, local, plans, get_state = self.device, self._local, self._plans, self._state
        run_c = _c_run(self.session)
        valid = True
        # Small outputs on the CPU: ORT writes into buffers bound once per thread for this plan, and the
        # call returns copies of them. A clone costs about what torch.empty does, and saves a C-level
        # bind_output per output per call (~1.2 µs: issue 20's per-call overhead).
        reuse = device.type == "cpu" and all(r.numel() * r.element_size() <= _REUSE_MAX_BYTES for r in results)
        token = object()  # what a thread's binding holds outputs for

        def planned(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            nonlocal valid
            if not valid:  # dropped after a failure; callers may still hold it
                return self.run(inputs)
            st = getattr(local, "state", None) or get_state()
            bind, dev, bound = st.bind_c, st.device, st.inputs
            for i, name, np_t, shape in used:
                key = (inputs[i].data_ptr(), shape)
                if bound.get(name) != key:  # rebinding costs a few µs; skip it when unchanged
                    bind.bind_input(name, dev, np_t, shape, key[0])
                    bound[name] = key
            outs = []
            if not reuse or st.outputs_for is not token:
                for name, np_t, shape, dtype in outputs:
                    out = torch.empty(size=shape, dtype=dtype, device=device)  # size= parses faster than a tuple
                    bind.bind_output(name, dev, np_t, shape, out.data_ptr())
                    outs.append(out)
                st.outputs_for, st.out_buffers = (token, outs) if reuse else (None, [])
            try:
                run_c(bind, None)
            except Exception:  # noqa: BLE001 - _run reports it, or recovers (distrusted output shapes)
                valid = False
                plans.clear()
                return self._run(inputs, shapes)
            return [b.clone() for b in st.out_buffers] if reuse else outs

        return planned

    def _run(self, inputs: Sequence[torch.Tensor], in_shapes: tuple[tuple[int, ...], ...]) -> list[torch.Tensor]:
        staged = [t if t.device == self._run_device else t.to(self._run_device) for t in inputs]
        st = self._state()
        bind, dev = st.bind_c, st.device
        st.outputs_for, st.out_buffers = None, []  # outputs are bound anew below
        keep: list[torch.Tensor] = []
        for i, name, np_t in self._used:
            t = buf = staged[i]
            if t.numel() == 0:
                # Never hand a null pointer to the runtime: bind a one-element buffer.
                buf = torch.empty(1, dtype=t.dtype, device=t.device)
                keep.append(buf)
            bound = (buf.data_ptr(), tuple(t.shape))
            if st.inputs.get(name) != bound:  # rebinding costs a few µs; skip it when unchanged
                bind.bind_input(name, dev, np_t, bound[1], bound[0])
                st.inputs[name] = bound
        shapes = self.output_shapes(in_shapes)
        results: list[torch.Tensor | None] = []
        for i, (spec, np_t, shape) in enumerate(zip(self.outputs, self._np_out, shapes)):
            if shape is None or i in self._distrusted:
                bind.bind_output(spec.name, dev)
                results.append(None)
                continue
            out = torch.empty(shape, dtype=self._out_dtypes[i], device=self._run_device)
            buf = out if out.numel() else torch.empty(1, dtype=out.dtype, device=out.device)
            bind.bind_output(spec.name, dev, np_t, shape, buf.data_ptr())
            results.append(out)
        try:
            st.run(bind, None)
        except Exception as e:  # noqa: BLE001
            st.inputs.clear()
            msg = str(e).lower()
            # ORT words it "...shape..." or "Got invalid dimensions for output", by version and op.
            if any(r is not None for r in results) and ("shape" in msg or "dimension" in msg):
                # A symbolic output shape from the exporter was wrong for these inputs: let
                # ORT allocate those outputs from now on, and run again.
                self._distrusted.update(i for i, r in enumerate(results) if r is not None)
                self._shape_memo.clear()
                self._plans.clear()
                log.info("onnxruntime: output shapes not predictable from the graph; ORT allocates them")
                return self._run(inputs, in_shapes)
            raise RuntimeFailure(f"onnxruntime failed to run the graph: {e}") from e
        plannable = (not keep and self._run_device == self.device and len(self._plans) < 256
                     and all(r is not None and r.numel() for r in results))
        if plannable:
            self._plans[in_shapes] = self._plan(in_shapes, results)  # type: ignore[arg-type]
        if any(r is None for r in results):
            ort_outs = bind.get_outputs()
            results = [torch.from_numpy(np.ascontiguousarray(ort_outs[i].numpy())).to(self._run_device)
                       if r is None else r for i, r in enumerate(results)]
        if self._run_device != self.device:
            return [r.to(self.device) for r in results]  # type: ignore[union-attr]
        return results  # type: ignore[return-value]


class _BindState:
    """One thread's binding. Uses ORT's C-level IOBinding: the public Python wrappers
    rebuild an OrtDevice and re-check options on every call (~15 µs of a 3 µs run)."""

    def __init__(self, session: Any, device: tuple[str, int]) -> None:
        from onnxruntime.capi.onnxruntime_inference_collection import OrtDevice

        self.binding = session.io_binding()  # keeps the Python wrapper alive
        self.bind_c = getattr(self.binding, "_iobinding", None)
        self.device = OrtDevice.make(*device)._get_c_device()
        if self.bind_c is None:
            raise RuntimeFailure("this onnxruntime version lacks the IOBinding internals torch_trt_module uses")
        self.run = _c_run(session)
        self.inputs: dict[str, tuple[int, tuple[int, ...]]] = {}  # what is bound: name -> (address, shape)
        self.outputs_for: object = None  # the plan whose reused output buffers are bound (see _plan)
        self.out_buffers: list[torch.Tensor] = []


def _c_run(session: Any) -> Callable[[Any, Any], None]:
    """The C-level ``run_with_iobinding(binding, run_options)`` of a session."""
    sess_c = getattr(session, "_sess", None)
    if sess_c is None:
        raise RuntimeFailure("this onnxruntime version lacks the session internals torch_trt_module uses")
    return sess_c.run_with_iobinding  # type: ignore[no-any-return]
