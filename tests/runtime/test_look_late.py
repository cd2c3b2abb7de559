"""Following weights on a GPU: the fast call enqueues its run, then looks at the source's weights
(``FollowsWeights._look_first`` and ``_ran_stale``). A stale run is thrown away and the call runs
again after the refit, so no call returns what the old weights computed.

The GPU is stood in for by a test double (:class:`EnqueuingRunner`): a runner on the ``meta``
device, which the module treats as it treats a GPU (its runs are enqueued, not done before the
look), computing with ONNX Runtime on the CPU. The real run of this path is
``tests/gpu/test_optimized_runtime.py::test_follow_mode_looks_after_the_run_and_is_never_stale``.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module.backends._onnxruntime import OnnxRuntimeRunner

from .._support import convbn_input, convbn_model

META = torch.device("meta")


class EnqueuingRunner:
    """Test double of a GPU runner: on the meta device, so the module may look at the weights after
    a run; it computes on the CPU input it was given, with the weights of its last refit, through
    a real ONNX Runtime session, and counts its runs."""

    backend = "onnxruntime"

    def __init__(self, engine: Any, x: torch.Tensor, device: torch.device = META) -> None:
        ex = engine.exported
        self.inputs, self.outputs = list(ex.inputs), list(ex.outputs)
        self.device = device
        self.x = x
        self.inner = OnnxRuntimeRunner(engine.onnx, ex.inputs, ex.outputs, "cpu")
        self.runs = 0
        self.fail_next = False
        #: Called once, after the next run computed its output and before it returns: what another
        #: thread does while this run is on the GPU.
        self.meanwhile: Callable[[], None] | None = None
        #: (begun, go): the next refit sets ``begun`` and waits for ``go`` before it takes effect.
        self.hold_refit: tuple[threading.Event, threading.Event] | None = None

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        assert [t.device for t in inputs] == [self.device]
        self.runs += 1
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("a kernel failed")
        out = self.inner.run([self.x])
        meanwhile, self.meanwhile = self.meanwhile, None
        if meanwhile is not None:
            meanwhile()
        return out

    def refit(self, values: Any) -> "EnqueuingRunner":
        inner = self.inner.refit(values)
        hold, self.hold_refit = self.hold_refit, None
        if hold is not None:  # a slow refit: says it has begun, and waits to be let go
            hold[0].set()
            assert hold[1].wait(10)
        self.inner = inner
        return self


@pytest.fixture(scope="module")
def engine() -> Any:
    return ttm.compile(convbn_model(), convbn_input(), backend="onnxruntime", cache=False).engine


def _setup(engine: Any, weights: str = "follow", device: torch.device = META
           ) -> tuple[torch.nn.Module, EnqueuingRunner, ttm.TRTModule]:
    model = convbn_model()
    runner = EnqueuingRunner(engine, convbn_input(), device)
    return model, runner, ttm.TRTModule(engine, runner=runner, source=model, weights=weights)


def _eager(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(convbn_input())


def _call(module: ttm.TRTModule, runner: EnqueuingRunner) -> tuple[torch.Tensor, int]:
    """The module's output for the meta stand-in of the input, and how many runs the call made."""
    before = runner.runs
    out = module(torch.empty(convbn_input().shape, device=runner.device))
    return out, runner.runs - before


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_late_look_is_never_stale_and_wastes_a_run_only_after_quiet_calls(engine: Any) -> None:
    model, runner, module = _setup(engine)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out, runs = _call(module, runner)  # looks first: no change
    assert _close(out, _eager(model)) and runs == 1
    out, runs = _call(module, runner)  # a fast call: runs, then looks
    assert _close(out, _eager(model)) and runs == 1
    old = out

    model(convbn_input()).sum().backward()
    opt.step()
    out, runs = _call(module, runner)  # ran on the old weights, saw the step, refit, ran again
    assert _close(out, _eager(model)) and not _close(out, old)
    assert runs == 2 and module.weights_version == 1

    # A loop that changes the weights before every call: each call looks first, one run each.
    for step in range(3):
        opt.zero_grad()
        model(convbn_input()).sum().backward()
        opt.step()
        out, runs = _call(module, runner)
        assert _close(out, _eager(model)) and runs == 1, step
    assert module.weights_version == 4

    # Quiet again: the first call looks first and finds nothing, then calls look late.
    for _ in range(2):
        out, runs = _call(module, runner)
        assert _close(out, _eager(model)) and runs == 1


