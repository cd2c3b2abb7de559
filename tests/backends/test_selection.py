"""Backend selection and the runtime chain (backends/__init__.py), with the GPU and the runtimes
faked where this CPU machine has none: each branch of the chain, forced runtimes, the reason
strings, and a TensorRT plan a runtime refuses at load time moving the chain on."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module import backends
from torch_trt_module.backends import choose_runtime

CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the fake GPU machine has: whether a plan can run, and whether ORT has a CUDA provider."""
    state: dict[str, Any] = {"plan": "no tensorrt runtime is importable here", "ort_cuda": False}
    monkeypatch.setattr(backends, "can_run_plan", lambda backend, meta, device: state["plan"])
    monkeypatch.setattr(backends, "ort_cuda_available", lambda: state["ort_cuda"])
    return state


def test_on_the_cpu_onnx_runtime_runs(gpu: dict[str, Any]) -> None:
    choice = choose_runtime("tensorrt_rtx", {}, "cpu", has_plan=True, has_program=True)
    assert (choice.runtime, choice.reason) == ("onnxruntime", "the module lives on the CPU")


def test_a_plan_that_can_run_comes_first(gpu: dict[str, Any]) -> None:
    gpu.update(plan=None, ort_cuda=True)
    choice = choose_runtime("tensorrt", {}, CUDA, has_plan=True, has_program=True)
    assert choice.runtime == "tensorrt" and "runs the engine on this GPU" in choice.reason


def test_then_onnx_runtime_s_cuda_provider(gpu: dict[str, Any]) -> None:
    gpu.update(ort_cuda=True)
    choice = choose_runtime("tensorrt_rtx", {}, CUDA, has_plan=True, has_program=True)
    assert choice.runtime == "onnxruntime" and "CUDA provider runs the graph on the GPU" in choice.reason


def test_then_the_pytorch_program(gpu: dict[str, Any]) -> None:
    choice = choose_runtime("tensorrt_rtx", {}, CUDA, has_plan=True, has_program=True)
    assert choice.runtime == "torch"
    assert choice.reason.startswith("no tensorrt runtime is importable here, and onnxruntime has no CUDA provider")


def test_onnx_runtime_on_the_cpu_is_the_last_resort_and_says_it_is_slow(gpu: dict[str, Any]) -> None:
    choice = choose_runtime("tensorrt_rtx", {}, CUDA, has_plan=True, has_program=False)
    assert choice.runtime == "onnxruntime"
    assert "copied to the host and back: slow" in choice.reason and "pip install onnxruntime-gpu" in choice.reason


@pytest.mark.parametrize("runtime,has_program,message", [
    ("tensorrt", True, "runtime='tensorrt' cannot run this engine here: it was built with tensorrt_rtx"),
    ("tensorrt_rtx", True, "runtime='tensorrt_rtx' cannot run this engine here: no tensorrt runtime"),
    ("torch", False, "runtime='torch' needs the PyTorch program"),
])
def test_a_forced_runtime_that_cannot_run_says_why_and_how_to_fix_it(gpu: dict[str, Any], runtime: str,
                                                                    has_program: bool, message: str) -> None:
    with pytest.raises(ttm.BackendUnavailable, match=message) as e:
        choose_runtime("tensorrt_rtx", {}, CUDA, has_plan=True, has_program=has_program, runtime=runtime)
    assert "Fix:" in str(e.value)


def test_forced_runtimes_that_can_run(gpu: dict[str, Any]) -> None:
    for runtime in ("torch", "onnxruntime"):
        assert choose_runtime("tensorrt_rtx", {}, CUDA, has_plan=True, has_program=True,
                              runtime=runtime).runtime == runtime
    gpu.update(plan=None)
    assert choose_runtime("tensorrt_rtx", {}, CUDA, has_plan=True, has_program=True,
                          runtime="tensorrt_rtx").runtime == "tensorrt_rtx"


def test_an_unknown_runtime_is_a_settings_error() -> None:
    with pytest.raises(ttm.SettingsError, match="option 'runtime' got 'tensorrt-llm'; expected one of 'auto'"):
        ttm.compile(torch.nn.Linear(2, 2).eval(), torch.randn(1, 2), runtime="tensorrt-llm")


def test_a_plan_the_runtime_refuses_at_load_moves_the_chain_on(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    # The lean runtime loads only version-compatible plans: any other plan is refused at load time,
    # and the module must still run (on the next runtime of the chain), with a WARNING saying why.
    model = torch.nn.Linear(4, 2).eval()
    engine = ttm.compile(model, torch.randn(2, 4), exporter="torchscript", cache=False).engine
    assert engine is not None and not engine.has_program  # so the chain's next runtime is ONNX Runtime
    fake = ttm.Engine("tensorrt", b"not a plan", engine.onnx, {**engine.meta, "backend": "tensorrt"})

    def refuse(engine: Any, device: Any, allow_host_code: bool) -> Any:
        raise ttm.EngineLoadError("tensorrt_lean could not deserialize the engine (10 bytes): Serialization assertion")

    monkeypatch.setattr(backends, "can_run_plan", lambda backend, meta, device: None)  # a fake GPU that could
    monkeypatch.setattr(backends, "_tensorrt_runner", refuse)
    monkeypatch.setattr(backends, "ort_cuda_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="torch_trt_module"):
        runner, reason = backends.make_runner(fake, CUDA)
    assert runner.backend == "onnxruntime" and "copied to the host and back" in reason
    assert "tensorrt could not load the engine here (tensorrt_lean could not deserialize" in caplog.text
    with pytest.raises(ttm.EngineLoadError, match="Serialization assertion"):
        backends.make_runner(fake, CUDA, runtime="tensorrt")  # forced: the refusal is the error


def test_the_gpu_is_resolved_once_and_carried_by_the_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """select_backend looks the GPU up once; the key, the fleet's grouping and the build read it
    from the choice (issue 22: one compile() resolved the GPU identity six times)."""
    import torch_trt_module.backends as backends

    calls: list[object] = []
    ident = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "sm_count": 132, "total_memory": 1}
    monkeypatch.setattr(backends.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "gpu_identity", lambda device: calls.append(device) or ident)
    monkeypatch.setattr(backends, "_importable", lambda name, runtime=False: name == "tensorrt")
    choice = backends.select_backend("auto", "cuda", to_run=False)
    assert (choice.build, choice.gpu, len(calls)) == ("tensorrt", ident, 1)
    assert choice == backends.BackendChoice("tensorrt", "none", choice.reason, dict(ident))
    assert choice != backends.BackendChoice("tensorrt", "none", choice.reason, {**ident, "sm_count": 114})
    hash(choice)  # usable as a key, the GPU's dict notwithstanding
