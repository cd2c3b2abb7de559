"""Weight following, issue 20: fused optimizers, writes through ``.data``, ``.to()`` with a change
pending, ``optimizer.step(closure)`` (LBFGS), tied weights, refit's argument, plain tensor attributes.
Each test failed before its fix (see the issue's items)."""

from __future__ import annotations

import gc
import logging
import threading
from typing import Any, Callable

import pytest
import torch
from torch import nn

import torch_trt_module as ttm
from torch_trt_module._runtime.weights import WeightWatch

from .._support import in_threads
from .test_refit import ConvBN, _close, _hash_of, _model, _x


def _grads(model: nn.Module) -> None:
    model.train()
    model(_x()).square().mean().backward()
    model.eval()


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "AdamW(fused=True)": lambda ps: torch.optim.AdamW(ps, lr=0.1, fused=True),
    "Adam(fused=True)": lambda ps: torch.optim.Adam(ps, lr=0.1, fused=True),
    "SGD(fused=True)": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, fused=True),
    "AdamW(foreach=True)": lambda ps: torch.optim.AdamW(ps, lr=0.1, foreach=True),
    "SGD(foreach=True)": lambda ps: torch.optim.SGD(ps, lr=0.5, foreach=True),
}


@pytest.mark.parametrize("make", sorted(OPTIMIZERS))
def test_every_optimizer_kind_is_followed_fused_ones_included(make: str) -> None:
    model = _model()
    fast = ttm.compile(model, _x(), cache=False)
    opt = OPTIMIZERS[make](model.parameters())
    for step in range(2):
        _grads(model)
        opt.step()  # fused kernels do not bump the parameters' versions
        opt.zero_grad()
        _close(fast, model, _x(3))
        assert fast.weights_version == step + 1
    assert fast.weights_hash() == _hash_of(fast, model)


def test_a_step_of_an_optimizer_over_other_tensors_refits_nothing() -> None:
    model, other = _model(), _model(seed=4)
    fast = ttm.compile(model, _x(), cache=False)
    fast(_x())
    opt = torch.optim.AdamW(other.parameters(), lr=0.1, fused=True)
    _grads(other)
    opt.step()
    fast(_x())
    assert fast.weights_version == 0


class OldStyleSGD(torch.optim.Optimizer):
    """A custom optimizer as many were written: it writes through ``p.data``."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                p.data.add_(p.grad.data, alpha=-group["lr"])


def _swap_storage(model: ConvBN) -> None:
    model.conv.weight.data = torch.randn_like(model.conv.weight)  # the old memory is freed


def _swap_keeping_the_old(model: ConvBN) -> list[torch.Tensor]:
    kept = [model.head.weight.data]  # an EMA swap: the old memory stays alive
    model.head.weight.data = torch.randn_like(model.head.weight)
    return kept


def _two_swaps(model: ConvBN) -> None:
    model.conv.weight.data = model.conv.weight.data * 0.5
    model.conv.weight.data = model.conv.weight.data + 1.0


def _clip_after_step(model: ConvBN) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _grads(model)
    opt.step()
    for p in model.parameters():
        p.data.clamp_(-0.05, 0.05)  # WGAN-style clipping, after the step: read at the next call


def _old_style_optimizer(model: ConvBN) -> None:
    opt = OldStyleSGD(model.parameters(), lr=0.5)
    _grads(model)
    opt.step()


DATA_WRITES: dict[str, Callable[[ConvBN], Any]] = {
    "p.data = w": _swap_storage, "p.data = w (old memory kept)": _swap_keeping_the_old,
    "two p.data = w between calls": _two_swaps, "p.data.clamp_ after a step": _clip_after_step,
    "an optimizer writing p.data": _old_style_optimizer,
}


@pytest.mark.parametrize("change", sorted(DATA_WRITES))
def test_writes_through_data_are_followed(change: str) -> None:
    model = _model()
    fast = ttm.compile(model, _x(), cache=False)
    _close(fast, model, _x())
    kept = DATA_WRITES[change](model)
    _close(fast, model, _x(3))
    assert fast.weights_hash() == _hash_of(fast, model)
    del kept


def test_new_memory_at_the_address_of_freed_memory_is_seen() -> None:
    """p.data = a, then p.data = b where b's memory has a's address (a caching allocator reuses the
    block freed a moment before): the death of a's memory marks the watch changed."""
    mem = bytearray(16 * 4)
    lin = nn.Linear(4, 4)
    lin.weight.data = torch.frombuffer(mem, dtype=torch.float32).view(4, 4)
    watch = WeightWatch(lin, ["weight"])
    watch.mark()
    assert not watch.changed()
    lin.weight.data = torch.frombuffer(mem, dtype=torch.float32).view(4, 4)  # other memory, same address
    gc.collect()
    assert watch.changed()


