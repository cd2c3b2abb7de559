"""How compile() takes its example and device (issue 20, item 13): a list of example inputs is the
positional arguments (Torch-TensorRT's habit), ``cpu:0`` is the CPU, ``device="cuda"`` without a GPU
is refused up front with the fix, and a shape outside a static dim is told it is static."""

from __future__ import annotations

import pytest
import torch

import torch_trt_module as ttm

from .._support import TwoInputs


def test_a_list_of_example_inputs_is_the_positional_arguments() -> None:
    # compile(m, [x]) raised a raw TypeError from inside forward (the list was one argument).
    linear = torch.nn.Linear(8, 4).eval()
    fast = ttm.compile(linear, [torch.randn(2, 8)], backend="onnxruntime")
    assert fast.input_names == ["input"]
    model = TwoInputs().eval()
    fast = ttm.compile(model, [torch.randn(2, 8), torch.randn(2, 4)], backend="onnxruntime")
    assert fast.input_names == ["x", "y"]
    x, y = torch.randn(3, 8), torch.randn(3, 4)
    assert ttm.verify(model, fast, [x, y]).passed


def test_a_list_for_a_forward_of_one_argument_says_how_to_pass_one_list() -> None:
    with pytest.raises(ttm.InputError) as info:
        ttm.compile(torch.nn.Linear(8, 4).eval(), [torch.randn(2, 8), torch.randn(2, 8)], backend="onnxruntime")
    assert str(info.value) == ("got 2 positional arguments but forward takes at most 1 (input); pass the others by "
                               "keyword")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_device_cuda_without_a_gpu_is_refused_before_any_work() -> None:
    from torch_trt_module._pipeline.compile import STATS

    exports = STATS["exports"]
    with pytest.raises(ttm.BackendUnavailable) as info:
        ttm.compile(torch.nn.Linear(8, 4).eval(), torch.randn(2, 8), device="cuda")
    assert str(info.value) == (
        f"device='cuda' asks for a CUDA GPU, but torch sees none here (torch.cuda.is_available() is False; torch "
        f"{torch.__version__}). Fix: pass device='cpu' or leave device= out (the model's own device), or run on a "
        "machine with a GPU and a CUDA build of torch")
    assert STATS["exports"] == exports


def test_cpu_0_is_the_cpu() -> None:
    # After fast.to("cpu:0") every CPU tensor was refused, with advice to move it to cpu:0.
    model = torch.nn.Linear(8, 4).eval()
    x = torch.randn(2, 8)
    fast = ttm.compile(model, x, backend="onnxruntime")
    fast.to("cpu:0")
    assert fast.device == torch.device("cpu")
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
    pinned = ttm.compile(model, x, backend="onnxruntime", device="cpu:0")
    assert pinned.device == torch.device("cpu")
    with torch.no_grad():
        torch.testing.assert_close(pinned(x), model(x))


def test_a_wrong_channel_count_is_told_the_dim_is_static() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    fast = ttm.compile(model, torch.randn(2, 3, 16, 16), backend="onnxruntime")
    with pytest.raises(ttm.InputError) as info:
        fast(torch.randn(2, 4, 16, 16))
    assert str(info.value) == (
        "input 'input' has shape (2, 4, 16, 16) outside the engine's profile (1..32, 3, 16, 16) (dim 1 = 4 not in "
        "3..3). Dim 1 is static: the module was compiled for size 3 there, the example's (not a dynamic dim; a size "
        "the weights fix, such as a Conv's channels, cannot be one). Pass a tensor of size 3 in dim 1.")
