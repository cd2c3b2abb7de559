"""Bad inputs at forward, inputs that must simply work, and bad models (issue 6).

Every bad input gets an :class:`InputError` (under ``TorchTRTError``) whose message names the
input, what was expected, what was received, and the fix; the assertions quote those parts.
Modules run on ONNX Runtime here (no GPU), which shares every check with the TensorRT path: the
checks live in ``TRTModule``, not in the runners.
"""

from __future__ import annotations

from typing import Any

import onnx
import onnx.helper as oh
import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module import ExportError, InputError, TorchTRTError
from torch_trt_module._pipeline import compile as _compile
from torch_trt_module._core.spec import TensorSpec

from harness.models import Conv

EXPORTER = "torchscript"  # 0.02 s per export; the dynamo exporter is used where it matters


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * y.sum(-1, keepdim=True)


class Embed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids).sum(1)


class Elementwise(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0 + 1.0


class RowSum(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(-1) + 1.0


X, Y = torch.randn(3, 8), torch.randn(3, 5)


@pytest.fixture(scope="module")
def model() -> TwoInputs:
    torch.manual_seed(0)
    return TwoInputs().eval()


@pytest.fixture(scope="module")
def module(model: TwoInputs) -> ttm.TRTModule:
    # cache=False: module-scoped fixtures run before the per-test cache directory is set.
    return ttm.compile(model, (X, Y), exporter=EXPORTER, cache=False)


def error_of(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, TorchTRTError) and isinstance(info.value, ValueError)
    return str(info.value)


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, equal_nan=True)


# --------------------------------------------------------------------------- the call's structure

def test_too_many_positional_arguments(module: ttm.TRTModule) -> None:
    msg = error_of(module, X, Y, Y)
    assert "got 3 positional arguments" in msg and "at most 2 (x, y)" in msg and "pass the others by keyword" in msg


def test_unknown_keyword_argument(module: ttm.TRTModule) -> None:
    msg = error_of(module, X, Y, z=Y)
    assert "unexpected keyword argument 'z'" in msg and "forward accepts: x, y" in msg


@pytest.mark.parametrize("call", ["positional", "keyword"])
def test_missing_argument(module: ttm.TRTModule, call: str) -> None:
    msg = error_of(module, X) if call == "positional" else error_of(module, x=X)
    assert "missing argument(s) ['y']" in msg and "compiled with ['x', 'y']" in msg and "pass exactly those" in msg


def test_argument_given_twice(module: ttm.TRTModule) -> None:
    msg = error_of(module, X, x=X)
    assert "multiple values for argument 'x'" in msg and "either by position or by keyword" in msg


# --------------------------------------------------------------------------- dtype, device, shape

def test_wrong_dtype_is_an_error_by_default(module: ttm.TRTModule) -> None:
    msg = error_of(module, X.double(), Y)
    assert "input 'x' has dtype torch.float64" in msg and "compiled for torch.float32" in msg
    assert "pass .to(torch.float32) or compile with cast_inputs=True" in msg


def test_cast_inputs_casts_only_safely(model: TwoInputs) -> None:
    cast = ttm.compile(model, (X, Y), exporter=EXPORTER, cast_inputs=True)
    with torch.inference_mode():
        out = cast(X.double(), Y)  # float64 -> float32: allowed
        assert_same(out, model(X, Y))
    torch.manual_seed(0)
    embed = Embed().eval()
    ids = torch.randint(0, 50, (3, 5))
    m = ttm.compile(embed, ids, exporter=EXPORTER, cast_inputs=True)
    with torch.inference_mode():
        assert_same(m(ids.int()), embed(ids))  # int32 -> int64: allowed
        msg = error_of(m, ids.float())  # float -> int64 would truncate: refused
    assert "input 'ids' has dtype torch.float32" in msg and "compiled for torch.int64" in msg
    assert "pass .to(torch.int64)" in msg and "or compile with" not in msg


def test_cpu_tensor_given_to_a_cuda_module(module: ttm.TRTModule) -> None:
    # The module's device is what matters; its runner here is ONNX Runtime staging through the CPU.
    on_cuda = ttm.TRTModule(module.engine, device="cuda")
    msg = error_of(on_cuda, X, Y)
    assert "input 'x' is on cpu but this module runs on cuda" in msg
    assert "move it with .to('cuda') or move the module with .to('cpu')" in msg


def test_tensor_on_another_device_given_to_a_cpu_module(module: ttm.TRTModule) -> None:
    # The same check as a CUDA tensor given to a CPU module, with a device that exists everywhere.
    msg = error_of(module, X.to("meta"), Y)
    assert "input 'x' is on meta but this module runs on cpu" in msg and "move it with .to('cpu')" in msg


@pytest.mark.gpu
def test_cuda_tensor_given_to_a_cpu_module(module: ttm.TRTModule) -> None:
    msg = error_of(module, X.cuda(), Y)
    assert "input 'x' is on cuda:0 but this module runs on cpu" in msg and ".to('cpu')" in msg


def test_shape_outside_the_profile_names_the_ranges_and_the_fix(module: ttm.TRTModule) -> None:
    msg = error_of(module, torch.randn(40, 8), torch.randn(40, 5))
    assert "input 'x' has shape (40, 8) outside the engine's profile (1..32, 8)" in msg
    assert "dim 0 = 40 not in 1..32" in msg
    assert "Recompile with dynamic={'x': {0: (1, 3, 40)}}" in msg and "lazy mode" in msg
    msg = error_of(module, torch.randn(3, 9), Y)
    # A static dim (the features a Linear's weight fixes) is said to be static, never made dynamic.
    assert "dim 1 = 9 not in 8..8" in msg and "Dim 1 is static: the module was compiled for size 8 there" in msg
    assert "Recompile" not in msg


def test_lazy_module_widens_instead(model: TwoInputs) -> None:
    lazy = ttm.compile(model, None, exporter=EXPORTER)
    builds = _compile.STATS["builds"]
    with torch.inference_mode():
        assert_same(lazy(X, Y), model(X, Y))
        assert _compile.STATS["builds"] == builds + 1
        big = torch.randn(40, 8), torch.randn(40, 5)
        assert_same(lazy(*big), model(*big))  # outside the first profile: rebuilt wider, no error
        assert _compile.STATS["builds"] == builds + 2
        assert lazy.engine.exported.inputs[0].max[0] >= 40
        assert_same(lazy(X, Y), model(X, Y))  # the wider profile still covers the first shapes
        assert _compile.STATS["builds"] == builds + 2
    msg = error_of(lazy, torch.randn(3, 8, 1), Y)  # a wrong rank cannot be widened
    assert msg == ("input 'x' has rank 3 (shape (3, 8, 1)) but the engine expects rank 2. Pass a tensor of the "
                   "compiled rank.")


def test_wrong_rank(module: ttm.TRTModule) -> None:
    msg = error_of(module, torch.randn(3, 8, 1), Y)
    assert "input 'x' has rank 3 (shape (3, 8, 1)) but the engine expects rank 2" in msg
    assert "Pass a tensor of the compiled rank" in msg


@pytest.mark.parametrize("value", [None, [1.0] * 8])
def test_non_tensor_where_a_tensor_is_expected(module: ttm.TRTModule, value: Any) -> None:
    msg = error_of(module, value, Y)
    got = "None" if value is None else "list"
    assert f"input 'x' is {got} but the module was compiled with a tensor there; pass a tensor" in msg


def test_input_that_requires_grad(module: ttm.TRTModule, model: TwoInputs) -> None:
    x = X.clone().requires_grad_()
    msg = error_of(module, x, Y)
    assert "input 'x' requires grad" in msg and "inference-only" in msg
    assert "pass .detach() or call under torch.inference_mode()" in msg
    with torch.inference_mode():
        assert_same(module(x, Y), model(X, Y))


def test_training_mode(module: ttm.TRTModule, model: TwoInputs) -> None:
    # Issue 20: a module or model in training mode computes its inference semantics, never raises.
    module.train()
    try:
        assert_same(module(X, Y), model(X, Y))
    finally:
        module.eval()
    model.train()
    try:
        fast = ttm.compile(model, (X, Y), exporter=EXPORTER)
        assert model.training
    finally:
        model.eval()
    assert_same(fast(X, Y), model(X, Y))


# --------------------------------------------------------------------------- handled, never errors

def test_non_contiguous_inputs(module: ttm.TRTModule, model: TwoInputs) -> None:
    x = torch.randn(8, 3).t()  # transposed
    y = torch.randn(3, 10)[:, ::2]  # strided
    assert not x.is_contiguous() and not y.is_contiguous()
    x_before, y_before = x.clone(), y.clone()
    with torch.inference_mode():
        assert_same(module(x, y), model(x, y))
    assert torch.equal(x, x_before) and torch.equal(y, y_before) and not x.is_contiguous()


def test_channels_last_input() -> None:
    torch.manual_seed(0)
    conv = Conv().eval()
    x = torch.randn(2, 3, 8, 8)
    m = ttm.compile(conv, x, exporter=EXPORTER)
    xl = torch.randn(4, 3, 8, 8).to(memory_format=torch.channels_last)
    assert not xl.is_contiguous()
    with torch.inference_mode():
        assert_same(m(xl), conv(xl))
    assert xl.is_contiguous(memory_format=torch.channels_last)


class _BindingSpy:
    """Test double around ONNX Runtime's C-level IOBinding: records the pointers bound, then forwards."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.pointers: list[int] = []

    def bind_input(self, *args: Any) -> Any:
        self.pointers.append(args[-1])
        return self._real.bind_input(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def test_zero_size_dims_are_handled_and_never_bound_as_null() -> None:
    row = RowSum().eval()
    x = torch.randn(3, 8)
    m = ttm.compile(row, x, exporter=EXPORTER, dynamic={"x": {0: (0, 3, 8), 1: (0, 8, 16)}})
    state = m.runner._state()  # this thread's binding state
    spy = state.bind_c = _BindingSpy(state.bind_c)
    with torch.inference_mode():
        for shape in [(0, 8), (3, 0), (0, 0)]:
            empty = torch.randn(shape)
            assert empty.data_ptr() == 0  # what a runner would bind without its guard
            assert_same(m(empty), row(empty))
    assert len(spy.pointers) == 3 and all(p != 0 for p in spy.pointers)
    # (The TensorRT adapter's guard is checked against its execution-context double in
    # tests/test_tensorrt_adapter.py, whose set_tensor_address refuses null like TensorRT.)


def test_zero_size_outside_the_profile_is_rejected_clearly(module: ttm.TRTModule) -> None:
    msg = error_of(module, torch.randn(0, 8), torch.randn(0, 5))
    assert "dim 0 = 0 not in 1..32" in msg and "Recompile with dynamic={'x': {0: (0, 3, 32)}}" in msg


def test_nan_and_inf_pass_through() -> None:
    ew = Elementwise().eval()
    m = ttm.compile(ew, torch.randn(3, 8), exporter=EXPORTER)
    x = torch.randn(4, 8)
    x[0, 0], x[1, 3], x[2, 5], x[3, 7] = float("nan"), float("inf"), float("-inf"), float("nan")
    with torch.inference_mode():
        got, want = m(x), ew(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got).sum() == 2
    assert got[1, 3] == float("inf") and got[2, 5] == float("-inf")
    assert_same(got, want)


# --------------------------------------------------------------------------- bad models

@pytest.mark.usefixtures("rtx_required")  # the TensorRT-RTX ONNX parser's own message
def test_unsupported_op_names_the_node_the_op_and_the_parser_message() -> None:
    from torch_trt_module import BuildError
    from torch_trt_module.backends._trt_build import build_serialized

    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 4])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 4])
    node = oh.make_node("FancyOp", ["x"], ["y"], name="my_fancy_node", domain="com.example")
    graph = oh.make_graph([node], "g", [x], [y])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid("com.example", 1)])
    spec = TensorSpec("x", "float32", ("b", 4), (1, 4), (2, 4), (8, 4))
    with pytest.raises(BuildError) as info:
        build_serialized(model.SerializeToString(), [spec], backend="tensorrt_rtx")
    msg = str(info.value)
    assert isinstance(info.value, TorchTRTError)
    assert "ONNX parser rejected the graph" in msg
    assert "node 0 (my_fancy_node, op FancyOp)" in msg and "Plugin not found" in msg  # the parser's own words
    assert "Fix: replace the unsupported op" in msg and "backend='onnxruntime'" in msg


class Branchy(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a Python branch on a tensor value
            return x * 2
        return x - 1


@pytest.mark.parametrize("exporter", ["auto", "torchscript"])
def test_data_dependent_control_flow_is_an_export_error(exporter: str) -> None:
    # partition="never": the error as it was; by default the model runs through graph breaks
    # (tests/zoo/test_must_fail.py, tests/partition/test_partition.py).
    with pytest.raises(ExportError) as info:
        ttm.compile(Branchy().eval(), torch.rand(3, 8) + 1, exporter=exporter, partition="never")
    msg = str(info.value)
    assert "data-dependent control flow" in msg and "torch.where" in msg


class WithNone(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> Any:
        return {"a": x * 2, "b": None}, None


class WithString(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> Any:
        return x * 2, "label"


class WithNumber(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> Any:
        return x * 2, 0.5


def test_none_outputs_are_preserved() -> None:
    m = ttm.compile(WithNone().eval(), X, exporter=EXPORTER)
    with torch.inference_mode():
        out = m(torch.randn(5, 8))
    assert isinstance(out, tuple) and out[1] is None and out[0]["b"] is None and out[0]["a"].shape == (5, 8)


@pytest.mark.parametrize(("cls", "kind"), [(WithString, "str"), (WithNumber, "float")])
def test_string_and_number_outputs_are_refused_at_compile_time(cls: type, kind: str) -> None:
    # Outputs are tensors nested in tuples, lists and dicts, or None: a constant output would be
    # frozen at its compile-time value, so compile() refuses it before exporting or building.
    # What the code raises today is a plain TypeError (outside TorchTRTError), which
    # tests/export/test_export.py also asserts; this test pins that down.
    stats = dict(_compile.STATS)
    with pytest.raises(TypeError) as info:
        ttm.compile(cls().eval(), X, exporter=EXPORTER)
    msg = str(info.value)
    assert f"output [1] is a {kind}; expected tensors nested in tuples, lists and dicts (or None)" in msg
    assert _compile.STATS["builds"] == stats["builds"]  # refused before building