def test_in_place_writes_through_data_outside_a_step_need_a_refit_as_documented() -> None:
    """The one write nothing cheap can see (docs/weights-and-refit.md): p.data has a version counter of
    its own and the memory stays where it was. refit(model) is the fix; p.mul_ under no_grad is followed."""
    model = _model()
    fast = ttm.compile(model, _x(), cache=False)
    _close(fast, model, _x())
    model.conv.weight.data.mul_(2.0)
    with pytest.raises(AssertionError, match="stale"):
        _close(fast, model, _x())
    fast.refit(model)
    _close(fast, model, _x())
    with torch.no_grad():
        model.conv.weight.mul_(2.0)
    _close(fast, model, _x())


def test_a_move_applies_a_change_no_call_applied_yet() -> None:
    model = _model()
    fast = ttm.compile(model, _x(), cache=False)
    _close(fast, model, _x())
    model.load_state_dict(_model(seed=7).state_dict())
    fast.to("cpu:0")
    fast.to("cpu")
    assert fast.weights_version == 1  # applied on the way, not lost
    _close(fast, model, _x(3))
    with torch.no_grad():
        model.head.weight.add_(1.0)
    _close(fast, model, _x(3))  # and still followed after the moves


def _in_thread(fn: Callable[[], Any], timeout: float = 120.0) -> None:
    """Run ``fn`` in a daemon thread; fail (instead of hanging the run) if it does not end in time."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"stuck: still running after {timeout:.0f} s"
    if errors:
        raise errors[0]


def test_a_closure_of_optimizer_step_calls_the_module_without_hanging() -> None:
    """LBFGS (and PyTorch Lightning) call the closure from inside step(): a read there must not wait
    for the step in progress, which is its own caller. The closure sees the weights as they are."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)).eval()
    x = torch.randn(4, 8)
    fast = ttm.compile(model, x, cache=False)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    gaps: list[float] = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        with torch.no_grad():
            gaps.append((fast(x) - model(x)).abs().max().item())
        loss = model(x).square().mean()
        loss.backward()
        return loss

    _in_thread(lambda: [opt.step(closure) for _ in range(2)])
    assert len(gaps) > 2 and max(gaps) < 1e-5
    assert fast.weights_version >= 2


def test_a_closure_and_another_thread_calling_the_same_module_never_deadlock() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)).eval()
    x = torch.randn(4, 8)
    fast = ttm.compile(model, x, cache=False)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    stop = threading.Event()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        fast(x)
        loss = model(x).square().mean()
        loss.backward()
        return loss

    def serve() -> None:
        while not stop.is_set():
            fast(x)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        _in_thread(lambda: [opt.step(closure) for _ in range(3)])
    finally:
        stop.set()
        server.join(30)
    assert not server.is_alive()
    _close(fast, model, x)


class FailingSGD(torch.optim.SGD):
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        super().step()
        raise FloatingPointError("a step that raises (torch then skips its post-step hooks)")


