"""Inference passes over the captured PyTorch program, for the optimizing GPU runtime.

The program torch.export captured is a training-IR graph whose weights are placeholders
(``TorchRunner`` passes them in as arguments). These passes rewrite it the way an inference
compiler would before TorchInductor sees it:

- **BatchNorm folding.** ``conv2d -> batch_norm(training=False)`` becomes one ``conv2d`` with
  folded weights (``w * gamma / sqrt(var + eps)``, and a bias to match). The folded weights are
  *derived* weights: a :class:`WeightPlan` recomputes them from the program's own weights, so a
  refit refolds them and the graph never goes stale. An fp16 program's ``conv2d -> to(fp32) ->
  batch_norm`` folds too (the conv keeps its dtype, the cast stays for what follows).
- **Linear before the permute.** ``linear(y.transpose(0, 1))`` (``nn.MultiheadAttention`` with
  ``batch_first=True`` captures its in-projection so) becomes ``linear(y).transpose(0, 1)``, made
  contiguous: a Linear acts on the last dim only, so it commutes with moving the others. Over the
  permuted input, ATen's matmul cannot fold the leading dims and runs a batched GEMM of 197 tiny
  products with the weight broadcast (vit_b_16: 0.81 ms each, 60% of a batch-8 call on an H100);
  over ``y`` it is one GEMM, as eager's fused MHA and ``torch.compile`` run it.
- **Sibling Linears merged.** Linears that read the same tensor (BERT's query, key and value
  projections; a gated MLP's gate and up) become one Linear over their weights concatenated
  (another derived weight, recomputed at every refit), and its output is sliced. One GEMM of
  N = 2304 fills an H100's 132 SMs where three of N = 768 at BERT's batch 8 (M = 1024) do not,
  and it is one launch instead of three. A ``view`` of a slice becomes ``reshape`` (a slice is
  not contiguous); a group whose output the program returns, or that an ``as_strided`` reads, is
  left alone.
- **Few input channels padded** (where Inductor compiles for a GPU, by default:
  :mod:`._pad_channels`). A convolution reading 3 channels gets zero channels up to its dtype's
  alignment, and a derived weight to match.
- ``_assert_tensor_metadata`` checks are dropped: they guard the export, not the computation, and
  they pin the dtypes a pass may change.

Every pass is checked against the unoptimized program on the CPU (``tests/backends/test_torch_passes.py``).
:data:`PASSES_VERSION` is part of ``_core.settings.OPTIMIZE_VERSION``, which the cache key holds: a
changed pass is a miss (a test keeps the two in step).

Example:
    >>> graph, plan = optimize_graph(runner.graph_module, runner.weight_names)   # doctest: +SKIP
    >>> weights = plan.derive(dict(zip(runner.weight_names, runner.weights)))      # doctest: +SKIP
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ._casts import drop_casts
from ._dwconv import conv_or_depthwise, rewrite_grouped
from ._pad_channels import Padded, pad_input_channels

__all__ = ["PASSES_VERSION", "WeightPlan", "optimize_graph"]

#: Bump when a pass changes what it computes: the cache key includes it.
PASSES_VERSION = "bnfold-1+linear-perm-1+linear-merge-1+casts-1"

_aten = torch.ops.aten
_CONVS = {_aten.conv2d.default, _aten.conv1d.default, _aten.conv3d.default}
_PERMUTES = {_aten.transpose.int, _aten.permute.default}
_ASSERTS = {getattr(_aten, "_assert_tensor_metadata").default} if hasattr(_aten, "_assert_tensor_metadata") else set()


@dataclass(frozen=True)
class _Fold:
    """A folded conv's weight or bias: from the conv's weight/bias and the BatchNorm's tensors."""

    kind: str  # "weight" or "bias"
    conv_weight: str
    conv_bias: str | None
    bn_weight: str | None
    bn_bias: str | None
    mean: str
    var: str
    eps: float

    def compute(self, w: Mapping[str, torch.Tensor]) -> torch.Tensor:
        cw = w[self.conv_weight]
        var = w[self.var].float()
        scale = torch.rsqrt(var + self.eps)
        if self.bn_weight is not None:
            scale = scale * w[self.bn_weight].float()
        if self.kind == "weight":
            shape = (-1,) + (1,) * (cw.dim() - 1)
            return (cw.float() * scale.reshape(shape)).to(cw.dtype)
        bias = w[self.conv_bias].float() if self.conv_bias is not None else torch.zeros_like(var)
        out = (bias - w[self.mean].float()) * scale
        if self.bn_bias is not None:
            out = out + w[self.bn_bias].float()
        return out.to(cw.dtype)


