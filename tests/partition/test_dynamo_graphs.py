"""_dynamo_graphs: what the torch.compile backend reads from a dynamo graph (the backend end to end:
test_dynamo.py)."""

from __future__ import annotations

from typing import Any

import torch

from torch_trt_module._partition.dynamo_graphs import classify, identifier, refusal


def _captured(fn: Any, *args: torch.Tensor) -> tuple[torch.fx.GraphModule, list[Any]]:
    got: list[Any] = []

    def grab(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        got.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=grab)(*args)
    torch._dynamo.reset()
    return got[0]


class InPlace(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.add_(1)
        return x * 2


def test_a_graph_that_writes_its_input_is_refused_with_the_fix() -> None:
    gm, inputs = _captured(InPlace(), torch.randn(2, 3))
    assert refusal(gm, inputs) == ("it writes to an input in place (add_), which an engine cannot do. Fix: make "
                                   "that op out-of-place (x = x + y, not x += y)")


def test_weights_and_inputs_are_told_apart() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU()).eval()
    with torch.no_grad():
        gm, inputs = _captured(model, torch.randn(2, 3))
        assert refusal(gm, inputs) is None
    slots, names = classify(gm, inputs)
    weights = [value for kind, _, value in slots if kind == "weight"]
    # the model's own tensors (so weights="follow" sees their changes), under Python names
    assert {id(w) for w in weights} == {id(model[0].weight), id(model[0].bias)}
    assert all(where.replace(".", "_").isidentifier() for kind, where, _ in slots if kind == "weight")
    assert [kind for kind, _, _ in slots].count("input") == 1 and len(names) == 1


def test_identifiers_are_python_names() -> None:
    assert identifier("L['x'].shape") == "L_x_shape"
    assert identifier("!!") == "input"
