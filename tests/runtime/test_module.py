"""TRTModule (torch_trt_module._runtime.module) on the ONNX Runtime runtime (real, on the CPU): output structure,
input checks, lazy mode, save/load, and the fast call (straight to the runner's per-shape plan)."""

from __future__ import annotations

import collections
import logging

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module import assert_parity

from harness.cases import KeywordArgs  # cases.md #11

from .._support import TwoInputs, rtx_missing


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

@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_keyword_calls_and_cast_inputs_take_the_fast_call(precision: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # model(**batch) (how Hugging Face models are called) and an fp16 engine's fp32 inputs skip the
    # full path after the first call (issue 21: the benchmark calls with keywords, and every
    # trtmodule-fp16 call took the full path); results and every check stay the same.
    torch.manual_seed(0)
    model = TwoInputs().eval()
    x, y = torch.randn(4, 8), torch.rand(4, 4)
    module = ttm.compile(model, (x, y), cache=False, backend="onnxruntime", precision=precision,
                         cast_inputs=precision == "fp16")
    full: list[int] = []
    orig = ttm.TRTModule._forward
    monkeypatch.setattr(ttm.TRTModule, "_forward", lambda self, a, k: full.append(1) or orig(self, a, k))
    tol = {"rtol": 1e-5, "atol": 1e-5} if precision == "fp32" else {"rtol": 2e-2, "atol": 2e-2}
    with torch.inference_mode():
        for call in range(4):
            got = module(x=x, y=y) if call % 2 else module(y=y, x=x)
            torch.testing.assert_close(got, model(x, y), **tol)
        assert len(full) == 1  # planned at the first call, fast ever after
        torch.testing.assert_close(module(x, y), got)
        assert len(full) == 1
        with pytest.raises(ttm.InputError, match="unexpected keyword argument 'y2'"):
            module(x=x, y2=y)
        with pytest.raises(ttm.InputError, match="input 'x' is on meta but this module runs on cpu"):
            module(x=torch.empty(4, 8, device="meta"), y=y)



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
    module.train()  # a parent's train(): inference all the same (issue 20), said once
    try:
        x = torch.randn(2, 8, 16)
        torch.testing.assert_close(module(x), module.eval()(x))
    finally:
        module.eval()


def test_cast_inputs_casts_safely() -> None:
    model = torch.nn.Linear(4, 2).eval()
    module = ttm.compile(model, torch.randn(2, 4), cache=False, cast_inputs=True)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert_parity(model, module, x.float())
    assert module(x).dtype == torch.float32


def test_compile_takes_a_model_in_training_mode_and_leaves_it_there() -> None:
    model = torch.nn.Linear(2, 2)  # issue 20: its inference semantics, as torch.onnx.export does
    fast = ttm.compile(model, torch.randn(2, 2))
    assert model.training
    x = torch.randn(3, 2)
    torch.testing.assert_close(fast(x), model(x).detach())


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
    assert loaded.engine is not None
    # The same engine comes back: its backend, its graph, and its plan where it has one (a
    # TensorRT-RTX build, made here when tensorrt_rtx is installed; else an ONNX Runtime engine).
    assert (loaded.engine.backend, loaded.engine.onnx) == (module.engine.backend, module.engine.onnx)
    if module.engine.backend == "onnxruntime":
        assert rtx_missing() is not None  # backend="auto" builds with TensorRT-RTX wherever it can
        assert loaded.engine.plan is None and not loaded.engine.has_plan
    else:
        assert module.engine.plan and loaded.engine.plan == module.engine.plan
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
    with pytest.raises(ttm.InputError, match=r"already rebuilt 1 time\(s\) \(max_rebuilds=1\) and rebuilds no more"):
        module(torch.randn(8, 9))  # rank matches, dim 1 changes: a widening is needed but none is left


def test_a_lazy_module_s_errors_neither_suggest_lazy_mode_nor_blame_a_rank_change_on_max_rebuilds() -> None:
    """issue 24: out-of-profile errors suggested lazy mode to a lazy module, and a rank change was blamed
    on max_rebuilds."""
    module = ttm.compile(torch.nn.Linear(8, 4).eval(), max_rebuilds=0)
    module(torch.randn(2, 8))
    with pytest.raises(ttm.InputError) as e:
        module(torch.randn(64, 8))
    assert str(e.value) == (
        "input 'input' has shape (64, 8) outside the engine's profile (1..32, 8) (dim 0 = 64 not in 1..32). "
        "Recompile with dynamic={'input': {0: (1, 2, 64)}}. This lazy module already rebuilt 0 time(s) "
        "(max_rebuilds=0) and rebuilds no more; or compile it with a larger max_rebuilds=.")
    with pytest.raises(ttm.InputError) as e:
        module(torch.randn(2, 3, 8))
    assert str(e.value) == ("input 'input' has rank 3 (shape (2, 3, 8)) but the engine expects rank 2. Pass a tensor "
                            "of the compiled rank.")


def test_explicit_backend_that_cannot_run_here_says_why() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ttm.BackendUnavailable, match="needs a CUDA GPU|not importable|cannot run here"):
        ttm.compile(torch.nn.Linear(2, 2).eval(), torch.randn(2, 2), backend="tensorrt")
    # Installed, TensorRT-RTX builds here but cannot run; not installed, the message says how to install it.
    why = ("'tensorrt_rtx' cannot run here: no CUDA GPU is in use" if rtx_missing() is None else
           r"TensorRT is not importable here \(tensorrt_rtx: .*\); install it: pip install 'torch_trt_module\[rtx\]'")
    with pytest.raises(ttm.BackendUnavailable, match=why):
        ttm.compile(torch.nn.Linear(2, 2).eval(), torch.randn(2, 2), backend="tensorrt_rtx")


