"""GPU acceptance (issues 11, 12, 13): what a user does on a CUDA GPU that has no TensorRT
runtime and no onnxruntime-gpu (the lent H200): compile real models with CUDA inputs and
check them against eager with PyTorch's default numerics (TF32 for cuDNN convolutions).

Every test records what ran (the runtime the chain chose, its reason, compile time, the error
against eager) and, with ``TTM_ACCEPTANCE_OUT=<dir>``, the session writes
``gpu-acceptance-<gpu>.json`` and ``.md`` there (benchmarks/results/ keeps the lent machine's).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from torch import nn

import torch_trt_module as ttm
from torch_trt_module._verify.compare import compare_outputs
from torch_trt_module._core.numerics import eager_uses_tf32, policy_for

pytestmark = pytest.mark.gpu
torchvision = pytest.importorskip("torchvision")

ROWS: list[dict[str, Any]] = []


def _policy(precision: str = "fp32") -> Any:
    """The tolerance for a compiled fp32/fp16/bf16 module against eager as a user runs it (TF32
    convolutions where PyTorch's defaults use them)."""
    if precision == "fp32" and eager_uses_tf32("cuda"):
        return policy_for("tf32")
    return policy_for(precision)


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    out = os.environ.get("TTM_ACCEPTANCE_OUT")
    if not out or not ROWS or not torch.cuda.is_available():
        return
    gpu = torch.cuda.get_device_name(0)
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    info = {"gpu": gpu, "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "cuda": torch.version.cuda}
    (path / f"gpu-acceptance-{slug}.json").write_text(json.dumps({"machine": info, "rows": ROWS}, indent=1))
    lines = [f"GPU acceptance on {gpu} ({info['gpus']} GPU(s)), torch {info['torch']}, {info['date']}: "
             "`TTM_ACCEPTANCE_OUT=... python -m pytest tests/gpu/test_acceptance.py`.", "",
             "| check | runtime | compile s | max abs err | numerics | passed |", "| --- | --- | --- | --- | --- | --- |"]
    for r in ROWS:
        err = "" if r.get("max_abs") is None else f"{r['max_abs']:.1e}"
        lines.append(f"| {r['check']} | {r.get('runtime', '')} | {r.get('compile_s', 0):.1f} | {err} | "
                     f"{r.get('numerics', '')} | {r['passed']} |")
    (path / f"gpu-acceptance-{slug}.md").write_text("\n".join(lines) + "\n")


def _record(check: str, fast: ttm.TRTModule | None, compile_s: float, report: Any = None, **extra: Any) -> None:
    row: dict[str, Any] = {"check": check, "compile_s": compile_s, "passed": True, **extra}
    if fast is not None:
        row.update(runtime=fast.backend, reason=fast.runtime_reason)
    if report is not None:
        row.update(max_abs=max(o.max_abs for o in report.outputs), numerics=report.numerics, passed=report.passed)
    ROWS.append(row)


def _compile(model: nn.Module, example: Any, **options: Any) -> tuple[ttm.TRTModule, float]:
    t = time.perf_counter()
    fast = ttm.compile(model, example, cache=False, **options)
    return fast, time.perf_counter() - t


def _vision(make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return make().eval().cuda()


VISION = {
    "resnet18": (lambda: torchvision.models.resnet18(), 224, None),
    "resnet50": (lambda: torchvision.models.resnet50(), 224, {"x": {0: (1, 4, 8)}}),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(), 224, None),
    "vit_b_16": (lambda: torchvision.models.vit_b_16(), 224, {"x": {0: (1, 2, 4)}}),
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(), 224, {"x": {0: (1, 4, 8)}}),
}


@pytest.mark.parametrize("name", list(VISION))
def test_vision_models_on_the_chain_match_eager(name: str) -> None:
    make, size, dynamic = VISION[name]
    model = _vision(make)
    fast, took = _compile(model, torch.randn(4, 3, size, size, device="cuda"), dynamic=dynamic or "batch")
    x = torch.randn(3, 3, size, size, device="cuda")
    out = fast(x)
    assert out.device == x.device
    report = ttm.assert_parity(model, fast, x)
    _record(f"{name} (CUDA example, batch 3)", fast, took, report)
    # no TensorRT runtime and no onnxruntime-gpu on this machine: the chain's PyTorch runtime
    assert fast.backend in ("torch", "tensorrt", "tensorrt_rtx", "onnxruntime")
    if fast.backend == "torch":
        assert "PyTorch runs the program captured at compile time" in fast.runtime_reason


def test_resnet18_lazily_on_cuda() -> None:
    model = _vision(torchvision.models.resnet18)
    t = time.perf_counter()
    fast = ttm.compile(model, cache=False)
    x = torch.randn(8, 3, 224, 224, device="cuda")
    fast(x)
    took = time.perf_counter() - t
    report = ttm.assert_parity(model, fast, x)
    _record("resnet18 lazy (first call builds)", fast, took, report)


def test_hf_bert_with_a_padding_mask() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128)
    model = transformers.BertModel(config).eval().cuda()

    def call(batch: int) -> tuple[tuple[()], dict[str, torch.Tensor]]:
        ids = torch.randint(0, 1000, (batch, 128), device="cuda")
        mask = torch.ones(batch, 128, dtype=torch.int64, device="cuda")
        mask[:, 96:] = 0
        return (), {"input_ids": ids, "attention_mask": mask}

    fast, took = _compile(model, call(4))
    _, kw = call(3)
    with torch.inference_mode():
        want = model(**kw)
    got = fast(**kw)
    report = compare_outputs(got, want, tolerance=_policy())
    assert report.passed, report
    _record("HF BERT, attention mask with padding", fast, took, report)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_on_the_pytorch_runtime(precision: str) -> None:
    model = _vision(torchvision.models.resnet18)
    fast, took = _compile(model, torch.randn(4, 3, 224, 224, device="cuda"), precision=precision)
    x = torch.randn(4, 3, 224, 224, device="cuda")
    out = fast(x)
    assert out.dtype == torch.float32  # eager's dtype at the boundary
    with torch.inference_mode():
        want = model(x)
    report = compare_outputs(out, want, tolerance=_policy(precision))
    assert report.passed, report
    _record(f"resnet18 {precision}", fast, took, report)


