"""Partial compilation inside one graph: engines for what the builder takes, PyTorch for the rest.

When a model exports as one graph but the builder's ONNX parser refuses some of its nodes (NonZero
on TensorRT-RTX, case #18), or the user keeps ops in PyTorch (``torch_executed_ops=``), the graph
is split instead of refused:

1. torch.export's program of the model is translated to ONNX without optimization, so each ONNX
   node names the ATen node it came from (``pkg.torch.onnx.fx_node``), in the program the
   translator decomposed (kept as ``exported_program``);
2. the parser says which ONNX nodes it takes (``supports_model_v2``: the nodes of its subgraphs;
   the rest, with its error for them). No operator list is kept here: the parser is asked;
3. the decomposed program's graph is partitioned (``CapabilityBasedPartitioner``: connected runs
   of nodes the parser takes, never a cycle between parts); a part with fewer than
   ``min_block_size`` ops, an input whose size depends on data, or a size crossing its boundary,
   stays in PyTorch;
4. each part goes through :func:`compile` (export, build, cache, checks) with ``partition="never"``;
   its profile follows from the model's (each symbolic size evaluated at the profile's min, opt
   and max). A part whose build fails stays in PyTorch, with the reason.

The rest of the graph runs as PyTorch ATen ops between the engines. :mod:`torch_trt_module._partition.split` holds the
module that runs it (:class:`SegmentedModule`), and how it is saved.
"""

from __future__ import annotations

import contextlib
import io
import logging
import operator
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .._core.settings import Settings
from .._errors import BackendUnavailable, TorchTRTError
from .._export.exporters import DEFAULT_OPSET
from ..backends._trt_loader import capture_log, import_tensorrt, logger

__all__ = ["Segment", "SplitPlan", "fuse", "parser_refusals", "plan_split"]

log = logging.getLogger(__name__)

_FX_NODE = re.compile(r"%(\S+)")
_SIZE_OPS = {"aten.sym_size.int", "aten.sym_numel.default", "aten.sym_stride.int"}


@dataclass
class Segment:
    """One part of a split graph: an engine's ops, or ops that stay in PyTorch and why."""

    kind: str  # "engine" or "pytorch"
    nodes: list[str]  # FX node names, in graph order
    ops: dict[str, int]  # ATen op -> count
    why: str = ""  # pytorch: the parser's refusal, min_block_size, torch_executed_ops, ...
    inputs: list[str] = field(default_factory=list)  # "name: dtype (shape)" at the example
    outputs: list[str] = field(default_factory=list)
    name: str = ""  # the engine's submodule (fused_N)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "nodes": self.nodes, "ops": self.ops, "why": self.why, "inputs": self.inputs,
                "outputs": self.outputs, "name": self.name}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Segment":
        return cls(**d)

    def describe(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.ops.items(), key=lambda kv: -kv[1])[:6])
        n = sum(self.ops.values())
        if self.kind == "engine":
            return (f"engine {self.name}: {n} ops ({ops}); inputs {self.inputs}; outputs {self.outputs}"
                    + (f"; {self.why}" if self.why else ""))
        return f"PyTorch: {n} ops ({ops}): {self.why}"


@dataclass
class SplitPlan:
    """What :func:`plan_split` found: the decomposed program, its graph with the engine parts fused
    into submodules (``fused_N``, still PyTorch), and every part with its reason."""

    program: Any  # the decomposed ExportedProgram (its module() is the graph that runs)
    graph: torch.fx.GraphModule
    segments: list[Segment]
    example: list[torch.Tensor]  # the flat example leaves
    profiles: dict[str, Any]  # per flat input: (min, opt, max)
    names: list[str]
    inputs: tuple[Any, ...] = ()  # TensorSpec per flat input (filled by _split.split_plan)

    @property
    def engines(self) -> list[Segment]:
        return [s for s in self.segments if s.kind == "engine"]


def _target(node: torch.fx.Node) -> str:
    t = node.target
    return str(t) if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))


