"""The casts an fp16 program keeps after BatchNorm folding, dropped (backends/_casts.py): against the
program as captured, and the regions that must keep theirs, on the CPU."""

from __future__ import annotations

from typing import Callable

import torch
from torch.fx import Graph, GraphModule, Node

from torch_trt_module.backends._casts import drop_casts
from torch_trt_module.backends._torch_passes import optimize_graph

from .test_torch_passes import _count, _program, _stats

_aten = torch.ops.aten
_TO = _aten.to.dtype


class Block(torch.nn.Module):
    """What mobilenet_v3 is made of: conv+BN+hardswish, a squeeze-excitation (pool, two 1x1 convs,
    hardsigmoid, product), conv+BN, a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.fc1, self.fc2 = torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(4, 8, 1)
        self.c2, self.b2 = torch.nn.Conv2d(8, 8, 1, bias=False), torch.nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.hardswish(self.b1(self.c1(x)))
        pooled = torch.nn.functional.adaptive_avg_pool2d(h, 1)
        s = torch.nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(pooled))))
        return self.b2(self.c2(h * s)) + x


def test_an_fp16_program_loses_its_casts_and_matches_the_captured_program() -> None:
    model = _stats(Block())
    x = torch.randn(2, 8, 10, 10)
    _, gm, names, weights = _program(model, x, precision="fp16")
    opt, plan = optimize_graph(gm, names, weights=dict(zip(names, weights)))
    before, after = _count(gm, "aten.to.dtype"), _count(opt, "aten.to.dtype")
    # One stays: the last BatchNorm's output, cast up, meets the input in the residual add and is
    # the program's fp32 output (the input's dtype is not the weights': not known to the pass).
    assert after == 1 and plan.casts == before - 1 >= 3, (before, after, plan.casts)
    for batch in (1, 3):
        xb = torch.randn(batch, 8, 10, 10).half()
        (want,) = gm(*weights, xb)
        (got,) = opt(*plan.derive(dict(zip(names, weights))), xb)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


def test_an_fp32_program_has_nothing_to_drop() -> None:
    model = _stats(Block())
    _, gm, names, weights = _program(model, torch.randn(2, 8, 10, 10))
    _, plan = optimize_graph(gm, names, weights=dict(zip(names, weights)))
    assert plan.casts == 0


def _graph(body: Callable[[Graph, Node, Node], Node]) -> tuple[GraphModule, Node, Node]:
    """A graph of a low tensor ``x`` and an fp32 one ``w`` whose output ``body`` builds."""
    g = Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    g.output(body(g, x, w))
    return GraphModule(torch.nn.Module(), g), x, w


def _up(g: Graph, n: Node) -> Node:
    return g.call_function(_TO, (n, torch.float32))


def _down(g: Graph, n: Node) -> Node:
    return g.call_function(_TO, (n, torch.float16))


def test_a_region_of_one_op_gives_the_same_bits() -> None:
    for op in (_aten.relu.default, _aten.hardswish.default, _aten.hardsigmoid.default):
        gm, x, w = _graph(lambda g, x, w: _down(g, g.call_function(op, (_up(g, x),))))  # noqa: B023
        xs = torch.randn(1000).half() * 4
        want = gm(xs, torch.zeros(1))
        assert drop_casts(gm.graph, {x: torch.float16, w: torch.float32}) == 2
        gm.recompile()
        assert _count(gm, "to.dtype") == 0
        got = gm(xs, torch.zeros(1))
        assert got.dtype == torch.float16 and torch.equal(got, want), op


def test_a_residual_add_of_two_casts_runs_low() -> None:
    def body(g: Graph, x: Node, w: Node) -> Node:
        a = g.call_function(_aten.relu.default, (_up(g, x),))
        return _down(g, g.call_function(_aten.add.Tensor, (a, _up(g, x))))

    gm, x, w = _graph(body)
    assert drop_casts(gm.graph, {x: torch.float16, w: torch.float32}) == 3
    gm.recompile()
    xs = torch.randn(64).half()
    torch.testing.assert_close(gm(xs, torch.zeros(1)), torch.relu(xs) + xs)


def test_regions_that_cannot_run_low_keep_their_casts() -> None:
    cases: dict[str, Callable[[Graph, Node, Node], Node]] = {
        "an op it does not know": lambda g, x, w: _down(g, g.call_function(_aten.layer_norm.default, (_up(g, x), [4]))),
        "an fp32 operand": lambda g, x, w: _down(g, g.call_function(_aten.add.Tensor, (_up(g, x), w))),
        "the graph's output": lambda g, x, w: g.call_function(_aten.relu.default, (_up(g, x),)),
        "an op told its dtype": lambda g, x, w: _down(g, g.call_function(_aten.mean.dim, (_up(g, x), [0]),
                                                                         {"dtype": torch.float32})),
    }
    for what, body in cases.items():
        gm, x, w = _graph(body)
        assert drop_casts(gm.graph, {x: torch.float16, w: torch.float32}) == 0, what


def test_an_in_place_op_never_comes_to_write_into_an_input_or_a_view() -> None:
    def on_input(g: Graph, x: Node, w: Node) -> Node:
        return _down(g, g.call_function(_aten.relu_.default, (_up(g, x),)))

    def on_view(g: Graph, x: Node, w: Node) -> Node:
        v = g.call_function(_aten.view.default, (_up(g, g.call_function(_aten.relu.default, (x,))), [-1]))
        return _down(g, g.call_function(_aten.relu_.default, (v,)))

    gm, x, w = _graph(on_input)
    assert drop_casts(gm.graph, {x: torch.float16, w: torch.float32}) == 0
    xs = torch.randn(64).half()
    kept = xs.clone()
    torch.testing.assert_close(gm(xs, torch.zeros(1)), torch.relu(kept))
    assert torch.equal(xs, kept)  # the caller's tensor is left as it was
    gm, x, w = _graph(on_view)  # relu(x) is the program's own, but relu_ would write through a view
    assert drop_casts(gm.graph, {x: torch.float16, w: torch.float32}) == 0


def test_an_in_place_op_on_a_tensor_read_elsewhere_keeps_its_cast() -> None:
    # relu_ writes into the cast's output; without the cast it would write into x, which add reads.
    def body(g: Graph, x: Node, w: Node) -> Node:
        r = g.call_function(_aten.relu_.default, (_up(g, x),))
        return g.call_function(_aten.add.Tensor, (_down(g, r), x))

    gm, x, w = _graph(body)
    assert drop_casts(gm.graph, {x: torch.float16, w: torch.float32}) == 0
    xs = torch.randn(64).half()
    torch.testing.assert_close(gm(xs, torch.zeros(1)), torch.relu(xs) + xs)


def test_an_in_place_chain_is_followed_back_to_the_tensor_it_writes_into() -> None:
    # relu_(add_(cast up of f)): both write into the cast's output; without the cast, into f.
    def chain(g: Graph, x: Node, f_read_again: bool) -> Node:
        f = g.call_function(_aten.relu.default, (x,))
        a = g.call_function(_aten.add_.Tensor, (_up(g, f), 1.0))
        out = _down(g, g.call_function(_aten.relu_.default, (a,)))
        return g.call_function(_aten.add.Tensor, (out, f)) if f_read_again else out

    for f_read_again, dropped in ((False, 2), (True, 0)):
        gm, x, w = _graph(lambda g, x, w: chain(g, x, f_read_again))  # noqa: B023
        assert drop_casts(gm.graph, {x: torch.float16, w: torch.float32}) == dropped, f_read_again
        gm.recompile()
        xs = torch.randn(64).half()
        want = torch.relu(torch.relu(xs) + 1) + (torch.relu(xs) if f_read_again else 0)
        torch.testing.assert_close(gm(xs, torch.zeros(1)), want)
