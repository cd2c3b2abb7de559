"""The torch.compile backend (torch_trt_module._dynamo): each dynamo graph through compile(), CPU only."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from typing import Any

import pytest
import torch

from torch_trt_module import SettingsError, _dynamo
from torch_trt_module._pipeline import compile as _compile
from torch_trt_module._errors import ExportError

from .._support import in_threads

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    torch._dynamo.reset()  # compiled frames of another test must not be reused (nor their guards)
    yield
    torch._dynamo.reset()


class ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        features = self.bn(self.conv(x)).relu()
        pooled = features.mean((2, 3))
        return {"logits": self.fc(pooled), "extra": [pooled, features[:, :2]]}


class Branchy(torch.nn.Module):
    """A data-dependent Python branch: dynamo breaks the graph there."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(6, 6)
        self.b = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum().item() > 0:
            return self.b(h).relu()
        return self.b(-h).sigmoid() * 2


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()


def _recording(engines: list[Any]) -> Any:
    """A backend that runs ours and keeps what it returned (to look at the compiled engines)."""

    def recording(gm: torch.fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Any:
        got = _dynamo.backend(gm, example_inputs, **kwargs)
        engines.append(got)
        return got

    return recording


def _assert_close(got: Any, want: Any) -> None:
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("torch_trt_module") and r.levelno >= logging.WARNING]


# --------------------------------------------------------------------------- 1. parity


def test_conv_net_matches_eager_and_keeps_the_output_structure() -> None:
    model = ConvNet().eval()
    tf32, handlers = torch.backends.cuda.matmul.allow_tf32, list(logging.getLogger("torch_trt_module").handlers)
    before = dict(_dynamo.STATS)
    fast = torch.compile(model, backend="torch_trt_module")
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        got, want = fast(x), model(x)
    assert set(got) == {"logits", "extra"} and isinstance(got["extra"], list)
    _assert_close(got, want)
    assert _dynamo.STATS["engines"] == before["engines"] + 1 and _dynamo.STATS["fallbacks"] == before["fallbacks"]
    # global state is the user's: no TF32 flag or logging handler changed
    assert torch.backends.cuda.matmul.allow_tf32 == tf32
    assert logging.getLogger("torch_trt_module").handlers == handlers


def test_resnet18_matches_eager() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    before = _dynamo.STATS["engines"]
    with torch.no_grad():
        got = torch.compile(model, backend="torch_trt_module")(x)
        _assert_close(got, model(x))
    assert _dynamo.STATS["engines"] == before + 1


def test_engine_holds_the_models_own_weights_and_follows_them() -> None:
    model, engines = ConvNet().eval(), []
    fast = torch.compile(model, backend=_recording(engines))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        fast(x)
        (engine,) = engines
        # dynamo passes the parameters as graph inputs; they are registered as the very same objects
        assert engine.call.get_parameter("conv.weight") is model.conv.weight
        assert {"conv.weight", "bn.running_mean", "fc.bias"} <= set(engine.module.weight_names)
        model.fc.weight.mul_(3)  # in place: the engine is refit before the next call
        _assert_close(fast(x), model(x))
        model.fc.bias = torch.nn.Parameter(torch.randn(5))  # reassigned: dynamo passes the new one, followed
        _assert_close(fast(x), model(x))


def _two_instances() -> tuple[torch.nn.Module, torch.nn.Module, Any, Any, list[Any]]:
    """Two instances of one class, with weights far apart (their outputs cannot be mistaken), each
    through torch.compile: dynamo gives both the same graph, and so the same backend callable."""
    torch.manual_seed(1)
    a = _mlp()
    torch.manual_seed(2)
    b = _mlp()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    engines: list[Any] = []
    backend = _recording(engines)
    return a, b, torch.compile(a, backend=backend), torch.compile(b, backend=backend), engines


