"""One graph split into engines and PyTorch (_segments, _split; issue 14): the parser decides what
becomes an engine, min_block_size and torch_executed_ops keep parts in PyTorch, the result is right
at every shape of its profile, follows its model's weights, and saves without pickle.

Engines are built with TensorRT-RTX here and run on ONNX Runtime (no GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module import SegmentedModule

from harness.models import ItemBranch


class NonZeroBetween(torch.nn.Module):
    """Two MLP blocks with a NonZero (which TensorRT-RTX's parser refuses) between them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                                     torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.Sigmoid())
        self.b = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 16),
                                     torch.nn.Tanh(), torch.nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.a(x)
        return self.b(y), torch.nonzero(y > 0.5)


def _check(fast: torch.nn.Module, model: torch.nn.Module, batch: int) -> None:
    x = torch.randn(batch, 8)
    got, want = fast(x), model(x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(got[1], want[1])


@pytest.fixture(scope="module")
def split() -> tuple[torch.nn.Module, SegmentedModule]:
    from .._support import require_rtx

    require_rtx()
    torch.manual_seed(0)
    model = NonZeroBetween().eval()
    fast = ttm.compile(model, torch.randn(4, 8), cache=False)
    assert isinstance(fast, SegmentedModule)
    return model, fast


def test_the_parser_decides_nonzero_stays_in_pytorch_and_the_rest_is_one_engine(split: tuple) -> None:
    model, fast = split
    assert [s.kind for s in fast.segments] == ["engine", "pytorch"]
    engine, rest = fast.segments
    assert rest.ops == {"aten.nonzero.default": 1}
    assert "parser refuses ONNX NonZero" in rest.why
    assert "aten.nonzero.default" not in engine.ops and engine.ops["aten.linear.default"] == 6
    module = getattr(fast.graph, engine.name)
    assert isinstance(module, ttm.TRTModule) and module.engine is not None and module.engine.has_plan
    assert module.input_names == ["flat_0"]  # the weights are inside the engine, not its inputs
    assert "engines=1, ops on engines=12/13" in repr(fast)


@pytest.mark.parametrize("batch", [1, 4, 9, 32])  # the profile's min, the example, off-opt, its max
def test_a_split_module_matches_eager_across_its_profile(split: tuple, batch: int) -> None:
    _check(split[1], split[0], batch)


def test_a_split_module_saves_and_loads_without_pickle(split: tuple, tmp_path: Path) -> None:
    model, fast = split
    path = tmp_path / "split.pt"
    ttm.save(fast, path)
    torch.load(path, weights_only=True)  # nothing but tensors, strings and dicts
    loaded = ttm.load(path)
    assert isinstance(loaded, SegmentedModule) and [s.to_json() for s in loaded.segments] == [
        s.to_json() for s in fast.segments]
    assert isinstance(getattr(loaded.graph, "fused_0"), ttm.TRTModule)
    for batch in (1, 7):
        _check(loaded, model, batch)


def test_a_corrupt_saved_split_is_refused(split: tuple, tmp_path: Path) -> None:
    path = tmp_path / "split.pt"
    ttm.save(split[1], path)
    state = torch.load(path, weights_only=True)
    state["meta"] = state["meta"].replace('"fused_0"', '"fused_9"', 1).replace('"linear"', '"no_such_node"', 1)
    torch.save(state, path)
    with pytest.raises(ttm.EngineLoadError, match="does not match its split"):
        ttm.load(path)


def test_a_split_module_follows_its_models_weights() -> None:
    from .._support import require_rtx

    require_rtx()
    torch.manual_seed(1)
    model = NonZeroBetween().eval()
    fast = ttm.compile(model, torch.randn(4, 8), cache=False)
    with torch.no_grad():
        model.a[0].weight.add_(0.5)  # inside the engine
        model.b[4].bias.sub_(1.0)
    _check(fast, model, 3)


def test_torch_executed_ops_and_min_block_size_keep_parts_in_pytorch() -> None:
    torch.manual_seed(2)
    model = NonZeroBetween().eval()
    fast = ttm.compile(model, torch.randn(4, 8), cache=False, torch_executed_ops={torch.ops.aten.gelu})
    assert isinstance(fast, SegmentedModule)
    why = {op: s.why for s in fast.segments if s.kind == "pytorch" for op in s.ops}
    assert why["aten.gelu.default"] == "torch_executed_ops: aten.gelu"
    # What follows GELU is 4 ops (gt, linear, tanh, linear... minus the NonZero): under min_block_size.
    assert why["aten.tanh.default"].startswith("min_block_size: 4 op(s)")
    assert all("aten.gelu.default" not in s.ops for s in fast.engines)
    assert fast.engines and all(sum(s.ops.values()) >= 5 for s in fast.engines)
    _check(fast, model, 5)
    everything = ttm.compile(model, torch.randn(4, 8), cache=False, torch_executed_ops=["aten.gelu"],
                             min_block_size=100)
    assert isinstance(everything, SegmentedModule) and not everything.engines
    assert all("min_block_size" in s.why or "torch_executed_ops" in s.why or "NonZero" in s.why
               for s in everything.segments)
    _check(everything, model, 2)


def test_a_graph_with_no_engine_part_runs_whole_on_the_next_runtime() -> None:
    """The parser refuses NonZero in a graph too small for any engine (case #18's shape): the whole
    graph runs on ONNX Runtime here, as it did before graphs were split."""
    from harness.models import MaskedSelect

    from .._support import require_rtx

    require_rtx()
    fast = ttm.compile(MaskedSelect().eval(), torch.randn(2, 8), cache=False)
    assert isinstance(fast, ttm.TRTModule) and fast.backend == "onnxruntime"


@pytest.mark.parametrize("ops, said", [
    ("aten.no_such_op", "there is no ATen op 'aten.no_such_op'"),
    ("relu", "expected ATen ops such as torch.ops.aten.nonzero"),
])
def test_torch_executed_ops_names_the_bad_op(ops: str, said: str) -> None:
    with pytest.raises(ttm.SettingsError, match=said):
        ttm.compile(torch.nn.Linear(2, 2).eval(), torch.randn(1, 2), torch_executed_ops=ops)


def test_min_block_size_must_be_positive() -> None:
    with pytest.raises(ttm.SettingsError, match="option 'min_block_size' got 0; expected an int >= 1"):
        ttm.compile(torch.nn.Linear(2, 2).eval(), torch.randn(1, 2), min_block_size=0)


def test_explain_lists_each_part_and_why() -> None:
    from .._support import require_rtx

    require_rtx()
    report = ttm.explain(NonZeroBetween().eval(), torch.randn(4, 8))
    assert report.whole_graph and [s["kind"] for s in report.segments] == ["engine", "pytorch"]
    text = str(report)
    assert "split into 1 engine part(s) and 1 PyTorch part(s)" in text
    assert "engine fused_0: 12 ops" in text and "inputs ['flat_0: float32" in text
    assert "PyTorch: 1 ops (aten.nonzero.default 1): tensorrt_rtx's parser refuses ONNX NonZero" in text


def test_partition_split_never_captures_graph_breaks() -> None:
    with pytest.raises(ttm.ExportError, match="data-dependent control flow"):
        ttm.compile(ItemBranch().eval(), torch.randn(2, 8), cache=False, partition="split")


def test_the_cli_explains_a_split(tmp_path: Path) -> None:
    import subprocess
    import sys

    from .._support import REPO

    (tmp_path / "split_models.py").write_text(
        "from tests.partition.test_split import NonZeroBetween\n\ndef factory():\n    return NonZeroBetween()\n")
    done = subprocess.run([sys.executable, "-m", "torch_trt_module", "explain", "split_models:factory",
                           "--shapes", "x:1x8,4x8,32x8", "--torch-executed-ops", "aten.gelu,aten.tanh",
                           "--min-block-size", "2"], capture_output=True, text=True,
                          env={"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "PyTorch: 2 ops (aten.gelu.default 1, aten.tanh.default 1): torch_executed_ops" not in done.stdout
    assert "torch_executed_ops: aten.gelu" in done.stdout and "torch_executed_ops: aten.tanh" in done.stdout


def test_a_part_whose_build_fails_stays_in_pytorch_with_the_builder_s_whole_reason(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from torch_trt_module._pipeline import compile as _compile

    from .._support import require_rtx

    require_rtx()
    real = _compile.compile

    def refuse(model: torch.nn.Module, *args: object, **kwargs: object) -> object:
        if kwargs.get("partition") == "never":  # an engine part
            raise ttm.BuildError("tensorrt_rtx failed to build the engine:\n  [E] AveragePool: window 320 is larger "
                                 "than the maximum 256\n  [E] build aborted")
        return real(model, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_compile, "compile", refuse)
    torch.manual_seed(0)
    model = NonZeroBetween().eval()
    with caplog.at_level(logging.WARNING, logger="torch_trt_module"):
        fast = real(model, torch.randn(4, 8), cache=False)
    said = [r.getMessage() for r in caplog.records if r.name == "torch_trt_module._partition.split"]
    assert said == ["part fused_0 of NonZeroBetween runs in PyTorch: its build failed: tensorrt_rtx failed to build "
                    "the engine: [E] AveragePool: window 320 is larger than the maximum 256 [E] build aborted"]
    _check(fast, model, 3)  # no engine part left: the whole graph runs on the next runtime
