"""What a simulated autoscaling policy sees: one observation model for every policy.

The engine hands controllers a :class:`Snapshot` (the exact state at a tick, with cumulative counters); a
metrics model turns the stream of snapshots into :class:`~cluster.observe.DeploymentMetrics`, what Serve's
controller would hand an autoscaling policy:

* :class:`ServeMetrics` follows Ray Serve 2.60 (:mod:`cluster.observe` describes the path): the handle calling
  a deployment and its replicas each record every ``min(record_interval_factor x look_back_period_s,
  metrics_interval_s)`` seconds and push the points of the last ``look_back_period_s`` every
  ``metrics_interval_s`` (each source at its own phase); the controller sees, at any time, the last push.
  The handle records the requests it holds and, per replica it has sent requests to, those not yet back;
  the controller sums the series of its running replicas (a stopping replica's drop out) and averages the
  sum over time from the newest first point among them (:func:`merged_window_mean`), so a replica that
  joined lately shortens the window. Custom metrics are raw points, one series per replica; a replica records
  and pushes from the moment it is ready (its first points then, its phase its own), and its series exist only
  while it runs. The replicas running at the start have drawn phases.
  The entrance's arrival counter is recorded like a stage replica's metrics (the entrance has an
  ``autoscaling_config``).
* :class:`ExactMetrics` is the oracle: every count as it is at the tick, custom metrics recorded every tick.
  An upper bound on what any policy could know, not what Serve shows.

A source records at the first tick at or after each of its scheduled times (ticks are 1 s, records 6 s
apart at Serve's defaults).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cluster.errors import check
from cluster.observe import DeploymentMetrics
from serve_app.names import ARRIVED_METRIC, BUSY_METRIC, ENTRANCE, FULL_BATCH_METRIC, QUEUED_METRIC, RUNNING_METRIC


@dataclass(frozen=True)
class ReplicaSnapshot:
    """One serving replica at a tick: what its ``record_autoscaling_stats`` reads; counters from its start."""

    ident: int
    queued: float
    """Samples in its own queue."""
    running: int
    busy_s: float
    full_ms: float
    full_batches: int


@dataclass(frozen=True)
class StageSnapshot:
    """One stage at a tick, exactly; counters run from the start of the simulation."""

    queued: int
    running: int
    target: int
    """Replicas running or starting (not draining)."""
    ready: int
    """Replicas serving (not starting, not draining)."""
    completed: int
    busy_s: float
    full_ms: float
    """Summed wall time of the full batches finished so far."""
    full_batches: int
    busy: int = 0
    """Replicas running a batch."""
    batch_size: int = 1
    """Samples in a full batch."""
    sent: tuple[tuple[int, int], ...] = ()
    """(replica id, requests the caller has sent it and it has not finished) for each serving replica that has
    been sent a request: what the caller's handle records per replica."""
    held: int = 0
    """Requests held at the caller (no replica to send them to)."""
    replicas: tuple[ReplicaSnapshot, ...] = ()
    """The serving replicas, each as it reports itself."""

    @property
    def requests(self) -> int:
        """Ongoing requests as Serve counts them: a stage request is a batch the entrance formed, so the queued
        samples count in full batches, plus one per batch running."""
        return self.busy + math.ceil(self.queued / self.batch_size)


@dataclass(frozen=True)
class Snapshot:
    time_s: float
    arrived: int
    """Requests that have arrived at the pipeline so far."""
    stages: tuple[StageSnapshot, ...]


def merged_window_mean(series: Sequence[Sequence[tuple[float, float]]], now_s: float) -> float:
    """Serve's ``total_num_requests`` at MEAN aggregation (``AutoscalingState._merge_and_aggregate_timeseries``):
    the gauges summed into one step function (each value held until its source's next point, the last until
    ``now_s``) and averaged from the newest first point among the series (before it, a series that started
    later would count as 0) to ``now_s``; 0 without points, and one series' time-weighted mean for one. A
    replica that joined lately so shortens the window to its own points. The mean of the sum is the sum of
    each series' integral over the window."""
    live = [s for s in series if s]
    if not live:
        return 0.0
    start = max(s[0][0] for s in live)
    if now_s <= start:
        return sum(_value_at(s, start) for s in live)
    return sum(_integral(s, start, now_s) for s in live) / (now_s - start)


def _value_at(points: Sequence[tuple[float, float]], t: float) -> float:
    """The gauge at ``t``: its newest point at or before ``t`` (0 before its first)."""
    value = 0.0
    for when, v in points:
        if when > t:
            break
        value = v
    return value


