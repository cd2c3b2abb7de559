"""partition="auto" (issue 14): what cannot become one engine still runs, and explain() says why.
Cases #18 and #19 themselves are in tests/zoo/test_must_fail.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch_trt_module as ttm

from harness.models import ItemBranch, MaskedSelect

from .._support import REPO


def test_explain_names_the_graph_break_and_its_source_line() -> None:
    report = ttm.explain(ItemBranch().eval(), torch.randn(2, 8))
    assert not report.whole_graph and "data-dependent control flow" in (report.export_error or "")
    assert len(report.graph_breaks) == 1 and len(report.graphs) == 2
    assert report.graph_breaks[0]["where"].endswith("harness/models.py:42")  # `if x.sum().item() > 0:`
    assert "item" in report.graph_breaks[0]["reason"].lower()
    assert "break 1:" in str(report)


@pytest.mark.usefixtures("rtx_required")
def test_explain_names_the_op_the_builder_refuses() -> None:
    report = ttm.explain(MaskedSelect().eval(), torch.randn(2, 8))
    assert report.whole_graph and report.engine is not None
    assert report.engine["builder"] == "tensorrt_rtx"
    assert "NonZero" in report.engine["verdict"] and "partition='auto'" in report.engine["verdict"]


@pytest.mark.usefixtures("rtx_required")
def test_explain_of_a_graph_the_builder_takes() -> None:
    report = ttm.explain(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval(), torch.randn(2, 4))
    assert report.whole_graph and report.engine is not None
    assert report.engine["verdict"] == "the parser takes every node"
    assert report.engine["inputs"] == ["input: float32 (1..32, 4)"]


def test_a_partitioned_module_refuses_to_be_saved_with_the_fix(tmp_path: Path) -> None:
    fast = ttm.compile(ItemBranch().eval(), torch.randn(2, 8), cache=False)
    assert isinstance(fast, ttm.PartitionedModule)
    with pytest.raises(ttm.UsageError, match="save the model .* and compile it again"):
        ttm.save(fast, tmp_path / "m.pt")  # type: ignore[arg-type]
    assert set(fast.state_dict()) == set(fast.model.state_dict())  # the model's weights, once


def test_a_partitioned_module_is_inference_only() -> None:
    model = ItemBranch().eval()
    fast = ttm.compile(model, torch.randn(2, 8), cache=False)
    model.train()  # issue 20: inference semantics all the same, and the model's mode is left alone
    x = torch.randn(2, 8)
    torch.testing.assert_close(fast(x), model(x))
    assert model.training


def test_the_cli_explains_a_model(tmp_path: Path) -> None:
    (tmp_path / "explain_models.py").write_text(
        "from harness.models import ItemBranch\n\ndef factory():\n    return ItemBranch()\n")
    env_path = f"{tmp_path}:{REPO}"
    done = subprocess.run([sys.executable, "-m", "torch_trt_module", "explain", "explain_models:factory",
                           "--shapes", "x:1x8,2x8,4x8"], capture_output=True, text=True,
                          env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "break 1:" in done.stdout and "models.py:42" in done.stdout


class ShiftLastToFirst(torch.nn.Module):
    """MBart's shift_tokens_right in small: an axis-less squeeze() specialises the export to batch > 1."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = ids.clone()
        out[:, 0] = ids[:, -1:].squeeze()
        return out


def test_a_dim_the_export_specialised_is_named_under_never_and_runs_under_auto() -> None:
    model = ShiftLastToFirst().eval()
    example = torch.randint(0, 100, (4, 6))
    with pytest.raises(ttm.ExportError, match=r"(?s)at the profile.s min \(ids=\(1, 6\)\).*specialised"):
        ttm.compile(model, example, cache=False, partition="never")
    fast = ttm.compile(model, example, cache=False)
    for batch in (1, 2, 4, 7):  # the profile's min included: correct at every shape
        ids = torch.randint(0, 100, (batch, 6))
        assert torch.equal(fast(ids), model(ids))