def _compute(node: torch.fx.Node) -> bool:
    """A node that counts toward ``min_block_size`` (not a getitem or a size query)."""
    return node.op == "call_function" and node.target is not operator.getitem and _target(node) not in _SIZE_OPS


def _matches(node: torch.fx.Node, ops: Sequence[str]) -> bool:
    t = node.target
    if not isinstance(t, torch._ops.OpOverload):
        return False
    return str(t) in ops or str(t.overloadpacket) in ops


def parser_refusals(onnx: bytes, builder: str) -> dict[str, str]:
    """FX node name -> the parser's reason, for each node of ``onnx`` (a graph translated without
    optimization) that the ``builder``'s ONNX parser does not take. Empty where no TensorRT builder
    is installed (ONNX Runtime then runs every node)."""
    import onnx as onnx_lib

    try:
        _, trt = import_tensorrt(builder)
    except (BackendUnavailable, ImportError):
        return {}
    proto = onnx_lib.load_from_string(onnx)
    with capture_log(quiet=True):
        network = trt.Builder(logger(trt)).create_network(0)
        parser = trt.OnnxParser(network, logger(trt))
        whole = parser.supports_model_v2(onnx)
        taken: set[int] = set()
        for i in range(parser.num_subgraphs):
            taken.update(int(k) for k in parser.get_subgraph_nodes(i))
        said = {int(parser.get_error(e).node()): parser.get_error(e).desc().strip().splitlines()[-1][:200]
                for e in range(parser.num_errors)}
    if whole:
        return {}
    refused: dict[str, str] = {}
    for k, node in enumerate(proto.graph.node):
        if k in taken and k not in said:
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        m = _FX_NODE.match(meta.get("pkg.torch.onnx.fx_node", ""))
        if m is None:
            raise TorchTRTError(f"ONNX node {node.name!r} ({node.op_type}) names no PyTorch node; the graph cannot "
                                "be split there")
        reason = said.get(k, f"the parser does not take ONNX {node.op_type}")
        refused.setdefault(m.group(1), f"{builder}'s parser refuses ONNX {node.op_type}: {reason}")
    return refused


def _translate(program: Any, leaves: Sequence[torch.Tensor], names: list[str]) -> tuple[bytes, Any]:
    """The program in ONNX, unoptimized (one ONNX node per ATen node, or a few), and the decomposed
    program whose node names the ONNX nodes carry."""

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, tuple(leaves), None, dynamo=True, input_names=names,
                                         opset_version=DEFAULT_OPSET, verbose=False, optimize=False,
                                         external_data=False)
    assert onnx_program is not None
    return onnx_program.model_proto.SerializeToString(), onnx_program.exported_program


def _copy_size_queries(gm: torch.fx.GraphModule) -> None:
    """One size query and one weight read per user: a size read by two parts would otherwise cross a
    boundary as an int, and a weight shared by two parts would become an engine's input."""
    for node in list(gm.graph.nodes):
        shared = node.op == "get_attr" or (node.op == "call_function" and _target(node) in _SIZE_OPS)
        if not shared or len(node.users) < 2:
            continue
        for user in list(node.users)[1:]:
            with gm.graph.inserting_after(node):
                copy = gm.graph.create_node(node.op, node.target, node.args, node.kwargs)
                copy.meta = dict(node.meta)
            user.replace_input_with(node, copy)
    gm.graph.lint()
    gm.recompile()


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else node


def _boundary(nodes: set[torch.fx.Node]) -> tuple[list[torch.fx.Node], list[torch.fx.Node]]:
    ins: dict[torch.fx.Node, None] = {}
    outs: dict[torch.fx.Node, None] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in nodes:
                ins[a] = None
        if any(u not in nodes for u in n.users):
            outs[n] = None
    return list(ins), list(outs)


