"""The named choices of compression, importable without torch (the CLI offers them before it loads a model)."""

from __future__ import annotations

from typing import Literal, get_args

Method = Literal["l1", "activation", "taylor", "random"]
"""How pruning ranks output channels (see :func:`partitions.compress.importance.scores`)."""
METHODS: tuple[Method, ...] = get_args(Method)

Mode = Literal["none", "dynamic-int8", "weight-int8", "fp16", "bf16"]
"""A quantization format (see :mod:`partitions.compress.quantize`)."""
MODES: tuple[Mode, ...] = get_args(Mode)
