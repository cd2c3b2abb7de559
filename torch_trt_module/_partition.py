"""Compile anything eager runs (``partition="auto"``, the default), and say what ran where.

- **A graph the builder cannot take whole** (an op its ONNX parser lacks, such as NonZero on
  TensorRT-RTX), or ops the user keeps in PyTorch (``torch_executed_ops=``): the graph is split,
  engines for the parts the parser takes and PyTorch ATen ops for the rest (:mod:`._segments`,
  :class:`~torch_trt_module._split.SegmentedModule`; it saves and loads). If the split itself
  fails, the whole graph runs without an engine on the next runtime of the chain.
- **A model that cannot be exported whole** (data-dependent control flow, ``.item()``, Python
  torch.export refuses, a dim the export specialised): the model runs through ``torch.compile``
  with this package's backend (:mod:`torch_trt_module._dynamo`). TorchDynamo splits it at the
  graph breaks, every graph between them goes through :func:`compile` and its cache (split again
  where the builder refuses ops: ``partition="split"``), and a graph that still cannot become an
  engine runs in PyTorch. The result is a :class:`PartitionedModule`: the same call and outputs as
  the model; it runs the model's own Python between the graphs, so it cannot be saved (save the
  model and compile it again: the cache makes that fast).
- ``partition="split"`` splits a graph but never captures with graph breaks; ``"never"`` raises.

:func:`explain` reports, without building engines, whether a model exports whole, the builder
parser's verdict on its graph and the split, and otherwise the graph breaks with their reasons and
source lines.
"""

from __future__ import annotations