# --------------------------------------------------------------------------- the fast call
# TRTModule.__call__ goes straight to the runner's per-shape plan once a call at the same input shapes
# has succeeded, skipping nn.Module's hook dispatch and forward()'s full checks. These tests pin what
# it must not change: every check and error of the full path, hooks, fresh outputs, and recovery
# when ONNX Runtime fails.

class Gather(torch.nn.Module):
    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.index_select(x, 0, idx) * 2


@pytest.fixture(scope="module")
def linear() -> tuple[torch.nn.Module, ttm.TRTModule]:
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8).eval()
    return model, ttm.compile(model, torch.randn(2, 16), cache=False, backend="onnxruntime")


def _planned(module: ttm.TRTModule) -> int:
    return len(module.runner._plans)


def test_repeated_calls_take_the_plan_and_return_fresh_outputs(linear: tuple) -> None:
    model, module = linear
    x = torch.randn(3, 16)
    a, b = module(x), module(x)
    assert _planned(module) >= 1 and (x.shape,) in module._fast  # the second call was a fast one
    torch.testing.assert_close(a, model(x).detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    a.zero_()  # the caller owns its output: writing to it touches nothing else
    assert b.abs().sum() > 0 and torch.equal(module(x), b)


def test_new_tensors_in_place_updates_and_alternating_shapes_all_match_eager(linear: tuple) -> None:
    model, module = linear
    x = torch.randn(1, 16)
    for step in range(12):
        if step % 3 == 0:
            x.mul_(-1.5)  # same address, new values: must not be served from a stale binding
        else:
            x = torch.randn(1 + step % 4, 16)  # new address, often a new shape
        with torch.inference_mode():
            got = module(x)
        torch.testing.assert_close(got, model(x).detach(), rtol=1e-5, atol=1e-5)


def test_every_input_check_still_applies_after_fast_calls(linear: tuple) -> None:
    _, module = linear
    x = torch.randn(2, 16)
    module(x), module(x)
    with pytest.raises(ttm.InputError, match=r"input 'input' has dtype torch.float64 but the module was compiled "
                                             r"for torch.float32; pass .to\(torch.float32\)"):
        module(x.double())
    with pytest.raises(ttm.InputError, match=r"input 'input' requires grad, .* pass .detach\(\)"):
        module(x.clone().requires_grad_())
    with pytest.raises(ttm.InputError, match=r"input 'input' is on meta but this module runs on cpu"):
        module(torch.empty(2, 16, device="meta"))
    with pytest.raises(ttm.InputError, match=r"input 'input' .*16"):
        module(torch.randn(2, 15))
    module.train()
    try:
        assert module(x.clone()).shape == module.eval()(x.clone()).shape  # issue 20: no raise in training mode
    finally:
        module.eval()
    wide = torch.randn(16, 4)  # non-contiguous view of the right shape: copied, not misread
    torch.testing.assert_close(module(wide.t()), module(wide.t().contiguous()))


def test_hooks_registered_after_fast_calls_run(linear: tuple) -> None:
    _, module = linear
    x = torch.randn(2, 16)
    module(x), module(x)
    seen: list[str] = []
    pre = module.register_forward_pre_hook(lambda m, args: seen.append("pre"))
    post = module.register_forward_hook(lambda m, args, out: out * 0)
    glob = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append("global"))
    try:
        out = module(x)
        assert seen == ["pre", "global"] and not out.any()  # the forward hook replaced the output
    finally:
        pre.remove(), post.remove(), glob.remove()
    assert module(x).any()


def test_a_runtime_failure_on_the_plan_raises_and_the_next_call_recovers() -> None:
    model = Gather().eval()
    x, idx = torch.randn(5, 3), torch.tensor([0, 4], dtype=torch.int64)
    module = ttm.compile(model, (x, idx), cache=False, backend="onnxruntime")
    module(x, idx), module(x, idx)
    assert _planned(module) == 1
    with pytest.raises(ttm.RuntimeFailure, match="onnxruntime failed to run the graph"):
        module(x, torch.tensor([0, 9]))  # same shapes, planned call: ORT rejects the index
    assert torch.equal(module(x, idx), model(x, idx))
    assert _planned(module) == 1  # planned again after the failure dropped it


def test_wrong_predicted_output_shape_falls_back_to_ort_allocation(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8).eval()
    module = ttm.compile(model, torch.randn(2, 16), cache=False, backend="onnxruntime")
    runner = module.runner
    runner._shapes = lambda shapes: [(shapes[0][0], 7)]  # a wrong symbolic shape from "the exporter"
    runner._shape_memo.clear(), runner._plans.clear()
    x = torch.randn(3, 16)
    with caplog.at_level(logging.INFO, logger="torch_trt_module"):
        got = [module(x) for _ in range(3)]
    assert "output shapes not predictable" in caplog.text
    for g in got:
        torch.testing.assert_close(g, model(x).detach(), rtol=1e-5, atol=1e-5)
    assert _planned(module) == 0  # outputs ORT allocates are never planned


def test_a_compiled_module_inside_another_module_moves_with_its_parent() -> None:
    """A parent's .to()/.float() reaches a child through nn.Module._apply(fn): it must neither be taken
    for a weights update (it was, and raised TypeError) nor lose the module's runner."""
    model = torch.nn.Linear(4, 3).eval()
    parent = torch.nn.Sequential(ttm.compile(model, torch.randn(2, 4), cache=False), torch.nn.ReLU())
    assert parent.to("cpu") is parent and parent.float() is parent
    x = torch.randn(5, 4)
    torch.testing.assert_close(parent(x), torch.relu(model(x)))