def test_cuda_graphs_replay_new_inputs_correctly() -> None:
    model = _vision(torchvision.models.resnet18)
    fast, took = _compile(model, torch.randn(1, 3, 224, 224, device="cuda"), cuda_graphs=True)
    worst = 0.0
    for _ in range(3):  # each replay reads the new input, not the captured one
        x = torch.randn(1, 3, 224, 224, device="cuda")
        out = fast(x)
        with torch.inference_mode():
            report = compare_outputs(out, model(x), tolerance=_policy())
        assert report.passed, report
        worst = max(worst, report.outputs[0].max_abs)
    _record("resnet18 cuda_graphs=True, batch 1, 3 new inputs", fast, took, report)


def test_a_non_default_stream_and_inputs_made_on_another_stream() -> None:
    model = _vision(torchvision.models.resnet18)
    fast, took = _compile(model, torch.randn(2, 3, 224, 224, device="cuda"))
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(producer):
        x = torch.randn(4, 3, 224, 224, device="cuda") * 2.0
    with torch.cuda.stream(consumer):
        consumer.wait_stream(producer)  # what the caller owes: order the input before the call
        out = fast(x)
    consumer.synchronize()
    with torch.inference_mode():
        report = compare_outputs(out, model(x), tolerance=_policy())
    assert report.passed, report
    _record("resnet18 on a side stream, input from another stream", fast, took, report)


def test_wrong_device_inputs_are_refused_with_the_fix() -> None:
    model = _vision(torchvision.models.resnet18)
    fast, took = _compile(model, torch.randn(2, 3, 64, 64, device="cuda"), dynamic=None)
    with pytest.raises(ttm.InputError, match=r"input 'x' is on cpu but this module runs on cuda:0; move it"):
        fast(torch.randn(2, 3, 64, 64))
    _record("wrong-device input refused", fast, took)


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_each_runtime_of_the_chain_against_eager(runtime: str) -> None:
    model = _vision(torchvision.models.resnet18)
    fast, took = _compile(model, torch.randn(2, 3, 224, 224, device="cuda"), runtime=runtime)
    assert fast.backend == runtime
    x = torch.randn(2, 3, 224, 224, device="cuda")
    assert fast(x).device == x.device
    report = ttm.assert_parity(model, fast, x)
    _record(f"resnet18 runtime={runtime!r}", fast, took, report)


