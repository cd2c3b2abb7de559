"""Depthwise convolutions by our Triton kernel (backends/_dwconv.py, an experiment off by default).

The kernel itself runs here under Triton's interpreter (``TRITON_INTERPRET=1``, in a child process:
the variable is read when the kernel is defined); on a GPU, tests/gpu/test_dwconv_cuda.py runs it
for real. The routing, the custom op in Inductor's stored programs and the key run on this CPU
with the op's reference path (``conv2d``), the CPU added to the devices it serves.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module.backends import _dwconv
from torch_trt_module.backends._dwconv import conv_or_depthwise
from torch_trt_module.backends._inductor_store import STATS

from .._support import REPO

_OP = torch.ops.torch_trt_module.depthwise_conv2d.default


@pytest.fixture(autouse=True)
def _fresh_stats() -> None:
    for k in STATS:
        STATS[k] = 0


def test_the_kernel_matches_the_convolution_under_triton_s_interpreter() -> None:
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import itertools
        import torch
        from torch_trt_module.backends._dwconv import triton_depthwise
        torch.manual_seed(0)
        cases = [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 1), (5, 2, 2, 1), (3, 1, 2, 2), (3, 1, 0, 1), (7, 2, 3, 1),
                 ((3, 5), (1, 2), (2, 1), (2, 1))]  # (kernel, stride, padding, dilation), each square or (h, w)
        pair = lambda v: list(v) if isinstance(v, tuple) else [v, v]
        runs = list(enumerate(itertools.product(cases, [torch.float32, torch.float16])))
        for i, ((k, s, p, d), dtype) in runs:  # layouts, bias and channel counts alternate: blocks that
            # cover the channels exactly (24, 72, 128: one, nine and two blocks) or not (20, masked)
            channels_last, bias, c = i % 2 == 0, i % 3 != 0, (24, 72, 20, 128)[i // 2 % 4]
            x = torch.randn(2, c, 11, 13, dtype=dtype)
            x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            w = torch.randn(c, 1, *pair(k), dtype=dtype)
            b = torch.randn(c, dtype=dtype) if bias else None
            s, p, d = pair(s), pair(p), pair(d)
            got = triton_depthwise(x, w, b, s, p, d)
            want = torch.nn.functional.conv2d(x.float(), w.float(), None if b is None else b.float(), s, p, d, c)
            assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last), (k, s, p, d)
            tol = 1e-2 if dtype == torch.float16 else 1e-5
            torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
        print("checked", len(runs))
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["checked", "16"]


def test_the_kernel_s_tiles_and_alignment_hints_follow_the_channels() -> None:
    from torch_trt_module.backends._dwconv import _blocks, _vec

    # Blocks of 64 channels down to 8 where they divide the channels: no channel mask, so loads of
    # whole rows (mobilenet_v3_small's 72, 88 and 120 channels: blocks of 8).
    assert _blocks(576, 2048) == (32, 64, True)
    assert _blocks(72, 1024) == (128, 8, True)
    assert _blocks(88, 1024) == (128, 8, True)
    assert _blocks(20, 1024) == (32, 32, False)  # 20 has no divisor of 8 or more: masked
    assert _blocks(3, 64) == (16, 16, False)  # at least 16 pixels a program
    # The hint is the power of two that divides every pixel offset's stride and the channels.
    c, h, w = 72, 56, 56
    assert _vec(c, h * w * c, w * c, c) == 8
    assert _vec(576, 576 * 49, 576 * 7, 576) == 16  # capped at 16
    assert _vec(72, 72 * 56 * 56, 56, 1) == 1  # NCHW: the pixels are one element apart


def test_inductor_may_hand_the_op_its_input_in_any_layout() -> None:
    # Without flexible_layout Inductor gives a custom op the strides it was traced with (NCHW), so
    # each call would copy the channels_last activation back to NCHW first.
    assert torch.Tag.flexible_layout in _OP.tags


def test_the_op_s_fake_agrees_with_its_reference_path() -> None:
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(8, 1, 5, 5), torch.randn(8)
    torch.library.opcheck(_OP, (x, w, b, [2, 2], [2, 2], [1, 1]))
    y = _OP(x, w, None, [1, 1], [2, 2], [1, 1])
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, None, 1, 2, 1, 8))
    assert y.is_contiguous(memory_format=torch.channels_last)


def _traced(x: torch.Tensor, w: torch.Tensor, groups: int, dtypes: tuple[str, ...]) -> set[object]:
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return conv_or_depthwise(x, w, None, 1, 1, 1, groups, dtypes=dtypes)

    return {n.target for n in make_fx(f, tracing_mode="fake")(x, w).graph.nodes if n.op == "call_function"}


def test_only_depthwise_convolutions_in_the_listed_dtypes_on_a_served_device_take_the_op(
        monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 8, 6, 6)
    depthwise, grouped = torch.randn(8, 1, 3, 3), torch.randn(8, 2, 3, 3)
    assert _traced(x, depthwise, 8, ("float32",)) == {torch.ops.aten.convolution.default}  # the CPU: not served
    monkeypatch.setattr(_dwconv, "DWCONV_DEVICES", ("cuda", "cpu"))
    assert _OP in _traced(x, depthwise, 8, ("float32",))
    assert _OP not in _traced(x, depthwise, 8, ("float16",))
    assert _OP not in _traced(x, grouped, 4, ("float32",))  # two channels per group: not depthwise
    assert _OP not in _traced(torch.randn(2, 8, 12, 12), torch.randn(8, 1, 9, 9), 8, ("float32",))  # > MAX_KERNEL


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 1), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
        torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, padding=1, groups=2),
        torch.nn.Conv2d(16, 16, 5, stride=2, padding=2, groups=16)).eval()


def test_a_program_calling_the_op_is_compiled_stored_loaded_and_keyed_by_the_dtypes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_dwconv, "DWCONV_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(_dwconv, "DWCONV_TRITON", frozenset({"float32"}))
    torch.manual_seed(0)
    model, x = _net(), torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        want = model(x)
    first = ttm.compile(model, x, cache=False, runtime="torch", optimize="inductor", verify=False)
    torch.testing.assert_close(first(x), want, rtol=1e-4, atol=1e-4)
    assert "3 grouped convolutions to the Triton depthwise kernel where depthwise (float32)" in first.runner.optimized
    assert STATS == {"compiled": 1, "loaded": 0, "stored": 1, "refused": 0}
    second = ttm.compile(model, x, cache=False, runtime="torch", optimize="inductor", verify=False)
    torch.testing.assert_close(second(x), want, rtol=1e-4, atol=1e-4)
    assert STATS == {"compiled": 1, "loaded": 1, "stored": 1, "refused": 0}
    # Other dtypes are other code in the graph, so another artifact: never the program made for the first.
    monkeypatch.setattr(_dwconv, "DWCONV_TRITON", frozenset({"float16"}))
    third = ttm.compile(model, x, cache=False, runtime="torch", optimize="inductor", verify=False)
    torch.testing.assert_close(third(x), want, rtol=1e-4, atol=1e-4)
    assert STATS == {"compiled": 2, "loaded": 1, "stored": 2, "refused": 0}


def test_off_by_default_the_program_keeps_its_convolutions() -> None:
    assert _dwconv.DWCONV_TRITON == frozenset()
    fast = ttm.compile(_net(), torch.randn(2, 3, 12, 12), cache=False, runtime="torch", optimize="inductor",
                       verify=False)
    assert "Triton depthwise" not in fast.runner.optimized
