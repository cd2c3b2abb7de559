"""torch_trt_module._core.inputs, as units: match_inputs checks a call against the compiled structure
(every mismatch an InputError naming the input by its path), safe_cast decides which dtype casts
cast_inputs=True may make, and widen_hint is the advice after an out-of-profile shape. TRTModule's
use of them is in tests/reliability/test_inputs.py and tests/runtime/test_module.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from torch_trt_module import InputError
from torch_trt_module._core.inputs import match_inputs, safe_cast, widen_hint
from torch_trt_module._core.spec import TensorSpec
from torch_trt_module._core.tree import flatten

X = TensorSpec("x", "float32", ("b", 3, "h"), (1, 3, 8), (4, 3, 16), (8, 3, 32))


def call(**changes: Any) -> dict[str, Any]:
    """A call of the compiled structure: a tensor, a dict with a tensor and a constant, None, a list."""
    base: dict[str, Any] = {"x": torch.ones(2), "opts": {"m": torch.ones(1), "k": 3}, "none": None,
                            "seq": [torch.ones(1), torch.ones(3)]}
    base.update(changes)
    return base


TREE = flatten(call())[1]


def error(obj: Any, path: str = "") -> str:
    with pytest.raises(InputError) as info:
        match_inputs(TREE, obj, path)
    return str(info.value)


def test_a_matching_call_gives_its_tensors_in_order() -> None:
    obj = call()
    leaves = match_inputs(TREE, obj, "")
    assert [t is u for t, u in zip(leaves, [obj["x"], obj["opts"]["m"], *obj["seq"]])] == [True] * 4
    assert len(leaves) == 4
    assert len(match_inputs(TREE, call(seq=(torch.ones(1), torch.ones(1))), "")) == 4  # a tuple for a list is fine


@pytest.mark.parametrize("changes,message", [
    ({"x": None}, "input 'x' is None but the module was compiled with a tensor there; pass a tensor"),
    ({"x": 1.5}, "input 'x' is float but the module was compiled with a tensor there; pass a tensor"),
    ({"opts": {"m": torch.ones(1), "k": 4}},
     "input 'opts'['k'] was the constant 3 at compile time (it is baked into the engine); got 4. Recompile with "
     "that value."),
    ({"opts": {"m": torch.ones(1), "k": 3.0}},  # equal, but another type: the engine saw an int
     "input 'opts'['k'] was the constant 3 at compile time (it is baked into the engine); got 3.0. Recompile with "
     "that value."),
    ({"none": torch.ones(1)},
     "input 'none' was None when the module was compiled, so it is not an engine input; got Tensor. Recompile with "
     "it in example_inputs."),
    ({"seq": [torch.ones(1)]}, "input 'seq' should be a list of 2 items; got 1"),
    ({"seq": 5}, "input 'seq' should be a list of 2 items; got int"),
    ({"seq": [torch.ones(1), None]},
     "input 'seq'[1] is None but the module was compiled with a tensor there; pass a tensor"),
    ({"opts": [1]}, "input 'opts' should be a dict with keys ['m', 'k']; got list"),
    ({"opts": {"m": torch.ones(1), "z": 3}},
     "'opts': missing key(s) ['k']; unexpected key(s) ['z'] (not given at compile time, so not engine inputs); the "
     "module was compiled with ['m', 'k']: pass exactly those keys"),
])
def test_each_mismatch_is_named_by_its_path(changes: dict[str, Any], message: str) -> None:
    assert error(call(**changes)) == message


def test_missing_and_unexpected_arguments_at_the_top() -> None:
    obj = call(extra=1)
    del obj["opts"]
    assert error(obj) == ("the call: missing argument(s) ['opts']; unexpected argument(s) ['extra'] (not given at "
                          "compile time, so not engine inputs); the module was compiled with ['x', 'opts', 'none', "
                          "'seq']: pass exactly those arguments")


def test_a_path_prefix_is_kept() -> None:
    assert error(call(x=None), path="batch") == \
        "input batch['x'] is None but the module was compiled with a tensor there; pass a tensor"


# --------------------------------------------------------------------------- safe_cast

@pytest.mark.parametrize("src,dst", [(torch.float64, torch.float32), (torch.float16, torch.float32),
                                     (torch.float32, torch.bfloat16), (torch.int32, torch.int64),
                                     (torch.bool, torch.int64), (torch.uint8, torch.int32),
                                     (torch.int64, torch.float32), (torch.float32, torch.float32)])
def test_casts_allowed(src: torch.dtype, dst: torch.dtype) -> None:
    assert safe_cast(src, dst)


@pytest.mark.parametrize("src,dst", [(torch.float32, torch.int64), (torch.float16, torch.int32),
                                     (torch.int64, torch.bool), (torch.float32, torch.bool),
                                     (torch.complex64, torch.float32)])
def test_casts_that_would_truncate_or_drop_are_refused(src: torch.dtype, dst: torch.dtype) -> None:
    assert not safe_cast(src, dst)


@pytest.mark.parametrize("src,dst", [(torch.int64, torch.int32), (torch.int32, torch.int8),
                                     (torch.int64, torch.uint8)])
def test_narrowing_integer_casts_are_refused(src: torch.dtype, dst: torch.dtype) -> None:
    assert not safe_cast(src, dst)


# --------------------------------------------------------------------------- widen_hint

def test_widen_hint_covers_the_shape_and_keeps_the_other_dynamic_dims() -> None:
    assert widen_hint(X, (9, 3, 16)) == \
        "Recompile with dynamic={'x': {0: (1, 4, 9), 2: (8, 16, 32)}} (or without example_inputs for lazy mode)."
    assert widen_hint(X, (2, 3, 4)) == \
        "Recompile with dynamic={'x': {0: (1, 4, 8), 2: (4, 16, 32)}} (or without example_inputs for lazy mode)."


def test_widen_hint_for_a_static_dim_never_suggests_making_it_dynamic() -> None:
    # Issue 20: a wrong channel count was told to make the Conv's channel dim dynamic, and following
    # that advice made a PartitionedModule. A static dim is the example's size: say so.
    assert widen_hint(X, (2, 5, 16)) == (
        "Dim 1 is static: the module was compiled for size 3 there, the example's (not a dynamic dim; a size the "
        "weights fix, such as a Conv's channels, cannot be one). Pass a tensor of size 3 in dim 1.")
    y = TensorSpec("y", "float32", ("b", 3, 16, 16), min=(1, 3, 16, 16), opt=(4, 3, 16, 16), max=(8, 3, 16, 16))
    assert widen_hint(y, (9, 4, 16, 20)) == (
        "Dims 1, 3 are static: the module was compiled for sizes 3, 16 there, the example's (not a dynamic dim; a "
        "size the weights fix, such as a Conv's channels, cannot be one). Pass a tensor of sizes 3, 16 in dims 1, 3. "
        "Recompile with dynamic={'y': {0: (1, 4, 9)}} (or without example_inputs for lazy mode).")


def test_widen_hint_for_another_rank_or_no_profile() -> None:
    assert widen_hint(X, (2, 3)) == "Pass a tensor of the compiled rank."
    assert widen_hint(TensorSpec("y", "float32", ("n",)), (2,)) == "Pass a tensor of the compiled rank."
