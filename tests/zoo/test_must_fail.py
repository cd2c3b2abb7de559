"""Cases #18 and #19 of ../shared/zoo/cases.md: models that cannot become a static engine run
correctly by default (partition="auto"), fail clearly with partition="never", and never give a
wrong result."""

from __future__ import annotations

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module._verify.compare import compare_outputs

from harness.models import ItemBranch, MaskedSelect, TensorBranch

from .._support import require_rtx


# --------------------------------------------------------------------------- #19

@pytest.mark.parametrize("module", [ItemBranch, TensorBranch], ids=["item", "python-branch"])
@pytest.mark.parametrize("entry", ["compile", "export_onnx"])
def test_data_dependent_control_flow_is_a_clear_export_error(module: type[torch.nn.Module], entry: str) -> None:
    x = torch.randn(2, 8)
    with pytest.raises(ttm.ExportError) as info:
        if entry == "compile":
            ttm.compile(module().eval(), x, cache=False, partition="never")
        else:
            ttm.export_onnx(module().eval(), x)
    message = str(info.value)
    assert "data-dependent control flow" in message
    # ...and it tells the user what to do about it.
    assert "Fix:" in message and ("torch.where" in message or "torch.cond" in message)


@pytest.mark.parametrize("module", [ItemBranch, TensorBranch], ids=["item", "python-branch"])
def test_data_dependent_control_flow_runs_through_graph_breaks_by_default(module: type[torch.nn.Module]) -> None:
    model = module().eval()
    fast = ttm.compile(model, torch.randn(2, 8), cache=False)
    assert isinstance(fast, ttm.PartitionedModule)
    for x in (torch.randn(3, 8), -torch.ones(2, 8), torch.ones(5, 8)):  # both branches, other batches
        with torch.no_grad():
            want = model(x)
        assert torch.allclose(fast(x), want, rtol=1e-5, atol=1e-6)
    assert fast.graphs >= 2 and "data-dependent control flow" in repr(fast)


# --------------------------------------------------------------------------- #18

# Different numbers of positives per input, including none and all of them.
_MASKED_INPUTS = {
    "random-3x8": lambda: torch.randn(3, 8, generator=torch.Generator().manual_seed(1)),
    "no-positives": lambda: -torch.ones(2, 8),
    "all-positive": lambda: torch.ones(4, 8),
    "one-row": lambda: torch.randn(1, 8, generator=torch.Generator().manual_seed(2)),
    "max-batch-mostly-zero": lambda: torch.zeros(32, 8).index_fill_(1, torch.tensor([3]), 1.5),
}


@pytest.fixture(scope="module")
def masked_onnxruntime(tmp_path_factory: pytest.TempPathFactory) -> ttm.TRTModule:
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    return ttm.compile(MaskedSelect().eval(), x, backend="onnxruntime",
                       cache_dir=tmp_path_factory.mktemp("masked"))


@pytest.mark.parametrize("which", list(_MASKED_INPUTS))
def test_data_dependent_output_shape_is_right_on_onnxruntime(masked_onnxruntime: ttm.TRTModule,
                                                              which: str) -> None:
    x = _MASKED_INPUTS[which]()
    got = masked_onnxruntime(x)
    expected = x[x > 0]
    assert got.shape == expected.shape  # never a buffer sized for another input
    report = compare_outputs(got, expected, rtol=0.0, atol=0.0)  # a selection must be exact
    assert report.passed, str(report)


def test_data_dependent_output_has_no_static_size_in_metadata(masked_onnxruntime: ttm.TRTModule) -> None:
    (out,) = masked_onnxruntime.engine.exported.outputs
    # The length is a data-dependent symbol, so no runtime may preallocate it from the profile.
    assert len(out.dims) == 1 and isinstance(out.dims[0], str)


def test_data_dependent_output_tensorrt_rtx_build() -> None:
    """What TensorRT-RTX 1.7.1 does with NonZero, asserted as it is.

    Its ONNX parser imports NonZero through a plugin that the RTX build does not ship,
    so the build fails. That is allowed by cases.md only as a clear BuildError that names
    the op; should a later RTX parse it, the build must yield an engine (the runtime
    adapter then binds the output through IOutputAllocator).
    """
    require_rtx()
    exported = ttm.export_onnx(MaskedSelect().eval(), torch.randn(2, 8))
    try:
        engine = ttm.build_engine(exported, backend="tensorrt_rtx")
    except ttm.BuildError as e:
        assert "NonZero" in str(e), f"the build error does not name the op:\n{e}"
        assert "Fix:" in str(e)
    else:
        assert engine.plan, "the build returned an empty engine"


def test_data_dependent_output_with_auto_backend_runs_by_default_and_raises_under_never() -> None:
    """backend="auto" here builds with TensorRT-RTX ahead of time, whose parser cannot take NonZero.

    By default (partition="auto") the graph runs without an engine (ONNX Runtime here), with a
    WARNING naming the op, and is right for every input; partition="never" raises, naming it.
    """
    require_rtx()
    import logging

    x = torch.randn(2, 8)
    with pytest.raises(ttm.BuildError, match="NonZero"):
        ttm.compile(MaskedSelect().eval(), x, backend="auto", cache=False, partition="never")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("torch_trt_module")
    logger.addHandler(handler)
    try:
        module = ttm.compile(MaskedSelect().eval(), x, backend="auto", cache=False)
    finally:
        logger.removeHandler(handler)
    assert any("NonZero" in r and "partition='auto'" in r for r in records), records
    assert module.backend == "onnxruntime" and module.engine is not None and module.engine.plan is None
    for make in _MASKED_INPUTS.values():
        t = make()
        assert torch.equal(module(t), t[t > 0])
