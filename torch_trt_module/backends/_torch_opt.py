"""The optimizing side of the PyTorch runtime: the captured program after the inference passes
(:mod:`._torch_passes`), compiled by TorchInductor on a GPU.

Where no TensorRT runtime can run, this is what does an inference compiler's work: BatchNorms
folded into their convolutions (refolded at every refit), convolution weights laid out
channels_last, and Inductor's fused kernels for the rest. The weights stay *arguments* of the
compiled graph, never constants baked into it, so a refit swaps tensors of the same shapes,
dtypes and strides, and nothing is compiled again.

On a GPU, Inductor writes its wrapper (the code that launches the kernels) in C++
(``cpp_wrapper``), not Python: the kernels are the same, but a launch costs the host less. Where
the host is what limits a call (small models, small batches), that is most of the time:
mobilenet_v3_small's graph at batch 8 on an H100, 2.11 ms a call with the Python wrapper and
1.40 ms with the C++ one, against 2.31 ms for ``torch.compile``'s default (benchmarks/RESULTS.md). Where the
C++ wrapper cannot compile, the Python one runs (one WARNING), then the graph without Inductor.

What Inductor compiles is kept as one artifact per input signature, under Inductor's own cache
directory (:mod:`._inductor_store`): a second process loads it and runs no Dynamo and no compile.
Nothing of it is stored in this library's cache or saved files: a saved module stores the
captured program, and the machine that loads it compiles it for its own GPU. Where Inductor
cannot compile (no Triton, no C++ compiler, an op it lacks), the graph runs as it is, and a
WARNING says so once.

Example:
    >>> opt = Optimized.make(graph_module, names, weights, "auto", torch.device("cuda"))   # doctest: +SKIP
    >>> outs = opt.call(*opt.weights, x)                                                     # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from typing import Any, Callable, Mapping, Sequence

import torch

from . import _dwconv, _pad_channels
from ._inductor_store import Artifacts
from ._torch_passes import WeightPlan, optimize_graph
from ._warn import warn_once, why

__all__ = ["AUTO_INDUCTOR", "Optimized", "STORE_ARTIFACTS"]

#: Whether ``optimize="auto"`` compiles with TorchInductor on a GPU (else: the passes only, and
#: ``optimize="inductor"`` asks for it). See docs/backends.md, "The PyTorch runtime", for why.
AUTO_INDUCTOR = True

#: Whether Inductor's programs are compiled per input signature and stored as artifacts
#: (:mod:`._inductor_store`: a warm start runs no Dynamo), else compiled by ``torch.compile``
#: from its own caches. False: the comparison in benchmarks/bench_compile_gpu.py.
STORE_ARTIFACTS = True

#: Inductor's options, best first, on a GPU (True) and on a CPU (False). The C++ wrapper is the
#: GPU's default for the launch cost (see above); on a CPU the kernels dominate, and its compile
#: (seconds more per graph) would not pay back. ``cpp.vec_isa_ok=False``: before it builds any C++,
#: Inductor checks each vector ISA the CPU reports by compiling a test library and loading it in a
#: fresh Python process. torch 2.11 repeats that in every process; on the lent H100 machine (an
#: import of torch takes ~7 s there) it was most of a warm start, 37.8 s of the first call after a
#: cache hit against 2.5 s for torch.compile with its Python wrapper. The GPU wrapper is host code
#: with no vector kernels, so it needs no ISA. The option is part of Inductor's cache key: it is
#: set for the cold compile and the warm one alike. (:func:`_isa_list_restored` keeps the user's
#: own CPU compiles in the process as they were.)
_TIERS: dict[bool, tuple[dict[str, Any], ...]] = {
    True: ({"cpp_wrapper": True, "cpp.vec_isa_ok": False}, {}), False: ({},)}

log = logging.getLogger(__name__)


def _isa_cache() -> tuple[Callable[[], Any], Callable[[], None]] | None:
    """Inductor's process-wide list of checked vector ISAs: its cache_info, and what clears it with
    the per-ISA answers behind it (AVX512's, VNNI's and AMX's ``__bool__`` are cached whatever
    ``cpp.vec_isa_ok`` was), or None in a torch without them."""
    try:
        from torch._inductor.cpu_vec_isa import supported_vec_isa_list, valid_vec_isa_list
    except ImportError:
        return None
    if not hasattr(valid_vec_isa_list, "cache_info"):
        return None
    cached = {type(isa).__bool__ for isa in supported_vec_isa_list if hasattr(type(isa).__bool__, "cache_clear")}

    def clear() -> None:
        valid_vec_isa_list.cache_clear()
        for answer in cached:
            answer.cache_clear()  # type: ignore[attr-defined]
    return valid_vec_isa_list.cache_info, clear


def _tiers_for(device: torch.device) -> list[dict[str, Any]]:
    """:data:`_TIERS` for ``device``, less the options this torch's Inductor does not have."""
    tiers = [dict(t) for t in _TIERS[device.type == "cuda"]]
    if any("cpp.vec_isa_ok" in t for t in tiers):
        import torch._inductor.config as inductor_config

        if not hasattr(inductor_config.cpp, "vec_isa_ok") or _isa_cache() is None:
            for t in tiers:
                t.pop("cpp.vec_isa_ok", None)
    return tiers