def _integral(points: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """The gauge's integral over [start, end], each value held until the next point, the last until ``end``."""
    ends = [t for t, _ in points[1:]] + [end]
    return sum(v * max(0.0, min(stop, end) - max(t, start)) for (t, v), stop in zip(points, ends))


class _Source:
    """A recorder (the handle calling a deployment, or its replicas): records on its period, pushes the points
    of the look-back window on its own; ``pushed`` is what the controller holds."""

    def __init__(self, record_s: float, push_s: float, look_back_s: float, first_record_s: float, first_push_s: float):
        self.record_s, self.push_s, self.look_back_s = record_s, push_s, look_back_s
        self.next_record, self.next_push = first_record_s, first_push_s
        self.store: list[tuple[float, dict[str, float]]] = []
        self.pushed: list[tuple[float, dict[str, float]]] = []

    def advance(self, now_s: float, sample: dict[str, float] | None) -> bool:
        """Record ``sample`` (None: nothing to record, e.g. no replica runs) and push, when due; True when it
        recorded ``sample``."""
        recorded = False
        if now_s + 1e-9 >= self.next_record:
            if sample is not None:
                self.store.append((now_s, sample))
                recorded = True
            self.next_record += self.record_s * max(1, math.floor((now_s - self.next_record) / self.record_s) + 1)
        if now_s + 1e-9 >= self.next_push:
            start = now_s - self.look_back_s
            self.store = [p for p in self.store if p[0] >= start]
            self.pushed = list(self.store)
            self.next_push += self.push_s * max(1, math.floor((now_s - self.next_push) / self.push_s) + 1)
        return recorded

    def series(self, key: str) -> list[tuple[float, float]]:
        return [(t, v[key]) for t, v in self.pushed if key in v]


@dataclass(frozen=True)
class ServeMetricsConfig:
    """Ray Serve 2.60's defaults: ``AutoscalingConfig.metrics_interval_s`` and ``look_back_period_s``, and
    ``RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR``."""

    metrics_interval_s: float = 10.0
    look_back_period_s: float = 30.0
    record_interval_factor: float = 0.2

    def __post_init__(self) -> None:
        check(self.metrics_interval_s > 0, f"metrics_interval_s ({self.metrics_interval_s}) must be > 0")
        check(self.look_back_period_s > 0, f"look_back_period_s ({self.look_back_period_s}) must be > 0")
        check(self.record_interval_factor > 0, f"record_interval_factor ({self.record_interval_factor}) must be > 0")

    @property
    def record_interval_s(self) -> float:
        return min(self.record_interval_factor * self.look_back_period_s, self.metrics_interval_s)


def _next_at(began_s: float, period_s: float, now_s: float) -> float:
    """The first time at or after ``now_s`` of a timer that fired at ``began_s`` and every ``period_s`` since."""
    return began_s + period_s * math.ceil((now_s - began_s) / period_s - 1e-9)


def _replica_key(ident: int) -> str:
    return f"replica-{ident}"


def _custom(now: StageSnapshot | ReplicaSnapshot, previous: StageSnapshot | ReplicaSnapshot | None) -> dict[str, float]:
    """A replica's ``record_autoscaling_stats`` (of a stage: summed over its replicas)."""
    out = {QUEUED_METRIC: float(now.queued), RUNNING_METRIC: float(now.running), BUSY_METRIC: now.busy_s}
    batches = now.full_batches - (previous.full_batches if previous else 0)
    if batches > 0:
        out[FULL_BATCH_METRIC] = (now.full_ms - (previous.full_ms if previous else 0.0)) / batches
    return out


class ServeMetrics:
    """Ray Serve's view, per deployment: see the module docstring."""

    name = "serve"

    def __init__(
        self,
        stage_names: Sequence[str],
        config: ServeMetricsConfig = ServeMetricsConfig(),
        seed: int = 0,
        entrance_offsets_s: tuple[float, float] | None = None,
    ) -> None:
        """Each source's phase is drawn from ``seed``; ``entrance_offsets_s`` (first record, first push, seconds)
        sets the entrance's instead, e.g. as measured on a live run."""
        self.names, self.config = list(stage_names), config
        rng = np.random.default_rng((seed, 2))
        r, p, lb = config.record_interval_s, config.metrics_interval_s, config.look_back_period_s

        def source(phase: float) -> _Source:
            return _Source(r, p, lb, phase * r, phase * p)

        self.handles = [source(float(rng.uniform())) for _ in self.names]
        drawn = float(rng.uniform())  # drawn either way, so a seed gives the other sources the same phases
        self.entrance = source(drawn) if entrance_offsets_s is None else _Source(r, p, lb, *entrance_offsets_s)
        self._initial_phases = np.random.default_rng((seed, 3))
        self._started = False
        self.replicas: list[dict[int, tuple[_Source, ReplicaSnapshot | None]]] = [{} for _ in self.names]
        """Per stage, for each running replica (by id): its source, and its snapshot at its newest record."""

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            "model": self.name,
            "record_interval_s": c.record_interval_s,
            "push_interval_s": c.metrics_interval_s,
            "look_back_period_s": c.look_back_period_s,
        }

    def _replica_sources(self, i: int, stage: StageSnapshot, now: float) -> list[_Source]:
        """Stage i's running replicas' sources, advanced to ``now``: a replica seen for the first time records
        and pushes now (those running at the start, at a drawn phase); a replica gone takes its series along."""
        c = self.config
        replicas = self.replicas[i]
        for gone in set(replicas) - {r.ident for r in stage.replicas}:
            del replicas[gone]
        for r in stage.replicas:
            if r.ident not in replicas:
                # it started (recorded and pushed first) at `began`: now, or for those running at the start, a
                # drawn time in the look-back window before it
                began = now - (0.0 if self._started else float(self._initial_phases.uniform()) * c.look_back_period_s)
                source = _Source(
                    c.record_interval_s,
                    c.metrics_interval_s,
                    c.look_back_period_s,
                    _next_at(began, c.record_interval_s, now),
                    _next_at(began, c.metrics_interval_s, now),
                )
                replicas[r.ident] = (source, None)
            source, last = replicas[r.ident]
            if source.advance(now, _custom(r, last)):
                replicas[r.ident] = (source, r)
        return [source for source, _ in replicas.values()]

    def view(self, snap: Snapshot) -> tuple[DeploymentMetrics, list[DeploymentMetrics]]:
        """(the entrance, the stages) as the controller holds them at ``snap.time_s``."""
        now = snap.time_s
        self.entrance.advance(now, {ARRIVED_METRIC: float(snap.arrived), QUEUED_METRIC: 0.0})
        stages = []
        for i, (name, s) in enumerate(zip(self.names, snap.stages)):
            handle = self.handles[i]
            handle.advance(now, {"queued": float(s.held), **{_replica_key(r): float(n) for r, n in s.sent}})
            sources = self._replica_sources(i, s, now)
            keys = {k for source in sources for _, v in source.pushed for k in v}
            stages.append(
                DeploymentMetrics(
                    name=name,
                    current_replicas=s.ready,
                    target_replicas=s.target,
                    total_requests=merged_window_mean(
                        [handle.series("queued")] + [handle.series(_replica_key(r)) for r, _ in s.sent], now
                    ),
                    queued_requests=merged_window_mean([handle.series("queued")], now),
                    raw={k: [source.series(k) for source in sources] for k in keys},
                )
            )
        self._started = True
        entrance = DeploymentMetrics(
            name=ENTRANCE,
            current_replicas=1,
            target_replicas=1,
            total_requests=0.0,
            raw={k: [self.entrance.series(k)] for k in (ARRIVED_METRIC, QUEUED_METRIC)},
        )
        return entrance, stages


