"""SegmentedModule and PartitionedModule have TRTModule's API (issue 20, item 11): ``refit``,
``weights_hash``, ``weight_names``, ``input_names`` and ``backend``; and they deep-copy (issue 24).

A SegmentedModule's refit makes every part (engines and PyTorch) compute with the given weights, leaves
the model alone, and follows the model again at its next change; a PartitionedModule's refit loads the
weights into the model it runs (its Python and PyTorch graphs read the model's own tensors)."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module import PartitionedModule, SegmentedModule
from torch_trt_module._runtime.weights import weights_hash

from ..partition.test_split import NonZeroBetween


def _split(seed: int = 0) -> tuple[torch.nn.Module, SegmentedModule]:
    from .._support import require_rtx

    require_rtx()
    torch.manual_seed(seed)
    model = NonZeroBetween().eval()
    # GELU in PyTorch leaves the last two Linears under min_block_size: a PyTorch part with weights.
    fast = ttm.compile(model, torch.randn(4, 8), cache=False, torch_executed_ops={"aten.gelu"})
    assert isinstance(fast, SegmentedModule) and fast.engines
    return model, fast


def _same(fast: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor) -> None:
    got, want = fast(x), model(x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(got[1], want[1])


def _bump(model: torch.nn.Module, by: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)


def _pytorch_part_weights(fast: SegmentedModule) -> set[str]:
    on_engines = {n.removeprefix("model.") for s in fast.engines for n in getattr(fast.graph, s.name).weight_names}
    return set(fast.weight_names) - on_engines


def test_a_split_module_names_its_inputs_backend_and_weights_as_a_trtmodule_does() -> None:
    model, fast = _split()
    assert fast.input_names == ["x"]
    assert fast.backend == "onnxruntime"
    assert fast.weight_names == sorted(model.state_dict())
    assert _pytorch_part_weights(fast) == {"b.2.weight", "b.2.bias", "b.4.weight", "b.4.bias"}
    assert fast.weights_hash() == weights_hash(model.state_dict())


def test_refit_makes_every_part_compute_with_the_weights_leaves_the_model_and_follows_it_again() -> None:
    model, fast = _split()
    other = NonZeroBetween().eval()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    x = torch.randn(5, 8)
    fast.refit(other.state_dict())
    _same(fast, other, x)
    assert fast.weights_hash() == weights_hash(other.state_dict())
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())  # the model is not touched
    _bump(model, 0.01)  # the model's next change: every part follows it again
    _same(fast, model, x)
    assert fast.weights_hash() == weights_hash(model.state_dict())
    fast.refit(other)  # a module of the same architecture works too
    _same(fast, other, x)


def test_refit_checks_everything_before_changing_anything() -> None:
    model, fast = _split()
    bad = dict(NonZeroBetween().state_dict())
    bad["b.4.weight"] = torch.zeros(3, 16)
    del bad["a.0.bias"]
    with pytest.raises(ttm.InputError) as e:
        fast.refit(bad)
    assert str(e.value) == ("cannot refit: 'a.0.bias' is missing; 'b.4.weight' has shape (3, 16), the engine's weight "
                            "has (4, 16). Fix: pass the weights of the same architecture, or compile the new model")
    _same(fast, model, torch.randn(3, 8))
    assert fast.weights_hash() == weights_hash(model.state_dict())
    with pytest.raises(ttm.InputError, match="refit\\(\\) takes a state_dict .* got str"):
        fast.refit("checkpoint.pt")


def test_a_loaded_split_module_takes_new_weights_and_saves_them(tmp_path: Path) -> None:
    model, fast = _split()
    ttm.save(fast, tmp_path / "split.pt")
    loaded = ttm.load(tmp_path / "split.pt")
    other = NonZeroBetween().eval()
    loaded.refit(other.state_dict())
    _same(loaded, other, torch.randn(6, 8))
    ttm.save(loaded, tmp_path / "refit.pt")  # the refit weights, the PyTorch parts' included
    again = ttm.load(tmp_path / "refit.pt")
    _same(again, other, torch.randn(2, 8))
    assert again.weights_hash() == weights_hash(other.state_dict())


def test_a_snapshot_split_module_keeps_its_weights_in_every_part() -> None:
    from .._support import require_rtx

    require_rtx()
    model = NonZeroBetween().eval()
    fast = ttm.compile(model, torch.randn(4, 8), cache=False, torch_executed_ops={"aten.gelu"}, weights="snapshot")
    x = torch.randn(3, 8)
    want = model(x)
    _bump(model, 0.05)
    got = fast(x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)


class Holder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, fast: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.fast = model, fast


def test_a_deep_copied_parent_s_split_child_follows_the_copied_model_and_pickling_names_ttm_save() -> None:
    model, fast = _split()
    parent = Holder(model, fast)
    twin = copy.deepcopy(parent)
    _bump(twin.model, 0.1)
    x = torch.randn(3, 8)
    _same(twin.fast, twin.model, x)
    _same(parent.fast, parent.model, x)
    with pytest.raises(ttm.UsageError, match="a SegmentedModule cannot be pickled .* Fix: save it with ttm.save"):
        torch.save(fast, io.BytesIO())


# --------------------------------------------------------------------------- PartitionedModule

class GatedMLP(torch.nn.Module):
    """A branch on a tensor's value between two blocks with weights: two graphs, a graph break between."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if h.sum().item() > 0:
            return self.b(h)
        return self.c(h)


def _partitioned() -> tuple[torch.nn.Module, PartitionedModule]:
    torch.manual_seed(0)
    model = GatedMLP().eval()
    fast = ttm.compile(model, torch.randn(2, 8), cache=False)
    assert isinstance(fast, PartitionedModule)
    return model, fast


def test_a_partitioned_module_names_its_inputs_backend_and_weights() -> None:
    model, fast = _partitioned()
    assert fast.backend == "unbuilt"  # engines are built at the first call
    x = torch.randn(3, 8)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    assert fast.backend == "onnxruntime"
    assert fast.input_names == ["x"]
    assert fast.weight_names == sorted(model.state_dict())
    assert fast.weights_hash() == weights_hash(model.state_dict())


def test_a_partitioned_modules_refit_loads_the_weights_into_its_model_checked_first() -> None:
    model, fast = _partitioned()
    x = torch.randn(3, 8)
    fast(x)
    other = GatedMLP().eval()
    bad = dict(other.state_dict())
    bad.pop(next(iter(bad)))
    with pytest.raises(ttm.InputError, match="cannot refit: .* is missing"):
        fast.refit(bad)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    fast.refit(other.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    torch.testing.assert_close(fast(x), other(x), rtol=1e-4, atol=1e-5)
    assert fast.weights_hash() == weights_hash(other.state_dict())


def test_a_partitioned_module_deep_copies_with_its_model_and_refuses_pickling() -> None:
    model, fast = _partitioned()
    twin = copy.deepcopy(fast)
    assert twin.model is not model
    _bump(twin.model, 0.2)
    x = torch.randn(3, 8)
    torch.testing.assert_close(twin(x), twin.model(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ttm.UsageError) as e:
        torch.save(fast, io.BytesIO())
    assert str(e.value).startswith("a PartitionedModule cannot be pickled (torch.save(module), pickle.dumps), nor "
                                   "saved with ttm.save: it runs the model's own Python")
