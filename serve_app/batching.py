"""Payload batching shared by the entrance and the stages: sizes in samples, concat, split, run together.

A payload is a dict (name -> array) whose arrays share dimension 0, the batch; a request may carry many
samples, so batches are sized in samples, not requests.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np

from serve_app.tensors import Payload

R = TypeVar("R", bound=Payload)


def samples(payload: Payload) -> int:
    """Samples in a payload: the length of its batch dimension."""
    return len(next(iter(payload.values())))


def total_samples(payloads: list[Payload]) -> int:
    """Samples in a list of payloads: the size ``@serve.batch`` gives a batch (its ``batch_size_fn``)."""
    return sum(map(samples, payloads))


def concat(payloads: list[Payload]) -> tuple[Payload, list[int]]:
    """One payload holding every request's samples, and each request's batch length."""
    sizes = [samples(p) for p in payloads]
    if len(payloads) == 1:
        return payloads[0], sizes
    return {k: np.concatenate([p[k] for p in payloads]) for k in payloads[0]}, sizes


def split(payload: R, sizes: list[int]) -> list[R]:
    """Undo :func:`concat` on a result."""
    if len(sizes) == 1:
        return [payload]
    cuts = np.cumsum(sizes)[:-1]
    parts = {k: np.split(v, cuts) for k, v in payload.items()}
    return [{k: parts[k][i] for k in payload} for i in range(len(sizes))]  # type: ignore[misc]


async def run_together(
    payloads: list[Payload],
    run: Callable[[Payload, int], Awaitable[R]],
    alone_on: Callable[[Exception], bool] = lambda exc: True,
) -> list[R | Exception]:
    """``run(merged, requests)`` once for all ``payloads`` and split the result back. If that fails (and
    ``alone_on(exc)``), run each payload alone so only the failing ones fail."""
    merged, sizes = concat(payloads)
    try:
        return split(await run(merged, len(payloads)), sizes)
    except Exception as exc:
        if len(payloads) == 1 or not alone_on(exc):
            return [exc] * len(payloads)
    results: list[R | Exception] = []
    for payload in payloads:
        try:
            results.append(await run(payload, 1))
        except Exception as exc:
            results.append(exc)
    return results
