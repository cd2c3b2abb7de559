"""Refit through the TensorRT runtime adapter (``TensorRTRunner.refit``), against the strict test
double of TensorRT's ``Refitter`` (tests/backends/trt_double.py), whose surface is derived from the
real ``tensorrt_lean`` (TensorRT 11.4) and ``tensorrt_rtx`` classes: every test runs against each
that is installed. The engine double computes with the weights it holds, so a refit that did not
take effect shows in the outputs.

What this does NOT show: that TensorRT refits an engine. No machine here can run one.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
from typing import Any

import pytest
import torch
from torch import nn

import torch_trt_module as ttm
from torch_trt_module import backends
from torch_trt_module.backends import RuntimeChoice
from torch_trt_module.backends._onnxruntime import OnnxRuntimeRunner
from torch_trt_module.backends._tensorrt import TensorRTRunner
from torch_trt_module._core.spec import TensorSpec
from torch_trt_module._runtime.weights import weights_hash

from .trt_double import (HostStreams, Knobs, doubles, onnx_weights, ort_weighted_compute, overloads,
                         property_returns, refitter_double, runtime_module)
from .._support import REFIT_BREAKAGES, broken_state, convbn_input as _x, convbn_model as _model

REAL = [pytest.param(m, marks=pytest.mark.skipif(importlib.util.find_spec(m) is None, reason=f"{m} not installed"))
        for m in ("tensorrt_lean", "tensorrt_rtx")]


@pytest.fixture(params=REAL)
def trt(request: pytest.FixtureRequest) -> Any:
    return importlib.import_module(request.param)


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool((got - want).abs().max().item() < 1e-4)


@pytest.fixture(scope="module")
def engine() -> Any:
    """The engine of ``_model()`` (its graph, specs and weights map); each test makes its own double of it."""
    built = ttm.compile(_model(), _x(), backend="onnxruntime", cache=False).engine
    assert built is not None
    return built


class Setup:
    """The real adapter over an engine double holding the graph's weights, and the module around it."""

    def __init__(self, trt: Any, engine: Any, knobs: Knobs | None = None, *, source: nn.Module | None = None,
                 runtime: str = "auto") -> None:
        ex = engine.exported
        self.knobs = knobs or Knobs()
        self.streams = HostStreams()
        self.fake = doubles(trt)[0](ex.inputs, ex.outputs, ort_weighted_compute(engine.onnx, ex.output_names),
                                    knobs=self.knobs, streams=self.streams,
                                    weights=onnx_weights(engine.onnx, ex.weights))
        self.runner = TensorRTRunner(self.fake, ex.inputs, ex.outputs, "cpu", trt=runtime_module(trt),
                                     backend="tensorrt", streams=self.streams)
        self.module = ttm.TRTModule(engine, runner=self.runner, source=source, runtime=runtime)
        self.weights = ex.weights  # engine weight name -> (source name, dtype, shape)

    def name(self, source_name: str) -> str:
        return next(k for k, (src, _, _) in self.weights.items() if src == source_name)

    def values(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model``'s weights by the engine's names (what a refit passes the runner)."""
        state = model.state_dict()
        return {k: state[src].detach().clone() for k, (src, _, _) in self.weights.items()}

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner.run([x])[0]


# --------------------------------------------------------------------------- refit takes effect

def test_refit_applies_the_new_weights_and_the_engine_computes_with_them(trt: Any, engine: Any) -> None:
    s, x = Setup(trt, engine), _x()
    model, other, third = _model(), _model(seed=5), _model(seed=6)
    assert _same(s.out(x), _eager(model, x))
    assert s.runner.refit(s.values(other)) is s.runner
    assert _same(s.out(x), _eager(other, x)) and not _same(s.out(x), _eager(model, x))
    assert s.knobs.refits == [sorted(s.weights)]
    # Through the module: a state_dict, on the same runner (no fallback).
    s.module.refit(third.state_dict())
    assert _same(s.module(x), _eager(third, x))
    assert s.module._runner is s.runner and s.module.weights_version == 1
    assert s.module.weights_hash() == weights_hash({n: third.state_dict()[n] for n in s.module.weight_names})


def test_follow_mode_refits_the_tensorrt_engine_when_the_source_changes(trt: Any, engine: Any) -> None:
    model = _model()
    s, x = Setup(trt, engine, source=model), _x()
    assert _same(s.module(x), _eager(model, x))
    with torch.no_grad():
        model.conv.weight.add_(0.5)
        model.bn.running_mean.add_(0.3)  # a BatchNorm statistic, which a folding builder would have baked in
    assert _same(s.module(x), _eager(model, x))
    assert s.module._runner is s.runner and len(s.knobs.refits) == 1


# --------------------------------------------------------------------------- refused, and nothing half-applied

@pytest.mark.parametrize(("breakage", "message"), REFIT_BREAKAGES)
def test_a_module_refit_with_mismatched_weights_names_the_tensor_and_changes_nothing(
        trt: Any, engine: Any, breakage: str, message: str) -> None:
    s, x = Setup(trt, engine), _x()
    before = s.module(x)
    state = broken_state(breakage)
    with pytest.raises(ttm.InputError, match="cannot refit") as err:
        s.module.refit(state)
    assert message in str(err.value)
    assert torch.equal(s.module(x), before) and s.knobs.refits == [] and s.module.weights_version == 0


@pytest.mark.parametrize("breakage, error, message", [
    # TensorRT compares a Weights' element count and dtype with the engine's (it sees no shape).
    ("count", ttm.RuntimeFailure, r"refused the new weights for 'model\.conv\.weight' .*have 24 elements, "
                                  r"the engine's have 216"),
    ("dtype", ttm.RuntimeFailure, r"refused the new weights for 'model\.conv\.weight' .*HALF, the engine's are "
                                  r".*FLOAT"),
    ("name", ttm.EngineNotRefittable, r"folded weights \['model\.conv\.nope'\]"),
])
def test_weights_tensorrt_refuses_raise_and_nothing_is_half_applied(trt: Any, engine: Any, breakage: str,
                                                                    error: type, message: str) -> None:
    s, x = Setup(trt, engine), _x()
    before = s.out(x)
    values = s.values(_model(seed=9))
    conv = values.pop("model.conv.weight")  # every other weight is set first: a half-applied refit would show
    if breakage == "count":
        values["model.conv.weight"] = conv[:, :, :1, :1].contiguous()
    elif breakage == "dtype":
        values["model.conv.weight"] = conv.half()
    else:
        values["model.conv.weight"] = conv
        values["model.conv.nope"] = conv
    with pytest.raises(error, match=message):
        s.runner.refit(values)
    assert torch.equal(s.out(x), before) and s.knobs.refits == []
    s.runner.refit(s.values(_model(seed=9)))  # the runner is still usable
    assert _same(s.out(x), _eager(_model(seed=9), x))


def test_weights_the_builder_folded_raise_engine_not_refittable_before_anything_changes(trt: Any,
                                                                                        engine: Any) -> None:
    s = Setup(trt, engine, Knobs(folded=frozenset({"model.bn.running_mean"})))
    x = _x()
    before = s.out(x)
    with pytest.raises(ttm.EngineNotRefittable, match=r"folded weights \['model\.bn\.running_mean'\]"):
        s.runner.refit(s.values(_model(seed=4)))
    assert torch.equal(s.out(x), before) and s.knobs.refits == []


def test_weights_left_missing_make_the_refit_fail_before_anything_changes(trt: Any, engine: Any) -> None:
    # The builder combined the conv with its BatchNorm: setting one leaves the other missing.
    s = Setup(trt, engine, Knobs(fused=(frozenset({"model.conv.weight", "model.bn.weight"}),)))
    x, other = _x(), _model(seed=4)
    before = s.out(x)
    values = s.values(other)
    with pytest.raises(ttm.RuntimeFailure, match=r"needs new values for weights \['model\.bn\.weight'\]"):
        s.runner.refit({"model.conv.weight": values["model.conv.weight"]})
    assert torch.equal(s.out(x), before) and s.knobs.refits == []
    s.runner.refit(values)
    assert _same(s.out(x), _eager(other, x))


def test_a_refit_that_fails_part_way_stops_the_engine_from_running_until_a_refit_succeeds(trt: Any,
                                                                                          engine: Any) -> None:
    # refit_cuda_engine returning False "may have refitted a subset of weights": the double refits half.
    s = Setup(trt, engine, Knobs(fail_refit=True))
    x, other = _x(), _model(seed=4)
    with pytest.raises(ttm.RuntimeFailure, match="refit_cuda_engine failed.*must not be used.*Knobs.fail_refit"):
        s.runner.refit(s.values(other))
    for run in (s.runner.run, s.runner.dedicated()[0].run, lambda xs: s.module(*xs)):
        with pytest.raises(ttm.RuntimeFailure, match="must not be used"):
            run([x])  # never an output computed from a mix of old and new weights
    s.knobs.fail_refit = False
    s.runner.refit(s.values(other))
    assert _same(s.out(x), _eager(other, x)) and _same(s.module(x), _eager(other, x))


# --------------------------------------------------------------------------- not refittable: the next runtime

def test_an_engine_built_without_refit_raises_engine_not_refittable(trt: Any, engine: Any) -> None:
    s = Setup(trt, engine, Knobs(refittable=False), runtime="tensorrt")
    x = _x()
    before = s.out(x)
    with pytest.raises(ttm.EngineNotRefittable, match="built without BuilderFlag.REFIT"):
        s.runner.refit(s.values(_model(seed=4)))
    with pytest.raises(ttm.EngineNotRefittable):  # a forced runtime has nowhere else to go
        s.module.refit(_model(seed=4))
    assert torch.equal(s.out(x), before) and s.module._runner is s.runner


@pytest.mark.parametrize("how", ["refit", "follow"])
@pytest.mark.parametrize("knobs", [Knobs(refittable=False), Knobs(folded=frozenset({"model.bn.running_var"}))],
                         ids=["built_without_refit", "folded_weight"])
def test_a_module_whose_engine_cannot_take_the_new_weights_runs_them_on_the_next_runtime(
        trt: Any, engine: Any, how: str, knobs: Knobs) -> None:
    model = _model()
    s, x = Setup(trt, engine, knobs, source=model), _x()
    assert _same(s.module(x), _eager(model, x))
    if how == "refit":
        model = _model(seed=8)
        s.module.refit(model.state_dict())
    else:
        with torch.no_grad():
            model.bn.running_var.mul_(3.0)
    assert _same(s.module(x), _eager(model, x))  # never stale
    assert isinstance(s.module._runner, OnnxRuntimeRunner) and s.knobs.refits == []
    assert s.module.weights_hash() == weights_hash({n: model.state_dict()[n] for n in s.module.weight_names})


@pytest.mark.parametrize("refittable", [True, False])
def test_the_runtime_chain_refits_the_plan_or_takes_the_next_runtime_with_the_weights(
        trt: Any, engine: Any, refittable: bool, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # make_runner as on a GPU whose TensorRT runtime loads the plan: here, the adapter over the double.
    s = Setup(trt, engine, Knobs(refittable=refittable))
    chosen: list[bool] = []
    real_choose = backends.choose_runtime

    def choose(*args: Any, **kwargs: Any) -> RuntimeChoice:
        chosen.append(kwargs["has_plan"])
        if len(chosen) == 1:
            return RuntimeChoice("tensorrt", "the test double runs the plan")
        return real_choose(*args, **kwargs)

    monkeypatch.setattr(backends, "choose_runtime", choose)
    monkeypatch.setattr(backends, "_tensorrt_runner", lambda engine, device, allow_host_code: s.runner)
    other, x = _model(seed=3), _x()
    with caplog.at_level(logging.WARNING, logger="torch_trt_module"):
        runner, reason = backends.make_runner(engine, "cpu", weights=s.values(other))
    assert _same(runner.run([x])[0], _eager(other, x))
    if refittable:
        assert runner is s.runner and reason == "the test double runs the plan" and len(s.knobs.refits) == 1
        assert "cannot take" not in caplog.text
    else:
        assert isinstance(runner, OnnxRuntimeRunner) and chosen == [engine.has_plan, False]
        assert "cannot take this module's new weights" in caplog.text
        assert "built without BuilderFlag.REFIT" in caplog.text


# --------------------------------------------------------------------------- the double is the real Refitter's

def test_the_refitter_double_has_the_real_refitter_s_surface(trt: Any) -> None:
    double, real = refitter_double(trt), trt.Refitter
    defined = {n: v for n, v in vars(double).items() if not n.startswith("_") and n not in ("real", "trt")}
    # What the adapter calls, and more.
    assert {"get_all_weights", "set_named_weights", "get_missing_weights", "refit_cuda_engine"} <= set(defined)
    for name, value in defined.items():
        assert hasattr(real, name), name
        if isinstance(value, property):
            assert isinstance(getattr(real, name), property), name
            ann, writable = property_returns(real, name)
            assert (value.fset is not None) == writable, name
            continue
        ovs = overloads(real, name)
        sig = inspect.signature(value.__wrapped__)
        params = list(sig.parameters.values())[1:]  # self
        longest = max(ovs, key=lambda ov: len(ov.params))
        # The same parameter names in the same order (so keywords work as on the real one), required as there.
        assert [p.name for p in params] == [n for n, _ in longest.params], name
        assert all(ov.params == longest.params[:len(ov.params)] for ov in ovs), name
        assert sum(p.default is inspect.Parameter.empty for p in params) == min(ov.required for ov in ovs), name
        real_returns = {ov.returns.rpartition(".")[2] for ov in ovs}
        assert sig.return_annotation in real_returns or (sig.return_annotation == "Any"
                                                         and all(hasattr(trt, r) for r in real_returns)), name
    init = overloads(real, "__init__")
    assert [[n for n, _ in ov.params] for ov in init] == [["engine", "logger"]]
    # The rest of what the adapter uses, on the real classes: Weights(type, ptr, count), DataType, refittable.
    assert any([n for n, _ in ov.params] == ["type", "ptr", "count"] for ov in overloads(trt.Weights, "__init__"))
    assert property_returns(trt.ICudaEngine, "refittable") == ("bool", False)  # read-only
    assert isinstance(doubles(trt)[0].refittable, property) and doubles(trt)[0].refittable.fset is None
    proxy = runtime_module(trt)
    assert proxy.Refitter is double and proxy.__name__ == trt.__name__
    assert all(getattr(proxy, n) is getattr(trt, n) for n in ("Weights", "DataType", "ILogger", "ICudaEngine",
                                                              "TensorLocation", "IOutputAllocator"))


def _collecting_logger(trt: Any) -> Any:
    class Collect(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)

    return Collect()


def _small_engine(trt: Any, knobs: Knobs | None = None, streams: HostStreams | None = None) -> Any:
    specs = ([TensorSpec("x", "float32", ("b", 3), (1, 3), (2, 3), (4, 3))], [TensorSpec("y", "float32", ("b", 2))])
    weights = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2)}
    return doubles(trt)[0](*specs, lambda feeds, w: {"y": feeds["x"] @ w["w"].T + w["b"]}, knobs=knobs,
                           streams=streams or HostStreams(), weights=weights)


def test_the_refitter_double_refuses_what_the_real_one_refuses(trt: Any) -> None:
    refitter_cls, log = refitter_double(trt), _collecting_logger(trt)
    fake = _small_engine(trt)
    r = refitter_cls(engine=fake, logger=log)  # the real keyword names
    assert r.get_all_weights() == ["w", "b"] and r.logger is log
    proto = r.get_weights_prototype("w")
    assert isinstance(proto, trt.Weights) and proto.dtype == trt.DataType.FLOAT and proto.size == 6
    assert r.get_weights_prototype("nope").size == -1  # "-1 when the name does not correspond to any"
    new = torch.full((2, 3), 7.0)

    def weights(t: torch.Tensor, dtype: Any = trt.DataType.FLOAT) -> Any:
        return trt.Weights(dtype, t.data_ptr(), t.numel())

    # Rejections (False, with an error through the logger), as the real docstring lists them.
    assert r.set_named_weights("nope", weights(new)) is False and "'nope'" in log.errors[-1]
    assert r.set_named_weights("", weights(new)) is False
    assert r.set_named_weights("w", weights(new.half(), trt.DataType.HALF)) is False and "HALF" in log.errors[-1]
    assert r.set_named_weights("w", weights(new[:, :2].contiguous())) is False and "4 elements" in log.errors[-1]
    assert r.set_named_weights("w", weights(new), trt.TensorLocation.DEVICE) is False  # no device here
    assert r.get_missing_weights() == []
    # Calls the real binding refuses.
    with pytest.raises(TypeError, match="incompatible function arguments"):
        r.set_named_weights("w")
    with pytest.raises(TypeError, match="incompatible function arguments"):
        r.set_named_weights("w", new)  # a tensor is not a Weights
    with pytest.raises(TypeError, match="incompatible function arguments"):
        r.set_named_weights(1, weights(new))
    with pytest.raises(TypeError, match="incompatible constructor arguments"):
        refitter_cls(fake)
    with pytest.raises(TypeError, match="incompatible constructor arguments"):
        refitter_cls(object(), log)
    with pytest.raises(AttributeError, match="does not implement 'get_all'"):
        r.get_all()
    with pytest.raises(AttributeError, match="has no attribute 'refit_engine'"):
        r.refit_engine()
    with pytest.raises(AttributeError):
        r.extra = 1
    # A Weights has no shape: one of the same count and dtype is taken, as TensorRT takes it.
    assert r.set_named_weights(name="w", weights=weights(new.reshape(3, 2))) is True
    assert r.unset_named_weights("w") is True and r.unset_named_weights("w") is False
    assert r.set_named_weights("w", weights(new)) is True
    x = torch.ones(1, 3)
    assert r.refit_cuda_engine() is True
    torch.testing.assert_close(fake._d.weights["w"], new)
    torch.testing.assert_close(fake._d.evaluate({"x": x})["y"], torch.tensor([[21.0, 21.0]]))


def test_the_refitter_double_refuses_missing_weights_pending_work_and_engines_without_refit(trt: Any) -> None:
    refitter_cls, log = refitter_double(trt), _collecting_logger(trt)
    # Weights the builder combined: one set leaves the other missing, and refit_cuda_engine returns False.
    fused = _small_engine(trt, Knobs(fused=(frozenset({"w", "b"}),)))
    r = refitter_cls(fused, log)
    new_w, new_b = torch.ones(2, 3), torch.ones(2)
    assert r.set_named_weights("w", trt.Weights(trt.DataType.FLOAT, new_w.data_ptr(), 6)) is True
    assert r.get_missing_weights() == ["b"]
    assert r.refit_cuda_engine() is False and "missing" in log.errors[-1]
    assert torch.equal(fused._d.weights["w"], torch.arange(6.0).reshape(2, 3))  # unchanged
    assert r.set_named_weights("b", trt.Weights(trt.DataType.FLOAT, new_b.data_ptr(), 2)) is True
    assert r.get_missing_weights() == [] and r.refit_cuda_engine() is True
    # Work in flight: refitting then is undefined in TensorRT; the double fails the test.
    streams = HostStreams()
    busy = _small_engine(trt, streams=streams)
    ctx = busy.create_execution_context()
    x, y = torch.ones(2, 3), torch.empty(2, 2)
    assert ctx.set_input_shape("x", (2, 3)) and ctx.set_tensor_address("x", x.data_ptr())
    assert ctx.set_tensor_address("y", y.data_ptr()) and ctx.infer_shapes() == []
    assert ctx.execute_async_v3(5)  # pending until handle 5 synchronises
    r = refitter_cls(busy, log)
    with pytest.raises(AssertionError, match="in flight"):
        r.refit_cuda_engine()
    streams.synchronize(5)
    assert r.refit_cuda_engine() is True
    # An engine built without REFIT has no refitter: TensorRT logs why and returns null.
    with pytest.raises(TypeError, match="factory function returned nullptr"):
        refitter_cls(_small_engine(trt, Knobs(refittable=False)), log)
    assert "isRefittable" in log.errors[-1]


# --------------------------------------------------------------------------- the adapter's own refit details

def _small_runner(trt: Any, knobs: Knobs | None = None) -> tuple[TensorRTRunner, Knobs, Any]:
    knobs = knobs or Knobs()
    streams = HostStreams()
    fake = _small_engine(trt, knobs, streams)
    specs = fake._d.inputs, fake._d.outputs
    return TensorRTRunner(fake, *specs, "cpu", trt=runtime_module(trt), streams=streams), knobs, fake


def test_weights_are_read_when_tensorrt_refits_so_the_host_copies_are_kept_until_then(trt: Any) -> None:
    # A weight that is not contiguous on the host (or is on a GPU) is copied for TensorRT, which reads the
    # copy's memory only in refit_cuda_engine: the copies must live until then, not one loop iteration.
    runner, knobs, fake = _small_runner(trt)
    w = torch.arange(10.0, 16.0).reshape(3, 2).t()  # (2, 3), not contiguous
    b = torch.tensor([7.0, 0.0, 8.0, 0.0])[::2]  # not contiguous
    x = torch.ones(1, 3)
    runner.refit({"w": w, "b": b})
    assert knobs.refits == [["b", "w"]]
    torch.testing.assert_close(runner.run([x])[0], x @ w.contiguous().T + b)


def test_refit_errors_name_the_fix(trt: Any) -> None:
    runner, _, _ = _small_runner(trt, Knobs(refittable=False))
    with pytest.raises(ttm.EngineNotRefittable) as err:
        runner.refit({"w": torch.zeros(2, 3)})
    assert str(err.value) == (
        "this TensorRT engine was built without BuilderFlag.REFIT (weights='snapshot', or a TensorRT-RTX build on "
        "a machine without a GPU), so its weights cannot change. Fix: compile with weights='follow' on a machine "
        "with a GPU")
    runner, knobs, _ = _small_runner(trt)
    unknown = {name: torch.zeros(1) for name in "vutsrqp"}  # more than the message lists: the first five, sorted
    with pytest.raises(ttm.EngineNotRefittable) as err:
        runner.refit({"w": torch.zeros(2, 3), **unknown})
    assert str(err.value) == (
        "TensorRT folded weights ['p', 'q', 'r', 's', 't'] into the engine at build time, so they cannot be refit. "
        "Fix: compile the model again for its new weights")
    assert knobs.refits == []


def test_a_failed_refit_names_the_weights_still_missing_and_what_to_do(trt: Any) -> None:
    names = [f"w{i}" for i in range(10)]
    specs = ([TensorSpec("x", "float32", ("b", 3), (1, 3), (2, 3), (4, 3))], [TensorSpec("y", "float32", ("b", 3))])
    knobs, streams = Knobs(fused=(frozenset(names),)), HostStreams()  # all ten combined at build
    fake = doubles(trt)[0](*specs, lambda feeds, w: {"y": feeds["x"] + sum(w.values())}, knobs=knobs, streams=streams,
                           weights={n: torch.zeros(3) for n in names})
    runner = TensorRTRunner(fake, *specs, "cpu", trt=runtime_module(trt), streams=streams)
    with pytest.raises(ttm.RuntimeFailure) as err:
        runner.refit({"w0": torch.ones(3)})
    assert str(err.value) == ("TensorRT needs new values for weights ['w1', 'w2', 'w3', 'w4', 'w5', 'w6', 'w7', 'w8'] "
                              "too before it can refit")  # the first eight of nine
    knobs.fused, knobs.fail_refit = (), True
    with pytest.raises(ttm.RuntimeFailure) as err:
        runner.refit({"w0": torch.ones(3)})
    assert str(err.value) == (
        "TensorRT's refit_cuda_engine failed; the engine may hold a mix of old and new weights and must not be used: "
        "IRefitter::refitCudaEngine: Error Code 1: refit failed (Knobs.fail_refit) [test double]. Fix: refit it "
        "again with all its weights, or compile the model again")