@pytest.mark.slow
def test_fasterrcnn_backbone_is_an_engine_and_its_postprocessing_runs_in_pytorch() -> None:
    """torchvision's detector does not export whole (data-dependent sizes in its post-processing):
    its graphs go through torch.compile; the backbone's is a TensorRT-RTX engine, and the RoiAlign
    graph the parser refuses runs without a plan. ~2 min on 2 cores."""
    import torchvision

    from torch_trt_module._partition.split import SegmentedModule

    from .._support import require_rtx

    require_rtx()
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.0).eval()
    with torch.no_grad():  # random heads score every box alike; spread the scores
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 5.0)
        model.rpn.head.cls_logits.weight.normal_(0, 5.0)
    fast = ttm.compile(model, ([torch.rand(3, 320, 320)],), cache=False)
    assert isinstance(fast, ttm.PartitionedModule)
    image = [torch.rand(3, 320, 320)]
    got, want = fast(image)[0], model(image)[0]
    assert set(got) == {"boxes", "labels", "scores"} and got["boxes"].shape == want["boxes"].shape
    # Random weights tie many scores, so which tied box comes first is arbitrary, and at the bottom of
    # the list NMS may keep another of two near-equal boxes; the top scores, and nearly all, agree.
    mine, theirs = got["scores"].sort(descending=True).values, want["scores"].sort(descending=True).values
    torch.testing.assert_close(mine[:10], theirs[:10], rtol=1e-3, atol=1e-4)
    assert ((mine - theirs).abs() <= 1e-4).float().mean() >= 0.95
    parts = fast.parts()
    modules = [p["module"] for p in parts if p["runs"] == "engine"]
    backbone = [m for m in modules if isinstance(m, ttm.TRTModule) and m.input_specs[0].min == (3, 320, 320)]
    assert backbone and backbone[0].engine is not None and backbone[0].engine.has_plan  # an engine
    # RoiAlign: refused by TensorRT-RTX's parser; the graph runs without a plan (ONNX Runtime here) or split.
    no_plan = [m for m in modules if isinstance(m, SegmentedModule)
               or (isinstance(m, ttm.TRTModule) and m.engine is not None and not m.engine.has_plan)]
    assert no_plan, [p["graph"] for p in parts]


def test_a_graph_whose_engine_build_fails_at_its_first_call_counts_as_pytorch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The graphs are handed to the backend at the first call and built there; a build failing then
    # must show in fallbacks and repr() as in parts(), not as a graph on an engine.
    from torch_trt_module._pipeline import compile as _compile

    model = ItemBranch().eval()
    fast = ttm.compile(model, torch.randn(2, 8), cache=False)
    assert isinstance(fast, ttm.PartitionedModule)

    def refuse(*args: object, **kwargs: object) -> object:
        raise ttm.BuildError("forced for the test: the builder failed")

    monkeypatch.setattr(_compile, "compile", refuse)
    x = torch.randn(2, 8)
    torch.testing.assert_close(fast(x), model(x))
    parts = fast.parts()
    assert fast.graphs == len(parts) >= 2 and fast.fallbacks == len(parts)
    assert all(p["runs"] == "pytorch" for p in parts)
    assert any("BuildError: forced for the test" in p["why"] for p in parts)
    assert f"on engines=0, in PyTorch={len(parts)}" in repr(fast)


def test_the_fallback_warning_carries_the_export_error_whole(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 24: the warning was cut at 300 characters, mid-word ("leave it out of dyna)")."""
    import logging

    with caplog.at_level(logging.WARNING, logger="torch_trt_module"):
        fast = ttm.compile(ItemBranch().eval(), torch.randn(2, 8), cache=False)
    assert isinstance(fast, ttm.PartitionedModule)
    (msg,) = [r.getMessage() for r in caplog.records if "does not export as one graph" in r.getMessage()]
    reason = msg.split("does not export as one graph (", 1)[1].rsplit("). partition='auto'", 1)[0]
    assert len(reason) > 300 and reason.endswith((".", ")", "'", '"')), reason[-80:]