def _unbacked(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and any(
        isinstance(s, torch.SymInt) and any(str(x).startswith("u") for x in s.node.expr.free_symbols)
        for s in t.shape)


def _refuse_part(nodes: set[torch.fx.Node], settings: Settings) -> str:
    """Why a part the parser takes still stays in PyTorch, or ''."""
    n = sum(1 for x in nodes if _compute(x))
    if n < settings.min_block_size:
        return f"min_block_size: {n} op(s), fewer than min_block_size={settings.min_block_size}"
    ins, outs = _boundary(nodes)
    for x in ins + outs:
        v = _val(x)
        if not isinstance(v, torch.Tensor):
            return f"a non-tensor value ({x.name}: {type(v).__name__}) crosses its boundary"
    for x in ins:
        if _unbacked(_val(x)):
            return (f"its input {x.name} has a size that depends on data ({tuple(_val(x).shape)}); an engine needs "
                    "a profile for it")
    return ""


def _shape_str(node: torch.fx.Node, ranges: dict[Any, tuple[int, int]]) -> str:
    """``name: dtype (1..32, 12, 9)``: each symbolic size as its range over the profile (torch's
    ``s39`` means nothing to a reader), ``?`` for one that depends on data."""
    v = _val(node)
    if not isinstance(v, torch.Tensor):
        return f"{node.name}: {type(v).__name__}"
    sizes = []
    for s in v.shape:
        if not isinstance(s, torch.SymInt):
            sizes.append(str(s))
            continue
        try:
            lo, hi = sorted(int(s.node.expr.subs({k: r[i] for k, r in ranges.items()})) for i in (0, 1))
        except (TypeError, ValueError):  # a symbol left free: a size that depends on data
            sizes.append("?")
            continue
        sizes.append(str(lo) if lo == hi else f"{lo}..{hi}")
    return f"{node.name}: {str(v.dtype).replace('torch.', '')} ({', '.join(sizes)})"


def _symbol_ranges(program: Any, names: list[str], profiles: dict[str, Any]) -> dict[Any, tuple[int, int]]:
    """Each input size symbol of ``program`` with its (min, max) in the profile."""
    import sympy

    ranges: dict[Any, tuple[int, int]] = {}
    user = [n for n in program.graph.nodes if n.op == "placeholder" and n.name not in _lifted(program)]
    for node, name in zip(user, names):
        v = _val(node)
        for d, s in enumerate(v.shape if isinstance(v, torch.Tensor) else ()):
            if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol):
                ranges[s.node.expr] = (profiles[name][0][d], profiles[name][2][d])
    return ranges


