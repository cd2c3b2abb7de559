"""``weights="exact"`` (issue 20, "never wrong"): writes through ``p.data`` with no optimizer step,
which the cheap signature of ``weights="follow"`` cannot see, are followed by comparing the weights'
bytes with a copy at every call. Each test here fails without the mode: the writes would go stale,
the NaN weight would refit at every call, the key would differ, the message would list two choices."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

import torch_trt_module as ttm
from torch_trt_module import PartitionedModule, SegmentedModule
from torch_trt_module._build.build import engine_flags
from torch_trt_module._cache import keys as _keys
from torch_trt_module._core.settings import Settings
from torch_trt_module._runtime import exact as _exact
from torch_trt_module._runtime.exact import ContentCheck
from torch_trt_module.backends import BackendChoice

from .._support import counting
from .test_refit import _hash_of, _model, _x

#: The writes "follow" cannot see: p.data is a tensor with a version counter of its own, over the
#: same memory, so neither the counter nor the address changes.
WRITES: dict[str, Callable[[nn.Parameter], None]] = {
    "p.data.mul_(2)": lambda p: p.data.mul_(2),
    "p.data.normal_()": lambda p: p.data.normal_(generator=torch.Generator().manual_seed(7)),
    "p.data.clamp_(-0.01, 0.01)": lambda p: p.data.clamp_(-0.01, 0.01),
    "p.data.copy_(w)": lambda p: p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(8))),
}
# What runs the engine on this CPU machine: ONNX Runtime (the default here), and the PyTorch runtime.
RUNTIMES = ["onnxruntime", "torch"]


def _matches(fast: nn.Module, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        want = model(x)
    got = fast(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return got


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("write", sorted(WRITES))
def test_a_write_through_data_is_followed_with_one_refit(write: str, runtime: str) -> None:
    model = _model()
    fast = ttm.compile(model, _x(), cache=False, weights="exact", runtime=runtime)
    _matches(fast, model, _x())
    assert fast.weights_version == 0
    for step, p in enumerate((model.conv.weight, model.head.weight), 1):  # a Conv's, then a Linear's
        WRITES[write](p)
        _matches(fast, model, _x(3))
        assert fast.weights_version == step  # one refit for the write
        _matches(fast, model, _x(3))
        assert fast.weights_version == step  # and none while nothing changes
    assert fast.weights_hash() == _hash_of(fast, model)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_calls_with_nothing_changed_never_refit_even_with_a_nan_weight(runtime: str) -> None:
    """Compared as bits, not values: NaN == NaN is false, and a NaN weight must not refit at every call."""
    model = _model()
    with torch.no_grad():
        model.head.weight[1, 2] = float("nan")
        model.bn.running_var[3] = float("nan")
    fast = ttm.compile(model, _x(), cache=False, weights="exact", runtime=runtime, verify=False)
    for _ in range(4):
        out = fast(_x())
        assert out.isnan().any()
    assert fast.weights_version == 0
    model.head.weight.data[0, 0] = float("nan")  # and a new NaN is a change
    fast(_x())
    assert fast.weights_version == 1
    fast(_x())
    assert fast.weights_version == 1


@pytest.mark.parametrize("write", sorted(WRITES))
def test_follow_stays_stale_after_a_write_through_data_as_documented(write: str) -> None:
    """The limit "exact" exists for (docs/weights-and-refit.md, "What is not followed"). If a change
    makes "follow" see these writes, this fails: update the docs, and reconsider "exact"."""
    model = _model()
    fast = ttm.compile(model, _x(), cache=False)  # weights="follow", the default
    before = _matches(fast, model, _x())
    WRITES[write](model.conv.weight)
    got = fast(_x())
    torch.testing.assert_close(got, before, rtol=0, atol=0)  # the old weights' output, exactly
    with torch.no_grad():
        assert not torch.allclose(got, model(_x()), rtol=1e-3, atol=1e-3)  # which eager no longer gives
    assert fast.weights_version == 0


def test_an_optimizer_step_is_followed_without_reading_bytes() -> None:
    model = _model()
    fast = ttm.compile(model, _x(), cache=False, weights="exact")
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)  # writes without bumping versions
    model.train()
    model(_x()).square().mean().backward()
    model.eval()
    opt.step()
    _matches(fast, model, _x())
    assert fast.weights_version == 1


# --------------------------------------------------------------------------- the comparison itself

def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "float32": torch.randn(64, 33, generator=g),
        "channels_last": torch.randn(4, 3, 5, 5, generator=g).to(memory_format=torch.channels_last),
        "transposed": torch.randn(7, 9, generator=g).t(),
        "strided slice": torch.randn(8, 8, generator=g)[:, ::2],  # not dense: compared element-wise
        "0-dim int64": torch.tensor(5),
        "bfloat16": torch.randn(40, generator=g).to(torch.bfloat16),
        "bool": torch.rand(10, generator=g) > 0.5,
        "zeros": torch.zeros(300),
        "nan": torch.full((6,), float("nan")),
        "complex": torch.randn(8, dtype=torch.complex128, generator=g),
    }


def _flip_one(t: torch.Tensor) -> None:
    """Change one element of ``t`` in place, the way a value compare or a signed difference could miss."""
    if t.dim() == 0:
        t += 1
    elif t.dtype == torch.bool:
        t[3] = ~t[3]
    elif t.isnan().all():
        t[5] = float("inf")
    elif (t == 0).all():
        t[0] = -0.0  # equal as values, not as bits: a change (the engine had +0.0)
    else:
        last = tuple(s - 1 for s in t.shape)
        t[last] = -t[last]  # the sign bit only: the two differ by exactly the top bit


@pytest.mark.parametrize("how", ["memcmp", "torch.equal", "batched"])
@pytest.mark.parametrize("name", sorted(_tensors()))
def test_the_comparison_is_bitwise_and_sees_one_element(name: str, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each way of comparing: libc's memcmp (the CPU's), torch.equal (where there is no memcmp), and
    the batched one a GPU gets, run here on the CPU."""
    if how == "torch.equal":
        monkeypatch.setattr(_exact, "_memcmp", lambda: None)
    tensors = _tensors()
    check = ContentCheck(list(tensors.values()), batched=how == "batched")
    assert all(c is not None for c in check.copies)
    assert bool(check._memcmp) == (how == "memcmp") and bool(check._batched) == (how == "batched")
    assert not check.differs() and not check.differs()  # NaN stays equal to itself
    _flip_one(tensors[name])
    assert check.differs()


