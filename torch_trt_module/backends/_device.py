"""Devices compared by what they are (a module of its own: the runners and the chain both use it)."""

from __future__ import annotations

import torch

__all__ = ["normalize_device"]


def normalize_device(device: str | torch.device) -> torch.device:
    """``cuda`` -> ``cuda:N`` (the current device) and ``cpu:0`` -> ``cpu`` (torch has one CPU device,
    and its tensors say ``cpu``), so devices compare by what they are."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev
