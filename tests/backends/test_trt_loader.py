"""torch_trt_module.backends._trt_loader: importing the TensorRT modules (a missing or stub module is
BackendUnavailable naming the extra to install), the logger bridge into ``logging``, capture_log
(one per thread, nested blocks pass their messages up) and deserialize's errors.

Never deserializes for real: TensorRT's runtime segfaults deserializing without a GPU. The runtime
is a strict double derived from the real class (tests/backends/trt_double.py) or a plain stand-in."""

from __future__ import annotations

import logging
import sys
import threading
import types
from typing import Any

import pytest
import torch

from torch_trt_module import BackendUnavailable, EngineLoadError
from torch_trt_module.backends import _trt_loader
from torch_trt_module.backends._trt_loader import (
    Captured,
    capture_log,
    deserialize,
    device_guard,
    import_runtime,
    import_tensorrt,
    logger,
)

from .._support import in_threads
from .trt_double import runtime_double

HINTS = {"tensorrt": "pip install 'torch_trt_module[tensorrt]' (tensorrt-cu12 or -cu13)",
         "tensorrt_rtx": "pip install 'torch_trt_module[rtx]' (tensorrt-rtx-cu13)",
         "tensorrt_lean": "pip install tensorrt-lean-cu13 (runs version-compatible TensorRT plans)"}


@pytest.fixture
def lean() -> Any:
    """The real tensorrt_lean module (in the 'test' extra): its ILogger and Runtime are real classes."""
    return pytest.importorskip("tensorrt_lean")


