"""torch_trt_module._core.quiet and the console (issue 20, item 14): compile() and explain() leave torch's FX
dumps and "Unable to find user code" lines, TensorRT-RTX's parser lines and ONNX Runtime's error log
off the user's stderr. What torch writes goes to DEBUG; the user's logging configuration is untouched."""

from __future__ import annotations

import logging
import re
import sys
import threading

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module._core.quiet import quiet_torch

NOISE = ("Unable to find user code", "def forward(", "ModelImporter.cpp", "[E:onnxruntime", "sequential_executor")


def assert_clean(err: str) -> None:
    found = [n for n in NOISE if n in err]
    assert not found, f"{found} on stderr:\n{err[:2000]}"


def test_quiet_torch_routes_this_thread_s_stderr_to_debug(caplog: pytest.LogCaptureFixture,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    original = sys.stderr
    other: list[None] = []

    def elsewhere() -> None:
        print("another thread's line", file=sys.stderr)
        other.append(None)

    with caplog.at_level(logging.DEBUG, logger="torch_trt_module._core.quiet"):
        with quiet_torch("a step"):
            print("torch's dump", file=sys.stderr)
            with quiet_torch("a nested step"):
                print("more of it", file=sys.stderr)
            thread = threading.Thread(target=elsewhere)
            thread.start()
            thread.join()
    assert sys.stderr is original and other
    err = capsys.readouterr().err
    assert "another thread's line" in err and "torch's dump" not in err and "more of it" not in err
    assert [r.getMessage() for r in caplog.records] == [
        "a step wrote to stderr (kept off the console):\ntorch's dump\nmore of it"]


def test_quiet_torch_restores_stderr_after_an_error() -> None:
    original = sys.stderr
    with pytest.raises(ValueError):
        with quiet_torch("a step"):
            raise ValueError("boom")
    assert sys.stderr is original


class Branches(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.l(x)
        if y.sum() > 0:  # data-dependent: torch.export prints its partial FX graph on stderr
            return y * 2
        return y


def test_compile_and_explain_keep_torch_s_dumps_off_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    levels = {name: logging.getLogger(name).level for name in ("torch", "torch.fx.experimental.symbolic_shapes")}
    model = Branches().eval()
    fast = ttm.compile(model, torch.randn(4, 8), backend="onnxruntime")
    assert isinstance(fast, ttm.PartitionedModule)
    report = ttm.explain(model, torch.randn(4, 8))
    assert not report.whole_graph
    assert_clean(capfd.readouterr().err)
    assert {name: logging.getLogger(name).level for name in levels} == levels


def test_an_onnxruntime_failure_is_said_once_by_the_exception(capfd: pytest.CaptureFixture[str]) -> None:
    # ORT printed its error log on stderr, twice (the planned call, then the retry), besides the exception.
    embed = torch.nn.Embedding(10, 4).eval()
    fast = ttm.compile(embed, torch.tensor([[1, 2, 3]]), backend="onnxruntime")
    fast(torch.tensor([[1, 2, 3]]))  # plans the call for this shape
    with pytest.raises(ttm.RuntimeFailure, match="indices element out of data bounds, idx=30"):
        fast(torch.tensor([[1, 2, 30]]))
    assert_clean(capfd.readouterr().err)


class Folds(torch.nn.Module):
    """Col2Im, which TensorRT-RTX's parser refuses, between ops it takes."""

    def __init__(self) -> None:
        super().__init__()
        self.l = torch.nn.Linear(9, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.l(x)) * 2 + 1
        return torch.nn.functional.fold(y, (4, 4), (2, 2)) * 3 - 1


def test_the_rtx_parser_s_refusal_is_not_logged_as_errors(rtx_required: None, caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    # It logged "ModelImporter.cpp:140: While parsing node number 0 [Col2Im ...]" lines at ERROR (on the
    # console where logging is not configured); the BuildError carries the parser's errors, and under
    # partition='auto' one WARNING says what follows. The lines stay at DEBUG.
    with caplog.at_level(logging.DEBUG, logger="torch_trt_module"):
        with pytest.raises(ttm.BuildError, match="tensorrt_rtx's ONNX parser rejected the graph:\n  node 6 "):
            ttm.compile(Folds().eval(), torch.randn(2, 12, 9), partition="never")
    parser_lines = [r for r in caplog.records if "ModelImporter.cpp" in r.getMessage()]
    assert parser_lines and all(r.levelno == logging.DEBUG for r in parser_lines)


def test_explain_shows_sizes_not_torch_s_symbols(rtx_required: None, capfd: pytest.CaptureFixture[str]) -> None:
    report = ttm.explain(Folds().eval(), torch.randn(2, 12, 9), min_block_size=1)
    engines = [s for s in report.segments if s["kind"] == "engine"]
    assert engines and engines[0]["inputs"] == ["flat_0: float32 (1..32, 12, 9)"]
    assert not re.search(r"\bs\d+\b", str(report))  # no s39
    assert_clean(capfd.readouterr().err)