def test_the_comparison_sees_an_inference_tensor_written_in_inference_mode() -> None:
    with torch.inference_mode():
        t = torch.ones(5)
    check = ContentCheck([t])
    assert not check.differs()
    with torch.inference_mode():
        t.mul_(2)  # no version counter: only the bytes show it
    assert check.differs()


def test_tensors_it_cannot_compare_are_left_to_the_signature() -> None:
    sparse, empty = torch.eye(3).to_sparse(), torch.empty(0)
    check = ContentCheck([sparse, empty, torch.ones(2)])
    assert [c is None for c in check.copies] == [True, True, False]
    assert not check.differs()


# --------------------------------------------------------------------------- settings and the cache

def test_a_bad_value_lists_the_three_choices() -> None:
    said = "option 'weights' got 'exakt'; expected one of 'follow', 'exact', 'snapshot'"
    with pytest.raises(ttm.SettingsError, match=said):
        ttm.compile(nn.Linear(2, 2).eval(), torch.randn(1, 2), cache=False, weights="exakt")
    with pytest.raises(ttm.SettingsError, match=said):
        ttm.TRTModule(weights="exakt")


def test_exact_and_follow_have_one_cache_key_and_share_entries(tmp_path: Path) -> None:
    exported = ttm.export_onnx(_model(), _x())
    ort = BackendChoice("onnxruntime", "onnxruntime", "test")
    follow, exact, snapshot = (Settings.from_options(weights=w) for w in ("follow", "exact", "snapshot"))
    cpu = torch.device("cpu")

    def key(s: Settings) -> str:
        return _keys.content_key(exported.onnx, exported.to_meta(), s, ort, cpu)

    def fingerprint(s: Settings) -> str | None:
        return _keys.fingerprint(_model(), (_x(),), {}, s, ort, cpu)

    assert key(exact) == key(follow) != key(snapshot)
    assert fingerprint(exact) == fingerprint(follow) != fingerprint(snapshot)
    assert not _keys.keyed_by_value(exact)
    # A compile with one finds the other's entry with no export (the warm path), and refits it to
    # its model's weights; both directions.
    root = str(tmp_path / "cache")
    ttm.compile(_model(seed=0), _x(), cache_dir=root, weights="follow")
    for seed, weights in ((1, "exact"), (2, "follow")):
        model = _model(seed=seed)
        with counting() as n:
            fast = ttm.compile(model, _x(), cache_dir=root, weights=weights)
        assert n == {"exports": 0, "builds": 0, "cache_hits": 1}, weights
        assert fast.weights == weights
        _matches(fast, model, _x())
        WRITES["p.data.mul_(2)"](model.conv.weight)
        if weights == "exact":
            _matches(fast, model, _x())


