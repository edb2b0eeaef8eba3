"""Discrete-event simulation of an S-stage pipeline served by autoscaled replicas.

Each stage has a FIFO queue and identical replicas; a free replica takes up to ``max_batch_size`` queued
requests and holds them for ``fixed_ms + per_sample_ms * n`` (times Gamma noise with ``service_cv``), then hands
the batch to the next stage's queue. A new replica serves after ``startup_s``; a removed busy replica finishes
its batch first. Every ``tick_s`` a controller gets a :class:`~cluster.sim.metrics.Snapshot` (the exact state;
what a policy may see of it is the controller's metrics model, :mod:`cluster.sim.metrics`) and sets each
stage's replicas; replicas beyond the GPU budget wait until GPUs free up, as in a Ray cluster.

Replicas are counted, not modelled one by one, arrivals that find every entrance replica busy are queued in
one slice, and latencies are written per batch with numpy: thousands of replicas and a million requests take
seconds.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from cluster.errors import check
from cluster.sim.metrics import Snapshot, StageSnapshot

_DONE, _READY = 0, 1


@dataclass(frozen=True)
class StageModel:
    name: str
    fixed_ms: float
    per_sample_ms: float
    max_batch_size: int = 8
    gpu_fraction: float = 1.0
    min_replicas: int = 1
    max_replicas: int = 100
    initial_replicas: int | None = None
    """Replicas at time 0; None: ``min_replicas``."""

    def __post_init__(self) -> None:
        check(
            self.fixed_ms >= 0 and self.per_sample_ms >= 0 and self.full_batch_ms > 0,
            f"stage {self.name!r}: fixed_ms ({self.fixed_ms}) and per_sample_ms ({self.per_sample_ms}) must be"
            " >= 0 and not both 0",
        )
        check(self.max_batch_size >= 1, f"stage {self.name!r}: max_batch_size ({self.max_batch_size}) must be >= 1")

    def batch_ms(self, n: int) -> float:
        return self.fixed_ms + self.per_sample_ms * n

    @property
    def full_batch_ms(self) -> float:
        return self.batch_ms(self.max_batch_size)

    @property
    def rate_per_s(self) -> float:
        """Requests/s of one replica with full batches."""
        return self.max_batch_size * 1000.0 / self.full_batch_ms


def with_initial_replicas(
    stages: list[StageModel], how: str, rate_per_s: float, target_utilisation: float
) -> list[StageModel]:
    """Stages starting at min replicas, at ``n``, or (``auto``) at ``rate / (mu_i * target_utilisation)``."""
    if how == "min":
        return stages
    if how == "auto":
        counts = [math.ceil(rate_per_s / (s.rate_per_s * target_utilisation)) for s in stages]
    else:
        check(how.isdigit(), f"initial replicas {how!r} is not 'min', 'auto' or a number")
        counts = [int(how)] * len(stages)
    return [
        StageModel(
            s.name,
            s.fixed_ms,
            s.per_sample_ms,
            s.max_batch_size,
            s.gpu_fraction,
            s.min_replicas,
            s.max_replicas,
            initial_replicas=min(s.max_replicas, max(s.min_replicas, n)),
        )
        for s, n in zip(stages, counts)
    ]


@dataclass(frozen=True)
class SimConfig:
    tick_s: float = 1.0
    startup_s: float = 5.0
    service_cv: float = 0.0
    gpu_budget: float | None = None
    drain_s: float = 300.0
    """After the last arrival, time allowed for the backlog to finish; later requests count as unfinished."""
    seed: int = 0
    max_ongoing: int = 0
    """Requests a replica accepts before the caller's handle queues them (Serve's ``max_ongoing_requests``, as
    metrics see it); 0: no limit."""


class Controller(Protocol):
    name: str

    def decide(self, snapshot: Snapshot) -> list[int]:
        """Replicas per stage, from the exact state (which the controller's metrics model filters)."""
        ...


@dataclass
class SimResult:
    arrivals_s: np.ndarray
    finish_s: np.ndarray
    """np.inf for requests still unfinished at the end."""
    tick_s: np.ndarray
    replicas: np.ndarray
    """(ticks, stages): replicas running or starting at each tick."""
    replica_seconds: float
    gpu_seconds: float
    """Replica-seconds weighted by each stage's GPU share."""
    scale_actions: int
    duration_s: float
    stage_names: list[str] = field(default_factory=list)

    @property
    def latency_ms(self) -> np.ndarray:
        return (self.finish_s - self.arrivals_s) * 1000.0


class _Stage:
    """Mutable per-stage bookkeeping."""

    def __init__(self, model: StageModel, replicas: int) -> None:
        self.model = model
        self.queue: deque[np.ndarray] = deque()
        self.head = self.queued = self.running = 0
        self.idle, self.busy, self.starting, self.draining, self.cancelled = replicas, 0, 0, 0, 0
        self.target = replicas
        self.completed, self.busy_s, self.full_ms, self.full_batches = 0, 0.0, 0.0, 0

    @property
    def alive(self) -> int:
        return self.idle + self.busy + self.starting

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n and self.queue:
            chunk, h = self.queue[0], self.head
            if len(chunk) - h <= n:
                parts.append(chunk[h:])
                n -= len(chunk) - h
                self.queue.popleft()
                self.head = 0
            else:
                parts.append(chunk[h : h + n])
                self.head, n = h + n, 0
        ids = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self.queued -= len(ids)
        return ids

    def snapshot(self, max_ongoing: int) -> StageSnapshot:
        return StageSnapshot(
            queued=self.queued,
            running=self.running,
            target=self.alive - self.draining,
            ready=self.idle + self.busy - self.draining,
            completed=self.completed,
            busy_s=self.busy_s,
            full_ms=self.full_ms,
            full_batches=self.full_batches,
            max_ongoing=max_ongoing,
            busy=self.busy,
            batch_size=self.model.max_batch_size,
        )


def simulate(
    stages: Sequence[StageModel],
    arrivals_s: np.ndarray,
    controller: Controller,
    duration_s: float,
    config: SimConfig = SimConfig(),
    progress: Callable[[float], None] | None = None,
) -> SimResult:
    """Run the pipeline on ``arrivals_s`` (sorted, seconds) under ``controller`` for ``duration_s``."""
    check(len(stages) >= 1, "the simulated pipeline needs at least 1 stage (got 0)")
    check(config.tick_s > 0, f"tick_s ({config.tick_s}) must be > 0")
    rng = np.random.default_rng((config.seed, 1))  # a stream apart from the arrivals drawn with the same seed
    noise = rng.gamma(1 / config.service_cv**2, config.service_cv**2, 1 << 16) if config.service_cv > 0 else np.ones(1)
    st = [_Stage(m, m.min_replicas if m.initial_replicas is None else m.initial_replicas) for m in stages]
    finish = np.full(len(arrivals_s), np.inf)
    events: list[tuple] = []
    seq = 0
    cost, gpu_cost, cost_t = 0.0, 0.0, 0.0
    n_alive, n_gpu = sum(s.alive for s in st), sum(s.alive * s.model.gpu_fraction for s in st)
    actions = 0
    ticks, replica_rows = [], []
    budget = math.inf if config.gpu_budget is None else config.gpu_budget

    def dispatch(i: int, t: float) -> None:
        nonlocal seq
        s = st[i]
        while s.idle and s.queued:
            ids = s.take(s.model.max_batch_size)
            s.idle -= 1
            s.busy += 1
            s.running += len(ids)
            dur = s.model.batch_ms(len(ids)) * noise[seq % len(noise)] / 1000.0
            seq += 1
            heapq.heappush(events, (t + dur, seq, _DONE, i, ids, dur))

    def reconcile(i: int, t: float) -> None:
        """Move stage i towards its target: undrain, start (GPU budget permitting) or stop replicas."""
        nonlocal seq, n_alive, n_gpu
        s, gpu = st[i], stages[i].gpu_fraction
        have = s.alive - s.draining
        if s.target > have:
            undrain = min(s.draining, s.target - have)
            s.draining -= undrain
            free = budget - sum(x.alive * x.model.gpu_fraction for x in st)
            add = s.target - have - undrain
            if gpu > 0 and free < math.inf:
                add = min(add, int(free / gpu + 1e-9))
            for _ in range(max(0, add)):
                seq += 1
                heapq.heappush(events, (t + config.startup_s, seq, _READY, i, None, 0.0))
            s.starting += max(0, add)
        elif s.target < have:
            remove = have - s.target
            for attr in ("starting", "idle"):
                k = min(getattr(s, attr), remove)
                setattr(s, attr, getattr(s, attr) - k)
                s.cancelled += k if attr == "starting" else 0
                remove -= k
            s.draining += remove
        n_alive = sum(x.alive for x in st)
        n_gpu = sum(x.alive * x.model.gpu_fraction for x in st)

    def account(t: float) -> None:
        nonlocal cost, gpu_cost, cost_t
        t = min(t, duration_s)
        cost += n_alive * max(0.0, t - cost_t)
        gpu_cost += n_gpu * max(0.0, t - cost_t)
        cost_t = max(cost_t, t)

    n, ai, next_tick = len(arrivals_s), 0, 0.0
    end_s = duration_s + config.drain_s
    while True:
        t_ev = events[0][0] if events else math.inf
        t_arr = arrivals_s[ai] if ai < n else math.inf
        t_tick = next_tick if next_tick <= duration_s else math.inf
        t = min(t_ev, t_arr, t_tick)
        if t == math.inf or t > end_s:
            break
        account(t)
        if t_tick <= t_ev and t_tick <= t_arr:
            snap = Snapshot(time_s=t, arrived=ai, stages=tuple(s.snapshot(config.max_ongoing) for s in st))
            decided = controller.decide(snap)
            for i, (s, target) in enumerate(zip(st, decided)):
                actions += target != s.target
                s.target = target
                reconcile(i, t)
            ticks.append(t)
            replica_rows.append([s.alive - s.draining for s in st])
            next_tick = t + config.tick_s
            if progress is not None:
                progress(t)
        elif t_arr <= t_ev:
            upto = ai + 1 if st[0].idle else max(ai + 1, int(np.searchsorted(arrivals_s, min(t_ev, t_tick))))
            st[0].queue.append(np.arange(ai, upto))
            st[0].queued += upto - ai
            ai = upto
            dispatch(0, t)
        else:
            _, _, kind, i, ids, dur = heapq.heappop(events)
            s = st[i]
            if kind == _READY:
                if s.cancelled:
                    s.cancelled -= 1
                    continue
                s.starting -= 1
            else:
                s.busy -= 1
                s.running -= len(ids)
                s.completed += len(ids)
                s.busy_s += dur
                if len(ids) == s.model.max_batch_size:
                    s.full_ms += dur * 1000.0
                    s.full_batches += 1
                if i + 1 < len(st):
                    st[i + 1].queue.append(ids)
                    st[i + 1].queued += len(ids)
                    dispatch(i + 1, t)
                else:
                    finish[ids] = t
                if s.draining:
                    s.draining -= 1
                    n_alive -= 1
                    n_gpu -= s.model.gpu_fraction
                    continue
            s.idle += 1
            dispatch(i, t)
    account(duration_s)
    return SimResult(
        arrivals_s=arrivals_s,
        finish_s=finish,
        tick_s=np.asarray(ticks),
        replicas=np.asarray(replica_rows, dtype=int).reshape(len(ticks), len(st)),
        replica_seconds=cost,
        gpu_seconds=gpu_cost,
        scale_actions=int(actions),
        duration_s=duration_s,
        stage_names=[m.name for m in stages],
    )
