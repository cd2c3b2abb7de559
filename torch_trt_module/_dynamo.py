"""The ``torch.compile`` backend, registered as ``torch_trt_module`` (setup.py's ``torch_dynamo_backends``
entry point): each graph dynamo captures goes through :func:`torch_trt_module.compile`.

It sits above the whole pipeline: :mod:`torch_trt_module._partition.dynamo` handles the graphs and
is given the compile function here, so nothing below the orchestrator imports it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ._partition.dynamo import STATS, GraphCall, describe
from ._partition.dynamo import backend as _graph_backend
from ._pipeline import compile as _compiler  # the module: compile() is looked up at each call

__all__ = ["STATS", "GraphCall", "backend", "describe"]


def backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, options: dict[str, Any] | None = None,
            mode: str | None = None) -> Callable[..., Any]:
    """Compile one dynamo graph, or run it in PyTorch where it cannot be compiled (one WARNING says why).

    ``options`` are :func:`torch_trt_module.compile`'s (``precision``, ``cache_dir``, ``verify``,
    ``runtime``, ``weights``, ``dynamic``, ``max_batch``, ...); an unknown one raises
    :class:`SettingsError`. ``dynamic`` defaults to the dims dynamo made symbolic.

    Example:
        >>> fast = torch.compile(model, backend="torch_trt_module", options={"precision": "fp16"})  # doctest: +SKIP
        >>> with torch.no_grad():                    # engines are inference-only  # doctest: +SKIP
        ...     out = fast(torch.randn(8, 3, 224, 224))
    """
    return _graph_backend(gm, example_inputs, compile_fn=_compiler.compile, options=options, mode=mode)
