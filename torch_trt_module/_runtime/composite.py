"""What the composite compiled modules share with :class:`~torch_trt_module.TRTModule`'s weights API
(issue 20, item 11): reading the weights given to ``refit()``, checking them, and naming a model's
tensors.

:class:`~torch_trt_module._partition.split.SegmentedModule` (one graph, engines and PyTorch parts) and
:class:`~torch_trt_module._partition.partitioned.PartitionedModule` (torch.compile's graphs around the model's
own Python) take ``refit(weights)``, ``weights_hash()``, ``weight_names``, ``input_names`` and
``backend``; what a refit means for each is in its docstring.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping

import torch

from .weights import given_weights, read_weights

__all__ = ["backend_of", "check_weights", "named_tensors", "unsaved_buffers"]


def named_tensors(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """``module``'s parameters and buffers whose names start with ``prefix``, by their names without it
    (a tied tensor once, under its first name, as ``named_parameters`` gives it)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in itertools.chain(module.named_parameters(), module.named_buffers()):
        if name.startswith(prefix) and name[len(prefix):] not in out:
            out[name[len(prefix):]] = t
    return out


def unsaved_buffers(module: torch.nn.Module, prefix: str = "") -> set[str]:
    """The buffers a ``state_dict`` leaves out (``persistent=False``), named as :func:`named_tensors` does."""
    out = set()
    for path, m in module.named_modules():
        for leaf in getattr(m, "_non_persistent_buffers_set", ()):
            name = f"{path}.{leaf}" if path else leaf
            if name.startswith(prefix):
                out.add(name[len(prefix):])
    return out


def check_weights(ours: Mapping[str, torch.Tensor], weights: Any, *, optional: set[str]) -> dict[str, torch.Tensor]:
    """New values for ``ours`` from ``weights`` (see :func:`given_weights`), each cast to our tensor's dtype
    and on its device. Every name, shape and dtype is checked before anything is read (InputError naming
    the tensors, as ``TRTModule.refit`` does); names in ``optional`` may be missing and are left out."""
    spec = {n: (n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in ours.items()}
    values = read_weights(spec, given_weights(weights), optional=optional)
    return {n: v.to(ours[n].device) for n, v in values.items()}


def backend_of(modules: list[Any], *, none: str) -> str:
    """The backends that run ``modules`` (compiled modules), joined by '+'; ``none`` where there are none."""
    return "+".join(sorted({m.backend for m in modules})) or none
