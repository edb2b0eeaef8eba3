"""Models for tests, importable as ``tests.models:FACTORY``."""

from __future__ import annotations

import torch
from torch import nn


class Gate(nn.Module):
    """Data-dependent control flow: torch.export cannot capture it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if float(x.sum()) > 0 else self.b(x)


def gated_sequential(width: int = 32, batch_size: int = 4):
    """An nn.Sequential with one non-exportable child: capture falls back to module boundaries."""
    torch.manual_seed(0)
    layers = [nn.Linear(16, width), nn.ReLU(), Gate(width), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4)]
    return nn.Sequential(*layers).eval(), torch.randn(batch_size, 16)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Linear(8, 8)
        self.y = nn.Linear(8, 8)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.x(left)) + right
        return {"sum": self.y(h), "skip": left * 2}


def two_inputs(batch_size: int = 4):
    """Two positional inputs, a dict of two outputs, one of them straight off an input."""
    torch.manual_seed(0)
    return TwoInputs().eval(), (torch.randn(batch_size, 8), torch.randn(batch_size, 8))
