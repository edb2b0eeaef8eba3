"""Models for tests, importable as ``tests.models:FACTORY``."""

from __future__ import annotations

import time

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


class TextImageTowers(nn.Module):
    """A transformers ``CLIPModel`` returning ``(text_embeds, image_embeds)``: two towers that meet only in the
    outputs, with the pooling and logits a branch plan must not turn into empty stages."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids=input_ids, pixel_values=pixel_values)
        return out.text_embeds, out.image_embeds


def clip_towers(batch_size: int = 4, width: int = 32, layers: int = 2):
    """A small CLIP (random weights from a fixed seed) with text ids and 32x32 images as inputs."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tower = {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers}
    tower["num_attention_heads"] = 2
    config = CLIPConfig(
        text_config={**tower, "vocab_size": 100, "max_position_embeddings": 16},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    inputs = {"input_ids": torch.randint(0, 100, (batch_size, 8)), "pixel_values": torch.randn(batch_size, 3, 32, 32)}
    return TextImageTowers(CLIPModel(config).eval()), inputs


class CausalLogits(nn.Module):
    """A transformers causal LM returning its logits alone, without a key-value cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def tiny_llama(batch_size: int = 4, seq_len: int = 16, layers: int = 2, width: int = 64, vocab: int = 256):
    """A Llama-style causal LM (``LlamaForCausalLM`` from a transformers ``LlamaConfig``: RMSNorm, rotary
    positions, grouped-query attention, SwiGLU; random weights from a fixed seed): token ids in, logits out."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2 * seq_len,
    )
    return CausalLogits(LlamaForCausalLM(config).eval()), torch.randint(0, vocab, (batch_size, seq_len))


POISON, HANG, SLOW = 1e6, 2e6, 3e6
"""Marker values for :class:`Trap`, in an input's first feature."""
HANG_S, SLOW_S = 600.0, 3.0


class Trap(nn.Module):
    """Passes its input on, except for a sample whose first feature is a marker: :data:`POISON` raises,
    :data:`HANG` blocks for ``HANG_S`` seconds, :data:`SLOW` sleeps ``SLOW_S`` seconds. Data-dependent, so
    torch.export cannot capture it: capture falls back to module boundaries."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = x[:, 0]
        if bool((first == POISON).any()):
            raise ValueError("poison input")
        if bool((first == HANG).any()):
            time.sleep(HANG_S)
        if bool((first == SLOW).any()):
            time.sleep(SLOW_S)
        return x


def trap_sequential(width: int = 8, batch_size: int = 4):
    """An nn.Sequential starting with a :class:`Trap`: markers in the input fail, hang or slow the first stage."""
    torch.manual_seed(0)
    layers = [Trap(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4)]
    return nn.Sequential(*layers).eval(), torch.randn(batch_size, width)


class Mean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True)


def vector_mean(width: int = 15_000_000, batch_size: int = 1):
    """The mean of one long vector per sample (15M floats: a 60 MB request): large bodies, little compute."""
    return Mean().eval(), torch.zeros(batch_size, width)


class RunningMax(nn.Module):
    """A linear layer, a running maximum over the features (``torch.cummax``: torch.export captures it, ONNX
    export has no conversion for it), then another linear layer."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.cummax(self.a(x), dim=1).values)


def running_max(width: int = 16, batch_size: int = 4):
    """A model whose middle op has no ONNX conversion: its stage must stay eager, the others need not."""
    torch.manual_seed(0)
    return RunningMax(width).eval(), torch.randn(batch_size, width)
