"""torch_trt_module._export.lowering: scaled_dot_product_attention as plain math, checked against eager's
fused kernels, and used while torch.export captures a model, so that the program and the ONNX
graph hold the math (torch.onnx's own decomposition of the fused op breaks the views after it)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import torch_trt_module as ttm
from torch_trt_module._verify.compare import compare_outputs
from torch_trt_module._export.exporters import capture
from torch_trt_module._export.lowering import attention_math, lowered_attention

B, HQ, HKV, L, S, E = 2, 4, 2, 3, 5, 8


def qkv(heads_kv: int = HQ, length: int = L, source: int = S) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(B, HQ, length, E), torch.randn(B, heads_kv, source, E), torch.randn(B, heads_kv, source, E)


def bool_mask() -> torch.Tensor:
    mask = torch.rand(L, S) > 0.3
    mask[:, 0] = True
    mask[1] = False  # a query row that sees no key: torch's kernels return zeros there
    return mask


def float_mask() -> torch.Tensor:
    mask = torch.randn(B, 1, L, S)
    mask[0, 0, 2, 1:] = float("-inf")
    mask[1, 0, 0] = float("-inf")  # a row masked everywhere
    return mask


CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # id: (how the tensors are made, the keyword arguments of the call)
    "no mask, L != S": ({}, {}),
    "square": ({"source": L}, {}),
    "bool mask": ({}, {"attn_mask": "bool"}),
    "float additive mask": ({}, {"attn_mask": "float"}),
    "causal, square": ({"source": L}, {"is_causal": True}),
    "causal, L < S (top-left)": ({}, {"is_causal": True}),
    "causal, L > S": ({"length": 6}, {"is_causal": True}),
    "gqa": ({"heads_kv": HKV}, {"enable_gqa": True}),
    "gqa, bool mask, custom scale": ({"heads_kv": HKV}, {"enable_gqa": True, "attn_mask": "bool", "scale": 0.3}),
    "gqa with equal heads": ({}, {"enable_gqa": True}),
    "custom scale": ({}, {"scale": 0.05}),
    "explicit dropout_p=0": ({}, {"dropout_p": 0.0}),
}


def _call_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    made = dict(kwargs)
    if made.get("attn_mask") == "bool":
        made["attn_mask"] = bool_mask()
    elif made.get("attn_mask") == "float":
        made["attn_mask"] = float_mask()
    return made


@pytest.mark.parametrize("case", list(CASES))
def test_the_math_matches_eager_attention(case: str) -> None:
    shapes, kwargs = CASES[case]
    q, k, v = qkv(**shapes)
    kwargs = _call_args(kwargs)
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    got = attention_math(q, k, v, **kwargs)
    assert got.shape == expected.shape and not got.isnan().any()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_fully_masked_row_gives_zeros_like_eager() -> None:
    q, k, v = qkv()
    mask = bool_mask()
    got = attention_math(q, k, v, attn_mask=mask)
    assert torch.equal(got[:, :, 1], torch.zeros_like(got[:, :, 1]))
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_the_positional_form_matches() -> None:
    q, k, v = qkv(source=L)
    mask = torch.randn(L, L)
    torch.testing.assert_close(attention_math(q, k, v, mask, 0.0, False, 0.2),
                               F.scaled_dot_product_attention(q, k, v, mask, 0.0, False, scale=0.2))


def test_fp16_scores_stay_finite() -> None:
    # The query is scaled before the product: fp16 scores of large activations would overflow otherwise.
    q, k, v = (t.half() * 60 for t in qkv())
    got = attention_math(q, k, v)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()


def test_dropout_is_refused_with_the_value_received() -> None:
    q, k, v = qkv()
    with pytest.raises(ttm.ExportError) as info:
        attention_math(q, k, v, dropout_p=0.1)
    msg = str(info.value)
    assert msg.startswith("scaled_dot_product_attention was called with dropout_p=0.1 while exporting")
    assert "expected dropout_p=0" in msg and "Fix:" in msg


def test_the_mode_replaces_the_call_and_only_while_active() -> None:
    q, k, v = qkv(heads_kv=HKV)
    with lowered_attention():
        got = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        # Other functions pass through untouched.
        assert torch.equal(torch.softmax(q, -1), torch.softmax(q, -1))
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


# --------------------------------------------------------------------------- during capture

class HeadsMerged(torch.nn.Module):
    """The pattern of T5, Swin and MaxViT: attention with grouped KV heads, then heads merged back with
    transpose + view."""

    def __init__(self, heads: int = HQ, heads_kv: int = HKV) -> None:
        super().__init__()
        self.heads, self.heads_kv = heads, heads_kv
        self.q = torch.nn.Linear(E * heads, E * heads)
        self.kv = torch.nn.Linear(E * heads, 2 * E * heads_kv)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, E).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.heads_kv, E).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2).contiguous().view(b, n, -1)


class T5Like(torch.nn.Module):
    """T5's self-attention in small: a padding mask built from the input plus a learned position bias,
    ``scale=1.0``, then transpose + contiguous + reshape. Without the lowering, torch.onnx 2.14's
    decomposition of the fused op fails on it with ``Cannot view a tensor with shape [s, 8, 4, 8] and
    strides (256, 8, 64, 1) as a tensor with shape (s, 8, 32)``, as on T5 itself."""

    def __init__(self, length: int = 8) -> None:
        super().__init__()
        self.q = torch.nn.Linear(HQ * E, HQ * E)
        self.bias = torch.nn.Parameter(torch.randn(1, HQ, length, length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, HQ, E).transpose(1, 2)
        keep = (x[:, :, 0] > -1.0)[:, None, None, :].expand(b, 1, n, n)  # some keys are padding
        mask = torch.where(keep, self.bias, torch.finfo(x.dtype).min).contiguous()
        out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask, scale=1.0)
        return out.transpose(1, 2).contiguous().reshape(b, n, -1)


class T5Normed(T5Like):
    """T5Like, then a LayerNorm: in fp16/bf16 programs its output is fp32 (LayerNorm's fp32 island),
    while attention is computed in the low dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = torch.nn.LayerNorm(HQ * E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(super().forward(x))


class Flat(torch.nn.Module):
    """What _export hands capture(): flat tensors in, a tuple out."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.model(*xs),)


def _has_fused_attention(program: Any) -> bool:
    return any("scaled_dot_product" in str(node.target) for node in program.graph.nodes)


def test_capture_holds_the_math_not_the_fused_op() -> None:
    x, mask = torch.randn(2, 6, E * HQ), torch.randn(2, 1, 6, 6)
    names = ["x", "mask"]
    profiles = {"x": ((1, 6, E * HQ), (2, 6, E * HQ), (8, 6, E * HQ)), "mask": ((1, 1, 6, 6), (2, 1, 6, 6),
                                                                             (8, 1, 6, 6))}
    model = HeadsMerged().eval()
    program = capture(Flat(model), names, [x, mask], profiles)
    assert not _has_fused_attention(program)
    for batch in (1, 3):
        xb, mb = torch.randn(batch, 6, E * HQ), torch.randn(batch, 1, 6, 6)
        torch.testing.assert_close(program.module()(xb, mb)[0], model(xb, mb), rtol=1e-5, atol=1e-6)
    # The lowering is for the capture only: eager code outside it still runs the fused op.
    assert torch.overrides._get_current_function_mode_stack() == []


def test_a_model_with_attention_then_a_view_compiles_as_one_graph() -> None:
    model = T5Like().eval()
    compiled = ttm.compile(model, torch.randn(2, 8, HQ * E), cache=False)
    assert compiled.engine.exported.exporter == "dynamo"  # no fallback to the tracer
    for batch in (1, 5):  # the profile's min, and another batch
        x = torch.randn(batch, 8, HQ * E)
        with torch.inference_mode():
            report = compare_outputs(compiled(x), model(x), rtol=1e-2, atol=1e-3)
        assert report.passed, report


# --------------------------------------------------------------------------- the runtime's program

def _program_of(compiled: Any) -> Any:
    from torch_trt_module._formats.program import load_program

    return load_program(compiled.engine.program)


@pytest.mark.parametrize("model_cls", [T5Like, HeadsMerged])
def test_the_runtime_program_keeps_fused_attention_and_onnx_keeps_the_math(model_cls: type) -> None:
    # The PyTorch runtime runs the fused kernels, as eager and torch.compile do (issue 21: fp32
    # transformers trailed torch.compile); the ONNX graph holds the math, views after it included.
    model = model_cls().eval()
    args = (torch.randn(2, 8, HQ * E),) if model_cls is T5Like else (torch.randn(2, 8, HQ * E), torch.randn(2, 1, 8, 8))
    dynamic = {"x": {0: (1, 2, 5)}} if model_cls is T5Like else {"x": {0: (1, 2, 5)}, "mask": {0: (1, 2, 5)}}
    compiled = ttm.compile(model, (args, {}), dynamic=dynamic, cache=False, runtime="torch")
    assert _has_fused_attention(_program_of(compiled))
    import onnx

    assert "Softmax" in {n.op_type for n in onnx.load_from_string(compiled.engine.onnx).graph.node}
    for batch in (1, 5):
        xs = [torch.cat([a] * 3)[:batch] for a in args]
        with torch.inference_mode():
            report = compare_outputs(compiled(*xs), model(*xs), rtol=1e-4, atol=1e-5)
        assert report.passed, report


def test_the_lowered_program_stays_where_the_fused_one_disagrees(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from torch_trt_module._export import exporters as _exporters

    monkeypatch.setattr(_exporters, "_agrees", lambda *args: False)
    model = T5Like().eval()
    with caplog.at_level("INFO", logger="torch_trt_module._export.exporters"):
        compiled = ttm.compile(model, torch.randn(2, 8, HQ * E), cache=False, runtime="torch")
    assert not _has_fused_attention(_program_of(compiled))
    assert "keeps attention as its math" in caplog.text
    x = torch.randn(3, 8, HQ * E)
    with torch.inference_mode():
        assert compare_outputs(compiled(x), model(x), rtol=1e-4, atol=1e-5).passed


@pytest.mark.parametrize("model_cls", [T5Like, HeadsMerged, T5Normed])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_precision_programs_keep_fused_attention_in_their_dtype_and_onnx_keeps_the_math(
        precision: str, model_cls: type) -> None:
    # fp32_islands decomposes attention into low-precision matmuls around an fp32 softmax (for ONNX,
    # whose engines build from its dtypes). The PyTorch runtime's program keeps one fused call in the
    # low dtype instead, whose kernels keep the softmax in fp32 themselves: decomposed, vit_b_16 fp16
    # at batch 32 wrote its fp32 scores to memory and trailed torch.compile under autocast (0.91x).
    from torch_trt_module._core.numerics import policy_for

    low = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    model = model_cls().eval()
    one = model_cls is not HeadsMerged  # one input (T5Like, T5Normed), or x and a mask
    args = (torch.randn(2, 8, HQ * E),) if one else (torch.randn(2, 8, HQ * E), torch.randn(2, 1, 8, 8))
    dynamic = {"x": {0: (1, 2, 5)}} if one else {"x": {0: (1, 2, 5)}, "mask": {0: (1, 2, 5)}}
    compiled = ttm.compile(model, (args, {}), dynamic=dynamic, cache=False, precision=precision, cast_inputs=True,
                           runtime="torch")
    program = _program_of(compiled)
    fused = [n for n in program.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert fused and all(n.args[0].meta["val"].dtype == low for n in fused)
    import onnx

    assert "Softmax" in {n.op_type for n in onnx.load_from_string(compiled.engine.onnx).graph.node}
    for batch in (1, 5):
        xs = [torch.cat([a] * 3)[:batch] for a in args]
        with torch.inference_mode():
            report = compare_outputs(compiled(*xs), model(*xs), tolerance=policy_for(precision))
        assert report.passed, report


def test_an_fp32_model_s_attention_is_never_touched_by_the_low_precision_switch() -> None:
    # The switch acts on fp32_islands' low-precision attention only: fp32 attention is the model's own.
    from torch_trt_module._export.precision import low_precision_attention

    q = torch.randn(2, 4, 6, 8)
    want = F.scaled_dot_product_attention(q, q, q)
    with low_precision_attention(fused=True) as calls:
        got = F.scaled_dot_product_attention(q, q, q)
    assert calls == [0] and torch.equal(got, want)


def test_a_cpu_compile_for_onnx_runtime_captures_once_and_keeps_the_math(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fused program serves the PyTorch runtime only: compiled on the CPU with the default runtime
    # (ONNX Runtime), the model is captured once.
    from torch_trt_module._export import exporters as _exporters

    calls: list[bool] = []
    real = _exporters.capture

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("lower_attention", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(_exporters, "capture", counting)
    compiled = ttm.compile(T5Like().eval(), torch.randn(2, 8, HQ * E), cache=False)
    assert calls == [True]
    assert not _has_fused_attention(_program_of(compiled))