def test_saved_on_one_runtime_loaded_and_run_on_another(tmp_path: Path) -> None:
    model = _vision(torchvision.models.resnet18)
    cpu_model = torchvision.models.resnet18().eval()
    cpu_model.load_state_dict(model.state_dict())
    saved, took = _compile(cpu_model, torch.randn(2, 3, 224, 224))  # compiled on the CPU: ONNX Runtime
    assert saved.backend == "onnxruntime"
    ttm.save(saved, tmp_path / "m.pt")
    loaded = ttm.load(tmp_path / "m.pt", device="cuda")  # a CUDA module here: the PyTorch runtime
    x = torch.randn(3, 3, 224, 224, device="cuda")
    report = ttm.assert_parity(model, loaded, x)
    _record("saved on onnxruntime (CPU), loaded on cuda", loaded, took, report)
    again = ttm.TRTModule(runtime="onnxruntime")
    again.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    report = ttm.assert_parity(cpu_model, again, x.cpu())
    _record("... and loaded again on onnxruntime", again, 0.0, report)


def test_weights_followed_on_the_gpu() -> None:
    model = _vision(torchvision.models.resnet18)
    fast, took = _compile(model, torch.randn(2, 3, 224, 224, device="cuda"))
    x = torch.randn(2, 3, 224, 224, device="cuda")
    fast(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        report = ttm.assert_parity(model, fast, x)
    assert fast.weights_version == 3
    _record("resnet18 follows 3 SGD steps on the GPU", fast, took, report)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_module_moves_to_the_second_gpu() -> None:
    model = _vision(torchvision.models.resnet18)
    fast, took = _compile(model, torch.randn(2, 3, 224, 224, device="cuda"))
    moved = fast.to("cuda:1")
    x = torch.randn(2, 3, 224, 224, device="cuda:1")
    out = moved(x)
    assert out.device == x.device
    with torch.inference_mode():
        report = compare_outputs(out.cuda(0), model(x.cuda(0)), tolerance=_policy())
    assert report.passed, report
    assert torch.cuda.current_device() == 0  # the call did not change the caller's device
    _record("resnet18 moved with .to('cuda:1')", moved, took, report)


def test_the_torch_compile_backend_on_the_gpu() -> None:
    from torch_trt_module._dynamo import backend

    model = _vision(torchvision.models.resnet18)
    t = time.perf_counter()
    fast = torch.compile(model, backend=backend)  # the entry point needs the installed package; same function
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        out = fast(x)
        want = model(x)
    took = time.perf_counter() - t
    report = compare_outputs(out, want, tolerance=_policy())
    assert report.passed, report
    _record("torch.compile(resnet18, backend=torch_trt_module)", None, took, report)


def test_a_data_dependent_branch_runs_through_graph_breaks_on_the_gpu() -> None:
    from harness.models import ItemBranch

    model = ItemBranch().eval().cuda()
    fast, took = _compile(model, torch.randn(2, 8, device="cuda"))
    assert isinstance(fast, ttm.PartitionedModule)
    for x in (torch.randn(3, 8, device="cuda"), -torch.ones(2, 8, device="cuda"), torch.ones(5, 8, device="cuda")):
        with torch.no_grad():
            assert torch.allclose(fast(x), model(x))
    _record("case #19 (an .item() branch) under partition='auto'", None, took, runtime="torch.compile graphs")


def test_a_split_graph_runs_on_the_gpu_and_saves() -> None:
    """torch_executed_ops keeps GELU in PyTorch; the rest of the graph runs as engine parts on the GPU."""
    from torch_trt_module._partition.split import SegmentedModule

    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64),
                                torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.ReLU()).eval().cuda()
    fast, took = _compile(model, torch.randn(8, 64, device="cuda"), torch_executed_ops={"aten.gelu"},
                          min_block_size=3)
    assert isinstance(fast, SegmentedModule) and len(fast.engines) == 2
    x = torch.randn(5, 64, device="cuda")
    with torch.no_grad():
        report = compare_outputs(fast(x), model(x), tolerance=_policy())
    assert report.passed, report
    with tempfile.TemporaryDirectory() as d:
        ttm.save(fast, f"{d}/split.pt")
        loaded = ttm.load(f"{d}/split.pt", device="cuda")
    with torch.no_grad():
        assert compare_outputs(loaded(x), model(x), tolerance=_policy()).passed
    _record("MLP split by torch_executed_ops={aten.gelu}", None, took, report, runtime="2 engine parts + PyTorch")
