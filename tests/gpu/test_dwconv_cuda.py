"""Our Triton depthwise kernel on a CUDA GPU (backends/_dwconv.py, an experiment off by default).

- the kernel against cuDNN's depthwise convolution, for mobilenet_v3_small's shapes and a few
  more, in fp32, fp16 and bf16, channels_last and not;
- mobilenet_v3_small compiled with the kernel for fp32 and fp16, against eager at the profile's
  corners, through plain calls and CUDA graphs, and its stored program loaded by a second module.
"""

from __future__ import annotations

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module._core.numerics import eager_uses_tf32, policy_for, strict_fp32
from torch_trt_module._verify.compare import compare_outputs
from torch_trt_module.backends import _dwconv
from torch_trt_module.backends._dwconv import triton_depthwise
from torch_trt_module.backends._inductor_store import STATS

pytestmark = pytest.mark.gpu
torchvision = pytest.importorskip("torchvision")
pytest.importorskip("triton")

if not torch.cuda.is_available():  # pragma: no cover - the marker's skip, made explicit for collection
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_kernel_matches_cudnn(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    # (batch, channels, size, kernel, stride): mobilenet_v3_small's at batch 32, and odd ones.
    cases = [(32, 16, 112, 3, 2), (32, 72, 56, 3, 2), (32, 88, 28, 3, 1), (32, 96, 28, 5, 2), (32, 240, 14, 5, 1),
             (32, 576, 7, 5, 1), (1, 3, 9, 3, 1), (3, 130, 17, 7, 2), (2, 64, 10, 5, 1)]
    for i, (n, c, size, k, s) in enumerate(cases):
        x = torch.randn(n, c, size, size, device="cuda", dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last) if i % 2 == 0 else x
        w = torch.randn(c, 1, k, k, device="cuda", dtype=dtype)
        b = torch.randn(c, device="cuda", dtype=dtype) if i % 3 else None
        with strict_fp32():
            want = torch.nn.functional.conv2d(x.float(), w.float(), None if b is None else b.float(), s, k // 2, 1, c)
        got = torch.ops.torch_trt_module.depthwise_conv2d(x, w, b, [s, s], [k // 2, k // 2], [1, 1])
        assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
        tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol, msg=lambda m: f"case {i}: {m}")
        torch.testing.assert_close(triton_depthwise(x, w, b, [s, s], [k // 2, k // 2], [1, 1]), got)


def _policy(precision: str) -> object:
    return policy_for("tf32") if precision == "fp32" and eager_uses_tf32("cuda") else policy_for(precision)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_mobilenet_with_the_kernel_matches_eager_and_its_program_is_stored(
        monkeypatch: pytest.MonkeyPatch, precision: str) -> None:
    monkeypatch.setattr(_dwconv, "DWCONV_TRITON", frozenset({"float32", "float16"}))
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None).eval().cuda()
    for k in STATS:
        STATS[k] = 0
    fast = ttm.compile(model, torch.randn(4, 3, 224, 224, device="cuda"), precision=precision, max_batch=32,
                       cast_inputs=True, cache=False)
    assert "11 grouped convolutions to the Triton depthwise kernel" in fast.runner.optimized
    again = ttm.compile(model, torch.randn(4, 3, 224, 224, device="cuda"), precision=precision, max_batch=32,
                        cast_inputs=True, cache=False)
    for batch in (1, 32):
        for call in range(3):  # plain, judged (cuda_graphs="auto"), then a replay where a graph was kept
            x = torch.randn(batch, 3, 224, 224, device="cuda")
            with torch.no_grad(), strict_fp32():
                want = model(x)
            for module in (fast, again):
                report = compare_outputs(module(x).float(), want, tolerance=_policy(precision))
                assert report.passed, f"batch {batch}, call {call + 1}: {report}"
    assert STATS["loaded"] >= 1 and STATS["refused"] == 0, STATS
