"""Depthwise convolutions as a sum of shifted slices, for TorchInductor (an experiment, off by default).

Inductor writes no convolution kernels: every ``conv2d`` is a cuDNN call, a kernel launch that
nothing can be fused into. In mobilenet_v3_small on an H100 at batch 32 the 11 depthwise
convolutions are the costliest kernels of the fp16 program (0.093 ms of its 0.50 ms of GPU time;
0.112 ms in fp32), memory-latency bound and barely faster in half precision, which holds its fp16
call to 1.22x its fp32 one (benchmarks/RESULTS.md, issue 21).

A depthwise convolution (``groups`` = input channels = output channels, one filter each) is
``sum over (i, j) of x_padded[:, :, i*dh :: sh, j*dw :: sw] * w[:, 0, i, j]``: k*k shifted views
of the input, each scaled per channel. Written so, it is pointwise work that Inductor fuses with
the BatchNorm-folded bias and the activation around it into one Triton kernel. Whether that
kernel beats cuDNN's is a GPU measurement, not yet made: :data:`DEPTHWISE_TAPS` stays False until
then, and the rewrite applies only where Inductor compiles the graph (eagerly, k*k small kernels
would be slower than one convolution).

The shapes are read when the graph is traced (:func:`conv_taps`), not when it is rewritten: a
stored program's compact graph carries none. Anything else (a grouped convolution with several
channels per group, large kernels, string padding) runs as the convolution it was.

Example:
    >>> import torch
    >>> x, w = torch.randn(2, 8, 9, 9), torch.randn(8, 1, 3, 3)
    >>> ref = torch.nn.functional.conv2d(x, w, None, 1, 1, 1, 8)
    >>> bool(torch.allclose(conv_taps(x, w, None, 1, 1, 1, 8), ref, atol=1e-5))
    True
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["DEPTHWISE_TAPS", "MAX_TAPS", "conv_taps", "rewrite_depthwise"]

#: Whether the optimizing runtime rewrites depthwise convolutions (where Inductor compiles).
DEPTHWISE_TAPS = False
#: The largest kernel written as taps (5 x 5): beyond it the sum reads the input too many times.
MAX_TAPS = 25

_aten = torch.ops.aten


def _pair(v: int | Sequence[int]) -> tuple[int, int] | None:
    if isinstance(v, int):
        return v, v
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(e, int) for e in v):
        return int(v[0]), int(v[1])
    if isinstance(v, (list, tuple)) and len(v) == 1 and isinstance(v[0], int):
        return int(v[0]), int(v[0])
    return None


def conv_taps(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              stride: int | Sequence[int] = 1, padding: int | Sequence[int] | str = 0,
              dilation: int | Sequence[int] = 1, groups: int = 1) -> torch.Tensor:
    """``conv2d(x, weight, bias, stride, padding, dilation, groups)``, written as shifted slices where
    it is a depthwise convolution of at most :data:`MAX_TAPS` taps, else the convolution itself."""
    s, p, d = _pair(stride), None if isinstance(padding, str) else _pair(padding), _pair(dilation)
    depthwise = (x.dim() == 4 and weight.dim() == 4 and weight.shape[1] == 1 and weight.shape[0] == groups
                 and x.shape[1] == groups and groups > 1)
    if not depthwise or s is None or p is None or d is None or weight.shape[2] * weight.shape[3] > MAX_TAPS:
        return torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    xp = _aten.constant_pad_nd.default(x, [p[1], p[1], p[0], p[0]], 0.0) if any(p) else x
    taps = weight.reshape(1, groups, kh, kw)
    out: torch.Tensor | None = None
    for i in range(kh):
        # Rows i*dh, i*dh + sh, ... up to the last window's: ending (kh-1-i)*dh before the padded
        # edge gives exactly the output's row count without knowing it.
        rows = _aten.slice.Tensor(xp, 2, i * d[0], xp.shape[2] - (kh - 1 - i) * d[0], s[0])
        for j in range(kw):
            cols = _aten.slice.Tensor(rows, 3, j * d[1], xp.shape[3] - (kw - 1 - j) * d[1], s[1])
            term = cols * taps[:, :, i:i + 1, j:j + 1]
            out = term if out is None else out + term
    assert out is not None
    return out if bias is None else out + bias.reshape(1, groups, 1, 1)


def rewrite_depthwise(graph: torch.fx.Graph) -> int:
    """Point every grouped ``conv2d`` of ``graph`` at :func:`conv_taps` (which decides at trace time,
    from the shapes, whether it is depthwise); the number rewritten."""
    n = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target is _aten.conv2d.default and not node.kwargs \
                and len(node.args) == 7 and isinstance(node.args[6], int) and node.args[6] > 1:
            node.target = conv_taps
            n += 1
    return n
