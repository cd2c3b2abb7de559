"""Small models shared by several test files and the benchmarks."""

from __future__ import annotations

import torch


class Conv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class Sensitive(torch.nn.Module):
    """A synthetic worst case for fp16: a large reduction and a hand-written norm.

    Features of size 16384 with an offset: their sum overflows fp16 (max 65504), and the
    hand-written variance loses every digit to cancellation in fp16. This is where a
    whole-model cast loses digits and autocast-style mixed precision does not.
    """

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(64, 16384)
        self.down = torch.nn.Linear(16384, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x) + 8.0
        total = h.sum(-1, keepdim=True)                       # overflows in fp16
        centred = h - h.mean(-1, keepdim=True)
        var = (centred * centred).mean(-1, keepdim=True)      # a norm written by hand
        return self.down(centred / torch.sqrt(var + 1e-5)) + total * 1e-4


class ItemBranch(torch.nn.Module):
    """#19: ``.item()`` turns a tensor value into a Python number that picks a branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum().item() > 0:
            return x * 2
        return x - 1


class TensorBranch(torch.nn.Module):
    """#19: a Python ``if`` on a tensor (an implicit ``bool(tensor)``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return x * 2
        return x - 1


class MaskedSelect(torch.nn.Module):
    """#18: the output's length depends on the input's values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[x > 0]
