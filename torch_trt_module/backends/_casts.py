"""The casts an fp16 or bf16 program keeps after BatchNorm folding, dropped (a pass of
backends/_torch_passes.py).

A ``precision="fp16"`` export keeps BatchNorm in fp32, so every convolution is followed by a cast
up, the BatchNorm and its activation in fp32, and a cast down before the next convolution. Once
the BatchNorm is folded into the convolution the casts stay: in mobilenet_v3_small's fp16 program
77 ``aten.to.dtype`` nodes around activations, pooling and the squeeze-excitation products, and
round trips (``to(to(x, float32), float16)``) with nothing in between. Under Inductor the
activations between them are written to memory in fp32 where a tensor has two readers, twice the
bytes of the fp16 ones: the fp16 call's elementwise work was no faster than fp32's on the H100.

:func:`drop_casts` finds each region that starts at casts of fp16 (or bf16) tensors to fp32 and
ends at casts back to that dtype, with only elementwise ops, pooling and means in between whose
other operands are already in the low dtype, and runs the region in the low dtype instead. Each
op of the region then computes in fp32 internally and rounds once, as it did before the cast down
(PyTorch's and Inductor's half kernels compute in fp32): a region of one op gives the same bits.
A region of several ops rounds after each, as ``model.half()`` does. Anything else (LayerNorm,
softmax, an fp32 operand, a graph output, an op it does not know) leaves the region as it was.

Example:
    >>> n = drop_casts(graph, {weight_node: torch.float16})   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch.fx import Graph, Node

__all__ = ["drop_casts", "infer_dtypes"]

_aten = torch.ops.aten
_TO = _aten.to.dtype
_LOW = (torch.float16, torch.bfloat16)
#: Ops whose output has their weight's dtype (argument 1).
_WEIGHTED = {_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default, _aten.linear.default}
#: One tensor in (argument 0), its dtype out; the rest are not tensors.
_UNARY = {_aten.relu.default, _aten.relu_.default, _aten.hardswish.default, _aten.hardswish_.default,
          _aten.hardsigmoid.default, _aten.hardsigmoid_.default, _aten.sigmoid.default, _aten.silu.default,
          _aten.silu_.default, _aten.gelu.default, _aten.tanh.default, _aten.dropout.default,
          _aten.dropout_.default, _aten.clone.default, _aten.adaptive_avg_pool2d.default,
          _aten.avg_pool2d.default, _aten.max_pool2d.default, _aten.mean.dim, _aten.flatten.using_ints,
          _aten.view.default, _aten.reshape.default, _aten.hardtanh.default, _aten.hardtanh_.default}
#: Two operands (tensors or numbers), the common dtype out.
_BINARY = {_aten.add.Tensor, _aten.add_.Tensor, _aten.mul.Tensor, _aten.mul_.Tensor, _aten.sub.Tensor,
           _aten.div.Tensor}
#: Those that write into argument 0.
_IN_PLACE = {_aten.relu_.default, _aten.hardswish_.default, _aten.hardsigmoid_.default, _aten.silu_.default,
             _aten.dropout_.default, _aten.hardtanh_.default, _aten.add_.Tensor, _aten.mul_.Tensor}
#: Those whose output may be their input, or a view of it (dropout outside training returns it).
_ALIASING = {_aten.view.default, _aten.reshape.default, _aten.flatten.using_ints, _aten.dropout.default,
             _aten.dropout_.default}
#: The largest region rewritten (a bound on the walk, far above a block's few ops).
_MAX_REGION = 256


def infer_dtypes(graph: Graph, known: Mapping[Node, torch.dtype]) -> dict[Node, torch.dtype]:
    """The dtype of each node that follows from ``known`` (the weights') through casts, weighted ops
    and the ops of :data:`_UNARY` and :data:`_BINARY`; the others are left out (unknown)."""
    dt: dict[Node, torch.dtype] = dict(known)
    for n in graph.nodes:
        if n.op != "call_function" or "dtype" in n.kwargs:
            continue
        if n.target is _TO and len(n.args) >= 2 and isinstance(n.args[1], torch.dtype):
            dt[n] = n.args[1]
        elif n.target in _WEIGHTED and len(n.args) > 1 and n.args[1] in dt:
            dt[n] = dt[n.args[1]]
        elif n.target in _UNARY and n.args and n.args[0] in dt:
            dt[n] = dt[n.args[0]]
        elif n.target in _BINARY and len(n.args) >= 2:
            tensors = [a for a in n.args[:2] if isinstance(a, Node)]
            kinds = {dt.get(a) for a in tensors}
            if tensors and len(kinds) == 1 and None not in kinds:
                dt[n] = kinds.pop()  # type: ignore[assignment]
    return dt


def _widening(n: object, dt: Mapping[Node, torch.dtype], low: torch.dtype | None = None) -> bool:
    """Whether ``n`` is ``to(x, float32)`` of a low-precision ``x`` (of ``low`` where given)."""
    if not (isinstance(n, Node) and n.op == "call_function" and n.target is _TO and len(n.args) == 2
            and n.args[1] == torch.float32 and not n.kwargs):
        return False
    src = dt.get(n.args[0])  # type: ignore[arg-type]
    return src in _LOW if low is None else src == low


def _region(entry: Node, dt: Mapping[Node, torch.dtype]) -> tuple[set[Node], set[Node], set[Node]] | None:
    """The region that starts at ``entry``: its entries (casts up), inner ops and exits (casts down),
    or None where it cannot run in the low dtype."""
    low = dt[entry.args[0]]  # type: ignore[index]
    entries, inner, exits = {entry}, set(), set()
    todo = [entry]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in entries or u in inner or u in exits:
                continue
            if u.op != "call_function":
                return None  # the graph's output: its dtype would change
            if u.target is _TO and len(u.args) == 2 and u.args[1] == low and not u.kwargs:
                exits.add(u)
                continue
            if any(isinstance(a, torch.dtype) for a in (*u.args, *u.kwargs.values())):
                return None  # an op told its output dtype
            if u.target in _UNARY:
                if u.args[0] is not n or any(isinstance(a, Node) for a in (*u.args[1:], *u.kwargs.values())):
                    return None
            elif u.target in _BINARY:
                for a in (*u.args, *u.kwargs.values()):
                    if not isinstance(a, Node) or a in entries or a in inner:
                        continue
                    if _widening(a, dt, low):
                        entries.add(a)  # another cast up joins (a residual add of two low tensors)
                        todo.append(a)
                    elif dt.get(a) != low:
                        return None
            else:
                return None
            inner.add(u)
            todo.append(u)
            if len(inner) > _MAX_REGION:
                return None
    if any(u.target in _IN_PLACE and not _fresh(u.args[0], entries) for u in inner):
        return None
    return entries, inner, exits


def _fresh(target: object, entries: set[Node]) -> bool:
    """Whether an in-place op may write into ``target`` once the casts are gone: back through the
    in-place ops before it (each returns its input) and the casts that go, every tensor has this
    one reader, and the first is an op's own new output: never an input, a weight or a view."""
    while True:
        if not isinstance(target, Node) or target.op != "call_function" or len(target.users) != 1:
            return False
        if target in entries or target.target in _IN_PLACE:
            target = target.args[0]
            continue
        return target.target is not _TO and target.target not in _ALIASING


def drop_casts(graph: Graph, known: Mapping[Node, torch.dtype]) -> int:
    """Run every region of ``graph`` between casts up to fp32 and back down in the low dtype (see the
    module's docstring); the number of casts removed. ``known``: the weights' dtypes."""
    removed = 0
    while True:
        dt = infer_dtypes(graph, known)
        for node in graph.nodes:
            if _widening(node, dt) and (found := _region(node, dt)) is not None:
                break
        else:
            return removed
        entries, _, exits = found
        for cast in (*exits, *entries):
            cast.replace_all_uses_with(cast.args[0])  # type: ignore[arg-type]
            graph.erase_node(cast)
        removed += len(entries) + len(exits)
