"""Per-stage metrics of the stage replicas, for Prometheus and for ``partserve status``.

Prometheus (``ray.util.metrics``; each node's metrics agent exports them with Ray's ``ray_`` prefix, e.g.
``ray_partserve_stage_batch_latency_ms_bucket``), tagged ``app``, ``stage`` (the deployment name) and
``replica`` like Serve's own ``serve_*`` metrics:

* ``partserve_stage_batch_latency_ms`` (histogram): wall time of one batch through the stage's module, ms.
* ``partserve_stage_batch_size`` (histogram): requests per batch.
* ``partserve_stage_batch_samples`` (histogram): samples per batch (a request may carry several).
* ``partserve_stage_queued_requests`` (gauge): requests in the replica waiting for a batch, set when a batch
  starts and when it ends.
* ``partserve_stage_busy_seconds`` (counter, exported as ``..._total``): seconds spent running batches; its
  rate is the replica's utilisation.

Ray exports a histogram's ``_sum`` from its bucket midpoints (an approximation): read the buckets
(``histogram_quantile``) and ``_count``.

``partserve status`` reads :func:`window_summary` of each replica instead (no metrics agent needed): the
batches of the last :data:`WINDOW_S` seconds, with latencies in a mergeable log-bucket sketch
(:func:`sketch_key`, :func:`sketch_quantile`; relative error under 2.2 %).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ray.util import metrics

WINDOW_S = 10.0
"""Seconds of recent batches a replica's :func:`window_summary` covers."""
LATENCY_BUCKETS_MS: list[float] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000]
BATCH_SIZE_BUCKETS: list[float] = [1, 2, 4, 8, 16, 32, 64, 128, 256]
SAMPLE_BUCKETS: list[float] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1_024, 4_096, 16_384]
SKETCH_STEPS_PER_OCTAVE = 16
"""Sketch buckets per doubling of the latency: each spans a factor ``2 ** (1 / 16)`` (4.4 %)."""
_MIN_MS = 1e-3


class StageMetrics:
    """The metrics of one stage replica, and its live queue: requests inside the replica (``request_in`` /
    ``request_out``) minus those in the running batch (a stage runs one batch at a time)."""

    def __init__(self, app: str, stage: str, replica: str) -> None:
        tags = {"app": app, "stage": stage, "replica": replica}
        keys = tuple(tags)
        self.latency = metrics.Histogram(
            "partserve_stage_batch_latency_ms",
            description="Wall time of one batch through the stage's module, in milliseconds.",
            boundaries=LATENCY_BUCKETS_MS,
            tag_keys=keys,
        )
        self.batch_size = metrics.Histogram(
            "partserve_stage_batch_size",
            description="Requests per batch.",
            boundaries=BATCH_SIZE_BUCKETS,
            tag_keys=keys,
        )
        self.batch_samples = metrics.Histogram(
            "partserve_stage_batch_samples",
            description="Samples per batch (a request may carry several).",
            boundaries=SAMPLE_BUCKETS,
            tag_keys=keys,
        )
        self.queued_gauge = metrics.Gauge(
            "partserve_stage_queued_requests",
            description="Requests in the replica waiting for a batch.",
            tag_keys=keys,
        )
        self.busy = metrics.Counter(
            "partserve_stage_busy_seconds",
            description="Seconds the replica spent running batches.",
            tag_keys=keys,
        )
        for metric in (self.latency, self.batch_size, self.batch_samples, self.queued_gauge, self.busy):
            metric.set_default_tags(tags)
        self.ongoing = 0
        self.running = 0
        self.running_since_s: float | None = None
        """``time.time()`` when the running batch started; None between batches."""

    def request_in(self) -> None:
        self.ongoing += 1

    def request_out(self) -> None:
        self.ongoing -= 1

    def queued(self) -> int:
        """Requests in the replica that are not in the running batch."""
        return max(0, self.ongoing - self.running)

    def batch_started(self, requests: int, now_s: float) -> None:
        self.running = requests
        self.running_since_s = now_s
        self.queued_gauge.set(self.queued())

    def batch_done(self, seconds: float, requests: int, samples: int) -> None:
        """Record a finished batch of ``requests`` requests, ``samples`` samples, that ran ``seconds`` s."""
        self.latency.observe(seconds * 1e3)
        self.batch_size.observe(requests)
        self.batch_samples.observe(samples)
        self.busy.inc(seconds)
        self.running_since_s = None
        self.queued_gauge.set(self.queued())  # the batch's callers are still counted in ``ongoing``
        self.running = 0


def sketch_key(ms: float) -> int:
    """The sketch bucket of a latency: ``ceil(16 * log2(ms))``."""
    return math.ceil(SKETCH_STEPS_PER_OCTAVE * math.log2(max(ms, _MIN_MS)))


def sketch_quantile(sketch: Mapping[int, int], q: float) -> float | None:
    """The ``q`` quantile (0..1, nearest rank) of the latencies counted in ``sketch`` ({bucket: count}), in ms:
    the geometric middle of its bucket; None for an empty sketch."""
    total = sum(sketch.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    keys = sorted(sketch)
    key = next(k for k, seen in zip(keys, itertools.accumulate(sketch[k] for k in keys)) if seen >= rank)
    return 2 ** ((key - 0.5) / SKETCH_STEPS_PER_OCTAVE)


def merge_sketches(sketches: Iterable[Mapping[int, int]]) -> dict[int, int]:
    merged: dict[int, int] = {}
    for sketch in sketches:
        for key, count in sketch.items():
            merged[key] = merged.get(key, 0) + count
    return merged


def union_s(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by the ``(start_s, end_s)`` intervals, overlaps counted once."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


def window_summary(
    batches: Sequence[tuple[float, float, int, int]],
    now_s: float,
    since_s: float,
    running_since_s: float | None = None,
    window_s: float = WINDOW_S,
) -> dict[str, Any]:
    """What a replica did in the last ``window_s`` seconds (or since ``since_s``, its start, if later).

    ``batches``: ``(start_s, end_s, requests, samples)``, newest last (epoch seconds); ``running_since_s``:
    start of the batch running now. Returns ``window_s`` (the span covered, s), ``busy_s`` (time inside it
    when a batch ran, the running batch included; batches that overlap count their common time once),
    ``batches``, ``requests``, ``samples`` (of the batches that ended in it)
    and ``latency_sketch`` ({:func:`sketch_key`: count} of their wall times).
    """
    begin = max(now_s - window_s, since_s)
    spans = [] if running_since_s is None else [(max(running_since_s, begin), now_s)]
    count = requests = samples = 0
    sketch: dict[int, int] = {}
    for start, end, n, k in reversed(batches):
        if end <= begin:
            break
        spans.append((max(start, begin), end))
        count += 1
        requests += n
        samples += k
        key = sketch_key((end - start) * 1e3)
        sketch[key] = sketch.get(key, 0) + 1
    return {
        "window_s": max(now_s - begin, 0.0),
        "busy_s": union_s(spans),
        "batches": count,
        "requests": requests,
        "samples": samples,
        "latency_sketch": sketch,
    }
