"""The weights map of an export: which graph initializer is which of the model's tensors.

An :class:`~torch_trt_module.ExportedModel` records, per initializer the graph holds by name, the
model's name for it (a tied tensor by its first name in ``state_dict`` order), its dtype and
shape; that is what refit and ``weights="follow"`` read.
"""

from __future__ import annotations

from typing import Any

import torch

from .._core.dtypes import by_onnx
from .exporters import weight_names
from .precision import MixedPrecisionModel

__all__ = ["aliases", "tied_names", "unsaved", "weight_map"]


def tied_names(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """For each name of a tensor that ``model`` holds under several names (tied weights, such as an
    embedding and its output layer), all its names, first in ``state_dict`` order first."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    order = list(model.state_dict(keep_vars=True))
    in_state = set(order)
    order += [n for n in tensors if n not in in_state]  # non-persistent buffers, last
    groups: dict[int, list[str]] = {}
    for name in order:
        t = tensors.get(name)
        if t is not None:
            groups.setdefault(id(t), []).append(name)
    return {n: tuple(g) for g in groups.values() if len(g) > 1 for n in g}


def weight_map(model_proto: Any, program: Any, work_model: torch.nn.Module, model: torch.nn.Module
                ) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """``{initializer: (source name, dtype, shape)}`` for the weights the graph holds by name
    (``_exporters._optimize_keeping_weights`` keeps them so); empty without a program. A tied
    tensor, which torch.export names by one of its names, goes by its first in ``state_dict`` order."""
    if program is None:
        return {}
    tied = tied_names(model)

    # The wrapper (Flat) holds the model as ``model``; a mixed-precision copy holds it as ``model`` too.
    prefix = "model.model." if isinstance(work_model, MixedPrecisionModel) else "model."
    names = weight_names(program)
    out = {}
    for init in model_proto.graph.initializer:
        row = by_onnx(init.data_type)
        if init.name in names and init.name.startswith(prefix) and row is not None:
            name = init.name[len(prefix):]
            out[init.name] = (tied[name][0] if name in tied else name, row.name, tuple(int(d) for d in init.dims))
    return out


def aliases(model: torch.nn.Module, mapped: set[str]) -> dict[str, tuple[str, ...]]:
    """``{first name: other names}`` for the mapped tensors that ``model`` ties (see :func:`weight_map`)."""
    tied = tied_names(model)
    return {n: tied[n][1:] for n in sorted(mapped) if n in tied}


def unsaved(model: torch.nn.Module, mapped: set[str]) -> tuple[str, ...]:
    """The mapped buffers a ``state_dict`` leaves out (registered with ``persistent=False``)."""
    saved = set(model.state_dict(keep_vars=True))
    return tuple(sorted(n for n, _ in model.named_buffers() if n in mapped and n not in saved))
