"""Type aliases and small plain-data records shared across the partitioner."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from partitions.dtypes import np_dtype

Ms = float
"""Milliseconds."""
Bytes = int
"""A size in bytes."""

BATCH = -1
"""Marks the dynamic batch dimension in a shape."""

Payload = dict[str, np.ndarray]
"""Arrays keyed by value name, every one with the batch as dimension 0: a stage's inputs and outputs, a request,
a response."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (``BATCH`` = -1 for the batch dimension) and dtype name (:mod:`partitions.dtypes`) of one
    tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def sample_bytes(self) -> Bytes:
        """Bytes of one sample (the batch dimension counted as 1)."""
        n = 1
        for d in self.shape:
            n *= 1 if d == BATCH else d
        return n * self.np_dtype.itemsize

    @property
    def np_dtype(self) -> np.dtype:
        return np_dtype(self.dtype)

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        return cls(d["name"], tuple(int(x) for x in d["shape"]), d["dtype"])