def test_a_step_that_raised_does_not_leave_readers_in_other_threads_waiting() -> None:
    model = _model()
    fast = ttm.compile(model, _x(), cache=False)
    fast(_x())
    opt = FailingSGD(model.parameters(), lr=0.5)
    _grads(model)
    with pytest.raises(FloatingPointError):
        opt.step()
    _in_thread(lambda: _close(fast, model, _x()), timeout=60)  # waited for the "step in progress" for ever


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(8, 8, bias=False)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 8, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid(self.emb(x))))


def test_a_tied_tensor_goes_by_its_first_name_and_refits_from_any_of_them() -> None:
    torch.manual_seed(0)
    model = Tied().eval()
    x = torch.randn(2, 8)
    fast = ttm.compile(model, x, cache=False, weights="snapshot")
    assert fast.weight_names == ["emb.weight", "mid.bias", "mid.weight"]
    other = Tied().eval()
    state = other.state_dict()
    for left_out in ("out.weight", "emb.weight"):  # a checkpoint storing it once, under either name
        fast.refit({k: v for k, v in state.items() if k != left_out})
        _close(fast, other, x)
    third = Tied().eval()
    fast.refit(third)
    assert fast.weights_hash() == _hash_of(fast, third)
    follow = ttm.compile(model, x, cache=False)
    with torch.no_grad():
        model.out.weight.mul_(0.5)  # written under the alias, followed
    _close(follow, model, x)


@pytest.mark.parametrize("given, message", [
    ("ckpt.pt", "got str 'ckpt.pt'. Fix: load it first: refit(torch.load('ckpt.pt', weights_only=True))"),
    (None, "got None. Fix: pass model.state_dict(), torch.load(path, weights_only=True), or the model itself"),
    (3, "got a int. Fix: pass model.state_dict()"),
])
def test_refit_names_what_it_takes_when_given_something_else(given: Any, message: str) -> None:
    fast = ttm.compile(_model(), _x(), cache=False)
    with pytest.raises(ttm.InputError) as err:
        fast.refit(given)
    assert str(err.value).startswith("refit() takes a state_dict (a mapping of names to tensors) or an nn.Module "
                                     "of the same architecture; ")
    assert message in str(err.value)


class PlainAttribute(nn.Module):
    def __init__(self, buffer: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        if buffer:
            self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)
        else:
            self.scale = torch.full((4,), 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


def test_a_plain_tensor_attribute_is_named_and_a_buffer_is_followed(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    with caplog.at_level(logging.INFO, logger="torch_trt_module"):
        plain = PlainAttribute(buffer=False).eval()
        ttm.compile(plain, x, cache=False)
    assert any("does not follow plain tensor attributes, which the engine holds as constants: scale. Register "
               "them as buffers" in r.getMessage() for r in caplog.records)
    model = PlainAttribute(buffer=True).eval()
    fast = ttm.compile(model, x, cache=False)
    model.scale.mul_(3.0)  # the documented fix: a buffer is followed
    _close(fast, model, x)


def test_the_planned_onnxruntime_call_returns_new_outputs_every_call_in_every_thread() -> None:
    """Item 8's per-call saving: small CPU outputs are copied out of buffers bound once per thread and
    plan, instead of binding new memory each call. Each call still returns tensors of its own."""
    torch.manual_seed(0)
    model = nn.Linear(16, 16).eval()
    fast = ttm.compile(model, torch.randn(1, 16), cache=False, backend="onnxruntime")
    xs = {b: torch.randn(b, 16) for b in (1, 3)}
    with torch.no_grad():
        want = {b: model(x) for b, x in xs.items()}

    def calls(_: int) -> None:
        for _ in range(50):
            for b, x in xs.items():  # two plans, one binding per thread
                first, second = fast(x), fast(x)
                assert first.data_ptr() != second.data_ptr()
                torch.testing.assert_close(first, want[b])
                torch.testing.assert_close(second, want[b])

    in_threads(calls, 3)
    kept = fast(xs[1])
    fast(xs[1] * 2)
    torch.testing.assert_close(kept, want[1])  # a later call never writes into an earlier output
