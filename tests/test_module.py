"""TRTModule on the ONNX Runtime runtime (real, on the CPU): structure, checks, lazy mode, save/load."""

from __future__ import annotations

import collections
import logging

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module import assert_parity

from harness.cases import KeywordArgs  # cases.md #11


class Nested(torch.nn.Module):  # cases.md #10
    def forward(self, x: torch.Tensor) -> dict[str, object]:
        return {"a": x + 1, "b": (x * 2, [x.sum(-1), x.mean(-1, keepdim=True)])}


Pair = collections.namedtuple("Pair", "first second")


class NamedOut(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> Pair:
        return Pair(x.relu(), x.sigmoid())


@pytest.fixture(scope="module")
def nested() -> tuple[torch.nn.Module, ttm.TRTModule]:
    model = Nested().eval()
    return model, ttm.compile(model, torch.randn(2, 8, 16), cache=False)


def test_nested_output_structure_and_container_types_are_preserved(nested: tuple) -> None:
    model, module = nested
    x = torch.randn(5, 8, 16)
    out = module(x)
    assert isinstance(out, dict) and isinstance(out["b"], tuple) and isinstance(out["b"][1], list)
    assert_parity(model, module, x)


def test_namedtuple_output_comes_back_as_the_namedtuple() -> None:
    model = NamedOut().eval()
    module = ttm.compile(model, torch.randn(2, 4), cache=False)
    out = module(torch.randn(3, 4))
    assert type(out) is Pair and out.first.shape == (3, 4)


def test_keyword_arguments_bind_by_name() -> None:
    model = KeywordArgs().eval()
    x, b = torch.randn(2, 32), torch.randn(2, 32)
    module = ttm.compile(model, ((), {"x": x, "bias": b}), cache=False)
    assert module.input_names == ["x", "bias"]
    x2, b2 = torch.randn(7, 32), torch.randn(7, 32)
    assert_parity(model, module, ((), {"x": x2, "bias": b2}))
    assert_parity(model, module, ((x2,), {"bias": b2}))  # positional x works too
    with pytest.raises(ttm.InputError, match=r"missing argument\(s\) \['bias'\]"):
        module(x2)
    with pytest.raises(ttm.InputError, match="'scale'.*not given at compile time"):
        module(x2, bias=b2, scale=2.0)
    with pytest.raises(ttm.InputError, match="got an unexpected keyword argument 'bais'"):
        module(x2, bais=b2)


def test_bad_inputs_get_typed_errors_naming_the_input(nested: tuple) -> None:
    _, module = nested
    with pytest.raises(ttm.InputError, match=r"input 'x' has dtype torch.float64 but the module was compiled for "
                                             r"torch.float32; pass .to\(torch.float32\) or compile with cast_inputs=True"):
        module(torch.randn(2, 8, 16, dtype=torch.float64))
    with pytest.raises(ttm.InputError, match=r"input 'x' has shape \(64, 8, 16\) outside the engine's profile "
                                             r"\(1..32, 8, 16\) \(dim 0 = 64 not in 1..32\).*Recompile with dynamic="):
        module(torch.randn(64, 8, 16))
    with pytest.raises(ttm.InputError, match=r"input 'x' has rank 2 .* expects rank 3"):
        module(torch.randn(2, 8))
    with pytest.raises(ttm.InputError, match="input 'x' is None but the module was compiled with a tensor there"):
        module(None)
    with pytest.raises(ttm.InputError, match=r"got 2 positional arguments but forward takes at most 1"):
        module(torch.randn(2, 8, 16), torch.randn(2, 8, 16))
    with pytest.raises(ttm.InputError, match="requires grad.*inference_mode"):
        module(torch.randn(2, 8, 16, requires_grad=True))
    module.train()
    try:
        with pytest.raises(ttm.InputError, match=r"training mode; call .eval\(\)"):
            module(torch.randn(2, 8, 16))
    finally:
        module.eval()


def test_cast_inputs_casts_safely() -> None:
    model = torch.nn.Linear(4, 2).eval()
    module = ttm.compile(model, torch.randn(2, 4), cache=False, cast_inputs=True)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert_parity(model, module, x.float())
    assert module(x).dtype == torch.float32


def test_compile_refuses_a_model_in_training_mode() -> None:
    with pytest.raises(ttm.InputError, match=r"training mode.*model.eval\(\)"):
        ttm.compile(torch.nn.Linear(2, 2), torch.randn(2, 2))


def test_nan_and_inf_pass_through(nested: tuple) -> None:
    _, module = nested
    x = torch.randn(2, 8, 16)
    x[0, 0, 0], x[1, 1, 1] = float("nan"), float("inf")
    out = module(x)
    assert torch.isnan(out["a"][0, 0, 0]) and torch.isinf(out["a"][1, 1, 1])


def test_save_and_load_round_trip_with_weights_only(tmp_path, nested: tuple) -> None:
    model, module = nested
    path = tmp_path / "m.pt"
    ttm.save(module, path)
    state = torch.load(path, weights_only=True)  # raises if anything but tensors/primitives were pickled
    assert set(state) == {"_extra_state"}
    loaded = ttm.load(path)
    assert loaded.engine is not None and loaded.engine.plan == module.engine.plan
    x = torch.randn(4, 8, 16)
    out = loaded(x)
    assert isinstance(out["b"][1], list)
    assert_parity(model, loaded, x)


def test_repr_names_backend_profiles_and_precision(nested: tuple) -> None:
    _, module = nested
    text = repr(module)
    assert "backend=onnxruntime" in text and "precision=fp32" in text and "x: float32 (1..32, 8, 16)" in text


def test_lazy_mode_builds_at_first_call_then_widens(caplog: pytest.LogCaptureFixture) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()).eval()
    module = ttm.compile(model, max_rebuilds=1)
    assert module.engine is None and "unbuilt" in repr(module)
    assert_parity(model, module, torch.randn(4, 8))
    first = module.engine
    assert_parity(model, module, torch.randn(20, 8))  # inside 1..32: no rebuild
    assert module.engine is first
    with caplog.at_level(logging.INFO, logger="torch_trt_module"):
        assert_parity(model, module, torch.randn(40, 8))
    assert module.engine is not first
    assert "rebuilding with a wider profile (1/1)" in caplog.text
    assert module.engine.exported.inputs[0].max[0] >= 40
    with pytest.raises(ttm.InputError, match=r"already rebuilt 1 times \(max_rebuilds=1\)"):
        module(torch.randn(8, 9))  # rank matches, dim 1 changes: a widening is needed but none is left


def test_explicit_backend_that_cannot_run_here_says_why() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ttm.BackendUnavailable, match="needs a CUDA GPU|not importable|cannot run here"):
        ttm.compile(torch.nn.Linear(2, 2).eval(), torch.randn(2, 2), backend="tensorrt")
    with pytest.raises(ttm.BackendUnavailable, match="'tensorrt_rtx' cannot run here: no CUDA GPU is in use"):
        ttm.compile(torch.nn.Linear(2, 2).eval(), torch.randn(2, 2), backend="tensorrt_rtx")
