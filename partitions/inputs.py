"""Random inputs that match tensor specs: test cases, benchmark requests, calibration data."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from partitions.types import BATCH, Payload, TensorSpec


def random_inputs(
    specs: Sequence[TensorSpec],
    batch: int,
    rng: np.random.Generator | int,
    int_ranges: Mapping[str, tuple[int, int]] | None = None,
) -> Payload:
    """``batch`` samples for each spec: integers drawn uniformly from ``int_ranges[name]`` (``[low, high)``)
    where given, else standard normal values; cast to the spec's dtype. ``rng``: a generator (drawn from), or
    a seed."""
    rng = np.random.default_rng(rng)  # a Generator comes back as it is
    ranges = int_ranges or {}
    out = {}
    for spec in specs:
        shape = tuple(batch if d == BATCH else d for d in spec.shape)
        if spec.name in ranges:
            low, high = ranges[spec.name]
            out[spec.name] = rng.integers(low, high, size=shape).astype(spec.np_dtype)
        else:
            out[spec.name] = rng.standard_normal(shape).astype(spec.np_dtype)
    return out
