"""Issue 14: exports that succeed and tell the truth.

1. Hugging Face models whose attention torch.onnx could not decompose (T5, Swin, timm's MaxViT)
   compile as one graph with the dynamo exporter, and match eager at the profile's min and another
   batch (the attention is captured as its math: ``_lowering``).
2. When the dynamo exporter fails, its error comes first and is kept; the TorchScript fallback's
   error follows it and never claims data-dependent control flow (the tracer cannot tell a shape
   check from a branch on data). Only torch.export's evidence gives that verdict.
3. Outputs: Hugging Face caches (``DynamicCache``, ``EncoderDecoderCache``) are refused at compile
   time with an error that is both an ExportError and a TypeError and says ``use_cache=False``;
   other classes registered with torch's pytree (a registered dataclass) are flattened and rebuilt.

Models are tiny random configurations; transformers and timm are imported lazily (skipped if absent).
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree

import torch_trt_module as ttm
from torch_trt_module._pipeline import compile as _compile
from torch_trt_module._export import exporters as _exporters
from torch_trt_module._verify.compare import compare_outputs
from torch_trt_module._errors import UnsupportedOutput
from torch_trt_module._core.tree import TreeSpec, flatten, leaf_paths, unflatten

TOL = {"rtol": 1e-2, "atol": 1e-3}  # class M
BATCHES = (1, 3)  # the profile's min (dynamic="batch": 1..32) and another batch than the example's 2


def transformers_module() -> Any:
    return pytest.importorskip("transformers")


def assert_matches_eager(compiled: torch.nn.Module, model: torch.nn.Module, make: Any) -> None:
    for batch in BATCHES:
        args, kwargs = make(batch)
        with torch.inference_mode():
            report = compare_outputs(compiled(*args, **kwargs), model(*args, **kwargs), **TOL)
        assert report.passed, f"batch {batch}:\n{report}"


# --------------------------------------------------------------------------- 1. attention lowered

def tiny_t5_config() -> Any:
    return transformers_module().T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)


def test_t5_encoder_compiles_as_one_graph_and_matches_eager() -> None:
    model = transformers_module().T5EncoderModel(tiny_t5_config()).eval()

    def make(batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        ids = torch.randint(0, 100, (batch, 8))
        mask = torch.ones(batch, 8, dtype=torch.long)
        mask[0, 6:] = 0  # padding: the additive mask is not all zeros
        return (ids,), {"attention_mask": mask}

    compiled = ttm.compile(model, make(2), cache=False)
    assert compiled.engine.exported.exporter == "dynamo"  # torch.onnx used to fail here; no fallback
    assert_matches_eager(compiled, model, make)


def test_swin_compiles_as_one_graph_and_matches_eager() -> None:
    transformers = transformers_module()
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                     window_size=4)
    model = transformers.SwinModel(config).eval()

    def make(batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (torch.randn(batch, 3, 32, 32),), {}

    compiled = ttm.compile(model, make(2), cache=False)
    assert compiled.engine.exported.exporter == "dynamo"
    assert_matches_eager(compiled, model, make)


@pytest.mark.slow
def test_t5_encoder_decoder_without_cache_matches_eager() -> None:
    # Cross-attention (query and key lengths differ) and the decoder's causal mask, through the lowering.
    model = transformers_module().T5Model(tiny_t5_config()).eval()

    def make(batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (torch.randint(0, 100, (batch, 8)),), {"decoder_input_ids": torch.randint(0, 100, (batch, 5)),
                                                      "use_cache": False}

    compiled = ttm.compile(model, make(2), cache=False)
    assert compiled.engine.exported.exporter == "dynamo"
    assert_matches_eager(compiled, model, make)


@pytest.mark.slow
def test_timm_maxvit_compiles_as_one_graph_and_matches_eager() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("maxvit_tiny_rw_224", pretrained=False).eval()

    def make(batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (torch.randn(batch, 3, 224, 224),), {}

    compiled = ttm.compile(model, make(2), cache=False, max_batch=4)
    assert compiled.engine.exported.exporter == "dynamo"
    assert_matches_eager(compiled, model, make)


def test_funnel_whose_pooling_specialises_a_dim_runs_correctly_by_default() -> None:
    """FunnelModel pools the sequence by a stride: the export specialised the sequence dim. The
    default (partition='auto') must still run it right at the profile's min and another batch."""
    transformers = transformers_module()
    config = transformers.FunnelConfig(vocab_size=100, block_sizes=[1, 1], d_model=32, n_head=2, d_head=16,
                                       d_inner=64, num_decoder_layers=1)
    model = transformers.FunnelModel(config).eval()

    def make(batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (torch.randint(0, 100, (batch, 8)),), {"attention_mask": torch.ones(batch, 8, dtype=torch.long)}

    compiled = ttm.compile(model, make(2), cache=False)
    assert_matches_eager(compiled, model, make)


def test_mbart_is_right_at_every_batch_of_its_profile() -> None:
    """MBart's axis-less squeeze specialised the graph for batch > 1 (ONNX Runtime failed at batch 1,
    inside the profile); the corner checks catch it and the default runs it right at batch 1."""
    transformers = transformers_module()
    config = transformers.MBartConfig(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1,
                                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                      decoder_ffn_dim=64, max_position_embeddings=64)
    model = transformers.MBartModel(config).eval()

    def make(batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (torch.randint(3, 100, (batch, 8)),), {"use_cache": False}

    compiled = ttm.compile(model, make(2), cache=False)
    assert_matches_eager(compiled, model, make)


@pytest.mark.slow
def test_timm_inception_v4_passes_the_export_check_by_its_scale() -> None:
    """Random weights with BatchNorm statistics from random data: max abs error ~7e-4 on outputs of
    large scale, which the old fixed atol refused; the policy relative to the output's rms takes it."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("inception_v4", pretrained=False).train()
    with torch.no_grad():  # calibrate the BatchNorm statistics on random data, as the run did
        for _ in range(2):
            model(torch.randn(4, 3, 299, 299))
    model.eval()

    def make(batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (torch.randn(batch, 3, 299, 299),), {}

    compiled = ttm.compile(model, make(2), cache=False, max_batch=4)
    assert_matches_eager(compiled, model, make)


# --------------------------------------------------------------------------- 2. truthful errors

class ShapeAssert(torch.nn.Module):
    """timm's patch embedding in small: an assert on the image size, which the TorchScript tracer
    reports as "Converting a tensor to a Python boolean" although no value of the data decides it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        torch._assert(h == 8, f"input height ({h}) doesn't match the model (8)")  # the assert line
        return x.flatten(2).transpose(1, 2) * 2


class Branch(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # the branch line
            return x * 2
        return x


def line_of(cls: type, marker: str) -> int:
    lines, start = inspect.getsourcelines(cls.forward)
    return start + next(i for i, line in enumerate(lines) if marker in line)


def test_a_shape_assert_seen_by_the_tracer_is_not_called_data_dependent(monkeypatch: pytest.MonkeyPatch) -> None:
    # The dynamo exporter fails for a reason that has nothing to do with data (the ONNX translation,
    # as torch.onnx's attention decomposition did on T5), so the tracer is tried and warns on the assert.
    dynamo_error = ValueError("Cannot view a tensor with shape torch.Size([s0, 8, 4, 8]) as a tensor with shape "
                              "(s0, 8, 32)!")
    monkeypatch.setattr(_exporters, "_to_onnx", lambda *a, **k: (_ for _ in ()).throw(dynamo_error))
    with pytest.raises(ttm.ExportError) as info:
        ttm.export_onnx(ShapeAssert().eval(), torch.randn(2, 3, 8, 8))
    msg = str(info.value)
    assert msg.startswith(f"could not export the model to ONNX (dynamo: {dynamo_error}; torchscript: the "
                          "TorchScript tracer turned a traced value into a Python value (Converting a tensor to a "
                          "Python ")  # a number for the f-string, a boolean for the comparison: the first is named
    assert "might cause the trace to be incorrect.) at " in msg
    assert msg.endswith("or fix what stops the dynamo exporter (exporter='dynamo' shows its error).).")
    assert "data-dependent" not in msg and "data dependent" not in msg
    assert f"{Path(__file__)}:{line_of(ShapeAssert, 'the assert line')}" in msg  # the model's line, not torch's
    assert info.value.__cause__ is dynamo_error  # the first exporter's error is the one chained


def test_the_tracer_alone_names_the_line_and_calls_a_shape_check_what_torch_export_found() -> None:
    with pytest.raises(ttm.ExportError) as info:
        ttm.export_onnx(ShapeAssert().eval(), torch.randn(2, 3, 8, 8), exporter="torchscript")
    msg = str(info.value)
    assert msg.startswith("the TorchScript tracer turned a traced value into a Python value (Converting a tensor to a "
                          f"Python number might cause the trace to be incorrect.) at {Path(__file__)}:"
                          f"{line_of(ShapeAssert, 'the assert line')}. ")
    assert msg.endswith("torch.export traced the same model without finding a data-dependent branch, so the value is "
                        "likely a check on a shape. Fix: use exporter='dynamo' (or 'auto'), or make the dimension it "
                        "depends on static (dynamic=None).")
    assert "data-dependent control flow" not in msg


def test_the_tracer_alone_calls_a_branch_on_data_so_with_torch_export_s_evidence() -> None:
    with pytest.raises(ttm.ExportError) as info:
        ttm.export_onnx(Branch().eval(), torch.randn(2, 4), exporter="torchscript")
    msg = str(info.value)
    assert f" at {Path(__file__)}:{line_of(Branch, 'the branch line')}. " in msg
    assert "torch.export confirms that the model has data-dependent control flow (a Python branch or .item()/int() " \
           "on a tensor value): Could not guard on data-dependent expression" in msg
    assert msg.endswith("Fix: replace the branch with tensor ops (torch.where, torch.cond) or move it outside the "
                        "compiled module.")
    assert _exporters.is_data_dependent(info.value.__cause__)  # the evidence is torch.export's, chained


def test_a_real_branch_on_data_is_called_data_dependent_from_torch_export_s_evidence() -> None:
    traced: list[str] = []
    with pytest.raises(ttm.ExportError) as info, pytest.MonkeyPatch.context() as mp:
        mp.setattr(_exporters, "_export_torchscript", lambda *a, **k: traced.append("tracer") or b"")
        ttm.export_onnx(Branch().eval(), torch.randn(2, 4))
    msg = str(info.value)
    assert msg.startswith("the model has data-dependent control flow (a Python branch or .item()/int() on a tensor "
                          "value), which cannot be captured in a static graph. torch.export said: Could not guard on "
                          "data-dependent expression")
    assert _exporters.is_data_dependent(info.value.__cause__)
    assert traced == []  # no fallback: the tracer would bake in the branch taken


def test_our_own_errors_are_never_evidence_of_data_dependence() -> None:
    ours = ttm.ExportError("the model has data-dependent control flow")
    assert not _exporters.is_data_dependent(ours)
    assert _exporters.is_data_dependent(RuntimeError("Could not guard on data-dependent expression u0 > 0"))


def test_a_failing_fallback_never_replaces_the_dynamo_error(monkeypatch: pytest.MonkeyPatch) -> None:
    dynamo_error = RuntimeError("torch.onnx: Failed to decompose the FX graph")
    tracer_error = ttm.ExportError("the TorchScript tracer refused it")
    monkeypatch.setattr(_exporters, "_to_onnx", lambda *a, **k: (_ for _ in ()).throw(dynamo_error))
    monkeypatch.setattr(_exporters, "_export_torchscript", lambda *a, **k: (_ for _ in ()).throw(tracer_error))
    with pytest.raises(ttm.ExportError) as info:
        ttm.export_onnx(torch.nn.Linear(4, 2).eval(), torch.randn(2, 4))
    assert info.value is not tracer_error
    assert str(info.value) == ("could not export the model to ONNX (dynamo: torch.onnx: Failed to decompose the FX "
                               "graph; torchscript: the TorchScript tracer refused it).")
    assert info.value.__cause__ is dynamo_error


# --------------------------------------------------------------------------- 3. outputs that are pytree nodes

def tiny_llama() -> torch.nn.Module:
    config = transformers_module().LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    return transformers_module().LlamaModel(config).eval()


def test_a_decoder_called_the_default_way_is_refused_with_the_fix() -> None:
    model = tiny_llama()
    builds = _compile.STATS["builds"]
    with pytest.raises(UnsupportedOutput) as info:
        ttm.compile(model, torch.randint(0, 100, (2, 8)), cache=False)
    err = info.value
    assert isinstance(err, ttm.TorchTRTError) and isinstance(err, ttm.ExportError) and isinstance(err, TypeError)
    msg = str(err)
    assert "is a DynamicCache (transformers.cache_utils.DynamicCache), a cache object" in msg
    assert msg.startswith("output [")  # names where in the output it is
    assert "use_cache=False" in msg
    assert _compile.STATS["builds"] == builds  # refused before building


def test_a_decoder_without_cache_compiles_and_matches_eager() -> None:
    model = tiny_llama()  # grouped KV heads (4 query heads, 2 KV heads) through the lowering

    def make(batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (torch.randint(0, 100, (batch, 8)),), {"use_cache": False}

    compiled = ttm.compile(model, make(2), cache=False)
    assert compiled.engine.exported.exporter == "dynamo"
    assert_matches_eager(compiled, model, make)


def test_an_encoder_decoder_cache_is_refused_too() -> None:
    model = transformers_module().T5Model(tiny_t5_config()).eval()
    ids = torch.randint(0, 100, (2, 8))
    with pytest.raises(UnsupportedOutput, match=r"is a EncoderDecoderCache \(.*\), a cache object.*use_cache=False"):
        ttm.export_onnx(model, ((ids,), {"decoder_input_ids": ids[:, :4]}))


@dataclasses.dataclass
class Pair:
    logits: torch.Tensor
    hidden: torch.Tensor
    extra: torch.Tensor | None = None


pytree.register_dataclass(Pair)


class ReturnsPair(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, Pair]:
        hidden = torch.relu(x)
        return {"out": Pair(self.lin(hidden), hidden)}


def test_a_registered_dataclass_is_flattened_and_rebuilt() -> None:
    value = Pair(torch.ones(2), torch.zeros(3))
    leaves, spec = flatten(value)
    assert [t.shape for t in leaves] == [(2,), (3,)] and spec.kind == "node" and spec.keys == ["logits", "hidden"]
    assert leaf_paths(spec) == [(("key", "logits"),), (("key", "hidden"),)]
    new = [torch.full((2,), 5.0), torch.full((3,), 6.0)]
    rebuilt = unflatten(spec, new)
    assert isinstance(rebuilt, Pair) and rebuilt.logits is new[0] and rebuilt.hidden is new[1]
    assert rebuilt.extra is None
    # Saved as JSON (no pickle); loading resolves the class only because it is registered.
    loaded = TreeSpec.from_json(spec.to_json())
    assert loaded == spec and isinstance(unflatten(loaded, new), Pair)


def test_an_unresolvable_node_falls_back_to_a_dict_of_its_fields() -> None:
    _, spec = flatten(Pair(torch.ones(2), torch.zeros(3)))
    data = spec.to_json()
    data["cls"] = "os:system"  # neither imported here as a node nor registered: never called
    loaded = TreeSpec.from_json(data)
    assert loaded.cls is None
    out = unflatten(loaded, [torch.ones(2), torch.zeros(3)])
    assert set(out) == {"logits", "hidden"}


def test_a_model_returning_a_registered_dataclass_compiles(tmp_path: Path) -> None:
    model = ReturnsPair().eval()
    compiled = ttm.compile(model, torch.randn(2, 4), cache=False)
    assert compiled.output_names == ["out_logits", "out_hidden"]
    x = torch.randn(3, 4)
    with torch.inference_mode():
        out, expected = compiled(x), model(x)
    assert isinstance(out["out"], Pair) and out["out"].extra is None
    assert compare_outputs(out, expected, **TOL).passed
    ttm.save(compiled, tmp_path / "pair.pt")
    with torch.inference_mode():
        again = ttm.load(tmp_path / "pair.pt")(x)
    assert isinstance(again["out"], Pair)


class Opaque:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


pytree.register_pytree_node(Opaque, lambda o: ([o.t], object()), lambda values, ctx: Opaque(values[0]))


def test_a_node_whose_context_is_not_json_is_refused_by_name() -> None:
    class ReturnsOpaque(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> Opaque:
            return Opaque(x * 2)

    with pytest.raises(UnsupportedOutput) as info:
        ttm.export_onnx(ReturnsOpaque().eval(), torch.randn(2, 4))
    assert str(info.value).startswith("output (the whole value) is a Opaque, registered with torch's pytree, but its "
                                      "pytree context is not JSON data (object is not JSON data)")
