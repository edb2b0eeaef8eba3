"""Built-in demo models: random weights from a fixed seed, nothing downloaded.

Each factory takes keyword options and returns ``(module, example_inputs)``: the module in eval mode and a
dict of example input tensors whose dimension 0 is the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

SEED = 0
Factory = Callable[..., tuple[nn.Module, dict[str, torch.Tensor]]]


class TransformerBlock(nn.Module):
    """Pre-norm encoder block: self-attention and an MLP, each with a residual connection."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(attn)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class DemoTransformer(nn.Module):
    """Token embedding, ``layers`` encoder blocks, mean pooling and a classifier head."""

    def __init__(self, layers: int, width: int, heads: int, seq_len: int, vocab: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(1, seq_len, width) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


class ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn plus identity (or 1x1 projection) skip, then relu."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.skip(x))


class DemoResNet(nn.Module):
    """ResNet-style CNN whose skip connections cross any cut placed inside a block."""

    def __init__(self, blocks_per_stage: int, width: int, classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers: list[nn.Module] = []
        c = width
        for i, c_out in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks_per_stage):
                layers.append(ResidualBlock(c, c_out, 2 if (i > 0 and j == 0) else 1))
                c = c_out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(c, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(image)).mean(dim=(2, 3)))


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        module = build()
    return _randomize_batchnorm(module).eval()


def _randomize_batchnorm(module: nn.Module) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics so eval mode is not an identity."""
    gen = torch.Generator().manual_seed(SEED + 1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None:
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return module


def demo_mlp(depth: int = 6, width: int = 1024, features: int = 256, classes: int = 10, batch_size: int = 8):
    """A plain ``nn.Sequential`` MLP: ``depth`` hidden Linear+ReLU layers."""
    dims = [features] + [width] * depth

    def build() -> nn.Module:
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(dims[-1], classes))

    gen = torch.Generator().manual_seed(SEED)
    return _seeded(build), {"features": torch.randn(batch_size, features, generator=gen)}


def demo_transformer(
    layers: int = 8,
    width: int = 256,
    heads: int = 4,
    seq_len: int = 64,
    vocab: int = 1000,
    classes: int = 10,
    batch_size: int = 8,
):
    """Encoder-only transformer classifier over ``seq_len`` token ids."""
    model = _seeded(lambda: DemoTransformer(layers, width, heads, seq_len, vocab, classes))
    gen = torch.Generator().manual_seed(SEED)
    return model, {"tokens": torch.randint(0, vocab, (batch_size, seq_len), generator=gen)}


def demo_resnet(blocks: int = 2, width: int = 16, image_size: int = 32, classes: int = 10, batch_size: int = 8):
    """ResNet-style CNN on ``image_size`` x ``image_size`` RGB images."""
    model = _seeded(lambda: DemoResNet(blocks, width, classes))
    gen = torch.Generator().manual_seed(SEED)
    return model, {"image": torch.randn(batch_size, 3, image_size, image_size, generator=gen)}


def demo_cnn(width: int = 16, image_size: int = 32, hidden: int = 128, classes: int = 10, batch_size: int = 8):
    """Small CNN: two 3x3 conv+BN+ReLU+max-pool stages, flatten, two fully connected layers."""

    def build() -> nn.Module:
        spatial = (image_size // 4) ** 2
        layers = {
            "conv1": nn.Conv2d(3, width, 3, padding=1),
            "bn1": nn.BatchNorm2d(width),
            "relu1": nn.ReLU(),
            "pool1": nn.MaxPool2d(2),
            "conv2": nn.Conv2d(width, 2 * width, 3, padding=1),
            "bn2": nn.BatchNorm2d(2 * width),
            "relu2": nn.ReLU(),
            "pool2": nn.MaxPool2d(2),
            "flatten": nn.Flatten(),
            "fc1": nn.Linear(2 * width * spatial, hidden),
            "relu3": nn.ReLU(),
            "fc2": nn.Linear(hidden, classes),
        }
        model = nn.Sequential()
        for name, layer in layers.items():
            model.add_module(name, layer)
        return model

    gen = torch.Generator().manual_seed(SEED)
    return _seeded(build), {"image": torch.randn(batch_size, 3, image_size, image_size, generator=gen)}


class InceptionBlock(nn.Module):
    """Four parallel branches (1x1; 1x1-3x3; 1x1-3x3-3x3; pool-1x1) concatenated: a fork and a join."""

    def __init__(self, c_in: int, c_branch: int) -> None:
        super().__init__()

        def conv(a: int, b: int, k: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(a, b, k, padding=k // 2), nn.ReLU())

        self.b1 = conv(c_in, c_branch, 1)
        self.b2 = nn.Sequential(conv(c_in, c_branch, 1), conv(c_branch, c_branch, 3))
        self.b3 = nn.Sequential(conv(c_in, c_branch, 1), conv(c_branch, c_branch, 3), conv(c_branch, c_branch, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv(c_in, c_branch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


class DemoInception(nn.Module):
    def __init__(self, blocks: int, width: int, classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4 * width, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(*[InceptionBlock(4 * width, width) for _ in range(blocks)])
        self.head = nn.Linear(4 * width, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(image)).mean(dim=(2, 3)))


class DemoTwoTower(nn.Module):
    """Two equal MLP towers over two inputs, joined by a small scoring head: the towers dominate the cost."""

    def __init__(self, features: int, width: int, depth: int, embed: int) -> None:
        super().__init__()

        def tower() -> nn.Module:
            dims = [features] + [width] * depth
            layers: list[nn.Module] = []
            for a, b in zip(dims[:-1], dims[1:]):
                layers += [nn.Linear(a, b), nn.ReLU()]
            return nn.Sequential(*layers, nn.Linear(width, embed))

        self.query_tower = tower()
        self.item_tower = tower()
        self.score = nn.Linear(2 * embed, 1)

    def forward(self, query: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        q, i = self.query_tower(query), self.item_tower(item)
        return self.score(torch.cat([q * i, q - i], dim=1))


def demo_inception(blocks: int = 2, width: int = 8, image_size: int = 32, classes: int = 10, batch_size: int = 8):
    """Inception-style CNN: each block forks into 4 parallel branches and joins them."""
    model = _seeded(lambda: DemoInception(blocks, width, classes))
    gen = torch.Generator().manual_seed(SEED)
    return model, {"image": torch.randn(batch_size, 3, image_size, image_size, generator=gen)}


def demo_two_tower(features: int = 256, width: int = 1024, depth: int = 4, embed: int = 128, batch_size: int = 8):
    """Two-tower scorer: equal query and item towers run in parallel, then a small head."""
    model = _seeded(lambda: DemoTwoTower(features, width, depth, embed))
    gen = torch.Generator().manual_seed(SEED)
    query = torch.randn(batch_size, features, generator=gen)
    return model, {"query": query, "item": torch.randn(batch_size, features, generator=gen)}


ZOO: dict[str, Factory] = {
    "demo-mlp": demo_mlp,
    "demo-transformer": demo_transformer,
    "demo-resnet": demo_resnet,
    "demo-inception": demo_inception,
    "demo-two-tower": demo_two_tower,
    "demo-cnn": demo_cnn,
}
