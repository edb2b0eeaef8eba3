"""One pipeline stage as a Ray Serve deployment (deployed once per stage as ``stage-0``, ``stage-1``, ...).

A replica loads only its own shard and is called with the payloads of the stages it reads from (merged in
order). A payload is a dict (value name -> array, batch on dim 0); the replica batches requests with
``@serve.batch``: concatenated along dim 0, run once, split back by each request's batch length.
``max_batch_size`` counts requests, not samples (a request may carry many).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from typing import Any

import numpy as np
import ray
from ray import serve

from partitions.runtime import StageRunner
from serve_app.tensors import Payload

BUSY_HISTORY = 10_000
"""Busy intervals kept per replica (the oldest are dropped)."""
FULL_BATCH_METRIC = "full_batch_ms"
"""Custom autoscaling metric read by :mod:`cluster.serve_policy`."""
STATS_WINDOW = 32
"""Batches the autoscaling metric looks back over."""


def samples(payload: Payload) -> int:
    """Samples in a payload: the length of its batch dimension."""
    return len(next(iter(payload.values())))


def concat(payloads: list[Payload]) -> tuple[Payload, list[int]]:
    """One payload holding every request's samples, and each request's batch length."""
    sizes = [len(next(iter(p.values()))) for p in payloads]
    if len(payloads) == 1:
        return payloads[0], sizes
    return {k: np.concatenate([p[k] for p in payloads]) for k in payloads[0]}, sizes


def split(payload: Payload, sizes: list[int]) -> list[Payload]:
    """Undo :func:`concat` on a stage's result."""
    if len(sizes) == 1:
        return [payload]
    cuts = np.cumsum(sizes)[:-1]
    parts = {k: np.split(v, cuts) for k, v in payload.items()}
    return [{k: parts[k][i] for k in payload} for i in range(len(sizes))]


@serve.deployment(ray_actor_options={"num_cpus": 0})
class StageDeployment:
    """Runs stage ``index`` of the plan at ``plan_uri`` on the device Ray assigned (CPU without CUDA)."""

    def __init__(self, plan_uri: str, index: int, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        """``batch_wait_timeout_s``: seconds a batch waits for more requests after its first."""
        self.runner = StageRunner(plan_uri, index)
        self.max_batch_size = max_batch_size
        self.busy: deque[tuple[float, float, int, int]] = deque(maxlen=BUSY_HISTORY)
        self.run_batch.set_max_batch_size(max_batch_size)
        self.run_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def __call__(self, *payloads: Payload) -> Payload:
        """Run the stage on the merged ``payloads``: the outputs of the stages it reads from (``Stage.after``,
        in that order), or the model inputs."""
        payload: Payload = {}
        for p in payloads:
            payload.update(p)
        result = await self.run_batch(payload)
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def run_batch(self, payloads: list[Payload]) -> list[Payload | Exception]:
        """Run the batch at once; if that fails, run each request alone so only the failing ones fail."""
        merged, sizes = concat(payloads)
        try:
            return split(await self._timed(merged, len(payloads)), sizes)
        except Exception as exc:
            if len(payloads) == 1:
                return [exc]
        results: list[Payload | Exception] = []
        for payload in payloads:
            try:
                results.append(await self._timed(payload, 1))
            except Exception as exc:
                results.append(exc)
        return results

    async def _timed(self, payload: Payload, requests: int) -> Payload:
        start = time.time()
        try:
            # A thread keeps the replica's event loop free to queue the next batch while this one runs.
            return await asyncio.to_thread(self.runner, payload)
        finally:
            self.busy.append((start, time.time(), requests, len(next(iter(payload.values())))))

    def busy_intervals(self) -> list[tuple[float, float, int, int]]:
        """``(start_s, end_s, requests, samples)`` per batch; times from ``time.time()`` (epoch seconds)."""
        return list(self.busy)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """``full_batch_ms``: milliseconds one batch of ``max_batch_size`` requests takes, the mean of the full
        batches among the last ``STATS_WINDOW`` (else of all of them, each scaled up to a full batch: an upper
        bound); nothing before the first batch."""
        recent = list(self.busy)[-STATS_WINDOW:]
        full = [(a, b, n) for a, b, n, _ in recent if n >= self.max_batch_size]
        batches = full or [(a, b, n) for a, b, n, _ in recent]
        if not batches:
            return {}
        return {FULL_BATCH_METRIC: statistics.fmean((b - a) * 1e3 * self.max_batch_size / n for a, b, n in batches)}

    def placement(self) -> dict[str, Any]:
        """The resources Ray assigned to this replica (``GPU`` may be fractional) and the torch device used."""
        return {
            "resources": ray.get_runtime_context().get_assigned_resources(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "device": str(self.runner.device),
            "stage": self.runner.stage.index,
        }
