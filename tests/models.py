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


def _branch(features: int, width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(features, width), nn.ReLU(), nn.Linear(width, width))


class ForkJoin(nn.Module):
    """A stem, then ``blocks`` diamonds in a row (a fork into two equal branches that both read the previous
    output, joined by a sum), then a head."""

    def __init__(self, features: int, width: int, blocks: int, classes: int) -> None:
        super().__init__()
        self.stem = nn.Linear(features, width)
        self.left = nn.ModuleList(_branch(width, width) for _ in range(blocks))
        self.right = nn.ModuleList(_branch(width, width) for _ in range(blocks))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        for left, right in zip(self.left, self.right):
            h = torch.tanh(left(h) + right(h))
        return self.head(h)


def fork_join(blocks: int = 1, features: int = 16, width: int = 64, classes: int = 10, batch_size: int = 4):
    """``blocks`` fork/join diamonds in a row; planned for latency each becomes two parallel stages."""
    torch.manual_seed(0)
    return ForkJoin(features, width, blocks, classes).eval(), torch.randn(batch_size, features)


class TwoRoots(nn.Module):
    """Two equal branches, each over its own input, joined by a sum and a head."""

    def __init__(self, features: int, width: int, classes: int) -> None:
        super().__init__()
        self.left = _branch(features, width)
        self.right = _branch(features, width)
        self.head = nn.Linear(width, classes)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.left(left) + self.right(right)))


def two_roots(features: int = 16, width: int = 64, classes: int = 10, batch_size: int = 4):
    """Two inputs, two equal branches: planned for latency, two root stages joined by a third."""
    torch.manual_seed(0)
    return TwoRoots(features, width, classes).eval(), {
        "left": torch.randn(batch_size, features),
        "right": torch.randn(batch_size, features),
    }
