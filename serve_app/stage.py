"""One pipeline stage as a Ray Serve deployment (deployed once per stage as ``stage-0``, ``stage-1``, ...).

A replica loads only its own shard and is called with the payloads of the stages it reads from (merged in
order). A payload is a dict (value name -> array, batch on dim 0). The entrance forms the batches; a replica
merges the requests already waiting for it (``@serve.batch`` sized in samples, no waiting for more), and a
request as large as ``max_batch_size`` samples runs alone.

Deadlines: each call carries its request's deadline (``deadline_s``, ``time.time()`` seconds; the entrance
sets it). A call whose deadline has passed is refused before it runs, and a batch still running at the
latest deadline of its requests is abandoned (its callers get :class:`~serve_app.retry.DeadlineExceeded`
and the replica takes the next batch). The abandoned thread cannot be stopped: while one has run longer than
``StageConfig.max_batch_s``, :meth:`StageDeployment.check_health` fails, so Serve replaces the replica.
A batch that fails is bisected (:func:`~serve_app.batching.run_together`).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from typing import Any

import ray
import torch
from ray import serve

from partitions.runtime import StageRunner
from partitions.types import Payload
from serve_app.batching import run_together, samples, total_samples
from serve_app.config import StageConfig
from serve_app.metrics import StageMetrics, union_s, window_summary
from serve_app.names import BUSY_METRIC, FULL_BATCH_METRIC, QUEUED_METRIC, RUNNING_METRIC
from serve_app.retry import DeadlineExceeded
from serve_app.serve_types import set_batching
from serve_app.tensors import from_wire, to_wire


def late(deadline_s: float | None) -> DeadlineExceeded:
    """The error of a call whose deadline passed at this stage."""
    return DeadlineExceeded(f"the request's deadline passed at a stage ({deadline_s})", 0.0)


def expired(deadline_s: float | None) -> None:
    """Raise :func:`late` when ``deadline_s`` has passed."""
    if deadline_s is not None and time.time() >= deadline_s:
        raise late(deadline_s)


Call = tuple[Payload, float | None]
"""One request to a stage replica: its merged payload and its deadline (``time.time()`` seconds, or None)."""


def call_samples(calls: list[Call]) -> int:
    """Samples in a list of calls: the size ``@serve.batch`` gives a batch (its ``batch_size_fn``)."""
    return total_samples([p for p, _ in calls])


BUSY_HISTORY = 10_000
"""Busy intervals kept per replica (the oldest are dropped)."""
STATS_WINDOW = 32
"""Batches the autoscaling metric looks back over."""


@serve.deployment(ray_actor_options={"num_cpus": 0})
class StageDeployment:
    """Runs stage ``config.index`` of the plan at ``config.plan_uri`` on the device Ray assigned (CPU without
    CUDA)."""

    def __init__(self, config: StageConfig) -> None:
        """See :class:`StageConfig`."""
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        # On the plan's engine for this stage (ONNX Runtime: an intra-op pool of the replica's threads, else
        # the plan's tuned figure); eager where the engine cannot run here, with the reason in the log.
        self.runner = StageRunner(config.plan_uri, config.index, threads=config.torch_threads)
        if not config.torch_threads:
            torch.set_num_threads(self.runner.threads)
        self.max_batch_size = config.max_batch_size
        self.busy: deque[tuple[float, float, int, int]] = deque(maxlen=BUSY_HISTORY)
        self.started_s = time.time()
        self.busy_s = 0.0
        """Seconds the replica spent running batches since it started (overlapping batches counted once)."""
        self.busy_until = 0.0
        replica = serve.get_replica_context()
        self.metrics = StageMetrics(replica.app_name, replica.deployment, replica.replica_id.unique_id)
        set_batching(self.run_batch, config.max_batch_size, config.batch_wait_timeout_s)
        self.max_batch_s = config.max_batch_s
        self.running: dict[int, float] = {}
        """Start (``time.time()``) of each batch whose thread still runs, abandoned ones included."""
        self.tokens = itertools.count()

    async def __call__(self, *payloads: Payload, deadline_s: float | None = None) -> Payload:
        """Run the stage on the merged ``payloads``: the outputs of the stages it reads from (``Stage.after``,
        in that order), or the model inputs; :class:`DeadlineExceeded` once ``deadline_s`` has passed.
        Payloads come and go with bfloat16 as raw words (:func:`~serve_app.tensors.to_wire`)."""
        expired(deadline_s)
        payload: Payload = {}
        for p in payloads:
            payload.update(p)
        payload = from_wire(payload, self.runner.stage.inputs)
        self.metrics.request_in()
        try:
            result = await (
                self._timed(payload, 1, deadline_s)
                if samples(payload) >= self.max_batch_size
                else self.run_batch((payload, deadline_s))
            )
        finally:
            self.metrics.request_out()
        if isinstance(result, Exception):
            raise result
        return to_wire(result)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0, batch_size_fn=call_samples)
    async def run_batch(self, calls: list[Call]) -> list[Payload | Exception]:
        """Run the batch at once (the requests whose deadline passed while they waited excepted), until the
        latest of its deadlines; if that fails, bisect it so only the failing requests fail."""
        payloads = [p for p, _ in calls]
        deadlines = [d for _, d in calls]
        now = time.time()
        live = [i for i, d in enumerate(deadlines) if d is None or d > now]
        ends = [deadlines[i] for i in live]
        deadline_s = None if None in ends else max((d for d in ends if d is not None), default=None)
        answers = (
            await run_together(
                [payloads[i] for i in live],
                lambda payload, requests: self._timed(payload, requests, deadline_s),
                alone_on=lambda exc: not isinstance(exc, DeadlineExceeded),
            )
            if live
            else []
        )
        by_index = dict(zip(live, answers))
        return [by_index[i] if i in by_index else late(deadlines[i]) for i in range(len(payloads))]

    async def _timed(self, payload: Payload, requests: int, deadline_s: float | None = None) -> Payload:
        """The stage's outputs for ``payload``, run in a thread; :class:`DeadlineExceeded` (the thread left
        to finish on its own) when ``deadline_s`` passes first."""
        start = time.time()
        self.metrics.batch_started(requests, start)
        # A thread keeps the replica's event loop free to queue the next batch while this one runs.
        work = asyncio.to_thread(self._run, payload, next(self.tokens))
        try:
            if deadline_s is None:
                return await work
            return await asyncio.wait_for(work, max(deadline_s - start, 0.0))
        except asyncio.TimeoutError:
            raise late(deadline_s) from None
        finally:
            end, count = time.time(), samples(payload)
            self.busy.append((start, end, requests, count))
            self.busy_s += max(0.0, end - max(start, self.busy_until))
            self.busy_until = max(self.busy_until, end)
            self.metrics.batch_done(end - start, requests, count)

    def _run(self, payload: Payload, token: int) -> Payload:
        """In the batch's thread: ``self.running`` holds the batch from its start to its end, abandoned or not."""
        self.running[token] = time.time()
        try:
            return self.runner(payload)
        finally:
            self.running.pop(token, None)

    def check_health(self) -> None:
        """Serve's periodic health check: fails while a batch has run longer than ``max_batch_s`` (hung, or
        abandoned at its deadline and still running), so that Serve replaces this replica."""
        starts = tuple(self.running.values())  # one step: batch threads add and remove entries meanwhile
        if self.max_batch_s is None or not starts:
            return
        oldest_s = time.time() - min(starts)
        if oldest_s > self.max_batch_s:
            raise RuntimeError(
                f"a batch has run for {oldest_s:.0f} s, over the {self.max_batch_s:g} s bound (max_batch_s): "
                "replace this replica"
            )

    def busy_intervals(self) -> list[tuple[float, float, int, int]]:
        """``(start_s, end_s, requests, samples)`` per batch; times from ``time.time()`` (epoch seconds)."""
        return list(self.busy)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What Serve records for the autoscaling policy every ``min(0.2 x look_back_period_s,
        metrics_interval_s)`` seconds (:mod:`cluster.observe` reads the newest points): ``queued`` (requests
        waiting in this replica) and ``running`` (requests in its running batch) now, ``busy_s`` (seconds of
        batches so far), and ``full_batch_ms``: milliseconds of replica time per request (a request is usually a
        batch the entrance formed) over the last ``STATS_WINDOW`` batches, from the first batch on. Batches that
        overlap (a full request runs in a thread of its own, and waits there for the device) count their
        common time once: the figure is the replica's time per request, not a request's wait."""
        stats = {
            QUEUED_METRIC: float(self.metrics.queued()),
            RUNNING_METRIC: float(self.metrics.running),
            BUSY_METRIC: self.busy_s,
        }
        recent = list(self.busy)[-STATS_WINDOW:]
        if recent:
            stats[FULL_BATCH_METRIC] = (
                union_s([(a, b) for a, b, _, _ in recent]) * 1e3 / sum(n for _, _, n, _ in recent)
            )
        return stats

    async def record_routing_stats(self) -> dict[str, Any]:
        """What ``partserve status`` shows of this replica (:mod:`cluster.status` calls it on every replica
        actor; Serve also polls it for custom request routers): ``queued_requests`` and ``running_batches``
        (batches whose thread runs, abandoned ones included) now, and
        :func:`serve_app.metrics.window_summary` of the last ``WINDOW_S`` seconds."""
        summary = window_summary(self.busy, time.time(), self.started_s, self.metrics.running_since_s)
        return {"queued_requests": self.metrics.queued(), "running_batches": len(self.running), **summary}

    def placement(self) -> dict[str, Any]:
        """The resources Ray assigned to this replica (``GPU`` may be fractional) and the torch device used."""
        return {
            "resources": ray.get_runtime_context().get_assigned_resources(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "device": str(self.runner.device),
            "torch_threads": torch.get_num_threads(),
            "stage": self.runner.stage.index,
            "engine": self.runner.engine,
            "engine_threads": self.runner.threads,
            "engine_note": self.runner.engine_note,
        }
