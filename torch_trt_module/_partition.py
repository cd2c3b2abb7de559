"""Compile anything eager runs (``partition="auto"``, the default), and say what ran where.

What this step does today, and what it does not yet:

- **A graph the builder cannot take** (an op its ONNX parser lacks, such as NonZero on
  TensorRT-RTX): the whole graph keeps its ONNX graph and PyTorch program without a plan, and
  runs on the next runtime of the chain (ONNX Runtime on the CPU, the PyTorch program on a GPU),
  with one WARNING naming the op. It is not yet split into an engine plus PyTorch segments.
- **A model that cannot be exported whole** (data-dependent control flow, ``.item()``, Python
  torch.export refuses, a dim the export specialised): the model runs through ``torch.compile``
  with this package's backend (:mod:`torch_trt_module._dynamo`). TorchDynamo splits it at the
  graph breaks, every graph between them goes through :func:`compile` and its cache, and a graph
  that still cannot become an engine runs in PyTorch. The result is a :class:`PartitionedModule`:
  the same call and outputs as the model; it runs the model's own Python between the graphs,
  so it cannot be saved (save the model and compile it again: the cache makes that fast).
- ``partition="never"`` raises instead, as before.

:func:`explain` reports, without building engines, whether a model exports whole, the builder
parser's verdict on its graph, and otherwise the graph breaks with their reasons and source lines.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ._errors import TorchTRTError, UsageError

SAVE_REFUSAL = ("a partitioned module runs the model's own Python between its graphs, so it cannot be saved as "
                "an engine. Fix: save the model (its state_dict) and compile it again after loading; the engine "
                "cache makes that a cache hit per graph")

__all__ = ["SAVE_REFUSAL", "PartitionReport", "PartitionedModule", "explain"]

log = logging.getLogger(__name__)


class PartitionedModule(torch.nn.Module):
    """A model that could not be exported whole, run through ``torch.compile`` with this package's
    backend: engines for the graphs between graph breaks, PyTorch for the rest (see the module
    docstring). Inference only: calls run under ``torch.no_grad()``.

    Example:
        >>> fast = torch_trt_module.compile(model_with_item_branch, x)   # doctest: +SKIP
        >>> fast                                                          # doctest: +SKIP
        PartitionedModule(graphs=2, on engines=2, in PyTorch=0, why='data-dependent control flow ...')
    """

    def __init__(self, model: torch.nn.Module, options: dict[str, Any], reason: str) -> None:
        super().__init__()
        from . import _dynamo

        self.model = model
        self.reason = reason
        self.graphs = 0
        self.fallbacks = 0
        options = dict(options)

        def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
            before = _dynamo.STATS["fallbacks"]
            fn = _dynamo.backend(gm, example_inputs, options=options)
            self.graphs += 1
            self.fallbacks += _dynamo.STATS["fallbacks"] - before
            return fn

        # dynamic=False: a new shape recompiles (logged by the backend); dynamo then makes the dims
        # that changed symbolic, and the backend turns them into profiles. Kept out of the module's
        # children: it wraps the same model, whose weights the state_dict already holds once.
        self.__dict__["_compiled"] = torch.compile(model, backend=backend, dynamic=False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.model.training:
            raise UsageError("the model is in training mode; a compiled module is inference-only: call model.eval()")
        with torch.no_grad():  # engines return no gradients; the graphs run on them only without grad
            return self._compiled(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"graphs={self.graphs}, on engines={self.graphs - self.fallbacks}, in PyTorch={self.fallbacks}, "
                f"why={self.reason.splitlines()[0][:120]!r}")


@dataclass
class PartitionReport:
    """What :func:`explain` found. ``str()`` gives the report a person reads."""

    whole_graph: bool
    export_error: str | None = None
    engine: dict[str, Any] | None = None  # the whole graph: nodes, inputs, outputs, builder, verdict
    graph_breaks: list[dict[str, str]] = field(default_factory=list)  # reason, where
    graphs: list[dict[str, Any]] = field(default_factory=list)  # per dynamo graph: ops

    def __str__(self) -> str:
        lines = []
        if self.whole_graph:
            e = self.engine or {}
            lines.append(f"exports as one graph: {e.get('nodes')} ONNX nodes; inputs {e.get('inputs')}; "
                         f"outputs {e.get('outputs')}")
            lines.append(f"builder ({e.get('builder')}): {e.get('verdict')}")
            return "\n".join(lines)
        lines.append(f"does not export as one graph: {self.export_error}")
        lines.append(f"torch.compile splits it into {len(self.graphs)} graph(s) at {len(self.graph_breaks)} "
                     "graph break(s); each graph goes through compile(), the code between them runs in Python:")
        for i, b in enumerate(self.graph_breaks, 1):
            lines.append(f"  break {i}: {b['reason']} at {b['where']}")
        for i, g in enumerate(self.graphs, 1):
            lines.append(f"  graph {i}: {g['ops']} ops ({g['summary']})")
        return "\n".join(lines)


def explain(model: torch.nn.Module, example_inputs: Any, **options: Any) -> PartitionReport:
    """What ``compile(model, example_inputs, **options)`` would do with the model, without building:
    whether it exports as one graph and whether the builder's ONNX parser takes that graph (and if
    not, which op it refuses); otherwise where torch.compile breaks it into graphs, and why.

    Example:
        >>> print(torch_trt_module.explain(torch.nn.Linear(4, 2).eval(), torch.randn(3, 4)))  # doctest: +SKIP
        exports as one graph: 1 ONNX nodes; inputs ['input: float32 (1..32, 4)']; outputs ['output: float32']
        builder (tensorrt_rtx): the parser takes every node
    """
    from ._compile import export_onnx
    from ._signature import split_inputs

    export_options = {k: v for k, v in options.items()
                      if k in ("dynamic", "precision", "exporter", "opset", "max_batch", "verify", "keep_fp32")}
    try:
        exported = export_onnx(model, example_inputs, **export_options)
    except TorchTRTError as e:
        report = PartitionReport(whole_graph=False, export_error=str(e).splitlines()[0][:300])
        _graph_breaks(model, example_inputs, report, split_inputs)
        return report
    from ._onnx import load, op_summary

    nodes = len(load(exported.onnx).graph.node)
    builder, verdict = _parser_verdict(exported)
    return PartitionReport(whole_graph=True, engine={
        "nodes": nodes, "ops": op_summary(exported.onnx),
        "inputs": [f"{s.name}: {s.dtype} {s.profile_str()}" for s in exported.inputs],
        "outputs": [f"{s.name}: {s.dtype}" for s in exported.outputs], "builder": builder, "verdict": verdict})


def _parser_verdict(exported: Any) -> tuple[str, str]:
    """Which builder would build here, and whether its ONNX parser takes the graph."""
    from ._errors import BackendUnavailable, BuildError

    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            from .backends._trt_loader import import_tensorrt

            _, trt = import_tensorrt(name)
        except (BackendUnavailable, ImportError):
            continue
        from .backends._trt_build import parse_onnx
        from .backends._trt_loader import capture_log, logger

        with capture_log():
            network = trt.Builder(logger(trt)).create_network(0)
            try:
                parse_onnx(trt, name, network, exported.onnx)
            except BuildError as e:
                said = " ".join(line.strip() for line in str(e).splitlines()[:3])[:400]
                return name, (f"the parser refuses the graph: {said}; under "
                              "partition='auto' the graph runs on the next runtime (ONNX Runtime, or the PyTorch "
                              "program on a GPU)")
        return name, "the parser takes every node"
    return "none", "no TensorRT builder is installed here: the graph runs on ONNX Runtime or PyTorch"


def _graph_breaks(model: torch.nn.Module, example_inputs: Any, report: PartitionReport, split: Any) -> None:
    import torch._dynamo

    args, kwargs = split(example_inputs)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            out = torch._dynamo.explain(model)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    for br in out.break_reasons:
        frames = [f for f in getattr(br, "user_stack", []) or []]
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "(unknown)"
        report.graph_breaks.append({"reason": str(br.reason).splitlines()[0][:200], "where": where})
    for gm in out.graphs:
        ops = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
        names: dict[str, int] = {}
        for n in ops:
            key = getattr(n.target, "__name__", str(n.target))
            names[key] = names.get(key, 0) + 1
        summary = ", ".join(f"{k} {v}" for k, v in sorted(names.items(), key=lambda kv: -kv[1])[:6])
        report.graphs.append({"ops": len(ops), "summary": summary})