import copy
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

    It has no weights of its own: the model's Python and the graphs that run in PyTorch read the
    model's tensors, and each engine follows them (``weights="follow"``, the default). So
    ``weight_names`` and ``weights_hash()`` are the model's, and ``refit(weights)`` loads the weights
    into the model itself, in place (where a TRTModule's refit leaves its model alone), after checking
    every name, shape and dtype; every engine follows at its next call.

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
        self.training = False  # its own flag, as a TRTModule starts in eval mode; the model's is left alone
        options = dict(options)
        self.__dict__["_options"] = options  # for a copy: it compiles its own model

        self.__dict__["_made"] = []  # what the backend returned per graph (see parts())

        def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
            fn = _dynamo.backend(gm, example_inputs, options=options)
            self._made.append(fn)
            return fn

        # dynamic=False: a new shape recompiles (logged by the backend); dynamo then makes the dims
        # that changed symbolic, and the backend turns them into profiles. Kept out of the module's
        # children: it wraps the same model, whose weights the state_dict already holds once.
        self.__dict__["_compiled"] = torch.compile(model, backend=backend, dynamic=False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from ._modes import eval_semantics, say_inference_only

        if self.training or self.model.training:
            say_inference_only(self)
        # The Python between the graphs is the model's own: it computes inference semantics (dropout
        # off, BatchNorm running statistics) as the engines do, whatever mode the model is in; every
        # submodule's mode is restored after the call.
        with torch.no_grad(), eval_semantics(self.model):  # engines return no gradients
            return self._compiled(*args, **kwargs)

    def parts(self) -> list[dict[str, Any]]:
        """Each graph dynamo captured so far: its label, ``runs`` ("engine": a TRTModule or
        SegmentedModule built at its first call, in ``module``; "pending": not called yet;
        "pytorch") and, for PyTorch, why. Engines are built at a graph's first call.

        Example:
            >>> [p["runs"] for p in fast.parts()]   # doctest: +SKIP
            ['engine', 'engine']
        """
        from ._dynamo import describe

        return [describe(fn) for fn in self._made]

    @property
    def graphs(self) -> int:
        """How many graphs dynamo captured so far."""
        return len(self._made)

    @property
    def fallbacks(self) -> int:
        """How many of them run in PyTorch, counted from :meth:`parts`: a graph whose engine build
        failed at its first call counts here too."""
        return sum(p["runs"] == "pytorch" for p in self.parts())

    # ------------------------------------------------------------------ the TRTModule API

    @property
    def input_names(self) -> list[str]:
        """The parameters of the model's ``forward``."""
        from ._signature import params_of

        return [p.name for p in params_of(self.model.forward)]

    @property
    def backend(self) -> str:
        """What runs the engines built so far (as :attr:`TRTModule.backend`; several joined by '+'),
        ``pytorch`` where every graph runs in PyTorch, ``unbuilt`` before the first call."""
        from ._composite import backend_of

        if not self._made:
            return "unbuilt"
        return backend_of([p["module"] for p in self.parts() if p["module"] is not None], none="pytorch")

    @property
    def weight_names(self) -> list[str]:
        """The model's parameters and buffers (the weights every graph computes with), by their names."""
        return sorted(self._tensors())

    def weights_hash(self) -> str:
        """sha256 of the model's weights over :attr:`weight_names` (what every graph computes with; an
        engine follows them at its next call), as :meth:`TRTModule.weights_hash`."""
        from ._weights import weights_hash

        return weights_hash(self._tensors())

    def refit(self, weights: Any) -> None:
        """Load ``weights`` (a ``state_dict``, or a module of the same architecture) into the model this
        module runs, in place: every name, shape and dtype is checked first (InputError naming the
        tensor; nothing is half-applied), and every engine follows at its next call. Unlike
        :meth:`TRTModule.refit`, this changes the model: it is what the graphs in PyTorch compute with.

        Example:
            >>> fast.refit(torch.load("checkpoint.pt", weights_only=True))   # doctest: +SKIP
        """
        from ._composite import check_weights, unsaved_buffers

        if self._options.get("weights") == "snapshot":
            raise UsageError("refit() on a PartitionedModule loads the weights into its model, and its engines, "
                             "compiled with weights='snapshot', would not follow them. Fix: compile with "
                             "weights='follow' (the default), or load the weights into the model and compile again")
        ours = self._tensors()
        values = check_weights(ours, weights, optional=unsaved_buffers(self.model))
        with torch.no_grad():
            for name, value in values.items():
                ours[name].copy_(value)

    def _tensors(self) -> dict[str, torch.Tensor]:
        from ._composite import named_tensors

        return named_tensors(self.model)

    # ------------------------------------------------------------------ copying

    def __deepcopy__(self, memo: dict[int, Any]) -> "PartitionedModule":
        # torch.compile's state is not copied: the copy compiles its own copy of the model (each graph a
        # cache hit), so its graphs follow the copy.
        new = type(self)(copy.deepcopy(self.model, memo), self._options, self.reason)
        memo[id(self)] = new
        new.training = self.training
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise UsageError("a PartitionedModule cannot be pickled (torch.save(module), pickle.dumps), nor saved with "
                         f"ttm.save: it {SAVE_REFUSAL.removeprefix('a partitioned module ')}")

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
    segments: list[dict[str, Any]] = field(default_factory=list)  # one graph split: engine and PyTorch parts

    def __str__(self) -> str:
        lines = []
        if self.whole_graph:
            e = self.engine or {}
            lines.append(f"exports as one graph: {e.get('nodes')} ONNX nodes; inputs {e.get('inputs')}; "
                         f"outputs {e.get('outputs')}")
            lines.append(f"builder ({e.get('builder')}): {e.get('verdict')}")
            if self.segments:
                from ._segments import Segment

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
    from ._compile import export_onnx
    from ._modes import eval_semantics
    from ._signature import split_inputs

    export_options = {k: v for k, v in options.items()
                      if k in ("dynamic", "precision", "exporter", "opset", "max_batch", "verify", "keep_fp32")}
    try:
        exported = export_onnx(model, example_inputs, **export_options)
    except TorchTRTError as e:
        report = PartitionReport(whole_graph=False, export_error=str(e).splitlines()[0])  # read whole
        with eval_semantics(model):  # what compile() would capture: the inference semantics
            _graph_breaks(model, example_inputs, report, split_inputs)
        return report
    from ._onnx import load, op_summary

    from ._settings import Settings

    settings = Settings.from_options(**options)
    nodes = len(load(exported.onnx).graph.node)
    builder, verdict, refused = _parser_verdict(exported)
    report = PartitionReport(whole_graph=True, engine={
        "nodes": nodes, "ops": op_summary(exported.onnx),
        "inputs": [f"{s.name}: {s.dtype} {s.profile_str()}" for s in exported.inputs],
        "outputs": [f"{s.name}: {s.dtype}" for s in exported.outputs], "builder": builder, "verdict": verdict})
    if settings.partition != "never" and builder != "none" and (refused or settings.torch_executed_ops):
        from ._split import split_plan

        args, kwargs = split_inputs(example_inputs)
        with eval_semantics(model):
            plan = split_plan(model, args, kwargs, settings, builder)[0]
        report.segments = [seg.to_json() for seg in plan.segments]
    return report


def _parser_verdict(exported: Any) -> tuple[str, str, bool]:
    """Which builder would build here, whether its ONNX parser takes the graph, and if it refused."""
    from ._errors import BackendUnavailable, BuildError

    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            from .backends._trt_loader import import_tensorrt

            _, trt = import_tensorrt(name)
        except (BackendUnavailable, ImportError):
            continue
        from .backends._trt_build import parse_onnx
        from .backends._trt_loader import capture_log, logger

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

    from ._quiet import quiet_torch
    from ._signature import copy_call

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
