"""An opt-in result cache for the entrance: repeated inputs skip the pipeline.

Keys hash the input bytes (names, dtypes, shapes and data of every tensor) together with the plan's
version, so a new plan never answers from an old one's results. Entries are evicted least recently used
first once their total size passes ``max_bytes``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from partitions.plan import Plan
from partitions.types import Payload


def plan_version(plan: Plan) -> str:
    """A short hash of what the plan computes: its model and every shard's hash."""
    parts = [str(plan.model.get("spec")), *(s.artifact.sha256 for s in plan.stages)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def input_key(version: str, inputs: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256(version.encode())
    for name in sorted(inputs):
        a = np.ascontiguousarray(inputs[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.data.cast("B"))
    return h.hexdigest()


class ResultCache:
    """LRU map from input key to outputs, bounded in bytes (keys and bookkeeping not counted)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes ({max_bytes}) must be >= 0")
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, Payload] = OrderedDict()
        self.size_bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Payload | None:
        outputs = self.entries.get(key)
        if outputs is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return outputs

    def put(self, key: str, outputs: Payload) -> None:
        size = sum(a.nbytes for a in outputs.values())
        if size > self.max_bytes or key in self.entries:
            return
        self.entries[key] = outputs
        self.size_bytes += size
        while self.size_bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.size_bytes -= sum(a.nbytes for a in old.values())

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self.entries), "bytes": self.size_bytes}