@pytest.mark.parametrize("change", ["reassigned .data", "load_state_dict", "in-place buffer"])
def test_late_look_sees_every_change_the_first_look_sees(engine: Any, change: str) -> None:
    model, runner, module = _setup(engine)
    for _ in range(2):
        _call(module, runner)
    with torch.no_grad():
        if change == "reassigned .data":
            model.conv.weight.data = model.conv.weight.data * 2
        elif change == "load_state_dict":
            model.load_state_dict(convbn_model(seed=3).state_dict())
        else:
            model.bn.running_mean.add_(1.0)
    out, runs = _call(module, runner)
    assert _close(out, _eager(model)) and runs == 2


def test_a_failed_run_with_changed_weights_is_run_again_after_the_refit(engine: Any) -> None:
    model, runner, module = _setup(engine)
    for _ in range(2):
        _call(module, runner)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    runner.fail_next = True
    out, runs = _call(module, runner)
    assert _close(out, _eager(model)) and runs == 2

    for _ in range(2):  # quiet again, so the next call looks late
        _call(module, runner)
    runner.fail_next = True  # unchanged weights: the run's own error is the caller's
    with pytest.raises(RuntimeError, match="a kernel failed"):
        _call(module, runner)


def test_a_call_whose_run_another_thread_refit_under_runs_again(engine: Any) -> None:
    """The weights change before two calls begin. While the first call's run is on the GPU, a
    second thread's call runs, sees the change and refits: when the first looks, the source's
    signature is the one just read, yet its run computed with the weights replaced, so it runs again."""
    model, runner, module = _setup(engine)
    for _ in range(2):
        _call(module, runner)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    other: list[torch.Tensor] = []

    def second_thread() -> None:
        t = threading.Thread(target=lambda: other.append(_call(module, runner)[0]))
        t.start()
        t.join()

    runner.meanwhile = second_thread
    out, _ = _call(module, runner)
    assert module.weights_version == 1  # one refit, the second thread's
    assert _close(other[0], _eager(model))
    assert _close(out, _eager(model))


@pytest.mark.parametrize("look", ["late", "first"])
def test_a_call_waits_for_a_refit_under_way_in_another_thread(engine: Any, look: str) -> None:
    """The weights change; another thread's call reads them and is refitting (slowly) when this
    call looks: the source's signature is already the new one and no version was bumped yet, so
    only the refit under way says this call's weights are being replaced. It waits, and computes
    with the new weights (looking late: after its run; looking first: before it)."""
    model, runner, module = _setup(engine)
    for _ in range(0 if look == "first" else 2):  # none: the call looks first; two: late
        _call(module, runner)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    begun, go = threading.Event(), threading.Event()
    runner.hold_refit = (begun, go)
    other: list[torch.Tensor] = []
    refitting = threading.Thread(target=lambda: other.append(_call(module, runner)[0]))

    def start_the_other_thread() -> None:
        refitting.start()
        assert begun.wait(10)  # its refit has begun: the signature is read, the runner not yet refit
        threading.Timer(0.3, go.set).start()

    if look == "late":
        runner.meanwhile = start_the_other_thread  # while this call's run is on the GPU
    else:
        start_the_other_thread()  # before this call
    out, _ = _call(module, runner)
    refitting.join()
    assert go.is_set() and module.weights_version == 1
    assert _close(other[0], _eager(model)) and _close(out, _eager(model))


@pytest.mark.parametrize("weights", ["exact", "snapshot"])
def test_exact_and_snapshot_always_look_first(engine: Any, weights: str) -> None:
    model, runner, module = _setup(engine, weights)
    first = _call(module, runner)[0]
    _call(module, runner)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    out, runs = _call(module, runner)
    assert runs == 1  # the look came first: no run was thrown away
    assert _close(out, _eager(model) if weights == "exact" else first)


def test_on_the_cpu_a_call_looks_first(engine: Any) -> None:
    # The same runner on the CPU: a run there is done before any look could run, so looking
    # late would save nothing and could waste a whole run.
    model, runner, module = _setup(engine, device=torch.device("cpu"))
    for _ in range(2):
        _call(module, runner)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    out, runs = _call(module, runner)
    assert _close(out, _eager(model)) and runs == 1
