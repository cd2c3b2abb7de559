"""Depthwise convolutions by a Triton kernel of our own (an experiment, off by default).

TorchInductor writes no convolution kernels: each ``conv2d`` is a cuDNN call. In
mobilenet_v3_small on the H100 at batch 32 the 11 depthwise convolutions are the costliest kernels
of the fp16 call (0.093 ms of 0.50 ms of GPU time; 0.112 ms in fp32): cuDNN's depthwise kernels
are barely faster in half precision, which holds that call to 1.22-1.27x its fp32 one
(benchmarks/RESULTS.md, issue 21). A depthwise convolution reads each input element k*k times from
cache and is otherwise a stream over memory, which half precision halves.

:func:`depthwise_conv2d` is that stream as a Triton kernel: one program per tile of output pixels
by channels, channels innermost (the channels_last layout the runtime gives convolutions), the
k*k taps unrolled, accumulated in fp32. It is the custom op
``torch.ops.torch_trt_module.depthwise_conv2d``, so Inductor calls it as an external kernel and can
store the program (a custom op is an ``OpOverload``, which its caches serialize by name).

:data:`DWCONV_TRITON` names the dtypes it serves; empty (the default) until a GPU measurement
says where it beats cuDNN. The passes then point grouped convolutions at :func:`conv_or_depthwise`
with those dtypes written into the call, so that they are part of the graph's code and of the
artifact key; it decides from the shapes and the dtype when the graph is traced.

Example:
    >>> import torch
    >>> x, w = torch.randn(2, 8, 9, 9), torch.randn(8, 1, 3, 3)
    >>> y = torch.ops.torch_trt_module.depthwise_conv2d(x, w, None, [1, 1], [1, 1], [1, 1])
    >>> bool(torch.allclose(y, torch.nn.functional.conv2d(x, w, None, 1, 1, 1, 8), atol=1e-5))
    True
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import torch

__all__ = ["DWCONV_DEVICES", "DWCONV_TRITON", "MAX_KERNEL", "TILE", "WARPS", "conv_or_depthwise",
           "depthwise_conv2d", "rewrite_grouped", "triton_depthwise"]

#: The dtypes whose depthwise convolutions run :func:`triton_depthwise` where Inductor compiles
#: for a GPU (an experiment: empty until measured faster than cuDNN).
DWCONV_TRITON: frozenset[str] = frozenset()
#: The devices the kernel serves (tests add ``"cpu"`` to run the op's reference path in a graph).
DWCONV_DEVICES: tuple[str, ...] = ("cuda",)
#: The largest kernel side the Triton kernel unrolls.
MAX_KERNEL = 7

_aten = torch.ops.aten


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _out_shape(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int]) -> tuple[int, int, int, int]:
    n, c, h, w = x.shape
    return (n, c, _out_size(h, weight.shape[2], stride[0], padding[0], dilation[0]),
            _out_size(w, weight.shape[3], stride[1], padding[1], dilation[1]))


def _channels_last_empty(shape: tuple[int, int, int, int], like: torch.Tensor) -> torch.Tensor:
    n, c, h, w = shape
    return torch.empty_strided(shape, (h * w * c, 1, w * c, c), dtype=like.dtype, device=like.device)


@functools.lru_cache(maxsize=None)
def _kernel() -> Any:
    """The Triton kernel, defined at first use: Triton is imported only where the op runs (and
    ``TRITON_INTERPRET=1``, read when the kernel is defined, runs it on the CPU for tests)."""
    import triton
    import triton.language as tl

    @triton.jit
    def depthwise(x_ptr, w_ptr, b_ptr, y_ptr, P, C, H, W, OH, OW,
                  sxn, sxc, sxh, sxw, swc, swh, sww, sh, sw, ph, pw, dh, dw,
                  KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr, VEC: tl.constexpr):
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # flat (n, oh, ow)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        pm, cm = p < P, c < C
        ow = p % OW
        oh = (p // OW) % OH
        n = p // (OW * OH)
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for i in tl.static_range(KH):
            ih = oh * sh - ph + i * dh
            row_ok = pm & (ih >= 0) & (ih < H)
            for j in tl.static_range(KW):
                iw = ow * sw - pw + j * dw
                ok = row_ok & (iw >= 0) & (iw < W)
                # Each pixel's offset is a multiple of VEC (the host checked the strides): Triton
                # cannot see it where C is not a multiple of 16, and without it loads one element
                # at a time (1.5-3x cuDNN's time at mobilenet's 72, 88 and 120 channels on the H100).
                pix = tl.multiple_of(n * sxn + ih * sxh + iw * sxw, VEC)
                mask = ok[:, None] if EVEN_C else ok[:, None] & cm[None, :]
                xv = tl.load(x_ptr + pix[:, None] + c[None, :] * sxc, mask=mask, other=0.0)
                wv = tl.load(w_ptr + c * swc + i * swh + j * sww, mask=cm, other=0.0)
                acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
        # The output is channels_last: element (n, c, oh, ow) sits at p * C + c.
        row = tl.multiple_of(p * C, VEC)
        out_mask = pm[:, None] if EVEN_C else pm[:, None] & cm[None, :]
        tl.store(y_ptr + row[:, None] + c[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)

    return depthwise


#: Elements of one program's tile (output pixels by channels) and its warps.
TILE, WARPS = 2048, 4


def _blocks(channels: int, tile: int) -> tuple[int, int, bool]:
    """Tile of output pixels by channels, and whether the channel blocks cover the channels exactly
    (no channel mask): up to 64 channels (a 128-byte row in fp16), the largest power of two from 8
    up that divides ``channels``, else the power of two that covers them."""
    block_c = next((b for b in (64, 32, 16, 8) if channels % b == 0), 0)
    even = block_c > 0
    if not even:
        block_c = min(64, max(16, 1 << (channels - 1).bit_length()))
    return max(16, tile // block_c), block_c, even


def _vec(*values: int) -> int:
    """The largest power of two up to 16 that divides every one of ``values``."""
    g = math.gcd(*values)
    return min(16, g & -g) if g else 16


def triton_depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], *,
                     tile: int | None = None, warps: int | None = None) -> torch.Tensor:
    """The depthwise convolution of ``x`` (N, C, H, W, any strides) by ``weight`` (C, 1, KH, KW),
    channels_last out, by the Triton kernel (``tile`` and ``warps``: :data:`TILE` and
    :data:`WARPS` unless given, for benchmarks/bench_dwconv.py)."""
    shape = _out_shape(x, weight, stride, padding, dilation)
    y = _channels_last_empty(shape, x)
    n, c, oh, ow = shape
    if y.numel() == 0:
        return y
    block_p, block_c, even = _blocks(c, tile or TILE)
    count = n * oh * ow
    sxn, _, sxh, sxw = x.stride()
    grid = ((count + block_p - 1) // block_p, (c + block_c - 1) // block_c)
    _kernel()[grid](x, weight, bias if bias is not None else weight, y, count, c, x.shape[2], x.shape[3], oh, ow,
                    *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3),
                    stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                    KH=weight.shape[2], KW=weight.shape[3], HAS_BIAS=bias is not None,
                    BLOCK_P=block_p, BLOCK_C=block_c, EVEN_C=even, VEC=_vec(c, sxn, sxh, sxw),
                    num_warps=warps or WARPS)
    return y


# flexible_layout: Inductor passes the input in the layout it chose (channels_last, where convolutions
# dominate). Without the tag a custom op gets the strides it was traced with (NCHW): a copy before
# each call, and the kernel's channel loads no longer contiguous.
@torch.library.custom_op("torch_trt_module::depthwise_conv2d", mutates_args=(),
                         tags=(torch.Tag.flexible_layout,))
def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
                     padding: list[int], dilation: list[int]) -> torch.Tensor:
    """The depthwise convolution, channels_last out: the Triton kernel on CUDA, cuDNN's or the CPU's
    ``conv2d`` elsewhere (the reference the tests compare with)."""
    # int32 offsets in the kernel: larger tensors take the library's convolution.
    reach = sum((size - 1) * st for size, st in zip(x.shape, x.stride()))
    if x.is_cuda and max(reach, _out_numel(x, weight, stride, padding, dilation)) < 2 ** 31:
        with torch.cuda.device(x.device):  # Triton launches on the current device
            return triton_depthwise(x, weight, bias, stride, padding, dilation)
    y = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, x.shape[1])
    return y.contiguous(memory_format=torch.channels_last)


def _out_numel(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int]) -> int:
    n, c, h, w = _out_shape(x, weight, stride, padding, dilation)
    return n * c * h * w


@depthwise_conv2d.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
      padding: list[int], dilation: list[int]) -> torch.Tensor:
    return _channels_last_empty(_out_shape(x, weight, stride, padding, dilation), x)


def _pair(v: int | Sequence[int] | str) -> list[int] | None:
    if isinstance(v, int):
        return [v, v]
    if isinstance(v, (list, tuple)) and len(v) in (1, 2) and all(isinstance(e, int) for e in v):
        return [int(v[0]), int(v[-1])]
    return None


def conv_or_depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      stride: int | Sequence[int] = 1, padding: int | Sequence[int] | str = 0,
                      dilation: int | Sequence[int] = 1, groups: int = 1,
                      dtypes: Sequence[str] = ()) -> torch.Tensor:
    """``conv2d(x, weight, bias, stride, padding, dilation, groups)``: by :func:`depthwise_conv2d`
    where it is depthwise (one filter per channel) with a kernel of at most :data:`MAX_KERNEL` a
    side, in one of ``dtypes``, on a device of :data:`DWCONV_DEVICES`; else the convolution."""
    s, p, d = _pair(stride), _pair(padding), _pair(dilation)
    depthwise = (x.dim() == 4 and weight.dim() == 4 and weight.shape[1] == 1 and groups > 1
                 and weight.shape[0] == groups and x.shape[1] == groups
                 and max(weight.shape[2], weight.shape[3]) <= MAX_KERNEL)
    if (depthwise and s is not None and p is not None and d is not None and str(x.dtype).split(".")[-1] in dtypes
            and x.device.type in DWCONV_DEVICES and weight.dtype == x.dtype):
        return torch.ops.torch_trt_module.depthwise_conv2d(x, weight, bias, s, p, d)
    return torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)


def rewrite_grouped(graph: torch.fx.Graph, dtypes: frozenset[str]) -> int:
    """Point every grouped ``conv2d`` of ``graph`` at :func:`conv_or_depthwise`, with ``dtypes``
    written into the call; the number rewritten."""
    n = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target is _aten.conv2d.default and not node.kwargs \
                and len(node.args) == 7 and isinstance(node.args[6], int) and node.args[6] > 1:
            node.target = conv_or_depthwise
            node.kwargs = {"dtypes": tuple(sorted(dtypes))}
            n += 1
    return n
