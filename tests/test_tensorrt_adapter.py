"""The TensorRT runtime adapter, driven through a test double of the execution
context (tests/trt_double.py says why a double), plus a check that every
TensorRT attribute the adapter touches exists on the real tensorrt_rtx classes.

What this does NOT show: that a TensorRT engine executes correctly. No machine
here can run one; the GPU tests at the bottom run only where one can.
"""

from __future__ import annotations

import threading

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module._compare import compare_outputs
from torch_trt_module._module import TRTModule
from torch_trt_module.backends._tensorrt import TensorRTRunner

from .trt_double import FakeContext, FakeEngine, Recorder

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx supplies the real enums and classes")


class ConvTuple(torch.nn.Module):  # cases.md #9
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.conv(x) * 0.5
        return c, torch.relu(c)


class Masked(torch.nn.Module):  # cases.md #18: a data-dependent output shape
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[x > 0]


def _module_with_double(model: torch.nn.Module, example: torch.Tensor, dynamic: object = "batch",
                        dds: tuple[str, ...] = (), log: set[str] | None = None) -> tuple[TRTModule, FakeEngine]:
    engine = ttm.compile(model, example, dynamic=dynamic, backend="onnxruntime", cache=False).engine
    assert engine is not None
    ex = engine.exported
    fake = FakeEngine(trt, engine.onnx, ex.inputs, ex.outputs, dds_outputs=dds)
    target = Recorder(fake, log) if log is not None else fake
    runner = TensorRTRunner(target, ex.inputs, ex.outputs, "cpu", trt=trt, backend="tensorrt_rtx",
                            stream=lambda: 0)
    module = TRTModule(engine)
    module._runner = runner  # the seam: swap ONNX Runtime for the adapter over the double
    return module, fake


def test_adapter_matches_eager_at_min_max_and_off_opt_shapes() -> None:
    model = ConvTuple().eval()
    module, fake = _module_with_double(model, torch.randn(4, 3, 32, 32),
                                       dynamic={"x": {0: (1, 4, 8), 2: (16, 32, 64), 3: (16, 32, 64)}})
    assert module.backend == "tensorrt_rtx"
    for shape in [(1, 3, 16, 16), (8, 3, 64, 64), (6, 3, 40, 24)]:
        x = torch.randn(shape)
        report = compare_outputs(module(x), model(x), rtol=1e-3, atol=1e-5)
        assert report.passed, str(report)
    assert len(fake.contexts) == 1


def test_set_input_shape_only_when_the_shape_changes() -> None:
    model = ConvTuple().eval()
    module, fake = _module_with_double(model, torch.randn(2, 3, 16, 16))
    for _ in range(3):
        module(torch.randn(2, 3, 16, 16))
    module(torch.randn(3, 3, 16, 16))
    assert fake.contexts[0].set_shape_calls == 2


