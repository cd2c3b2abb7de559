"""Copying, pickling and checkpointing compiled modules (issue 24, "Also found"): ``copy.deepcopy`` works
and a copied compiled child follows the COPIED parent (EMA and SWA helpers deep-copy the model);
pickling refuses with an error naming ``ttm.save``; a lazy child's ``state_dict()`` before its first
call holds its settings, and loads into a lazy module of the same model."""

from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path

import pytest
import torch

import torch_trt_module as ttm

PICKLE_REFUSAL = ("a TRTModule cannot be pickled (torch.save(module), pickle.dumps): it holds a runtime session and "
                  "a link to its source model. Fix: save it with ttm.save(module, path) and read it with "
                  "ttm.load(path), or save state_dict()s (a parent's state_dict() holds its compiled children's "
                  "engines); copy.deepcopy works")


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()


class Parent(torch.nn.Module):
    """A model with a compiled child that computes with the model's own backbone (eager or lazy)."""

    def __init__(self, lazy: bool = False) -> None:
        super().__init__()
        self.backbone = _mlp()
        self.fast = ttm.compile(self.backbone) if lazy else ttm.compile(self.backbone, torch.randn(2, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fast(x) * 2


def _bump(model: torch.nn.Module, by: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)


def test_a_deep_copy_runs_and_follows_its_own_copy_of_the_source() -> None:
    model = _mlp()
    x = torch.randn(3, 8)
    fast = ttm.compile(model, torch.randn(2, 8))
    twin = copy.deepcopy(fast)
    before = model(x)
    torch.testing.assert_close(twin(x), before, rtol=1e-5, atol=1e-5)
    _bump(model, 0.1)  # the original follows its model; the copy follows its own copy of it
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(twin(x), before, rtol=1e-5, atol=1e-5)
    assert twin.engine is fast.engine  # immutable: shared, not copied
    assert twin.runner is not fast.runner  # a refit of one never reaches the other


def test_averaged_model_of_a_parent_with_a_compiled_child_computes_with_the_averaged_weights() -> None:
    torch.manual_seed(0)
    parent = Parent()
    ema = torch.optim.swa_utils.AveragedModel(parent, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.5))
    x = torch.randn(5, 8)
    ema.update_parameters(parent)  # the first update copies
    _bump(parent.backbone, 0.2)  # a training step
    ema.update_parameters(parent)  # averages into the copy's backbone, in place
    averaged = ema.module.backbone
    assert not torch.allclose(averaged[0].weight, parent.backbone[0].weight)
    torch.testing.assert_close(ema(x), averaged(x) * 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parent(x), parent.backbone(x) * 2, rtol=1e-5, atol=1e-5)


def test_a_deep_copy_of_a_module_refit_without_a_source_keeps_its_refit_weights(tmp_path: Path) -> None:
    model, other = _mlp(), _mlp()
    ttm.save(ttm.compile(model, torch.randn(2, 8)), tmp_path / "m.pt")
    loaded = ttm.load(tmp_path / "m.pt")
    loaded.refit(other.state_dict())
    twin = copy.deepcopy(loaded)
    x = torch.randn(3, 8)
    torch.testing.assert_close(twin(x), other(x), rtol=1e-5, atol=1e-5)
    assert twin.weights_hash() == loaded.weights_hash()


def test_a_lazy_child_copied_before_its_first_call_builds_with_the_copys_weights() -> None:
    parent = Parent(lazy=True)
    twin = copy.deepcopy(parent)
    _bump(twin.backbone, 0.3)
    x = torch.randn(3, 8)
    torch.testing.assert_close(twin(x), twin.backbone(x) * 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parent(x), parent.backbone(x) * 2, rtol=1e-5, atol=1e-5)


def test_pickling_a_compiled_module_or_its_parent_names_ttm_save() -> None:
    parent = Parent()
    for obj in (parent.fast, parent):
        with pytest.raises(ttm.TorchTRTError) as e:
            torch.save(obj, io.BytesIO())
        assert str(e.value) == PICKLE_REFUSAL
        with pytest.raises(ttm.UsageError, match="ttm.save"):
            pickle.dumps(obj)
    torch.save(parent.state_dict(), io.BytesIO())  # what to save instead works


def test_a_checkpoint_at_step_0_holds_a_lazy_childs_settings_and_loads_into_a_new_model(tmp_path: Path) -> None:
    parent = Parent(lazy=True)
    state = parent.state_dict()  # before the child's first call: it used to raise
    assert set(state["fast._extra_state"]) == {"format", "lazy"}
    torch.save(state, tmp_path / "step0.pt")
    fresh = Parent(lazy=True)
    fresh.load_state_dict(torch.load(tmp_path / "step0.pt", weights_only=True))
    x = torch.randn(3, 8)
    torch.testing.assert_close(fresh(x), parent.backbone(x) * 2, rtol=1e-5, atol=1e-5)
    # and a built child loads it too: it keeps following its (now loaded) source
    built = Parent(lazy=True)
    built(x)
    built.load_state_dict(state)
    torch.testing.assert_close(built(x), parent.backbone(x) * 2, rtol=1e-5, atol=1e-5)


def test_a_lazy_state_cannot_be_loaded_where_nothing_can_build(tmp_path: Path) -> None:
    parent = Parent(lazy=True)
    torch.save(parent.fast.state_dict(), tmp_path / "lazy.pt")
    with pytest.raises(ttm.EngineLoadError) as e:
        ttm.load(tmp_path / "lazy.pt")
    assert str(e.value) == f"{tmp_path / 'lazy.pt'}: " + (
        "this TRTModule state was saved before the module's first call (a lazy module), so it holds its settings "
        "(cast_inputs=False, cuda_graphs='auto', device='cpu', max_rebuilds=4, runtime='auto', weights='follow') and "
        "no engine. Fix: load it into a lazy module of the same model (ttm.compile(model) without example_inputs, as "
        "the saving code made it: it builds at its first call from its model's weights), or call the module once "
        "before saving it")


def test_a_module_with_no_engine_and_no_build_still_refuses_to_save() -> None:
    with pytest.raises(ttm.TorchTRTError, match="this TRTModule has no engine to save"):
        ttm.TRTModule().state_dict()


def test_loading_onto_a_cuda_device_this_machine_lacks_says_so(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 24: ttm.load(p, device="cuda") with no GPU raised torch's raw "Found no NVIDIA driver"."""
    ttm.save(ttm.compile(_mlp(), torch.randn(2, 8)), tmp_path / "m.pt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ttm.BackendUnavailable) as e:
        ttm.load(tmp_path / "m.pt", device="cuda")
    assert str(e.value) == (
        "device='cuda' asks for a CUDA GPU, but torch can use none on this machine (torch.cuda.is_available() is "
        "False: no NVIDIA driver or GPU, or a CPU-only torch). Fix: pass device='cpu', or leave device out (the "
        "module then lives where it can run)")