@dataclass(frozen=True)
class _Concat:
    """A merged Linear's weight or bias: its siblings' tensors, concatenated along dim 0."""

    kind: str  # "weight" or "bias"
    names: tuple[str, ...]

    def compute(self, w: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([w[n] for n in self.names], 0)


_Recipe = str | _Fold | _Concat | Padded


def _unpadded(recipe: _Recipe) -> _Recipe:
    while isinstance(recipe, Padded):
        recipe = recipe.inner
    return recipe


@dataclass
class WeightPlan:
    """How the optimized graph's weight arguments derive from the program's weights: each is
    either one of them by name (a ``str``), a fold of several (a :class:`_Fold`) or a
    concatenation (a :class:`_Concat`)."""

    recipes: list[_Recipe] = field(default_factory=list)
    #: Indices of the 4-d weights that convolutions read (what ``channels_last`` lays out).
    conv_weights: frozenset[int] = frozenset()
    #: Grouped convolutions pointed at :func:`._dwconv.conv_or_depthwise`, and the dtypes it serves.
    dwconv: int = 0
    dwconv_dtypes: tuple[str, ...] = ()
    #: Casts dropped by :func:`._casts.drop_casts` (an fp16 or bf16 program's, after the folds).
    casts: int = 0
    #: Convolutions whose input channels :func:`._pad_channels.pad_input_channels` padded.
    padded: int = 0

    @property
    def sources(self) -> set[str]:
        """The program weights the derived ones read (what a refit must supply or keep)."""
        names: set[str] = set()
        for r in map(_unpadded, self.recipes):
            if isinstance(r, str):
                names.add(r)
            elif isinstance(r, _Concat):
                names.update(r.names)
            else:
                names.update(n for n in (r.conv_weight, r.conv_bias, r.bn_weight, r.bn_bias, r.mean, r.var)
                             if n is not None)
        return names

    @property
    def folds(self) -> int:
        return sum(isinstance(r, _Fold) and r.kind == "weight" for r in map(_unpadded, self.recipes))

    @property
    def merges(self) -> int:
        """How many groups of sibling Linears run as one."""
        return sum(isinstance(r, _Concat) and r.kind == "weight" for r in self.recipes)

    def derive(self, weights: Mapping[str, torch.Tensor], *, channels_last: bool = False) -> list[torch.Tensor]:
        """The optimized graph's weight arguments, in order, from the program's ``weights``;
        ``channels_last``: the 4-d convolution weights in that memory format (cuDNN's NHWC kernels
        then need no per-call copy of them)."""
        with torch.no_grad():
            out = [weights[r] if isinstance(r, str) else r.compute(weights).contiguous() for r in self.recipes]
            if channels_last:
                out = [w.contiguous(memory_format=torch.channels_last) if i in self.conv_weights and w.dim() == 4
                       else w for i, w in enumerate(out)]
            return out


def optimize_graph(graph_module: torch.fx.GraphModule, weight_names: Sequence[str], *, fold: bool = True,
                   weights: Mapping[str, torch.Tensor] | None = None,
                   dwconv: frozenset[str] = frozenset(),
                   pad_channels: bool = False) -> tuple[torch.fx.GraphModule, WeightPlan]:
    """A copy of ``graph_module`` (whose first ``len(weight_names)`` placeholders are the weights,
    by those names, and the rest the user inputs) with the inference passes applied, and the
    plan that computes its weight arguments. The original graph is left as it is. ``weights``
    (by name; only their shapes and dtypes are read): without them, Linears are not merged,
    since the graph itself carries no shapes. ``dwconv``: the dtypes whose depthwise convolutions
    run the Triton kernel of :mod:`._dwconv` (for Inductor on a GPU only); ``pad_channels``: pad
    the input channels of convolutions that read few (:mod:`._pad_channels`; needs ``weights``)."""
    gm = copy.deepcopy(graph_module)
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    n_weights = len(weight_names)
    if len(placeholders) < n_weights:
        raise ValueError(f"the graph has {len(placeholders)} placeholders, fewer than its {n_weights} weights")
    name_of = {node: name for node, name in zip(placeholders, weight_names)}
    recipe_of: dict[torch.fx.Node, _Recipe] = dict(name_of)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS:
            graph.erase_node(node)
    first_input = placeholders[n_weights] if len(placeholders) > n_weights else None
    for node in list(graph.nodes):
        _linear_before_permute(graph, node)
    if fold:
        for bn in list(graph.nodes):
            _fold_one(graph, bn, name_of, recipe_of, first_input)
    if weights is not None:
        for node in list(graph.nodes):
            _merge_siblings(graph, node, name_of, recipe_of, first_input, weights)
    casts = 0
    if weights is not None:
        casts = drop_casts(graph, {n: d for n, r in recipe_of.items() if (d := _recipe_dtype(r, weights)) is not None})
    padded = 0
    if pad_channels and weights is not None:
        def weight_of(recipe: _Recipe) -> torch.Tensor | None:
            name = _shaped_like(recipe)
            return weights.get(name) if name is not None else None
        padded = pad_input_channels(graph, recipe_of, weight_of, first_input)
    dwconv_count = rewrite_grouped(graph, dwconv) if dwconv else 0
    graph.eliminate_dead_code()
    weights_nodes = [n for n in graph.nodes if n.op == "placeholder" and n in recipe_of]
    # The weights come first, in a fixed order, then the user inputs, as TorchRunner calls it.
    inputs = [n for n in graph.nodes if n.op == "placeholder" and n not in recipe_of]
    for n in reversed(weights_nodes + inputs):
        head = next(iter(graph.nodes))
        if head is not n:
            head.prepend(n)
    graph.lint()
    gm.recompile()
    index = {n: i for i, n in enumerate(weights_nodes)}
    conv_weights = frozenset(index[n.args[1]] for n in graph.nodes if n.op == "call_function"
                             and (n.target in _CONVS or n.target is conv_or_depthwise) and len(n.args) > 1
                             and n.args[1] in index)
    return gm, WeightPlan([recipe_of[n] for n in weights_nodes], conv_weights, dwconv_count, tuple(sorted(dwconv)),
                          casts, padded)


def _shaped_like(recipe: _Recipe) -> str | None:
    """The program weight whose shape and dtype ``recipe``'s weight has (a fold's: its
    convolution's), or None (a concatenation, a padded weight)."""
    return recipe if isinstance(recipe, str) else recipe.conv_weight if isinstance(recipe, _Fold) else None


def _recipe_dtype(recipe: _Recipe, weights: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The dtype of the weight argument ``recipe`` derives (a fold keeps its convolution's)."""
    recipe = _unpadded(recipe)
    name = _shaped_like(recipe) or (recipe.names[0] if isinstance(recipe, _Concat) else None)
    t = weights.get(name) if name is not None else None
    return t.dtype if t is not None else None


def _fold_one(graph: torch.fx.Graph, bn: torch.fx.Node, name_of: dict[torch.fx.Node, str],
              recipe_of: dict[torch.fx.Node, _Recipe], first_input: torch.fx.Node | None) -> None:
    """Fold ``bn`` into the convolution that feeds it, where the pattern allows; else do nothing."""
    if bn.op != "call_function" or bn.target is not _aten.batch_norm.default:
        return
    args = list(bn.args) + [None] * (9 - len(bn.args))
    x, bn_w, bn_b, mean, var, training, _, eps = args[:8]
    if training or not isinstance(eps, float) and not isinstance(eps, int):
        return
    for t in (bn_w, bn_b):
        if t is not None and t not in name_of:
            return
    if mean not in name_of or var not in name_of:
        return
    cast = None
    conv = x
    if isinstance(conv, torch.fx.Node) and conv.op == "call_function" and conv.target is _aten.to.dtype \
            and len(conv.users) == 1:
        cast, conv = conv, conv.args[0]
    if not isinstance(conv, torch.fx.Node) or conv.op != "call_function" or conv.target not in _CONVS \
            or len(conv.users) != 1:
        return
    cargs = list(conv.args)
    cw = cargs[1]
    cb = cargs[2] if len(cargs) > 2 else conv.kwargs.get("bias")
    if cw not in name_of or (cb is not None and cb not in name_of):
        return
    common = dict(conv_weight=name_of[cw], conv_bias=name_of[cb] if cb is not None else None,
                  bn_weight=name_of[bn_w] if bn_w is not None else None,
                  bn_bias=name_of[bn_b] if bn_b is not None else None,
                  mean=name_of[mean], var=name_of[var], eps=float(eps))
    with graph.inserting_before(first_input or conv):
        fw = graph.placeholder(f"{name_of[cw].replace('.', '_')}__folded_w")
        fb = graph.placeholder(f"{name_of[cw].replace('.', '_')}__folded_b")
    fw.meta.update(cw.meta)
    recipe_of[fw] = _Fold("weight", **common)
    recipe_of[fb] = _Fold("bias", **common)
    cargs[1] = fw
    if len(cargs) > 2:
        cargs[2] = fb
        conv.args = tuple(cargs)
    else:
        conv.args = tuple(cargs)
        conv.kwargs = {**conv.kwargs, "bias": fb}
    bn.replace_all_uses_with(cast if cast is not None else conv)
    graph.erase_node(bn)
    for old in (cw, cb, bn_w, bn_b, mean, var):
        if old is not None and not old.users:
            recipe_of.pop(old, None)
            graph.erase_node(old)


def _linear_before_permute(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """``linear(permute(y, ...), w, b)`` -> ``_permuted_linear(y, op args, w, b)`` (see the module
    docstring), also with a cast between the permute and the linear. The graph carries no shapes here (a stored program's compact graph has none), so
    whether the permute keeps the last dim in place is decided when the graph runs or is traced."""
    if node.op != "call_function" or node.target is not _aten.linear.default or node.kwargs:
        return
    x, cast = node.args[0], None
    if isinstance(x, torch.fx.Node) and x.op == "call_function" and x.target is _aten.to.dtype and not x.kwargs \
            and len(x.args) == 2:
        cast, x = x, x.args[0]  # an fp16 program casts between them (LayerNorm's fp32 island): casts commute too
    if not isinstance(x, torch.fx.Node) or x.op != "call_function" or x.target not in _PERMUTES or x.kwargs:
        return
    dims = list(x.args[1:]) if x.target is _aten.transpose.int else list(x.args[1])
    if not all(isinstance(d, int) for d in dims):
        return
    with graph.inserting_before(node):
        y = x.args[0] if cast is None else graph.call_function(_aten.to.dtype, (x.args[0], cast.args[1]))
        new = graph.call_function(_permuted_linear, (y, x.target is _aten.transpose.int, tuple(dims),
                                                     *node.args[1:]))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _permuted_linear(y: torch.Tensor, transpose: bool, dims: tuple[int, ...], weight: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(y.transpose(*dims))`` (or ``y.permute(dims)``), computed over ``y``'s own layout
    where that is what lets the GEMM take the leading dims as rows: the permuted input is not
    contiguous, ``y`` is, and the last dim stays last. The result is contiguous, as the original
    linear's was. (Strides are known here, when the graph runs or is traced, not when it is rewritten.)"""
    rank = y.dim()
    if transpose:
        a, b = (d % rank for d in dims)
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
    else:
        perm = [d % rank for d in dims]
    x = _aten.permute.default(y, perm)
    if rank < 3 or perm[-1] != rank - 1 or x.is_contiguous() or not y.is_contiguous():
        return _aten.linear.default(x, weight, bias)
    return _aten.linear.default(y, weight, bias).permute(perm).contiguous()


#: Consumers that read a slice's storage, not its values: a merged group must not feed them.
_STORAGE_READERS = {_aten.as_strided.default, _aten.view.dtype}
_VIEWS = {_aten.view.default, _aten._unsafe_view.default}


def _merge_siblings(graph: torch.fx.Graph, x: torch.fx.Node, name_of: dict[torch.fx.Node, str],
                    recipe_of: dict[torch.fx.Node, _Recipe], first_input: torch.fx.Node | None,
                    weights: Mapping[str, torch.Tensor]) -> None:
    """Merge the Linears that read ``x`` (see the module docstring) where they can be; else nothing."""
    groups: dict[tuple[Any, ...], list[torch.fx.Node]] = {}
    for user in x.users:
        if user.op != "call_function" or user.target is not _aten.linear.default or user.kwargs \
                or user.args[0] is not x:
            continue
        w = user.args[1]
        b = user.args[2] if len(user.args) > 2 else None
        if w not in name_of or (b is not None and b not in name_of):
            continue
        wt = weights.get(name_of[w])
        bt = weights.get(name_of[b]) if b is not None else None
        if wt is None or wt.dim() != 2 or (b is not None and (bt is None or bt.dim() != 1)):
            continue
        consumers = list(user.users)
        if any(c.op == "output" or (c.op == "call_function" and c.target in _STORAGE_READERS) for c in consumers):
            continue
        key = (wt.dtype, wt.shape[1], wt.device, None if bt is None else bt.dtype)
        groups.setdefault(key, []).append(user)
    for members in groups.values():
        if len(members) < 2:
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        members.sort(key=order.__getitem__)
        ws = tuple(name_of[m.args[1]] for m in members)
        has_bias = len(members[0].args) > 2 and members[0].args[2] is not None
        bs = tuple(name_of[m.args[2]] for m in members) if has_bias else ()
        stem = f"{ws[0].replace('.', '_')}__merged{len(ws)}"
        with graph.inserting_before(first_input or members[0]):
            fw = graph.placeholder(f"{stem}_w")
            fb = graph.placeholder(f"{stem}_b") if has_bias else None
        recipe_of[fw] = _Concat("weight", ws)
        if fb is not None:
            recipe_of[fb] = _Concat("bias", bs)
        with graph.inserting_before(members[0]):
            fused = graph.call_function(_aten.linear.default, (x, fw, fb) if fb is not None else (x, fw))
            start = 0
            for m, name in zip(members, ws):
                end = start + int(weights[name].shape[0])
                part = graph.call_function(_aten.slice.Tensor, (fused, -1, start, end))
                part.meta.update(m.meta)
                for c in list(m.users):
                    if c.op == "call_function" and c.target in _VIEWS:
                        c.target = _aten.reshape.default  # a slice is not contiguous: view may not apply
                m.replace_all_uses_with(part)
                start = end
        for m in members:
            old = [a for a in m.args[1:] if isinstance(a, torch.fx.Node)]
            graph.erase_node(m)
            for a in old:
                if not a.users:
                    recipe_of.pop(a, None)
                    graph.erase_node(a)
