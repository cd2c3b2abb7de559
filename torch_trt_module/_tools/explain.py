"""``explain()``: what :func:`torch_trt_module.compile` would do with a model, without building engines.

It reports whether a model exports whole, the builder parser's verdict on its graph and the split,
and otherwise the graph breaks with their reasons and source lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .._core.modes import eval_semantics
from .._core.quiet import quiet_torch
from .._core.settings import Settings
from .._core.signature import copy_call, split_inputs
from .._errors import BackendUnavailable, BuildError, TorchTRTError
from .._formats.onnx import load, op_summary
from .._partition.segments import Segment
from .._partition.split import split_plan
from .._pipeline.compile import export_onnx
from ..backends._trt_build import parse_onnx
from ..backends._trt_loader import capture_log, import_tensorrt, logger

__all__ = ["PartitionReport", "explain"]


@dataclass
class PartitionReport:
    """What :func:`explain` found. ``str()`` gives the report a person reads."""

    whole_graph: bool
    export_error: str | None = None
    engine: dict[str, Any] | None = None  # the whole graph: nodes, inputs, outputs, builder, verdict
    graph_breaks: list[dict[str, str]] = field(default_factory=list)  # reason, where
    graphs: list[dict[str, Any]] = field(default_factory=list)  # per dynamo graph: ops
    segments: list[dict[str, Any]] = field(default_factory=list)  # one graph split: engine and PyTorch parts

    def __str__(self) -> str:
        lines = []
        if self.whole_graph:
            e = self.engine or {}
            lines.append(f"exports as one graph: {e.get('nodes')} ONNX nodes; inputs {e.get('inputs')}; "
                         f"outputs {e.get('outputs')}")
            lines.append(f"builder ({e.get('builder')}): {e.get('verdict')}")
            if self.segments:
                parts = [Segment.from_json(d) for d in self.segments]
                lines.append(f"split into {sum(p.kind == 'engine' for p in parts)} engine part(s) and "
                             f"{sum(p.kind == 'pytorch' for p in parts)} PyTorch part(s):")
                lines.extend(f"  {p.describe()}" for p in parts)
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
    whether it exports as one graph and whether the builder's ONNX parser takes that graph; if not
    (or ``torch_executed_ops`` is set), its split: each engine part with its ops and input and output
    shapes, each PyTorch part with its ops and why (the parser's refusal, ``min_block_size``,
    ``torch_executed_ops``); for a model that does not export whole, where torch.compile breaks it
    into graphs, with each break's reason and source line.

    Example:
        >>> print(torch_trt_module.explain(torch.nn.Linear(4, 2).eval(), torch.randn(3, 4)))  # doctest: +SKIP
        exports as one graph: 1 ONNX nodes; inputs ['input: float32 (1..32, 4)']; outputs ['output: float32']
        builder (tensorrt_rtx): the parser takes every node
    """
    export_options = {k: v for k, v in options.items()
                      if k in ("dynamic", "precision", "exporter", "opset", "max_batch", "verify", "keep_fp32")}
    try:
        exported = export_onnx(model, example_inputs, **export_options)
    except TorchTRTError as e:
        report = PartitionReport(whole_graph=False, export_error=str(e).splitlines()[0])  # read whole
        with eval_semantics(model):  # what compile() would capture: the inference semantics
            _graph_breaks(model, example_inputs, report, split_inputs)
        return report
    settings = Settings.from_options(**options)
    nodes = len(load(exported.onnx).graph.node)
    builder, verdict, refused = _parser_verdict(exported)
    report = PartitionReport(whole_graph=True, engine={
        "nodes": nodes, "ops": op_summary(exported.onnx),
        "inputs": [f"{s.name}: {s.dtype} {s.profile_str()}" for s in exported.inputs],
        "outputs": [f"{s.name}: {s.dtype}" for s in exported.outputs], "builder": builder, "verdict": verdict})
    if settings.partition != "never" and builder != "none" and (refused or settings.torch_executed_ops):
        args, kwargs = split_inputs(example_inputs)
        with eval_semantics(model):
            plan = split_plan(model, args, kwargs, settings, builder)[0]
        report.segments = [seg.to_json() for seg in plan.segments]
    return report


def _parser_verdict(exported: Any) -> tuple[str, str, bool]:
    """Which builder would build here, whether its ONNX parser takes the graph, and if it refused."""
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            _, trt = import_tensorrt(name)
        except (BackendUnavailable, ImportError):
            continue
        with capture_log(quiet=True):  # a probe: the refusal is reported below, not logged as an error
            network = trt.Builder(logger(trt)).create_network(0)
            try:
                parse_onnx(trt, name, network, exported.onnx, warn=False)
            except BuildError as e:
                said = " ".join(line.strip() for line in str(e).splitlines()[:3])[:400]
                return name, (f"the parser refuses the graph: {said}; under partition='auto' the graph is "
                              "split into engines for the parts it takes and PyTorch for the rest"), True
        return name, "the parser takes every node", False
    return "none", "no TensorRT builder is installed here: the graph runs on ONNX Runtime or PyTorch", False


def _graph_breaks(model: torch.nn.Module, example_inputs: Any, report: PartitionReport, split: Any) -> None:
    import torch._dynamo

    args, kwargs = copy_call(*split(example_inputs))  # the model runs: it may write to its inputs
    torch._dynamo.reset()
    try:
        with torch.no_grad(), quiet_torch("torch._dynamo.explain"):
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