def test_a_tensorrt_build_for_exact_is_refittable_like_follow() -> None:
    trt = BackendChoice("tensorrt", "tensorrt", "test")
    assert engine_flags(trt, Settings.from_options(weights="exact")) == \
        engine_flags(trt, Settings.from_options(weights="follow")) == ["REFIT"]


def test_a_deep_copy_reads_a_write_its_original_had_not_applied_yet() -> None:
    model = _model()
    fast = ttm.compile(model, _x(), cache=False, weights="exact")
    _matches(fast, model, _x())
    model.conv.weight.data.mul_(2)  # no call yet: the original has not applied it
    parent = nn.Module()
    parent.model, parent.fast = model, fast  # a deep copy of both: the copy follows the model's copy
    twin = copy.deepcopy(parent)
    _matches(twin.fast, twin.model, _x())


# --------------------------------------------------------------------------- partitioned models

class NonZeroBetween(nn.Module):
    """Two MLP blocks with a NonZero between them (tests/partition/test_split.py's model)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8),
                               nn.Sigmoid())
        self.b = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.a(x)
        return self.b(y), torch.nonzero(y > 0.5)


def test_a_split_module_passes_exact_to_its_engine_parts() -> None:
    torch.manual_seed(2)
    model = NonZeroBetween().eval()
    x = torch.randn(4, 8)
    fast = ttm.compile(model, x, cache=False, weights="exact", torch_executed_ops={torch.ops.aten.gelu})
    assert isinstance(fast, SegmentedModule) and fast.engines
    assert {p.weights for p in fast._parts()} == {"exact"}
    model.a[0].weight.data.mul_(2)  # inside an engine part
    got, want = fast(x), model(x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], want[1])
    # after a refit to other weights, the model's next write through .data makes every part follow it again
    fast.refit({n: t + 1 for n, t in model.state_dict().items()})
    model.b[4].weight.data.mul_(3)
    got, want = fast(x), model(x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


class LinearItemBranch(nn.Module):
    """A graph break (``.item()``) between two Linears: a PartitionedModule."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.first(x)
        if y.sum().item() > -1e9:  # always taken: the break is what matters
            y = y * 2
        return self.second(y)


def test_a_partitioned_module_passes_exact_to_its_engines() -> None:
    torch.manual_seed(3)
    model = LinearItemBranch().eval()
    x = torch.randn(2, 8)
    fast = ttm.compile(model, x, cache=False, weights="exact")
    assert isinstance(fast, PartitionedModule)
    _matches(fast, model, x)
    engines = [p["module"] for p in fast.parts() if p["module"] is not None]
    assert engines and {e.weights for e in engines} == {"exact"}
    model.first.weight.data.mul_(2)
    model.second.bias.data.normal_()
    _matches(fast, model, x)


def test_settings_say_exact_follows_weights() -> None:
    assert [Settings.from_options(weights=w).follows_weights for w in ("follow", "exact", "snapshot")] == \
        [True, True, False]
    assert dataclasses.replace(Settings.from_options(), weights="exact").engine_fields() == \
        Settings.from_options().engine_fields()


def test_a_weight_made_a_view_of_its_own_memory_is_followed() -> None:
    """``p.data = p.data.t()``: the same memory and bytes, read another way; no version bump."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 8)
    fast = ttm.compile(model, x, cache=False, weights="exact")
    _matches(fast, model, x)
    model[0].weight.data = model[0].weight.data.t()
    _matches(fast, model, x)
    assert fast.weights_version == 1


def test_a_storage_resized_in_place_is_a_change_never_a_read_of_freed_memory() -> None:
    t = torch.ones(1000)
    check = ContentCheck([t])
    t.untyped_storage().resize_(8000)  # the memory moves (FSDP frees and regrows parameters this way)
    assert check.differs()