def test_two_instances_of_one_class_alternating_never_refit(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch_trt_module._runtime.following import FollowsWeights

    a, b, fast_a, fast_b, engines = _two_instances()
    x = torch.randn(4, 5)
    refits = []
    real = FollowsWeights._apply_weights

    def counting(self: Any, values: Any) -> None:
        refits.append(1)
        real(self, values)

    monkeypatch.setattr(FollowsWeights, "_apply_weights", counting)
    with torch.no_grad():
        want_a, want_b = a(x), b(x)
        _assert_close(fast_a(x), want_a)
        _assert_close(fast_b(x), want_b)  # its own module: a cache hit, made with b's weights
        refits.clear()
        for _ in range(10):
            _assert_close(fast_a(x), want_a)
            _assert_close(fast_b(x), want_b)
    assert refits == []  # 0 refits in 20 alternating calls (before: one per call, 17-25 ms each)
    (engine,) = engines  # one graph for both instances
    assert len(engine.instances) == 2
    with torch.no_grad():  # an in-place write to one instance is still followed, by its own module
        b[0].weight.mul_(2)
        _assert_close(fast_b(x), b(x))
        _assert_close(fast_a(x), want_a)
    assert len(refits) == 1


def test_two_instances_of_one_class_from_two_threads_never_mix_outputs() -> None:

    a, b, fast_a, fast_b, _ = _two_instances()
    x = torch.randn(4, 5)
    with torch.no_grad():
        want = {"a": a(x), "b": b(x)}
        _assert_close(fast_a(x), want["a"])
        _assert_close(fast_b(x), want["b"])
    wrong: dict[str, int] = {"a": 0, "b": 0}
    pairs = [("a", fast_a), ("b", fast_b)]

    def run(i: int) -> None:
        name, fast = pairs[i]
        with torch.no_grad():
            for _ in range(300):
                if not torch.allclose(fast(x), want[name], rtol=1e-4, atol=1e-5):
                    wrong[name] += 1

    in_threads(run, 2)
    assert wrong == {"a": 0, "b": 0}  # before: model A returned B's outputs in 1-3 of 300 calls


def test_a_reassigned_weight_drops_the_old_set_of_weights() -> None:
    model, engines = _mlp(), []
    fast = torch.compile(model, backend=_recording(engines))
    x = torch.randn(3, 5)
    with torch.no_grad():
        for _ in range(3):  # reassigned three times: never more than one set kept, never stale
            model[2].bias = torch.nn.Parameter(torch.randn(3))
            _assert_close(fast(x), model(x))
    (engine,) = engines
    assert len(engine.instances) == 1 and engine.call.get_parameter("2.bias") is model[2].bias


# --------------------------------------------------------------------------- 2. graph breaks


def test_graph_break_runs_both_branches_and_compiles_each_graph() -> None:
    model = Branchy().eval()
    before = _dynamo.STATS["graphs"]
    fast = torch.compile(model, backend="torch_trt_module")
    with torch.no_grad():
        x = torch.randn(4, 6)
        for inp in (x, -x):  # one input takes each branch
            _assert_close(fast(inp), model(inp))
    with torch.no_grad():
        assert {float(model.a(x).sum()) > 0, float(model.a(-x).sum()) > 0} == {True, False}
    assert _dynamo.STATS["graphs"] - before >= 2  # the code before the branch, and each branch


# --------------------------------------------------------------------------- 3. dynamic shapes


def test_dynamic_true_becomes_a_profile_two_batches_one_engine() -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten()).eval()
    engines: list[Any] = []
    fast = torch.compile(model, backend=_recording(engines), dynamic=True)
    exports = _compile.STATS["exports"]
    with torch.no_grad():
        for n, size in ((2, 16), (5, 16), (3, 12)):  # inside the profile: no recompile, no new export or build
            x = torch.randn(n, 3, size, size)
            _assert_close(fast(x), model(x))
    (engine,) = engines
    assert _compile.STATS["exports"] == exports + 1 and engine.rebuilds == 0
    spec = engine.module.engine.exported.inputs[0]
    assert (spec.min[0], spec.opt[0], spec.max[0]) == (1, 2, 32)
    # dynamo's graph holds only where the last feature map is larger than 1x1 (its guards say so):
    # the profile starts there, not at 1, or the export over the range would fail
    assert (spec.min[2], spec.opt[2], spec.max[2]) == (5, 16, 32)


def test_mark_dynamic_bounds_are_the_profile() -> None:
    model, engines = _mlp(), []
    fast = torch.compile(model, backend=_recording(engines))
    x = torch.randn(6, 5)
    torch._dynamo.mark_dynamic(x, 0, min=3, max=40)
    with torch.no_grad():
        _assert_close(fast(x), model(x))
        y = torch.randn(37, 5)
        _assert_close(fast(y), model(y))
    (engine,) = engines
    spec = engine.module.engine.exported.inputs[0]
    assert (spec.min[0], spec.opt[0], spec.max[0]) == (3, 6, 40)
    assert spec.min[1] == spec.max[1] == 5


def test_static_graph_recompile_is_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    model = _mlp()
    fast = torch.compile(model, backend="torch_trt_module", dynamic=False)
    caplog.set_level(logging.INFO, logger="torch_trt_module")
    with torch.no_grad():
        for n in (4, 7):  # static graphs: the new batch is a dynamo recompile, and a new engine
            x = torch.randn(n, 5)
            _assert_close(fast(x), model(x))
    assert any(r.levelno == logging.INFO and "recompiled" in r.getMessage() for r in caplog.records)
    assert not _warnings(caplog)


