"""A convolution's few input channels zero-padded to an aligned count (on by default on a GPU).

An ImageNet CNN's first convolution reads 3 channels. cuDNN's tensor-core kernels want the channels
of an NHWC input aligned (8 halves, 4 floats); at 3 it runs a generic kernel. On the lent H100 at
batch 32, mobilenet_v3_small's first convolution (cast, convolution and hardswish, compiled by
Inductor, replayed from a CUDA graph: ``benchmarks/bench_first_conv.py``) took 71.4 µs in fp16 with
3 channels and 46.7 µs with 8; in fp32, 88.7 µs with 3 and 77.8 µs with 4 (8 was slower, 170.5 µs;
fp16 at 4, 337.6 µs). TensorRT pads its first layers' channels the same way.

:func:`pad_input_channels` rewrites each ``conv2d`` of one group whose weight has fewer input
channels than its dtype's alignment (:data:`ALIGN`): the input gets zero channels
(``constant_pad_nd``, which Inductor fuses into the copy that lays the input out channels_last),
and the weight becomes a derived weight, :class:`Padded`, recomputed from the program's own at
every refit. Zero channels add zero to every sum, so the result is the same convolution (to the
kernel's summation order).

:data:`PAD_INPUT_CHANNELS` switches it off. In the whole call it was measured before it became the
default (``bench_latency.py --pad-channels``), as :mod:`._dwconv`'s kernel, faster layer by layer,
was not: mobilenet_v3_small at batch 32 on an H100, two rounds of alternating processes, fp16 0.529
and 0.530 ms a call without it, 0.515 and 0.500 with it; fp32 0.702 and 0.703 without, 0.706 and
0.689 with (no change). The padding is written into the graph, so it is part of the compiled
artifact's key.

Example:
    >>> import torch
    >>> w = torch.randn(16, 3, 3, 3)
    >>> Padded("w", 1).compute({"w": w}).shape
    torch.Size([16, 4, 3, 3])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

__all__ = ["ALIGN", "PAD_INPUT_CHANNELS", "Padded", "pad_input_channels"]

#: Whether the optimizing runtime pads convolutions' input channels where Inductor compiles for a
#: GPU (measured faster in the call: see above).
PAD_INPUT_CHANNELS = True
#: The input channel count each weight dtype is padded to (from the H100 figures above).
ALIGN: dict[torch.dtype, int] = {torch.float16: 8, torch.bfloat16: 8, torch.float32: 4}

_aten = torch.ops.aten


@dataclass(frozen=True)
class Padded:
    """A convolution weight with ``pad`` zero input channels after its own: ``inner`` is the
    recipe of the weight it pads (a program weight's name, or a derived weight such as a fold)."""

    inner: Any  # a WeightPlan recipe: str, or an object with compute(weights)
    pad: int

    def compute(self, w: Mapping[str, torch.Tensor]) -> torch.Tensor:
        weight = w[self.inner] if isinstance(self.inner, str) else self.inner.compute(w)
        return torch.nn.functional.pad(weight, (0, 0, 0, 0, 0, self.pad))


def _groups(conv: torch.fx.Node) -> Any:
    return conv.args[6] if len(conv.args) > 6 else conv.kwargs.get("groups", 1)


def pad_input_channels(graph: torch.fx.Graph, recipe_of: dict[torch.fx.Node, Any],
                       weight_of: Callable[[Any], torch.Tensor | None], first_input: torch.fx.Node | None) -> int:
    """Pad the input channels of each one-group ``conv2d`` of ``graph`` whose weight (a weight
    placeholder, ``recipe_of`` its recipe; ``weight_of`` the program weight a recipe's shape and
    dtype come from) has fewer than :data:`ALIGN` of its dtype; the number padded."""
    n = 0
    for conv in list(graph.nodes):
        if conv.op != "call_function" or conv.target is not _aten.conv2d.default or _groups(conv) != 1:
            continue
        x, w = conv.args[0], conv.args[1]
        if w not in recipe_of or len(w.users) != 1 or not isinstance(x, torch.fx.Node):
            continue
        weight = weight_of(recipe_of[w])
        if weight is None or weight.dim() != 4 or weight.dtype not in ALIGN:
            continue
        pad = ALIGN[weight.dtype] - weight.shape[1]
        if pad <= 0:
            continue
        with graph.inserting_before(conv):
            padded_x = graph.call_function(_aten.constant_pad_nd.default, (x, [0, 0, 0, 0, 0, pad], 0.0))
        with graph.inserting_before(first_input or conv):
            padded_w = graph.placeholder(f"{w.name}__padded")
        padded_w.meta.update({k: v for k, v in w.meta.items() if k not in ("val", "tensor_meta")})  # not its shape
        recipe_of[padded_w] = Padded(recipe_of.pop(w), pad)
        conv.args = (padded_x, padded_w, *conv.args[2:])
        graph.erase_node(w)
        n += 1
    return n
