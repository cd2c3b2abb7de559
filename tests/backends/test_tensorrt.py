"""The TensorRT runtime adapter (backends/_tensorrt.py) against the strict test double of the
engine and execution context (tests/trt_double.py), whose surface is derived from the real
TensorRT 11.4 runtime classes (``tensorrt_lean``) and from TensorRT-RTX's (``tensorrt_rtx``):
every test runs against each that is installed.

What this does NOT show: that a TensorRT engine executes correctly. No machine here can run
one. tests/gpu/ runs the same double asynchronously on real CUDA streams, and the real
``tensorrt_lean`` objects, on the lent GPU machine.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Any, Iterator, Sequence

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module._verify.compare import compare_outputs
from torch_trt_module._core.spec import TensorSpec
from torch_trt_module.backends._tensorrt import TensorRTRunner

from .._support import in_threads
from .trt_double import MAX_SM_KHZ, HostStreams, Knobs, doubles, ort_compute, sleep_cycles, torch_compute

REAL = [pytest.param(m, marks=pytest.mark.skipif(importlib.util.find_spec(m) is None, reason=f"{m} not installed"))
        for m in ("tensorrt_lean", "tensorrt_rtx")]


@pytest.fixture(params=REAL)
def trt(request: pytest.FixtureRequest) -> Any:
    return importlib.import_module(request.param)


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


class Setup:
    """A TRTModule whose runner is the real adapter over the double, and the double's controls."""

    def __init__(self, trt: Any, model: torch.nn.Module, example: Any, dynamic: Any = "batch",
                 dds: tuple[str, ...] = (), knobs: Knobs | None = None) -> None:
        self.model = model.eval()
        engine = ttm.compile(self.model, example, dynamic=dynamic, backend="onnxruntime", cache=False).engine
        assert engine is not None
        ex = engine.exported
        self.knobs = knobs or Knobs()
        self.streams = HostStreams()
        engine_cls, _ = doubles(trt)
        self.fake = engine_cls(ex.inputs, ex.outputs, ort_compute(engine.onnx, ex.output_names), knobs=self.knobs,
                               streams=self.streams, dds_outputs=dds)
        self.runner = TensorRTRunner(self.fake, ex.inputs, ex.outputs, "cpu", trt=trt, backend="tensorrt_rtx",
                                     streams=self.streams)
        self.module = ttm.TRTModule(engine, runner=self.runner)


def test_adapter_matches_eager_at_min_max_and_off_opt_shapes(trt: Any) -> None:
    s = Setup(trt, ConvTuple(), torch.randn(4, 3, 32, 32),
              dynamic={"x": {0: (1, 4, 8), 2: (16, 32, 64), 3: (16, 32, 64)}}, knobs=Knobs(check_buffers=True))
    assert s.module.backend == "tensorrt_rtx"
    for shape in [(1, 3, 16, 16), (8, 3, 64, 64), (6, 3, 40, 24)]:
        x = torch.randn(shape)
        report = compare_outputs(s.module(x), s.model(x), rtol=1e-3, atol=1e-5)
        assert report.passed, str(report)
    assert len(s.knobs.contexts) == 1


