"""torch_trt_module._core.signature: a call's args and kwargs bound to forward's parameter names (the same
way at export and at every call), the inverse (to_call), the InputError of each kind of bad call,
and split_inputs' forms of example_inputs."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from torch_trt_module import InputError
from torch_trt_module._core.signature import Param, bind_call, params_of, split_inputs, to_call


def every_kind(a: Any, /, b: Any, *args: Any, c: Any, d: Any = 1, **kw: Any) -> None:
    """One parameter of each kind."""


class Model(torch.nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x


ALL = params_of(every_kind)
XM = params_of(Model().forward)


def test_params_of_names_each_kind_in_order() -> None:
    assert ALL == (Param("a", "positional_only"), Param("b", "positional_or_keyword"), Param("args", "var_positional"),
                   Param("c", "keyword_only"), Param("d", "keyword_only"), Param("kw", "var_keyword"))
    assert XM == (Param("x", "positional_or_keyword"), Param("mask", "positional_or_keyword"))  # self is bound


def test_params_of_a_callable_without_a_signature_takes_anything() -> None:
    class NoSignature:
        __signature__ = "not a signature"  # inspect.signature raises TypeError

        def __call__(self) -> None: ...

    assert params_of(NoSignature()) == (Param("args", "var_positional"), Param("kwargs", "var_keyword"))


def test_param_json_round_trip() -> None:
    for p in ALL:
        assert Param.from_json(p.to_json()) == p
    assert Param.from_json(("x", "keyword_only")) == Param("x", "keyword_only")


@pytest.mark.parametrize("args,kwargs,bound", [
    ((1, 2, 3, 4), {"c": 5, "z": 6, "d": 7}, {"a": 1, "b": 2, "args": (3, 4), "c": 5, "d": 7, "z": 6}),
    ((1,), {"c": 5, "b": 2}, {"a": 1, "b": 2, "c": 5}),
    ((1, 2), {"c": 3}, {"a": 1, "b": 2, "c": 3}),
])
def test_bind_call_orders_by_the_signature_and_to_call_inverts_it(args: tuple[Any, ...], kwargs: dict[str, Any],
                                                                 bound: dict[str, Any]) -> None:
    got = bind_call(ALL, args, kwargs)
    assert got == bound and list(got) == list(bound)  # signature order; extra keywords last
    args2, kwargs2 = to_call(ALL, got)
    assert bind_call(ALL, args2, kwargs2) == bound


def test_keywords_and_positions_bind_alike() -> None:
    assert bind_call(XM, (1,), {"mask": 2}) == bind_call(XM, (), {"mask": 2, "x": 1}) == {"x": 1, "mask": 2}
    assert list(bind_call(XM, (), {"mask": 2, "x": 1})) == ["x", "mask"]
    assert to_call(XM, {"x": 1}) == ((), {"x": 1})  # keywords unless positions are needed


def test_to_call_passes_positionally_what_must_be() -> None:
    assert to_call(ALL, {"a": 1, "b": 2, "c": 3}) == ((1,), {"b": 2, "c": 3})
    assert to_call(ALL, {"a": 1, "b": 2, "args": (3,), "c": 4}) == ((1, 2, 3), {"c": 4})


@pytest.mark.parametrize("params,args,kwargs,message", [
    (XM, (1, 2, 3), {}, "got 3 positional arguments but forward takes at most 2 (x, mask); pass the others by keyword"),
    (params_of(lambda: None), (1,), {},
     "got 1 positional arguments but forward takes at most 0 (none); pass the others by keyword"),
    (XM, (1,), {"x": 2}, "got multiple values for argument 'x'; pass it either by position or by keyword"),
    (XM, (), {"y": 1}, "got an unexpected keyword argument 'y'; forward accepts: x, mask"),
    (ALL, (), {"a": 1, "c": 2}, "argument 'a' is positional-only; pass it by position"),
])
def test_bad_calls_are_input_errors_that_say_the_fix(params: tuple[Param, ...], args: tuple[Any, ...],
                                                     kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError) as info:
        bind_call(params, args, kwargs)
    assert str(info.value) == message


# --------------------------------------------------------------------------- split_inputs (moved from test_compare)

def test_split_inputs_forms() -> None:
    x, y = torch.ones(1), torch.zeros(1)
    assert split_inputs(x) == ((x,), {})
    args, kwargs = split_inputs((x, y))
    assert args[0] is x and args[1] is y and kwargs == {}
    assert split_inputs(((x, y), {"mask": None}))[1] == {"mask": None}
    assert split_inputs(([x], {}))[0][0] is x
    args, kwargs = split_inputs((x, {"k": y}))  # a 2-tuple ending in a dict means (args, kwargs)
    assert args[0] is x and kwargs["k"] is y
    args, kwargs = split_inputs([x, y])  # a list is the positional arguments, as Torch-TensorRT takes them
    assert args == (x, y) and kwargs == {}
    lst = [x, y]
    assert split_inputs((lst,)) == ((lst,), {})  # one list argument
    assert split_inputs(()) == ((), {})


def test_split_inputs_rejects_non_str_keywords() -> None:
    with pytest.raises(TypeError, match=r"^keyword argument names must be str; got \[1\]$"):
        split_inputs(((), {1: torch.ones(1)}))


def test_compare_uses_the_same_split_inputs() -> None:
    from torch_trt_module._verify import parity as _compare

    # verify() and compile() must read example inputs the same way; the two tests above were written
    # against verify's module (_verify.parity), so this keeps them covering it.
    assert _compare.split_inputs is split_inputs