class ExactMetrics:
    """The oracle: counts as they are at the tick; custom metrics recorded every tick (the two newest kept)."""

    name = "exact"

    def __init__(self, stage_names: Sequence[str]) -> None:
        self.names = list(stage_names)
        self.last: Snapshot | None = None

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "record_interval_s": 0, "push_interval_s": 0, "look_back_period_s": 0}

    def view(self, snap: Snapshot) -> tuple[DeploymentMetrics, list[DeploymentMetrics]]:
        prev, now = self.last, snap.time_s
        self.last = snap

        stages = []
        for i, (name, s) in enumerate(zip(self.names, snap.stages)):
            p = prev.stages[i] if prev is not None else None
            raw = {k: [[(now, v)]] for k, v in _custom(s, p).items()} if s.ready else {}
            stages.append(
                DeploymentMetrics(
                    name=name,
                    current_replicas=s.ready,
                    target_replicas=s.target,
                    total_requests=float(s.requests),
                    queued_requests=float(s.held),
                    raw=raw,
                )
            )
        arrived = [
            [(now, float(snap.arrived))]
            if prev is None
            else [(prev.time_s, float(prev.arrived)), (now, float(snap.arrived))]
        ]
        entrance = DeploymentMetrics(
            name=ENTRANCE,
            current_replicas=1,
            target_replicas=1,
            total_requests=0.0,
            raw={ARRIVED_METRIC: arrived, QUEUED_METRIC: [[(now, 0.0)]]},
        )
        return entrance, stages


MetricsModel = ServeMetrics | ExactMetrics


def metrics_model(kind: str, stage_names: Sequence[str], config: ServeMetricsConfig, seed: int = 0) -> MetricsModel:
    """``serve`` (Ray Serve's path, the default) or ``exact`` (the oracle)."""
    check(kind in ("serve", "exact"), f"metrics model {kind!r} is not 'serve' or 'exact'")
    return ServeMetrics(stage_names, config, seed) if kind == "serve" else ExactMetrics(stage_names)