def inductor_available(device: torch.device) -> str | None:
    """None where TorchInductor can compile for ``device``, else why not."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    return None


class Optimized:
    """The optimized graph, its weight arguments (derived from the program's) and the callable
    that runs it; :meth:`refit` derives new weight arguments from new program weights."""

    def __init__(self, graph: torch.fx.GraphModule, plan: WeightPlan, raw: dict[str, torch.Tensor],
                 device: torch.device, inductor: bool, captured: torch.fx.GraphModule | None = None) -> None:
        self.graph = graph
        # The program as captured (its weights: ``raw``, in order): what runs if the passes' graph
        # ever fails where it does not.
        self._captured = captured
        self.passes_failed = False
        self.plan = plan
        self.device = device
        # NHWC weights pay off where Inductor lays out the activations to match; eager kernels
        # would convert the activations at every convolution instead.
        self.channels_last = inductor and device.type == "cuda" and bool(plan.conv_weights)
        self._raw = raw
        self._names = list(raw)  # the captured program's weight order (``make`` builds ``raw`` in it)
        self.weights = plan.derive(raw, channels_last=self.channels_last)
        self.inductor = inductor
        # Inductor's options, best first: each failure moves on to the next (then to the graph).
        self._tiers: list[dict[str, Any]] = _tiers_for(device)
        self._isa = _isa_cache() if any("cpp.vec_isa_ok" in t for t in self._tiers) else None
        self._lock = threading.RLock()  # _first holds it while a failure moves to the next tier
        self._fn: Callable[..., Any] = self._first if inductor else graph.forward
        self._compiled: Callable[..., Any] | None = None

    @classmethod
    def make(cls, graph: torch.fx.GraphModule, names: Sequence[str], weights: Sequence[torch.Tensor], mode: str,
             device: torch.device) -> "Optimized | None":
        """The optimized program for ``mode`` ("auto", "inductor" or "passes"), or None (the plain
        program runs) where the passes cannot apply, with a WARNING."""
        inductor = mode == "inductor" or (mode == "auto" and device.type == "cuda" and AUTO_INDUCTOR)
        if inductor and (missing := inductor_available(device)):
            warn_once(log, f"inductor:{missing}", "TorchInductor cannot compile here (%s); the optimized program "
                      "runs without it", missing)
            inductor = False
        pad = inductor and device.type == "cuda" and _pad_channels.PAD_INPUT_CHANNELS
        try:
            gm, plan = optimize_graph(graph, names, weights=dict(zip(names, weights)),
                                      dwconv=_dwconv.DWCONV_TRITON if inductor else frozenset(), pad_channels=pad)
        except Exception as e:  # noqa: BLE001 - a graph the passes do not understand runs as captured
            warn_once(log, f"passes:{type(e).__name__}", "the inference passes could not rewrite this program "
                      "(%s: %s); it runs as captured", type(e).__name__, e)
            return None
        return cls(gm, plan, dict(zip(names, weights)), device, inductor, captured=graph)

    @property
    def conv_inputs(self) -> list[int]:
        """Positions (among the user inputs) of the 4-d inputs that only convolutions read: where
        Inductor lays out channels_last activations, its program's first kernel copies such an
        input to channels_last (a graph runner's static input can be made so instead)."""
        if not self.channels_last:
            return []
        places = [n for n in self.graph.graph.nodes if n.op == "placeholder"][len(self.weights):]
        conv = (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)
        return [i for i, n in enumerate(places)
                if n.users and all(u.op == "call_function" and u.target in conv and u.args[0] is n for u in n.users)]

    def describe(self) -> str:
        if self.passes_failed:
            return "none (the inference passes' program failed; it runs as captured)"
        parts = [f"{self.plan.folds} BatchNorms folded"] if self.plan.folds else []
        if self.plan.merges:
            parts.append(f"{self.plan.merges} Linear groups merged")
        if self.plan.casts:
            parts.append(f"{self.plan.casts} casts dropped")
        if self.plan.padded:
            parts.append(f"{self.plan.padded} convolutions' input channels padded")
        if self.plan.dwconv:
            parts.append(f"{self.plan.dwconv} grouped convolutions to the Triton depthwise kernel where depthwise "
                         f"({', '.join(self.plan.dwconv_dtypes)})")
        if self.channels_last:
            parts.append("channels_last weights")
        if not self.inductor:
            parts.append("eager kernels")
        else:
            parts.append("TorchInductor" + (" (C++ wrapper)" if self._tiers[0].get("cpp_wrapper") else ""))
        return ", ".join(parts)

    def call(self, *args: torch.Tensor) -> Any:
        with torch.no_grad():  # an inference graph: no autograd state, and one set of Inductor guards
            fn = self._fn
            try:
                if self._isa is not None:  # a compile (the first, or Dynamo's for new shapes) may run
                    return self._isa_list_restored(fn, args)
                return fn(*args)
            except Exception as e:  # noqa: BLE001 - sorted out below: Inductor's, the passes' or the inputs'
                if fn == self._first or fn == self._as_captured or self._captured is None:
                    raise
                if fn is self.graph.forward:
                    return self._without_passes(e, args)
                return self._without_inductor(e, args)

    def _isa_list_restored(self, fn: Callable[..., Any], args: tuple[torch.Tensor, ...]) -> Any:
        """``fn(*args)``, leaving Inductor's process-wide ISA list as it was: a compile with
        ``cpp.vec_isa_ok=False`` that fills it (empty, and AVX512 answered "no") is undone, so the
        user's own CPU compiles in this process still check and use their vector ISAs."""
        assert self._isa is not None
        info, clear = self._isa
        filled = info().currsize
        try:
            return fn(*args)
        finally:
            if not filled and info().currsize:
                clear()

    def _first(self, *args: torch.Tensor) -> Any:
        """The first calls: compile (once, under a lock), fall back to the graph if Inductor fails."""
        with self._lock:
            if self._compiled is None:
                self._compiled = self._compile()
            try:
                out = self._compiled(*args)
            except Exception as e:  # noqa: BLE001 - Inductor's own failure: the graph itself still runs
                return self._without_inductor(e, args)
            self._fn = self._compiled
            return out

    def _compile(self) -> Callable[..., Any]:
        """Inductor for the first tier's options: stored artifacts where this torch has them."""
        options = dict(self._tiers[0])
        if STORE_ARTIFACTS and (store := Artifacts.make(self.graph, n_weights=len(self.weights), options=options,
                                                        device=self.device)) is not None:
            return store
        return torch.compile(self.graph.forward, fullgraph=True, dynamic=None, options=options or None)

    def _without_inductor(self, error: Exception, args: tuple[torch.Tensor, ...]) -> Any:
        """After the compiled program raised (at its first call, or when Dynamo compiled it again for
        new input shapes): where the graph itself runs these inputs, it was Inductor's failure, so
        the module goes on without Inductor (one WARNING); where the graph fails too, the inputs
        are at fault and the graph's error is raised. Never a failed call that the graph could run."""
        try:
            out = self.graph.forward(*args)
        except Exception as e:  # noqa: BLE001 - the passes' graph fails too: the passes', or the inputs'
            if self._captured is None:
                raise
            return self._without_passes(e, args)
        reason = why(error)
        with self._lock:
            if self._compiled is None:  # another thread's failure already moved on
                return out
            if len(self._tiers) > 1:  # the C++ wrapper failed: the next call compiles with the Python one
                warn_once(log, f"cpp:{reason[0]}", "TorchInductor could not compile this program with its C++ "
                          "wrapper (%s: %s); it compiles with the Python wrapper", *reason)
                self._tiers.pop(0)
                self._compiled, self._fn = None, self._first
                return out
        warn_once(log, f"compile:{reason[0]}", "TorchInductor could not compile this program (%s: %s); "
                  "it runs without Inductor", *reason)
        self._fn, self.inductor = self.graph.forward, False
        return out

    def _without_passes(self, error: Exception, args: tuple[torch.Tensor, ...]) -> Any:
        """After the passes' graph raised: where the program as captured runs these inputs, a pass
        was at fault, so the module runs the captured program from now on (one WARNING); where it
        fails too, its error (the inputs') is raised and the optimized program stays."""
        out = self._as_captured(*args)
        warn_once(log, f"passes-run:{type(error).__name__}", "the inference passes' program failed on these "
                  "inputs (%s: %s); the module runs the program as captured", *why(error))
        self._fn, self.inductor, self.passes_failed = self._as_captured, False, True
        return out

    def _as_captured(self, *args: torch.Tensor) -> Any:
        """The captured program, with the raw weights in place of the derived ones ``args`` starts with."""
        assert self._captured is not None
        raw = self._raw
        return self._captured.forward(*[raw[n] for n in self._names], *args[len(self.weights):])

    def refit(self, values: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """New weight arguments for these program weights (by name), folds recomputed; the raw
        weights are swapped whole, so a concurrent call sees the old set or the new one."""
        raw = dict(self._raw)
        for name, v in values.items():
            if name in raw:
                raw[name] = v.detach().to(self.device, raw[name].dtype).contiguous()
        weights = self.plan.derive(raw, channels_last=self.channels_last)
        if isinstance(compiled := self._compiled, Artifacts):
            compiled.check_weights(weights)
        self._raw, self.weights = raw, weights
        return weights