def _ops(nodes: Sequence[torch.fx.Node]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in nodes:
        if _compute(n):
            key = _target(n)
            out[key] = out.get(key, 0) + 1
    return out


def plan_split(program: Any, leaves: Sequence[torch.Tensor], names: list[str], profiles: dict[str, Any],
               settings: Settings, builder: str) -> SplitPlan:
    """Split ``program`` (torch.export's, flat tensors in and out) into engine parts and PyTorch, by the
    ``builder``'s parser and ``settings`` (``min_block_size``, ``torch_executed_ops``). Builds nothing."""
    from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
    from torch.fx.passes.operator_support import OperatorSupportBase

    onnx, decomposed = _translate(program, leaves, names)
    refused = parser_refusals(onnx, builder)
    gm = decomposed.module()
    _copy_size_queries(gm)
    forced = settings.torch_executed_ops or ()
    why: dict[str, str] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.name in refused:
            why[n.name] = refused[n.name]
        elif _matches(n, forced):
            why[n.name] = f"torch_executed_ops: {n.target.overloadpacket}"
        elif _compute(n) and not isinstance(_val(n), (torch.Tensor, list, tuple)):
            why[n.name] = f"computes a {type(_val(n)).__name__}, not a tensor"

    class _Support(OperatorSupportBase):  # type: ignore[misc]
        def is_node_supported(self, submodules: Any, node: torch.fx.Node) -> bool:
            return node.op == "call_function" and node.name not in why

    partitioner = CapabilityBasedPartitioner(gm, _Support(), allows_single_node_partition=True)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    parts = sorted(partitioner.propose_partitions(), key=lambda p: min(order[n] for n in p.nodes))
    kept, segments = [], []
    ranges = _symbol_ranges(decomposed, names, profiles)
    for part in parts:
        nodes = set(part.nodes)
        nodes |= {a for n in part.nodes for a in n.all_input_nodes if a.op == "get_attr"}  # weights go inside
        reason = _refuse_part(nodes, settings)
        ordered = sorted(nodes, key=order.__getitem__)
        if reason:
            segments.append(Segment("pytorch", [n.name for n in ordered], _ops(ordered), reason))
            continue
        ins, outs = _boundary(nodes)
        seg = Segment("engine", [n.name for n in ordered], _ops(ordered), "",
                      [_shape_str(x, ranges) for x in ins], [_shape_str(x, ranges) for x in outs])
        kept.append((part, seg))
        segments.append(seg)
    refused_nodes = [n for n in gm.graph.nodes if n.name in why and _compute(n)]
    for reason in dict.fromkeys(why[n.name] for n in refused_nodes):
        group = [n for n in refused_nodes if why[n.name] == reason]
        segments.append(Segment("pytorch", [n.name for n in group], _ops(group), reason))
    fused = fuse(gm, [seg.nodes for _, seg in kept])
    for i, (_, seg) in enumerate(kept):
        seg.name = f"fused_{i}"
    return SplitPlan(decomposed, fused, segments, list(leaves), profiles, names)


def fuse(gm: torch.fx.GraphModule, parts: Sequence[Sequence[str]]) -> torch.fx.GraphModule:
    """``gm`` with each part (FX node names) moved into a submodule ``fused_N`` (in this order)."""
    from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

    by_name = {n.name: n for n in gm.graph.nodes}
    missing = [name for part in parts for name in part if name not in by_name]
    if missing:
        raise TorchTRTError(f"the graph has no node(s) {missing[:5]}: it is not the graph that was split")
    fused = fuse_by_partitions(gm, [dict.fromkeys(by_name[name] for name in part) for part in parts])
    for m in fused.modules():  # an exported program's module refuses .eval(); it is an inference graph
        m.training = False
    return fused


def segment_profile(call: torch.fx.Node, plan: SplitPlan) -> dict[str, dict[int, tuple[int, int, int]]]:
    """compile()'s ``dynamic=`` for a fused part: each symbolic size of its inputs evaluated at the
    model's profile min, opt and max (sizes are monotone in the model's dims)."""
    import sympy

    points: list[dict[Any, int]] = [{}, {}, {}]
    placeholders = [n for n in plan.program.graph.nodes if n.op == "placeholder"]
    user = [n for n in placeholders if n.name not in _lifted(plan.program)]
    for node, name in zip(user, plan.names):
        v = _val(node)
        if not isinstance(v, torch.Tensor):
            continue
        for d, s in enumerate(v.shape):
            if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol):
                for k in range(3):
                    points[k][s.node.expr] = plan.profiles[name][k][d]
    sub: torch.fx.GraphModule = getattr(call.graph.owning_module, str(call.target))
    arg_names = [n.name for n in sub.graph.nodes if n.op == "placeholder"]
    dynamic: dict[str, dict[int, tuple[int, int, int]]] = {}
    for name, arg in zip(arg_names, call.args):
        v = _val(arg)
        for d, s in enumerate(v.shape if isinstance(v, torch.Tensor) else ()):
            if not isinstance(s, torch.SymInt):
                continue
            lo, opt, hi = (int(s.node.expr.subs(p)) for p in points)
            dynamic.setdefault(name, {})[d] = (min(lo, hi), opt, max(lo, hi))
    return dynamic


def _lifted(program: Any) -> set[str]:
    sig = program.graph_signature
    return set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers) | set(
        getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
