"""The passes' Python helpers traced into ATen ops, so that Inductor can store what it compiles.

The inference passes write some rewrites as calls to Python functions that decide from the shapes
when the graph is traced (``_torch_passes._permuted_linear``): a stored program's compact graph
carries no shapes. Inductor compiles such a graph, but its AOTAutograd cache refuses to serialize
a graph that calls a function it does not know, so the artifact could not be stored and every new
process compiled it again (vit_b_16's attention, found on the CPU on 2026-12-07).
:func:`inline_python_calls` traces the graph for one input signature with fake tensors: the
helpers run and leave only ATen ops behind. The artifacts are static per input signature
(backends/_inductor_store.py), so the static trace loses nothing.

Example:
    >>> gm = inline_python_calls(graph_module, [weight, x])   # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterator, Sequence

import torch

__all__ = ["calls_python", "inline_python_calls", "python_calls"]


def python_calls(graph: torch.fx.GraphModule) -> Iterator[Callable[..., Any]]:
    """The Python functions (not ATen ops or builtins) that ``graph`` and the graphs nested in it
    call, once per call site."""
    for gm in graph.modules():
        if isinstance(gm, torch.fx.GraphModule):
            for node in gm.graph.nodes:
                if node.op == "call_function" and inspect.isfunction(node.target):
                    yield node.target


def calls_python(graph: torch.fx.GraphModule) -> bool:
    """Whether ``graph`` (or a graph nested in it) calls a Python function defined outside torch."""
    return any(not (fn.__module__ or "").startswith(("torch.", "_operator", "operator")) for fn in python_calls(graph))


def inline_python_calls(graph: torch.fx.GraphModule, args: Sequence[torch.Tensor]) -> torch.fx.GraphModule:
    """``graph`` traced for ``args`` (their shapes, strides and dtypes; no data is read) into a graph
    of ATen ops, the same computation."""
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(graph, tracing_mode="fake")(*args)
