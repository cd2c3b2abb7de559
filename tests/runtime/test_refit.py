"""Weights that change (issue 12): a compiled module follows its source's weights by default,
refits in place on every runtime, and never serves stale or wrong weights."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

import torch_trt_module as ttm
from torch_trt_module._runtime.weights import weights_hash

from .._support import ConvBN, REFIT_BREAKAGES, broken_state, convbn_input as _x, convbn_model as _model

RUNTIMES = ["onnxruntime", "torch"]


def _close(fast: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        want = model(x)
    got = fast(x)
    assert (got - want).abs().max().item() < 1e-4, "stale weights: the compiled module disagrees with eager"


def _hash_of(fast: ttm.TRTModule, model: nn.Module) -> str:
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return weights_hash({n: state[n] for n in fast.weight_names})


def _sgd_step(model: nn.Module, x: torch.Tensor, lr: float = 0.5) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    model.eval()


def _add(model: ConvBN) -> None:
    with torch.no_grad():
        model.conv.weight.add_(1.0)  # the issue's example


def _copy(model: ConvBN) -> None:
    with torch.no_grad():
        model.head.weight.copy_(torch.randn_like(model.head.weight))


def _load(model: ConvBN) -> None:
    model.load_state_dict(_model(seed=7).state_dict())


def _reassign(model: ConvBN) -> None:
    model.head.weight = nn.Parameter(torch.randn_like(model.head.weight))


def _buffer(model: ConvBN) -> None:
    with torch.no_grad():
        model.bn.running_mean.add_(0.5)  # a folded BatchNorm's statistics


def _ema(model: ConvBN) -> None:
    other = _model(seed=3)
    with torch.no_grad():
        torch._foreach_lerp_(list(model.parameters()), list(other.parameters()), 0.5)


def _step(model: ConvBN) -> None:
    _sgd_step(model, _x())


CHANGES: dict[str, Callable[[ConvBN], None]] = {
    "inplace_add": _add, "copy_": _copy, "load_state_dict": _load, "reassigned_parameter": _reassign,
    "batchnorm_buffer": _buffer, "ema_foreach": _ema, "optimizer_step": _step,
}


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_every_kind_of_weight_change_is_followed(change: str, runtime: str) -> None:
    model = _model()
    fast = ttm.compile(model, _x(), runtime=runtime, cache=False)
    _close(fast, model, _x())
    before = fast.weights_version
    CHANGES[change](model)
    _close(fast, model, _x(3))
    assert fast.weights_version == before + 1
    assert fast.weights_hash() == _hash_of(fast, model)


def test_the_issue_example_is_never_stale_for_an_eager_or_a_lazy_module() -> None:
    for example in (_x(), None):
        model = _model()
        fast = ttm.compile(model, example, cache=False)
        fast(_x())
        _add(model)
        _close(fast, model, _x())


def test_dtype_conversions_of_the_source_are_followed() -> None:
    model = _model()
    fast = ttm.compile(model, _x(), cache=False)
    fast(_x())
    model.double()  # replaces every tensor's data without bumping versions
    with torch.no_grad():
        model.conv.weight.mul_(2.0)
    with torch.no_grad():
        want = model(_x().double()).float()
    assert (fast(_x()) - want).abs().max().item() < 1e-4


def test_a_lazy_module_with_widened_profiles_still_follows_weights() -> None:
    model = _model()
    fast = ttm.compile(model, cache=False, dynamic=None)
    _close(fast, model, _x(2))
    _add(model)
    _close(fast, model, _x(5))  # another batch: the lazy module rebuilds, and keeps following
    assert fast._rebuilds == 1  # noqa: SLF001 (the widening did happen)
    _copy(model)
    _close(fast, model, _x(5))
    _close(fast, model, _x(2))


def test_no_change_means_no_refit() -> None:
    model = _model()
    fast = ttm.compile(model, _x(), cache=False)
    for _ in range(3):
        fast(_x())
    with torch.no_grad():
        model(_x())  # an eager forward in eval mode writes nothing
    fast(_x())
    assert fast.weights_version == 0


def test_snapshot_keeps_the_compiled_weights_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    model = _model()
    fast = ttm.compile(model, _x(), cache=False, weights="snapshot")
    old = fast(_x())
    _add(model)
    with caplog.at_level(logging.WARNING, logger="torch_trt_module"):
        assert torch.equal(fast(_x()), old)
        _copy(model)
        assert torch.equal(fast(_x()), old)
    warnings = [r for r in caplog.records if "weights='snapshot'" in r.getMessage()]
    assert len(warnings) == 1
    assert "refit(model)" in warnings[0].getMessage()


def test_refit_with_a_state_dict_or_a_module_takes_its_weights() -> None:
    model = _model()
    fast = ttm.compile(model, _x(), cache=False, weights="snapshot")
    other = _model(seed=5)
    fast.refit(other.state_dict())
    _close(fast, other, _x())
    third = _model(seed=6)
    fast.refit(third)
    _close(fast, third, _x())
    assert fast.weights_hash() == _hash_of(fast, third)


@pytest.mark.parametrize(("breakage", "message"), REFIT_BREAKAGES)
def test_refit_refuses_mismatched_weights_naming_the_tensor_and_changes_nothing(breakage: str, message: str) -> None:
    model = _model()
    fast = ttm.compile(model, _x(), cache=False, weights="snapshot")
    before = fast(_x())
    state = broken_state(breakage)
    with pytest.raises(ttm.InputError, match="cannot refit") as err:
        fast.refit(state)
    assert message in str(err.value)
    assert torch.equal(fast(_x()), before)  # nothing half-applied
    assert fast.weights_version == 0


def test_state_dict_after_a_refit_holds_the_new_weights(tmp_path: Path) -> None:
    model = _model()
    fast = ttm.compile(model, _x(), cache=False)
    fast(_x())
    _step(model)
    fast(_x())
    path = tmp_path / "m.pt"
    ttm.save(fast, path)
    loaded = ttm.load(path)  # no source: the weights travel in the state
    _close(loaded, model, _x())
    assert loaded.weights_hash() == _hash_of(loaded, model)


@pytest.mark.parametrize("weights", ["follow", "snapshot"])
def test_the_cache_never_serves_an_engine_with_other_weights(tmp_path: Path, weights: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    model = _model()
    first = ttm.compile(model, _x(), cache_dir=tmp_path, weights=weights)
    _close(first, model, _x())
    del first
    _step(model)  # same structure, other weights
    with caplog.at_level(logging.INFO, logger="torch_trt_module"):
        second = ttm.compile(model, _x(), cache_dir=tmp_path, weights=weights)
    _close(second, model, _x())
    assert second.weights_hash() == _hash_of(second, model)
    hits = [r for r in caplog.records if "cache hit" in r.getMessage()]
    # follow: one structural entry, refit on the hit; snapshot: weights are in the key, a miss
    assert bool(hits) == (weights == "follow")


class SlowSGD(torch.optim.Optimizer):
    """Plain SGD that pauses between its in-place writes, so a weight read from another thread
    that did not wait for the step to finish would catch it half-done (the global optimizer
    hooks fire for it as for any torch.optim optimizer)."""

    def __init__(self, params: object, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: object = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"])
                time.sleep(0.001)  # lets the calling threads run mid-step


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_threads_calling_while_another_steps_the_optimizer_never_see_torn_weights(runtime: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(6)]).eval()
    x = torch.randn(4, 16)
    fast = ttm.compile(model, x, cache=False, runtime=runtime)
    opt = SlowSGD(model.parameters(), lr=0.2)
    references = []
    with torch.no_grad():
        references.append(model(x))
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def call() -> None:
        try:
            while not stop.is_set():
                results.append(fast(x))
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=call, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(8):
            model(x).square().mean().backward()
            opt.step()  # the weights change only in here; every whole version is in `references`
            opt.zero_grad()
            with torch.no_grad():
                references.append(model(x))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a calling thread is stuck after 60 s"
    assert not errors, errors
    seen = set()
    for r in results:  # every output is eager's at some whole version of the weights
        gaps = [(r - ref).abs().max().item() for ref in references]
        assert min(gaps) < 2e-5, f"a torn output: {min(gaps):.3g} from the nearest whole version"
        seen.add(gaps.index(min(gaps)))
    assert len(seen) > 2  # and the calls did see the weights move
    _close(fast, model, x)


def test_a_dead_source_stops_being_watched() -> None:
    model = _model()
    fast = ttm.compile(model, _x(), cache=False)
    want = fast(_x())
    del model
    import gc

    gc.collect()
    assert torch.equal(fast(_x()), want)


class WithUnsavedBuffer(nn.Module):
    """A buffer registered with persistent=False (BERT's position_ids): no checkpoint holds it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("offset", torch.arange(4.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.offset


def test_a_checkpoint_refit_keeps_buffers_no_checkpoint_holds() -> None:
    torch.manual_seed(0)
    model = WithUnsavedBuffer().eval()
    fast = ttm.compile(model, torch.randn(2, 4), cache=False, weights="snapshot")
    assert "offset" in fast.weight_names
    other = WithUnsavedBuffer().eval()
    fast.refit(other.state_dict())  # no "offset" in it: kept as it is
    _close(fast, other, torch.randn(3, 4))
    with torch.no_grad():
        other.offset.mul_(3.0)
    fast.refit(other)  # a module gives every buffer, non-persistent ones too
    _close(fast, other, torch.randn(3, 4))


def test_new_initializer_values_are_patched_into_the_graph_bytes_as_a_parse_would_write_them() -> None:
    import onnx

    from torch_trt_module._formats.onnx import _with_initializers_parsed, initializer_values, with_initializers

    fast = ttm.compile(_model(), _x(), cache=False)
    assert fast.engine is not None
    data = fast.engine.onnx
    names = set(fast.engine.exported.weights)
    new = {k: torch.randn_like(v) for k, v in initializer_values(data, names).items()}
    patched = with_initializers(data, new)
    assert patched == _with_initializers_parsed(data, new)  # byte for byte
    got = initializer_values(patched, names)
    assert all(torch.equal(got[k], new[k]) for k in names)
    onnx.checker.check_model(onnx.load_from_string(patched))
    # an initializer kept in float_data (not raw_data) takes the parsed path, with the same result
    model = onnx.load_from_string(data)
    init = next(i for i in model.graph.initializer if i.name == "model.head.bias")
    values = onnx.numpy_helper.to_array(init).tolist()
    init.ClearField("raw_data")
    init.float_data.extend(values)
    odd = model.SerializeToString()
    assert torch.equal(initializer_values(with_initializers(odd, new), names)["model.head.bias"],
                       new["model.head.bias"])


def test_follow_mode_builds_refittable_engines_where_the_builder_can(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch_trt_module._build.build import engine_flags
    from torch_trt_module._core.settings import Settings
    from torch_trt_module.backends import BackendChoice

    rtx, trt = BackendChoice("tensorrt_rtx", "onnxruntime", ""), BackendChoice("tensorrt", "tensorrt", "")
    follow, snapshot = Settings.from_options(), Settings.from_options(weights="snapshot")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engine_flags(trt, follow) == ["REFIT"] and engine_flags(trt, snapshot) == []
    assert engine_flags(rtx, follow) == []  # TensorRT-RTX cannot build refittable weights without a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine_flags(rtx, follow) == ["REFIT"]


@pytest.mark.usefixtures("rtx_required")
@pytest.mark.parametrize("flags", [["REFIT"], ["REFIT_IDENTICAL"], ["STRIP_PLAN"], ["REFIT", "STRIP_PLAN"]])
def test_tensorrt_rtx_cannot_build_refittable_weights_without_a_gpu(flags: list[str]) -> None:
    """What TensorRT-RTX 1.7 actually does on this CPU machine: it accepts the refit flags, and the
    build then fails in its code generator, which needs a CUDA device. If a release builds them,
    this test fails: then enable REFIT for RTX builds without a GPU in _build.engine_flags."""
    if torch.cuda.is_available():
        pytest.skip("the machine has a GPU")
    from torch_trt_module.backends._trt_build import build_serialized

    fast = ttm.compile(nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval(), torch.randn(2, 8), cache=False,
                       weights="snapshot")
    assert fast.engine is not None
    ex = fast.engine.exported
    plain, _ = build_serialized(ex.onnx, ex.inputs, backend="tensorrt_rtx", flags=[])
    assert len(plain) > 0
    with pytest.raises(ttm.BuildError, match="CUDA_SUCCESS"):
        build_serialized(ex.onnx, ex.inputs, backend="tensorrt_rtx", flags=flags)


class LazyTable(nn.Module):
    """Creates a buffer at its first forward, as timm's ConViT does; run under inference_mode, the
    buffer is an inference tensor, which has no version counter."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("table", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            self.table = torch.arange(4.0)
        return self.lin(x) + self.table


def test_weights_made_under_inference_mode_are_followed_where_they_can_be(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = LazyTable().eval()
    with torch.inference_mode():
        model(torch.randn(1, 4))
    assert model.table is not None and model.table.is_inference()
    with caplog.at_level(logging.WARNING, logger="torch_trt_module"):
        fast = ttm.compile(model, torch.randn(2, 4), cache=False)
    assert "table" in fast.weight_names
    assert any("cannot see in-place writes made under torch.inference_mode to table" in r.getMessage()
               for r in caplog.records)
    _close(fast, model, torch.randn(3, 4))
    with torch.no_grad():
        model.lin.weight.add_(1.0)  # an ordinary weight beside it is still followed
    _close(fast, model, torch.randn(3, 4))
    model.table = torch.arange(4.0) * 2  # so is a reassignment of the inference tensor
    _close(fast, model, torch.randn(3, 4))