def test_work_is_enqueued_on_the_stream_the_adapter_was_given(trt: Any) -> None:
    # The double's writes land at the given stream's synchronisation point; work enqueued on any
    # other handle (the legacy stream 0) stays pending and its outputs stay NaN.
    s = Setup(trt, ConvTuple(), torch.randn(2, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    assert compare_outputs(s.module(x), s.model(x)).passed
    assert s.knobs.handles == [s.streams.handle]


class RecordingStreams(HostStreams):
    """HostStreams that also records what the runner hands them: the tensors whose memory each enqueued
    run uses (CudaStreams records them on its side stream, so their memory is not reused too early), and
    the handles it waits on."""

    def __init__(self) -> None:
        super().__init__()
        self.used: list[list[torch.Tensor]] = []
        self.waited: list[int] = []

    @contextlib.contextmanager
    def enqueue(self, tensors: Sequence[torch.Tensor]) -> Iterator[int]:
        self.used.append(list(tensors))
        with super().enqueue(tensors) as handle:
            yield handle

    def wait(self, handle: int) -> None:
        self.waited.append(handle)
        super().wait(handle)


def _ptrs(tensors: Sequence[torch.Tensor]) -> set[int]:
    return {t.data_ptr() for t in tensors}


def test_the_streams_get_every_tensor_the_work_uses(trt: Any) -> None:
    inputs = [TensorSpec("x", "float32", ("b", 4), (0, 4), (2, 4), (8, 4))]
    outputs = [TensorSpec("y", "float32", ("b", 4)), TensorSpec("s", "float32", ("b",))]
    streams, knobs = RecordingStreams(), Knobs()
    fake = doubles(trt)[0](inputs, outputs, lambda f: {"y": f["x"] * 2, "s": f["x"].sum(1)}, knobs=knobs,
                           streams=streams)
    runner = TensorRTRunner(fake, inputs, outputs, "cpu", trt=trt, streams=streams)
    x = torch.randn(3, 4)
    y, total = runner.run([x])
    assert _ptrs(streams.used[-1]) == _ptrs([x, y, total]) and streams.waited == []
    empty = torch.empty(0, 4)
    runner.run([empty])  # the placeholders bound in place of empty tensors are used too (never null)
    used = streams.used[-1]
    assert len(used) == 6 and all(isinstance(t, torch.Tensor) for t in used)
    bound = set(knobs.contexts[-1]._c.addrs.values())
    assert len(bound) == 3 and bound <= _ptrs(used)  # every address TensorRT holds is one the streams keep alive


def test_data_dependent_outputs_are_read_after_waiting_on_the_handle_the_work_ran_on(trt: Any) -> None:
    inputs = [TensorSpec("x", "float32", ("b", 4), (1, 4), (2, 4), (8, 4))]
    outputs = [TensorSpec("y", "float32", ("n",))]
    streams = RecordingStreams()
    fake = doubles(trt)[0](inputs, outputs, lambda f: {"y": f["x"][f["x"] > 0]}, streams=streams, dds_outputs=["y"])
    runner = TensorRTRunner(fake, inputs, outputs, "cpu", trt=trt, streams=streams)
    x = torch.randn(3, 4)
    (y,) = runner.run([x])
    assert torch.equal(y, x[x > 0]) and streams.waited == [streams.handle]
    assert _ptrs(streams.used[-1]) == {x.data_ptr()}  # TensorRT's own buffer is read after the wait


def test_set_input_shape_only_when_the_shape_changes(trt: Any) -> None:
    s = Setup(trt, ConvTuple(), torch.randn(2, 3, 16, 16))
    for _ in range(3):
        s.module(torch.randn(2, 3, 16, 16))
    s.module(torch.randn(3, 3, 16, 16))
    assert s.knobs.contexts[0]._c.set_shape_calls == 2


def test_set_tensor_address_only_when_the_address_changes(trt: Any) -> None:
    inputs, outputs = _specs()
    knobs, streams = Knobs(), HostStreams()
    fake = doubles(trt)[0](inputs, outputs, lambda f: {"y": f["x"] * 2}, knobs=knobs, streams=streams)
    runner = TensorRTRunner(fake, inputs, outputs, "cpu", trt=trt, streams=streams)
    x = torch.randn(2, 4)
    calls: list[str] = []
    runner.run([x])
    ctx = knobs.contexts[0]._c
    real_set = ctx.set_address

    def counting(name: str, addr: int) -> bool:
        calls.append(name)
        return real_set(name, addr)

    ctx.set_address = counting
    for _ in range(3):  # the same input tensor: only the (new) output is bound again
        assert torch.equal(runner.run([x])[0], x * 2)
    assert calls == ["y", "y", "y"]
    x2 = torch.randn(2, 4)
    assert torch.equal(runner.run([x2])[0], x2 * 2)  # a new input tensor is bound
    assert calls[3:] == ["x", "y"]


def test_non_contiguous_and_channels_last_inputs_are_bound_correctly(trt: Any) -> None:
    s = Setup(trt, ConvTuple(), torch.randn(2, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    y = torch.randn(2, 3, 16, 32)[..., ::2]  # a strided view: its data_ptr is not a dense tensor
    for inp in (x, y):
        assert compare_outputs(s.module(inp), s.model(inp)).passed


def test_rejected_shape_raises_with_the_profile_and_the_next_call_sets_its_shape_again(trt: Any) -> None:
    s = Setup(trt, ConvTuple(), torch.randn(2, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    s.runner.run([x])
    # Straight to the runner, past the module's own check: the adapter must not ignore the bool.
    with pytest.raises(ttm.InputError, match=r"TensorRT rejected shape \(64, 3, 16, 16\) for input 'x'.*1\.\.32"):
        s.runner.run([torch.randn(64, 3, 16, 16)])
    # The context's shape for x is unknown after a rejection: the adapter must set it again.
    (got, _) = s.runner.run([x])
    torch.testing.assert_close(got, s.model(x)[0], rtol=1e-4, atol=1e-5)


def test_failed_execute_raises_instead_of_returning_garbage(trt: Any) -> None:
    s = Setup(trt, ConvTuple(), torch.randn(2, 3, 16, 16), knobs=Knobs(fail_execute=True))
    with pytest.raises(ttm.RuntimeFailure, match="execute_async_v3 failed for input shapes x=\\(2, 3, 16, 16\\)"):
        s.module(torch.randn(2, 3, 16, 16))


def test_infer_shapes_errors_become_runtime_failures(trt: Any) -> None:
    s = Setup(trt, ConvTuple(), torch.randn(2, 3, 16, 16), knobs=Knobs(infer_shapes_raises="shape inference broke"))
    with pytest.raises(ttm.RuntimeFailure, match="could not infer the output shapes .*shape inference broke"):
        s.module(torch.randn(2, 3, 16, 16))


def test_inputs_infer_shapes_reports_unset_raise(trt: Any) -> None:
    s = Setup(trt, ConvTuple(), torch.randn(2, 3, 16, 16), knobs=Knobs(forget_shapes={"x"}))
    with pytest.raises(ttm.RuntimeFailure, match=r"inputs not set: \['x'\]"):
        s.module(torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("knobs, message", [
    (Knobs(fail_execute=True), "TensorRT's execute_async_v3 failed for input shapes a=(3, 4), b=(1, 4); see the "
                               "torch_trt_module.tensorrt log for the engine's error"),
    (Knobs(infer_shapes_raises="no"), "TensorRT could not infer the output shapes for input shapes a=(3, 4), "
                                      "b=(1, 4): no"),
])
def test_run_failures_name_every_input_s_shape(trt: Any, knobs: Knobs, message: str) -> None:
    inputs = [TensorSpec("a", "float32", ("b", 4), (1, 4), (2, 4), (8, 4)),
              TensorSpec("b", "float32", ("c", 4), (1, 4), (1, 4), (8, 4))]
    outputs = [TensorSpec("y", "float32", ("b", 4))]
    streams = HostStreams()
    fake = doubles(trt)[0](inputs, outputs, lambda f: {"y": f["a"] + f["b"]}, knobs=knobs, streams=streams)
    runner = TensorRTRunner(fake, inputs, outputs, "cpu", trt=trt, streams=streams)
    with pytest.raises(ttm.RuntimeFailure) as err:
        runner.run([torch.ones(3, 4), torch.ones(1, 4)])
    assert str(err.value) == message


def test_a_context_tensorrt_cannot_create_is_a_runtime_failure(trt: Any) -> None:
    inputs, outputs = _specs()
    knobs, streams = Knobs(no_context=True), HostStreams()
    fake = doubles(trt)[0](inputs, outputs, lambda f: {"y": f["x"]}, knobs=knobs, streams=streams)
    runner = TensorRTRunner(fake, inputs, outputs, "cpu", trt=trt, streams=streams)
    with pytest.raises(ttm.RuntimeFailure) as err:
        runner.run([torch.ones(2, 4)])
    assert str(err.value) == "TensorRT could not create an execution context (out of GPU memory?)"
    knobs.no_context = False  # nothing was kept: the next call creates one
    assert torch.equal(runner.run([torch.ones(2, 4)])[0], torch.ones(2, 4))


def test_empty_tensors_never_bind_a_null_pointer(trt: Any) -> None:
    s = Setup(trt, torch.nn.Linear(4, 3), torch.randn(2, 4), dynamic={"input": {0: (0, 2, 8)}})
    out = s.module(torch.randn(0, 4))  # the double returns False for a null address
    assert out.shape == (0, 3)


def test_data_dependent_output_goes_through_the_output_allocator_and_is_copied_out(trt: Any) -> None:
    s = Setup(trt, Masked(), torch.randn(4, 8), dds=("output",))
    firsts = []
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(5, 8)
        got = s.module(x)
        assert torch.equal(got, s.model(x)), f"seed {seed}"
        firsts.append((got, s.model(x)))
    # TensorRT's buffer is reused by the next call: earlier results must not change with it.
    for got, want in firsts:
        assert torch.equal(got, want)
    assert "output" in s.knobs.contexts[0]._c.allocators


class Nonzero(torch.nn.Module):  # a data-dependent output of two dimensions, int64
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(x > 0)


def test_a_two_dimensional_data_dependent_output_is_copied_out_whole(trt: Any) -> None:
    s = Setup(trt, Nonzero(), torch.randn(4, 8), dds=("output",))
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(5, 8)
        got = s.module(x)
        assert got.shape[1] == 2 and torch.equal(got, s.model(x)), f"seed {seed}"


def test_the_output_allocator_reuses_a_big_enough_buffer_and_never_returns_null(trt: Any) -> None:
    from torch_trt_module.backends._tensorrt import _Allocator

    alloc = _Allocator(trt, torch.device("cpu"), {"y": torch.float32})
    first = alloc.impl.reallocate_output("y", 0, 64, 256)
    assert alloc.buffers["y"].numel() >= 64 and first == alloc.buffers["y"].data_ptr()
    assert alloc.impl.reallocate_output("y", 0, 64, 256) == first  # the same size: the same buffer
    assert alloc.impl.reallocate_output_async("y", 0, 16, 256, 7) == first  # smaller: the same buffer
    bigger = alloc.impl.reallocate_output("y", first, 256, 256)
    assert alloc.buffers["y"].numel() >= 256 and bigger == alloc.buffers["y"].data_ptr()
    assert alloc.impl.reallocate_output("z", 0, 0, 256) != 0  # an empty output still gets memory
    alloc.impl.notify_shape("y", trt.Dims((4, 2)))
    alloc.buffers["y"][:32].view(torch.float32)[:] = torch.arange(8.0)
    taken = alloc.take("y")
    assert taken.shape == (4, 2) and torch.equal(taken, torch.arange(8.0).reshape(4, 2))
    assert taken.data_ptr() != bigger  # a copy: the buffer is TensorRT's again for the next call


def test_a_dedicated_runner_is_the_same_runner_with_a_context_of_its_own(trt: Any) -> None:
    inputs, outputs = _specs()
    engine_cls, _ = doubles(trt)
    knobs, streams = Knobs(), HostStreams()
    fake = engine_cls(inputs, outputs, lambda f: {"y": f["x"] * 3}, knobs=knobs, streams=streams)
    runner = TensorRTRunner(fake, inputs, outputs, "cpu", trt=trt, backend="tensorrt_rtx", streams=streams)
    dedicated, engine = runner.dedicated()
    assert (dedicated.backend, dedicated.device, dedicated.inputs, dedicated.outputs) == \
        (runner.backend, runner.device, runner.inputs, runner.outputs)
    assert dedicated.streams is runner.streams and dedicated._unusable is runner._unusable
    x = torch.randn(2, 4)
    (got,) = dedicated.run([x])
    assert torch.equal(got, x * 3) and knobs.handles == [streams.handle]
    assert engine.context is knobs.contexts[0] and engine.create_execution_context() is engine.context
    assert engine.num_io_tensors == 2  # everything else is the engine's


def test_a_runner_defaults_to_the_tensorrt_backend_and_to_its_device_s_streams(trt: Any) -> None:
    from torch_trt_module.backends._tensorrt import CudaStreams

    inputs, outputs = _specs()
    fake = doubles(trt)[0](inputs, outputs, lambda f: {"y": f["x"]}, streams=HostStreams())
    on_cpu = TensorRTRunner(fake, inputs, outputs, "cpu", trt=trt)
    assert on_cpu.backend == "tensorrt" and not isinstance(on_cpu.streams, CudaStreams)
    on_gpu = TensorRTRunner(fake, inputs, outputs, "cuda:1", trt=trt)  # nothing touches CUDA before a run
    assert isinstance(on_gpu.streams, CudaStreams) and on_gpu.streams.device == torch.device("cuda", 1)


def test_one_execution_context_per_thread(trt: Any) -> None:
    s = Setup(trt, ConvTuple(), torch.randn(2, 3, 16, 16))
    errors: list[str] = []

    def work(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for _ in range(20):
            x = torch.randn(1 + seed % 4, 3, 16, 16, generator=g)
            if not compare_outputs(s.module(x), s.model(x)).passed:
                errors.append(f"thread {seed}")

    in_threads(work, 8)
    assert errors == []
    assert len(s.knobs.contexts) == 8
    assert all(len(c._c.threads) == 1 for c in s.knobs.contexts)


# --------------------------------------------------------------------------- engines the adapter refuses

def _specs() -> tuple[list[TensorSpec], list[TensorSpec]]:
    return ([TensorSpec("x", "float32", ("b", 4), (1, 4), (2, 4), (8, 4))], [TensorSpec("y", "float32", ("b", 4))])


@pytest.mark.parametrize("knobs,message", [
    (Knobs(dtype_override={"y": "float16"}), "engine tensor 'y' is .*HALF, metadata says float32"),
    (Knobs(profiles=2), "^the engine has 2 optimization profiles; torch_trt_module builds and runs engines with "
                        r"exactly one \(profile 0\)$"),
    (Knobs(vectorized_dim=1, format_desc="Two wide channel vectorized row major FP16 format"), "only row-major linear"),
    (Knobs(format_desc="Channel major FP32 format where C % 4 == 0"), "only row-major linear"),
])
def test_engines_the_adapter_cannot_bind_are_refused(trt: Any, knobs: Knobs, message: str) -> None:
    inputs, outputs = _specs()
    engine_cls, _ = doubles(trt)
    fake = engine_cls(inputs, outputs, lambda f: {"y": f["x"]}, knobs=knobs, streams=HostStreams())
    with pytest.raises(ttm.EngineLoadError, match=message):
        TensorRTRunner(fake, inputs, outputs, "cpu", trt=trt, streams=HostStreams())


@pytest.mark.parametrize("case, message", [
    ("names", "engine I/O tensors ['x', 'y'] do not match the metadata's ['x', 'z']"),
    ("mode", "engine tensor 'y' has the wrong I/O mode"),
    ("location", "engine tensor 'y' is not in device memory; not supported"),
    ("format", "engine tensor 'x' has the format 'Channel major FP32 format where C % 4 == 0'; only row-major "
               "linear is supported"),
    ("vectorized", "engine tensor 'x' has the format 'Row major linear FP32 format (kLINEAR)'; only row-major "
                   "linear is supported"),
])
def test_what_the_adapter_refuses_is_named_exactly(trt: Any, case: str, message: str) -> None:
    inputs, outputs = _specs()
    knobs = Knobs(host_location={"y"} if case == "location" else set())
    if case == "format":
        knobs.format_desc = "Channel major FP32 format where C % 4 == 0"
    if case == "vectorized":  # a vectorized dimension, whatever the description says
        knobs.vectorized_dim = 1
    fake = doubles(trt)[0](inputs, outputs, lambda f: {"y": f["x"]}, knobs=knobs, streams=HostStreams())
    if case == "names":
        outputs = [TensorSpec("z", "float32", ("b", 4))]
    if case == "mode":  # the same names, y said to be an input and x an output
        inputs, outputs = [TensorSpec("y", "float32", ("b", 4), (1, 4), (2, 4), (8, 4))], [TensorSpec("x", "float32",
                                                                                                     ("b", 4))]
    with pytest.raises(ttm.EngineLoadError) as err:
        TensorRTRunner(fake, inputs, outputs, "cpu", trt=trt, streams=HostStreams())
    assert str(err.value) == message


@pytest.mark.parametrize("rejected, message", [
    ({"x"}, "TensorRT rejected the address of input 'x'"),
    ({"y"}, "TensorRT rejected the address of output 'y'"),
])
def test_a_rejected_address_raises_and_the_next_call_binds_it_again(trt: Any, rejected: set[str],
                                                                   message: str) -> None:
    inputs, outputs = _specs()
    knobs, streams = Knobs(), HostStreams()
    fake = doubles(trt)[0](inputs, outputs, lambda f: {"y": f["x"] * 2}, knobs=knobs, streams=streams)
    runner = TensorRTRunner(fake, inputs, outputs, "cpu", trt=trt, streams=streams)
    x = torch.randn(2, 4)
    assert torch.equal(runner.run([x])[0], x * 2)
    knobs.reject_address = rejected
    with pytest.raises(ttm.RuntimeFailure) as err:
        runner.run([torch.randn(2, 4)])
    assert str(err.value) == message
    # The context's address for that tensor is unknown after a rejection: the adapter must set it again,
    # even for the tensor it had bound before.
    knobs.reject_address = set()
    assert torch.equal(runner.run([x])[0], x * 2)


def test_a_rejection_at_the_first_call_raises_the_adapter_s_error(trt: Any) -> None:
    # Nothing is cached yet for the tensor TensorRT refuses: the error is still the adapter's own.
    inputs, outputs = _specs()
    knobs, streams = Knobs(reject_address={"x"}), HostStreams()
    fake = doubles(trt)[0](inputs, outputs, lambda f: {"y": f["x"]}, knobs=knobs, streams=streams)
    with pytest.raises(ttm.InputError, match=r"TensorRT rejected shape \(9, 4\) for input 'x'"):
        TensorRTRunner(fake, inputs, outputs, "cpu", trt=trt, streams=streams).run([torch.ones(9, 4)])
    with pytest.raises(ttm.RuntimeFailure, match="^TensorRT rejected the address of input 'x'$"):
        TensorRTRunner(fake, inputs, outputs, "cpu", trt=trt, streams=streams).run([torch.ones(2, 4)])


class MaskedAndScaled(torch.nn.Module):  # a data-dependent output, then one of a static shape
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[x > 0], x * 2


def test_outputs_after_a_data_dependent_one_are_bound_too(trt: Any) -> None:
    s = Setup(trt, MaskedAndScaled(), torch.randn(4, 8), dds=("output_0",))
    x = torch.randn(5, 8)
    got = s.module(x)
    want = s.model(x)
    assert len(got) == 2 and all(torch.equal(g, w) for g, w in zip(got, want))


def test_a_rejected_output_allocator_raises(trt: Any) -> None:
    s = Setup(trt, Masked(), torch.randn(4, 8), dds=("output",), knobs=Knobs(reject_allocator=True))
    with pytest.raises(ttm.RuntimeFailure) as err:
        s.runner.run([torch.randn(5, 8)])
    assert str(err.value) == "TensorRT rejected the output allocator for 'output'"


class ManyDtypes(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, e: torch.Tensor,
                f: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (a * 2, b + 1, ~c, d + 3, e.float() * 0.5, (f.float() + 1).to(torch.bfloat16))


def test_several_inputs_of_every_io_dtype_are_bound(trt: Any) -> None:
    dtypes = ["float16", "int32", "bool", "uint8", "int64", "bfloat16"]
    outs = ["float16", "int32", "bool", "uint8", "float32", "bfloat16"]
    names = list("abcdef")
    inputs = [TensorSpec(n, d, ("b", 5), (1, 5), (2, 5), (4, 5)) for n, d in zip(names, dtypes)]
    outputs = [TensorSpec(f"o{i}", d, ("b", 5)) for i, d in enumerate(outs)]
    model = ManyDtypes()
    engine_cls, _ = doubles(trt)
    streams = HostStreams()
    fake = engine_cls(inputs, outputs, torch_compute(model, names, [o.name for o in outputs]),
                      knobs=Knobs(check_buffers=True), streams=streams)
    runner = TensorRTRunner(fake, inputs, outputs, "cpu", trt=trt, streams=streams)
    args = [torch.randn(3, 5).half(), torch.randint(-9, 9, (3, 5), dtype=torch.int32), torch.rand(3, 5) > 0.5,
            torch.randint(0, 200, (3, 5), dtype=torch.uint8), torch.randint(-9, 9, (3, 5)),
            torch.randn(3, 5).to(torch.bfloat16)]
    for got, want in zip(runner.run(args), model(*args)):
        assert got.dtype == want.dtype and torch.equal(got, want)


# --------------------------------------------------------------------------- the double is as strict as the real classes

def test_the_double_refuses_what_the_real_objects_refuse(trt: Any) -> None:
    inputs, outputs = _specs()
    engine_cls, _ = doubles(trt)
    fake = engine_cls(inputs, outputs, lambda f: {"y": f["x"]}, streams=HostStreams())
    with pytest.raises(AttributeError, match="object has no attribute '_torch_trt_module_runtime'"):
        fake._torch_trt_module_runtime = object()  # what deserialize() once did to real engines
    with pytest.raises(AttributeError, match="has no attribute 'num_bindings'"):
        fake.num_bindings  # the TensorRT 8 binding API, removed in 10.0
    with pytest.raises(AttributeError):
        fake.num_io_tensors = 3  # read-only on the real class
    ctx = fake.create_execution_context()
    with pytest.raises(TypeError, match="incompatible function arguments"):
        ctx.set_input_shape("x")  # arity from the real signature
    with pytest.raises(TypeError, match="incompatible function arguments"):
        ctx.set_tensor_address("x", 1.5)  # a float is not an address
    with pytest.raises(TypeError, match="incompatible function arguments"):
        ctx.execute_async_v3()
    assert ctx.set_input_shape("x", (2, 4)) is True and ctx.set_input_shape("x", [99, 4]) is False


def test_tensor_format_has_no_binding_in_the_lean_runtime() -> None:
    lean = pytest.importorskip("tensorrt_lean")
    inputs, outputs = _specs()
    engine_cls, _ = doubles(lean)
    fake = engine_cls(inputs, outputs, lambda f: {"y": f["x"]}, streams=HostStreams())
    # The real call fails the same way: tensorrt_lean has no TensorFormat class to return.
    with pytest.raises(TypeError, match="Unable to convert function return value"):
        fake.get_tensor_format("x")
    assert not hasattr(lean, "TensorFormat")


def test_the_runtime_api_the_adapter_uses_exists_on_the_real_classes(trt: Any) -> None:
    # deserialize(), build_serialized() and the allocator use these; deserializing needs a GPU
    # (tests/gpu/ does it with the real tensorrt_lean), so here the names are checked.
    assert hasattr(trt.Runtime, "deserialize_cuda_engine") and hasattr(trt.Runtime, "engine_host_code_allowed")
    for name in ("TensorIOMode", "TensorLocation", "IOutputAllocator", "ILogger", "Dims", "DataType"):
        assert hasattr(trt, name), name
    for name in ("get_tensor_vectorized_dim", "get_tensor_format_desc", "num_optimization_profiles"):
        assert hasattr(trt.ICudaEngine, name), name


@pytest.mark.parametrize("reported_khz", [0, 1_980_000, 2_520_000, 5_000_000], ids=["none", "h200", "rtx4090", "odd"])
def test_the_gpu_delay_of_the_double_lasts_its_sleep_ms_at_any_clock(reported_khz: int,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # On a GPU the double's writes land behind torch.cuda._sleep(cycles), a spin on the SM clock. Too few
    # cycles on a fast GPU (the H200) let a read that does not wait see results; so the cycles assume a
    # clock above any GPU's, or the one the device reports if higher.
    class Props:
        clock_rate = reported_khz

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    ms = Knobs().sleep_ms
    assert ms >= 50
    cycles = sleep_cycles(torch.device("cuda", 0), ms)
    for clock_khz in (1_000_000, 1_980_000, 3_000_000, MAX_SM_KHZ, max(reported_khz, MAX_SM_KHZ)):
        assert cycles / clock_khz >= ms, f"{cycles} cycles last {cycles / clock_khz:.1f} ms at {clock_khz} kHz"
