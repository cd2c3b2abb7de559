"""The real TensorRT 11.4 lean runtime (``tensorrt_lean``) on a GPU: runtime creation, engines
that cannot load, and the binding objects' attribute rules. No builder exists in this
workplace to make a plan the lean runtime would load, so what runs here is the loading path
up to TensorRT's own refusal, with TensorRT's own messages.

Run on the lent GPU machine with the lean wheels carried (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module.backends._trt_loader import deserialize, import_runtime, logger

pytestmark = pytest.mark.gpu
lean = pytest.importorskip("tensorrt_lean", reason="the TensorRT lean runtime (tensorrt-lean-cu13) is not installed")

DATA = Path(__file__).parent.parent / "data"


def test_the_lean_runtime_is_what_runs_tensorrt_plans_without_full_tensorrt() -> None:
    name, trt = import_runtime("tensorrt")
    try:
        import tensorrt  # noqa: F401
        assert name == "tensorrt"
    except ImportError:
        assert name == "tensorrt_lean" and trt is lean


def test_runtime_creation_and_attribute_rules() -> None:
    runtime = lean.Runtime(logger(lean))
    assert runtime is not None
    assert runtime.engine_host_code_allowed is False
    runtime.engine_host_code_allowed = False  # a real writable property
    with pytest.raises(AttributeError):
        runtime._torch_trt_module_runtime = object()  # pybind11 objects refuse new attributes
    with pytest.raises(AttributeError):
        runtime.num_bindings  # noqa: B018 - the TensorRT 8 API


@pytest.mark.parametrize("what", ["corrupt", "rtx"])
def test_a_plan_the_runtime_cannot_load_is_an_engine_load_error_with_tensorrt_s_message(what: str) -> None:
    plan = b"\x00garbage plan\x01" * 64 if what == "corrupt" else (DATA / "rtx_linear_sm86.plan").read_bytes()
    with pytest.raises(ttm.EngineLoadError) as e:
        deserialize(plan, backend="tensorrt", device="cuda")
    message = str(e.value)
    assert "tensorrt_lean could not deserialize the engine" in message or "tensorrt could not" in message
    assert "magicTag" in message or "Serialization" in message, message  # TensorRT's own words


def test_deserialize_runs_on_the_module_s_device() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.cuda.set_device(0)
    with pytest.raises(ttm.EngineLoadError):
        deserialize(b"bad" * 100, backend="tensorrt", device="cuda:1")
    assert torch.cuda.current_device() == 0  # the guard restored the current device