def test_non_contiguous_and_channels_last_inputs_are_bound_correctly() -> None:
    model = ConvTuple().eval()
    module, _ = _module_with_double(model, torch.randn(2, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    y = torch.randn(2, 3, 16, 32)[..., ::2]  # a strided view: its data_ptr is not a dense tensor
    for inp in (x, y):
        assert compare_outputs(module(inp), model(inp)).passed


def test_rejected_shape_raises_with_the_profile() -> None:
    model = ConvTuple().eval()
    module, _ = _module_with_double(model, torch.randn(2, 3, 16, 16))
    runner = module._runner
    # Straight to the runner, past the module's own check: the adapter must not ignore the bool.
    with pytest.raises(ttm.InputError, match=r"TensorRT rejected shape \(64, 3, 16, 16\) for input 'x'.*1\.\.32"):
        runner.run([torch.randn(64, 3, 16, 16)])


def test_failed_execute_raises_instead_of_returning_garbage() -> None:
    model = ConvTuple().eval()
    module, fake = _module_with_double(model, torch.randn(2, 3, 16, 16))
    fake.fail_execute = True
    with pytest.raises(ttm.RuntimeFailure, match="execute_async_v3 failed for input shapes x=\\(2, 3, 16, 16\\)"):
        module(torch.randn(2, 3, 16, 16))


def test_empty_tensors_never_bind_a_null_pointer() -> None:
    model = torch.nn.Linear(4, 3).eval()
    module, _ = _module_with_double(model, torch.randn(2, 4), dynamic={"input": {0: (0, 2, 8)}})
    out = module(torch.randn(0, 4))  # the double returns False for a null address
    assert out.shape == (0, 3)


def test_data_dependent_output_goes_through_the_output_allocator() -> None:
    model = Masked().eval()
    module, fake = _module_with_double(model, torch.randn(4, 8), dds=("output",))
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(5, 8)
        got = module(x)
        assert torch.equal(got, model(x)), f"seed {seed}"
    assert "output" in fake.contexts[0].allocators


def test_one_execution_context_per_thread() -> None:
    model = ConvTuple().eval()
    module, fake = _module_with_double(model, torch.randn(2, 3, 16, 16))
    errors: list[str] = []

    def work(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for _ in range(20):
            x = torch.randn(1 + seed % 4, 3, 16, 16, generator=g)
            if not compare_outputs(module(x), model(x)).passed:
                errors.append(f"thread {seed}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(fake.contexts) == 8
    assert all(len(c.threads) == 1 for c in fake.contexts)


def test_every_attribute_the_adapter_uses_exists_on_real_tensorrt_rtx() -> None:
    used: set[str] = set()
    model = Masked().eval()
    module, _ = _module_with_double(model, torch.randn(4, 8), dds=("output",), log=used)
    module(torch.randn(3, 8))
    engine_api = {n for n in dir(trt.ICudaEngine)}
    context_api = {n for n in dir(trt.IExecutionContext)}
    missing = sorted(n for n in used if n not in engine_api and n not in context_api)
    assert missing == [], f"adapter uses attributes missing from tensorrt_rtx: {missing}"
    for must in ("set_input_shape", "set_tensor_address", "infer_shapes", "execute_async_v3",
                 "get_tensor_shape", "set_output_allocator", "create_execution_context"):
        assert must in used


def test_the_double_only_defines_methods_the_real_classes_have() -> None:
    for fake, real in ((FakeEngine, trt.ICudaEngine), (FakeContext, trt.IExecutionContext)):
        public = {n for n in vars(fake) if not n.startswith("_")}
        assert public <= set(dir(real)), sorted(public - set(dir(real)))


def test_runtime_builder_and_allocator_api_exist_on_real_tensorrt_rtx() -> None:
    # deserialize(), build_serialized() and _Allocator use these; the build path runs for real
    # elsewhere, deserialization needs a GPU, so its names are checked here.
    assert hasattr(trt.Runtime, "deserialize_cuda_engine")
    assert hasattr(trt.Runtime, "engine_host_code_allowed")
    for name in ("TensorIOMode", "TensorLocation", "TensorFormat", "IOutputAllocator", "IProgressMonitor",
                 "ILogger", "OnnxParser", "MemoryPoolType", "ComputeCapability"):
        assert hasattr(trt, name), name
    for name in ("set_memory_pool_limit", "builder_optimization_level", "add_optimization_profile",
                 "num_compute_capabilities", "set_compute_capability", "progress_monitor", "clear_flag"):
        assert hasattr(trt.IBuilderConfig, name), name


@pytest.mark.gpu
@pytest.mark.trt_runtime
def test_real_engine_on_gpu_matches_eager() -> None:
    model = ConvTuple().eval().cuda()
    module = ttm.compile(model, torch.randn(4, 3, 32, 32, device="cuda"), cache=False)
    assert module.backend in ("tensorrt", "tensorrt_rtx")
    x = torch.randn(6, 3, 32, 32, device="cuda")
    assert compare_outputs(module(x), model(x), rtol=1e-2, atol=1e-3).passed
