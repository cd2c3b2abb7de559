"""The optimizing side of the PyTorch runtime: the captured program after the inference passes
(:mod:`._torch_passes`), compiled by TorchInductor on a GPU.

Where no TensorRT runtime can run, this is what does an inference compiler's work: BatchNorms
folded into their convolutions (refolded at every refit), convolution weights laid out
channels_last, and Inductor's fused kernels for the rest. The weights stay *arguments* of the
compiled graph, never constants baked into it, so a refit swaps tensors of the same shapes,
dtypes and strides, and nothing is compiled again.

What Inductor compiles lives in its own on-disk caches (``torch.compile``'s), so a second process
compiles from them in a fraction of the first time. Nothing of it is stored in this library's cache
or saved files: a saved module stores the captured program, and the machine that loads it compiles
it for its own GPU. Where Inductor cannot compile (no Triton, no C++ compiler, an op it lacks), the
graph runs as it is, and a WARNING says so once.

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

from ._torch_passes import WeightPlan, optimize_graph

__all__ = ["AUTO_INDUCTOR", "Optimized"]

#: Whether ``optimize="auto"`` compiles with TorchInductor on a GPU (else: the passes only, and
#: ``optimize="inductor"`` asks for it). See docs/backends.md, "The PyTorch runtime", for why.
AUTO_INDUCTOR = True

log = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


def inductor_available(device: torch.device) -> str | None:
    """None where TorchInductor can compile for ``device``, else why not."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    return None


class Optimized:
    """The optimized graph, its weight arguments (derived from the program's) and the callable
    that runs it; :meth:`refit` derives new weight arguments from new program weights."""

    def __init__(self, graph: torch.fx.GraphModule, plan: WeightPlan, raw: dict[str, torch.Tensor],
                 device: torch.device, inductor: bool) -> None:
        self.graph = graph
        self.plan = plan
        self.device = device
        # NHWC weights pay off where Inductor lays out the activations to match; eager kernels
        # would convert the activations at every convolution instead.
        self.channels_last = inductor and device.type == "cuda" and bool(plan.conv_weights)
        self._raw = raw
        self.weights = plan.derive(raw, channels_last=self.channels_last)
        self.inductor = inductor
        self._lock = threading.Lock()
        self._fn: Callable[..., Any] = self._first if inductor else graph.forward
        self._compiled: Callable[..., Any] | None = None

    @classmethod
    def make(cls, graph: torch.fx.GraphModule, names: Sequence[str], weights: Sequence[torch.Tensor], mode: str,
             device: torch.device) -> "Optimized | None":
        """The optimized program for ``mode`` ("auto", "inductor" or "passes"), or None (the plain
        program runs) where the passes cannot apply, with a WARNING."""
        try:
            gm, plan = optimize_graph(graph, names)
        except Exception as e:  # noqa: BLE001 - a graph the passes do not understand runs as captured
            _warn_once(f"passes:{type(e).__name__}", "the inference passes could not rewrite this program (%s: %s); "
                       "it runs as captured", type(e).__name__, e)
            return None
        inductor = mode == "inductor" or (mode == "auto" and device.type == "cuda" and AUTO_INDUCTOR)
        if inductor and (why := inductor_available(device)):
            _warn_once(f"inductor:{why}", "TorchInductor cannot compile here (%s); the optimized program runs "
                       "without it", why)
            inductor = False
        return cls(gm, plan, dict(zip(names, weights)), device, inductor)

    def describe(self) -> str:
        parts = [f"{self.plan.folds} BatchNorms folded"] if self.plan.folds else []
        if self.channels_last:
            parts.append("channels_last weights")
        parts.append("TorchInductor" if self.inductor else "eager kernels")
        return ", ".join(parts)

    def call(self, *args: torch.Tensor) -> Any:
        with torch.no_grad():  # an inference graph: no autograd state, and one set of Inductor guards
            fn = self._fn
            try:
                return fn(*args)
            except Exception as e:  # noqa: BLE001 - sorted out below: Inductor's failure, or the inputs'
                if fn is self.graph.forward or fn == self._first:
                    raise
                return self._without_inductor(e, args)

    def _first(self, *args: torch.Tensor) -> Any:
        """The first calls: compile (once, under a lock), fall back to the graph if Inductor fails."""
        with self._lock:
            if self._compiled is None:
                self._compiled = torch.compile(self.graph.forward, fullgraph=True, dynamic=None)
            try:
                out = self._compiled(*args)
            except Exception as e:  # noqa: BLE001 - Inductor's own failure: the graph itself still runs
                return self._without_inductor(e, args)
            self._fn = self._compiled
            return out

    def _without_inductor(self, error: Exception, args: tuple[torch.Tensor, ...]) -> Any:
        """After the compiled program raised (at its first call, or when Dynamo compiled it again for
        new input shapes): where the graph itself runs these inputs, it was Inductor's failure, so
        the module goes on without Inductor (one WARNING); where the graph fails too, the inputs
        are at fault and the graph's error is raised. Never a failed call that the graph could run."""
        out = self.graph.forward(*args)  # raises the inputs' own error, if it is theirs
        _warn_once(f"compile:{type(error).__name__}", "TorchInductor could not compile this program (%s: %s); "
                   "it runs without Inductor", type(error).__name__, str(error).splitlines()[0][:300] if str(error)
                   else "")
        self._fn, self.inductor = self.graph.forward, False
        return out

    def refit(self, values: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """New weight arguments for these program weights (by name), folds recomputed; the raw
        weights are swapped whole, so a concurrent call sees the old set or the new one."""
        raw = dict(self._raw)
        for name, v in values.items():
            if name in raw:
                raw[name] = v.detach().to(self.device, raw[name].dtype).contiguous()
        weights = self.plan.derive(raw, channels_last=self.channels_last)
        self._raw, self.weights = raw, weights
        return weights