def test_a_shape_beyond_the_profile_rebuilds_wider_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    model, engines = _mlp(), []
    fast = torch.compile(model, backend=_recording(engines))
    caplog.set_level(logging.INFO, logger="torch_trt_module")
    x = torch.randn(6, 5)
    torch._dynamo.mark_dynamic(x, 0)  # unbounded: the profile is 1..32, as dynamic="batch" makes it
    with torch.no_grad():
        _assert_close(fast(x), model(x))
        y = torch.randn(40, 5)  # dynamo's graph takes it; the engine's profile does not: widened, rebuilt
        _assert_close(fast(y), model(y))
    (engine,) = engines
    assert engine.rebuilds == 1 and engine.module.engine.exported.inputs[0].max[0] == 64
    assert any("outside the engine's profile" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert not _warnings(caplog)


# --------------------------------------------------------------------------- 4, 5. processes

_CHILD = textwrap.dedent("""
    import json, sys, torch
    assert "torch_trt_module" not in sys.modules
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    fast = torch.compile(model, backend="torch_trt_module", options={"cache_dir": sys.argv[1]})
    x = torch.randn(4, 5)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
    from torch_trt_module._pipeline import compile as _compile
    print(json.dumps(_compile.STATS))
""")


def _entry_point_installed() -> bool:
    return "torch_trt_module" in entry_points(group="torch_dynamo_backends").names


needs_entry_point = pytest.mark.skipif(
    not _entry_point_installed(),
    reason="the torch_dynamo_backends entry point is not installed: run `pip install -e .` to register it")


def _child(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@needs_entry_point
def test_entry_point_resolves_the_backend_without_importing_the_package() -> None:
    code = ("import sys, torch\n"
            "from torch._dynamo.backends.registry import list_backends, lookup_backend\n"
            "assert 'torch_trt_module' not in sys.modules\n"
            "assert 'torch_trt_module' in list_backends()\n"
            "fn = lookup_backend('torch_trt_module')\n"
            "print(fn.__module__ + '.' + fn.__name__)\n")
    assert _child(code) == "torch_trt_module._dynamo.backend"


@needs_entry_point
def test_second_process_hits_the_cache(tmp_path: Any) -> None:
    first = json.loads(_child(_CHILD, str(tmp_path)))
    second = json.loads(_child(_CHILD, str(tmp_path)))
    assert first["exports"] == 1 and first["cache_hits"] == 0
    assert second["exports"] == 0 and second["builds"] == 0 and second["cache_hits"] == 1


# --------------------------------------------------------------------------- 6. fallback


def test_a_graph_the_pipeline_refuses_runs_in_pytorch_with_one_warning(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ExportError("forced for the test: this graph cannot be exported")

    monkeypatch.setattr(_compile, "compile", refuse)
    model = ConvNet().eval()
    fast = torch.compile(model, backend="torch_trt_module")
    before = _dynamo.STATS["fallbacks"]
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(2, 3, 8, 8)
            _assert_close(fast(x), model(x))
    (warning,) = _warnings(caplog)
    assert "ExportError" in warning.getMessage() and "forced for the test" in warning.getMessage()
    assert _dynamo.STATS["fallbacks"] == before + 1


def test_a_graph_that_needs_gradients_runs_in_pytorch(caplog: pytest.LogCaptureFixture) -> None:
    model = _mlp()
    x = torch.randn(3, 5)
    got = torch.compile(model, backend="torch_trt_module")(x)  # grad mode on, parameters require grad
    assert got.requires_grad  # eager's autograd graph: backward still works
    _assert_close(got, model(x))
    (warning,) = _warnings(caplog)
    assert "no_grad" in warning.getMessage()


class WritesItsInput(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return x + 1


@pytest.mark.parametrize("model, reason", [
    (WritesItsInput(), "in place"),
    (torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Dropout(0.0)).train(), "training mode"),
])
def test_graphs_an_engine_cannot_run_stay_in_pytorch(model: torch.nn.Module, reason: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    x = torch.randn(3, 5)
    x_eager = x.clone()
    with torch.no_grad():
        got = torch.compile(model, backend="torch_trt_module")(x)
        _assert_close(got, model(x_eager))
    _assert_close(x, x_eager)  # the input written as eager writes it
    (warning,) = _warnings(caplog)
    assert reason in warning.getMessage()


# --------------------------------------------------------------------------- 7. options


def test_unknown_option_raises_settings_error_naming_it() -> None:
    fast = torch.compile(_mlp(), backend="torch_trt_module", options={"precison": "fp16"})
    with pytest.raises(Exception) as raised, torch.no_grad():
        fast(torch.randn(2, 5))
    # dynamo wraps a backend's error (BackendCompilerFailed); ours is inside, named
    err: BaseException | None = raised.value
    while err is not None and not isinstance(err, SettingsError):
        err = getattr(err, "inner_exception", None) or err.__cause__
    assert isinstance(err, SettingsError) and "precison" in str(err)
    assert "precison" in str(raised.value)