def missing(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError


# --------------------------------------------------------------------------- imports

def test_a_missing_builder_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    missing(monkeypatch, "tensorrt", "tensorrt_rtx")
    with pytest.raises(BackendUnavailable) as info:
        import_tensorrt("tensorrt_rtx")
    assert str(info.value).startswith("TensorRT is not importable here (tensorrt_rtx: ")  # then Python's ImportError
    assert str(info.value).endswith(f"); install it: {HINTS['tensorrt_rtx']}")
    with pytest.raises(BackendUnavailable) as info:
        import_tensorrt()  # either will do: both are named, with both extras
    msg = str(info.value)
    assert msg.startswith("TensorRT is not importable here (tensorrt: ") and "; tensorrt_rtx: " in msg
    assert msg.endswith(f"install it: {HINTS['tensorrt']} or {HINTS['tensorrt_rtx']}")


def test_a_stub_without_its_classes_is_not_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    # Wheels installed without their native libraries import, and lack the classes.
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(BackendUnavailable) as info:
        import_tensorrt("tensorrt")
    assert str(info.value) == ("TensorRT is not importable here (tensorrt: tensorrt imported but has no Builder (a stub "
                               f"without its libraries?)); install it: {HINTS['tensorrt']}")


def test_the_lean_runtime_runs_tensorrt_plans_where_full_tensorrt_is_missing(monkeypatch: pytest.MonkeyPatch,
                                                                           lean: Any) -> None:
    missing(monkeypatch, "tensorrt")
    assert import_runtime("tensorrt") == ("tensorrt_lean", lean)
    missing(monkeypatch, "tensorrt_lean")
    with pytest.raises(BackendUnavailable) as info:
        import_runtime("tensorrt")
    assert str(info.value).startswith("no runtime for tensorrt engines is importable here (tensorrt: ")
    assert str(info.value).endswith(f"install one: {HINTS['tensorrt']} or {HINTS['tensorrt_lean']}")


def test_rtx_plans_need_tensorrt_rtx(monkeypatch: pytest.MonkeyPatch) -> None:
    missing(monkeypatch, "tensorrt_rtx")
    with pytest.raises(BackendUnavailable) as info:
        import_runtime("tensorrt_rtx")
    assert str(info.value).endswith(f"; install one: {HINTS['tensorrt_rtx']}")


def test_the_lean_runtime_is_never_a_builder(lean: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not hasattr(lean, "Builder")
    with pytest.raises(BackendUnavailable, match=r"tensorrt_lean imported but has no Builder"):
        import_tensorrt("tensorrt_lean")


# --------------------------------------------------------------------------- the logger bridge

def test_one_bridge_per_module_even_when_threads_race(lean: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_trt_loader, "_bridges", {})
    got: list[Any] = []
    in_threads(lambda _: got.append(logger(lean)), 8)
    assert len(got) == 8 and all(b is got[0] for b in got)
    assert isinstance(got[0], lean.ILogger)  # a real ILogger subclass: TensorRT calls its log()


@pytest.mark.parametrize("severity,level", [("INTERNAL_ERROR", logging.CRITICAL), ("ERROR", logging.ERROR),
                                            ("WARNING", logging.WARNING), ("INFO", logging.DEBUG)])
def test_severities_map_to_logging_levels(lean: Any, caplog: pytest.LogCaptureFixture, severity: str,
                                          level: int) -> None:
    with caplog.at_level(logging.DEBUG, logger="torch_trt_module.tensorrt"):
        logger(lean).log(getattr(lean.ILogger.Severity, severity), f"a {severity} message")
    (record,) = [r for r in caplog.records if r.name == "torch_trt_module.tensorrt"]
    assert record.levelno == level and record.getMessage() == f"a {severity} message"


def test_verbose_messages_only_with_the_environment_variable(lean: Any, caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCH_TRT_MODULE_VERBOSE", raising=False)
    with caplog.at_level(logging.DEBUG, logger="torch_trt_module.tensorrt"):
        logger(lean).log(lean.ILogger.Severity.VERBOSE, "layer fusion details")
        assert "layer fusion details" not in caplog.text
        monkeypatch.setenv("TORCH_TRT_MODULE_VERBOSE", "1")
        logger(lean).log(lean.ILogger.Severity.VERBOSE, "layer fusion details")
    assert "layer fusion details" in caplog.text


# --------------------------------------------------------------------------- capture_log

def test_capture_log_keeps_errors_and_warnings_of_the_block(lean: Any) -> None:
    bridge, sev = logger(lean), lean.ILogger.Severity
    bridge.log(sev.ERROR, "before the block")
    with capture_log() as captured:
        assert captured.said() == "no error logged"
        bridge.log(sev.ERROR, "parse failed")
        bridge.log(sev.INTERNAL_ERROR, "assertion")
        bridge.log(sev.WARNING, "profile is odd")
        bridge.log(sev.INFO, "building")
    bridge.log(sev.ERROR, "after the block")
    assert captured.errors == ["parse failed", "assertion"] and captured.warnings == ["profile is odd"]
    assert captured.said() == "parse failed; assertion"


def test_capture_log_is_per_thread(lean: Any) -> None:
    bridge, sev = logger(lean), lean.ILogger.Severity
    start, done = threading.Barrier(4), threading.Barrier(4)
    results: dict[int, Captured] = {}

    def build(i: int) -> None:
        with capture_log() as captured:
            start.wait()  # every thread is inside its block before any logs
            for n in range(20):
                bridge.log(sev.ERROR, f"thread {i} error {n}")
            done.wait()  # and none leaves before all have logged
        results[i] = captured

    in_threads(build, 4)
    for i, captured in results.items():
        assert captured.errors == [f"thread {i} error {n}" for n in range(20)]
    assert len(results) == 4


def test_a_nested_block_passes_its_messages_to_the_outer_one(lean: Any) -> None:
    bridge, sev = logger(lean), lean.ILogger.Severity
    with capture_log() as outer:
        bridge.log(sev.ERROR, "outer 1")
        with capture_log() as inner:
            bridge.log(sev.ERROR, "inner")
            bridge.log(sev.WARNING, "inner warning")
        bridge.log(sev.ERROR, "outer 2")
    assert inner.errors == ["inner"] and inner.warnings == ["inner warning"]
    assert outer.errors == ["outer 1", "inner", "outer 2"] and outer.warnings == ["inner warning"]


def test_captured_keeps_the_last_twenty_of_each() -> None:
    captured = Captured()
    for n in range(30):
        captured.add(logging.ERROR, f"e{n}")
        captured.add(logging.WARNING, f"w{n}")
        captured.add(logging.DEBUG, f"d{n}")
    assert captured.errors == [f"e{n}" for n in range(10, 30)]
    assert captured.warnings == [f"w{n}" for n in range(10, 30)]


# --------------------------------------------------------------------------- deserialize (never for real)

def fake_module(monkeypatch: pytest.MonkeyPatch, trt: Any, runtime: Any, name: str = "tensorrt_lean") -> None:
    fake = types.SimpleNamespace(__name__=f"{name}_double", Runtime=runtime, ILogger=trt.ILogger)
    monkeypatch.setattr(_trt_loader, "import_runtime", lambda backend: (name, fake))


def test_deserialize_returns_the_engine_and_sets_host_code_as_given(lean: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    fake_module(monkeypatch, lean, runtime_double(lean, seen))
    assert deserialize(b"plan", backend="tensorrt") is not None
    assert deserialize(b"plan", backend="tensorrt", allow_host_code=True) is not None
    assert seen == [False, True]


def test_a_plan_the_runtime_refuses_says_why_and_what_to_do(lean: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_module(monkeypatch, lean, runtime_double(lean, [], refuse=(b"bad plan",)))
    with pytest.raises(EngineLoadError) as info:
        deserialize(b"bad plan", backend="tensorrt")
    assert str(info.value) == ("tensorrt_lean could not deserialize the engine (8 bytes): no error logged. Plans are "
                               "tied to the TensorRT version (and, for full TensorRT, the GPU) that built them: "
                               "rebuild it here, or load it where it was built")


def test_what_tensorrt_logs_while_refusing_is_in_the_error(lean: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    double = runtime_double(lean, [], refuse=(b"old",))

    class Logging(double):  # type: ignore[misc, valid-type]
        def deserialize_cuda_engine(self, serialized_engine: Any) -> Any:
            logger(lean).log(lean.ILogger.Severity.ERROR, "Serialization assertion: version tag mismatch")
            return super().deserialize_cuda_engine(serialized_engine)

    fake_module(monkeypatch, lean, Logging)
    with pytest.raises(EngineLoadError, match=r"\(3 bytes\): Serialization assertion: version tag mismatch\. Plans"):
        deserialize(b"old", backend="tensorrt")


def test_an_exception_from_the_runtime_is_an_engine_load_error(lean: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    double = runtime_double(lean, [])

    class Raising(double):  # type: ignore[misc, valid-type]
        def deserialize_cuda_engine(self, serialized_engine: Any) -> Any:
            raise TypeError("incompatible function arguments")

    fake_module(monkeypatch, lean, Raising, name="tensorrt_rtx")
    with pytest.raises(EngineLoadError) as info:
        deserialize(b"plan", backend="tensorrt_rtx")
    assert str(info.value) == "tensorrt_rtx could not deserialize the engine: incompatible function arguments"
    assert isinstance(info.value.__cause__, TypeError)


def test_a_runtime_that_cannot_be_created(lean: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_module(monkeypatch, lean, lambda trt_logger: None)  # what a failed pybind constructor gives
    with pytest.raises(EngineLoadError, match=r"^tensorrt_lean could not create a runtime: no error logged$"):
        deserialize(b"plan", backend="tensorrt")


def test_device_guard() -> None:
    for device in (None, "cpu", torch.device("cpu"), "meta"):
        guard = device_guard(device)
        with guard:  # a no-op context off CUDA
            pass
    assert isinstance(device_guard("cuda:1"), torch.cuda.device)  # entered only on a GPU
    assert device_guard(torch.device("cuda", 1)).idx == 1
