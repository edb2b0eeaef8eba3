"""One pipeline stage as a Ray Serve deployment (deployed once per stage as ``stage-0``, ``stage-1``, ...).

A replica loads only its own shard and is called with the payloads of the stages it reads from (merged in
order). A payload is a dict (value name -> array, batch on dim 0). The entrance forms the batches; a replica
merges the requests already waiting for it (``@serve.batch`` sized in samples, no waiting for more), and a
request as large as ``max_batch_size`` samples runs alone.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from typing import Any

import ray
import torch
from ray import serve

from partitions.runtime import StageRunner
from serve_app.batching import run_together, samples, total_samples
from serve_app.metrics import StageMetrics, window_summary
from serve_app.names import FULL_BATCH_METRIC
from serve_app.tensors import Payload

BUSY_HISTORY = 10_000
"""Busy intervals kept per replica (the oldest are dropped)."""
STATS_WINDOW = 32
"""Batches the autoscaling metric looks back over."""


@serve.deployment(ray_actor_options={"num_cpus": 0})
class StageDeployment:
    """Runs stage ``index`` of the plan at ``plan_uri`` on the device Ray assigned (CPU without CUDA)."""

    def __init__(
        self,
        plan_uri: str,
        index: int,
        max_batch_size: int,
        batch_wait_timeout_s: float = 0.0,
        torch_threads: int | None = None,
    ) -> None:
        """``max_batch_size``: samples per batch; ``batch_wait_timeout_s``: seconds a batch waits for more
        requests after its first (0: take what is waiting); ``torch_threads``: intra-op threads on CPU
        (default: Ray's, one per reserved CPU and at least one)."""
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.runner = StageRunner(plan_uri, index)
        self.max_batch_size = max_batch_size
        self.busy: deque[tuple[float, float, int, int]] = deque(maxlen=BUSY_HISTORY)
        self.started_s = time.time()
        replica = serve.get_replica_context()
        self.metrics = StageMetrics(replica.app_name, replica.deployment, replica.replica_id.unique_id)
        self.run_batch.set_max_batch_size(max_batch_size)
        self.run_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def __call__(self, *payloads: Payload) -> Payload:
        """Run the stage on the merged ``payloads``: the outputs of the stages it reads from (``Stage.after``,
        in that order), or the model inputs."""
        payload: Payload = {}
        for p in payloads:
            payload.update(p)
        self.metrics.request_in()
        try:
            result = await (
                self._timed(payload, 1) if samples(payload) >= self.max_batch_size else self.run_batch(payload)
            )
        finally:
            self.metrics.request_out()
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0, batch_size_fn=total_samples)
    async def run_batch(self, payloads: list[Payload]) -> list[Payload | Exception]:
        """Run the batch at once; if that fails, run each request alone so only the failing ones fail."""
        return await run_together(payloads, self._timed)

    async def _timed(self, payload: Payload, requests: int) -> Payload:
        start = time.time()
        self.metrics.batch_started(requests, start)
        try:
            # A thread keeps the replica's event loop free to queue the next batch while this one runs.
            return await asyncio.to_thread(self.runner, payload)
        finally:
            end, count = time.time(), samples(payload)
            self.busy.append((start, end, requests, count))
            self.metrics.batch_done(end - start, requests, count)

    def busy_intervals(self) -> list[tuple[float, float, int, int]]:
        """``(start_s, end_s, requests, samples)`` per batch; times from ``time.time()`` (epoch seconds)."""
        return list(self.busy)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """``full_batch_ms``: milliseconds of replica time per request (a request is usually a batch the
        entrance formed), the mean over the last ``STATS_WINDOW`` batches; nothing before the first batch.
        :mod:`cluster.serve_policy` reads it as the service time of one request."""
        recent = list(self.busy)[-STATS_WINDOW:]
        if not recent:
            return {}
        return {FULL_BATCH_METRIC: statistics.fmean((b - a) * 1e3 / n for a, b, n, _ in recent)}

    async def record_routing_stats(self) -> dict[str, Any]:
        """What ``partserve status`` shows of this replica (:mod:`cluster.status` calls it on every replica
        actor; Serve also polls it for custom request routers): ``queued_requests`` now and
        :func:`serve_app.metrics.window_summary` of the last ``WINDOW_S`` seconds."""
        summary = window_summary(self.busy, time.time(), self.started_s, self.metrics.running_since_s)
        return {"queued_requests": self.metrics.queued(), **summary}

    def placement(self) -> dict[str, Any]:
        """The resources Ray assigned to this replica (``GPU`` may be fractional) and the torch device used."""
        return {
            "resources": ray.get_runtime_context().get_assigned_resources(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "device": str(self.runner.device),
            "torch_threads": torch.get_num_threads(),
            "stage": self.runner.stage.index,
        }
