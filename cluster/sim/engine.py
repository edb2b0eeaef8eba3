"""Discrete-event simulation of an S-stage pipeline served by autoscaled replicas.

Each stage has identical replicas. A request (an arrival at the first stage; a batch handed on from the stage
before at the others) goes as Serve routes it (``SimConfig.routing``, default ``replicas``): to the less loaded
of two replicas drawn at random, into that replica's own queue, and waits at the caller while every replica
holds ``max_ongoing`` requests; a replica that starts gets only requests that arrive (or wait at the caller)
after it is ready, while the others work off their own queues. With ``shared`` routing a stage has one FIFO
queue that every free replica takes from. A free replica takes up to ``max_batch_size`` queued samples and
holds them for ``fixed_ms + per_sample_ms * n`` (times Gamma noise with ``service_cv``), then hands the batch
on. A new replica serves after ``startup_s``, or, with ``startup_slots``, after ``startup_s`` of progress
shared with the other replicas starting at the same time (:mod:`cluster.sim.startup`); a stopped replica finishes
what it holds first. Every
``tick_s`` a controller gets a :class:`~cluster.sim.metrics.Snapshot` (the exact state; what a policy may see
of it is the controller's metrics model, :mod:`cluster.sim.metrics`) and sets each stage's replicas; replicas
beyond the GPU budget wait until GPUs free up, as in a Ray cluster.

Latencies are written per batch with numpy: hundreds of replicas and a million requests take seconds.
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
from cluster.sim.metrics import ReplicaSnapshot, Snapshot, StageSnapshot
from cluster.sim.startup import startup_rate

_DONE, _READY = 0, 1
ROUTINGS = ("replicas", "shared")


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
    """Seconds a replica takes to start on its own."""
    startup_slots: float = 0.0
    """Replica start-ups that run at full speed at once; more share them (:func:`startup_rate`). 0: no limit,
    every start-up takes ``startup_s`` (replicas start on machines of their own). Set it to a machine's cores
    when every replica starts there and its start-up is CPU work (imports, loading a shard)."""
    service_cv: float = 0.0
    gpu_budget: float | None = None
    drain_s: float = 300.0
    """After the last arrival, time allowed for the backlog to finish; later requests count as unfinished."""
    seed: int = 0
    max_ongoing: int = 0
    """Requests a replica accepts before the caller's handle queues them (Serve's ``max_ongoing_requests``);
    0: no limit."""
    routing: str = "replicas"
    """``replicas``: Serve's routing, each replica with its own queue, a request sent to the less loaded of two
    replicas drawn at random (power of two choices) and held at the caller while every replica has
    ``max_ongoing`` requests; ``shared``: one queue per stage that every free replica takes from."""


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
    """(ticks, stages): replicas running or starting at each tick (not stopped)."""
    ready: np.ndarray
    """(ticks, stages): of those, the replicas that have started."""
    replica_seconds: float
    gpu_seconds: float
    """Replica-seconds weighted by each stage's GPU share."""
    scale_actions: int
    duration_s: float
    stage_names: list[str] = field(default_factory=list)

    @property
    def latency_ms(self) -> np.ndarray:
        return (self.finish_s - self.arrivals_s) * 1000.0


class _Queue:
    """Request ids waiting, in arrival order, as chunks (a batch handed on from the stage before is one)."""

    def __init__(self) -> None:
        self.chunks: deque[np.ndarray] = deque()
        self.head = self.count = 0

    def put(self, ids: np.ndarray) -> None:
        self.chunks.append(ids)
        self.count += len(ids)

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n and self.chunks:
            chunk, h = self.chunks[0], self.head
            if len(chunk) - h <= n:
                parts.append(chunk[h:])
                n -= len(chunk) - h
                self.chunks.popleft()
                self.head = 0
            else:
                parts.append(chunk[h : h + n])
                self.head, n = h + n, 0
        ids = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self.count -= len(ids)
        return ids


class _Replica:
    def __init__(self, queue: _Queue, ready: bool, ident: int) -> None:
        self.queue = queue
        """Its own queue (Serve's routing), or the stage's, shared by every replica."""
        self.ident = ident
        """Unique within its stage, as Serve's replica ids."""
        self.ready, self.busy, self.draining, self.running = ready, False, False, 0
        self.sent = False
        """Whether it has been sent a request (the caller's handle records a replica from its first request)."""
        self.left_s = 0.0
        """Start-up work left (seconds at full speed), while it starts."""
        self.busy_s, self.full_ms, self.full_batches = 0.0, 0.0, 0
        """Its own counters, as it reports them (``record_autoscaling_stats``)."""


class _Stage:
    """Mutable per-stage bookkeeping: the replicas, the stage's queue (shared routing) or the requests waiting
    at the caller's handle for a replica below ``max_ongoing`` (Serve's routing), counters for snapshots."""

    def __init__(self, model: StageModel, replicas: int, shared: bool) -> None:
        self.model = model
        self.shared = shared
        self.pending = _Queue()
        self.made = 0
        self.replicas = [self.new_replica(ready=True) for _ in range(replicas)]
        self.target = replicas
        self.completed, self.busy_s, self.full_ms, self.full_batches = 0, 0.0, 0.0, 0
        self._serving: list[_Replica] | None = None

    def new_replica(self, ready: bool) -> _Replica:
        self.made += 1
        return _Replica(self.pending if self.shared else _Queue(), ready, self.made)

    def serving(self) -> list[_Replica]:
        """The replicas that take new requests (ready, not stopped), kept until :meth:`changed`."""
        if self._serving is None:
            self._serving = [r for r in self.replicas if r.ready and not r.draining]
        return self._serving

    def changed(self) -> None:
        """A replica started, became ready, was stopped or went."""
        self._serving = None

    @property
    def alive(self) -> int:
        return len(self.replicas)

    def snapshot(self) -> StageSnapshot:
        queued = self.pending.count + (0 if self.shared else sum(r.queue.count for r in self.replicas))
        serving = [r for r in self.replicas if not r.draining]
        size = self.model.max_batch_size
        return StageSnapshot(
            queued=queued,
            running=sum(r.running for r in self.replicas),
            target=len(serving),
            ready=sum(r.ready for r in serving),
            completed=self.completed,
            busy_s=self.busy_s,
            full_ms=self.full_ms,
            full_batches=self.full_batches,
            busy=sum(r.busy for r in self.replicas),
            batch_size=size,
            sent=tuple(
                (r.ident, int(r.busy) + (0 if self.shared else math.ceil(r.queue.count / size)))
                for r in serving
                if r.ready and r.sent
            ),
            held=math.ceil(self.pending.count / size),
            replicas=self.replica_snapshots(),
        )

    def replica_snapshots(self) -> tuple[ReplicaSnapshot, ...]:
        """The serving replicas' own figures: each its own queue (a shared queue in equal shares, so that the
        replicas' sum is the stage's), its running batch and its counters."""
        serving = self.serving()
        share = self.pending.count / len(serving) if self.shared and serving else 0.0
        return tuple(
            ReplicaSnapshot(
                ident=r.ident,
                queued=share if self.shared else float(r.queue.count),
                running=r.running,
                busy_s=r.busy_s,
                full_ms=r.full_ms,
                full_batches=r.full_batches,
            )
            for r in serving
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
    check(config.startup_slots >= 0, f"startup_slots ({config.startup_slots}) must be >= 0 (0: no limit)")
    check(config.routing in ROUTINGS, f"routing {config.routing!r} is not one of {ROUTINGS}")
    rng = np.random.default_rng((config.seed, 1))  # a stream apart from the arrivals drawn with the same seed
    noise = rng.gamma(1 / config.service_cv**2, config.service_cv**2, 1 << 16) if config.service_cv > 0 else np.ones(1)
    picks = np.random.default_rng((config.seed, 2)).random(1 << 16)
    shared = config.routing == "shared"
    st = [_Stage(m, m.min_replicas if m.initial_replicas is None else m.initial_replicas, shared) for m in stages]
    finish = np.full(len(arrivals_s), np.inf)
    events: list[tuple] = []
    seq = pick = 0
    cost, gpu_cost, cost_t = 0.0, 0.0, 0.0
    n_alive, n_gpu = sum(s.alive for s in st), sum(s.alive * s.model.gpu_fraction for s in st)
    actions = 0
    ticks, replica_rows, ready_rows = [], [], []
    starting: list[tuple[int, _Replica]] = []
    """Replicas starting, with their stage; they progress together at :func:`startup_rate`."""
    starts_t, starts_version = 0.0, 0
    budget = math.inf if config.gpu_budget is None else config.gpu_budget
    cap = config.max_ongoing or math.inf

    def start_batch(i: int, r: _Replica, t: float) -> None:
        nonlocal seq
        ids = r.queue.take(st[i].model.max_batch_size)
        r.busy = r.sent = True
        r.running = len(ids)
        dur = st[i].model.batch_ms(len(ids)) * noise[seq % len(noise)] / 1000.0
        seq += 1
        heapq.heappush(events, (t + dur, seq, _DONE, i, (r, ids), dur))

    def choose(s: _Stage) -> _Replica | None:
        """Serve's power of two choices: of two different replicas drawn at random among those serving and
        under ``max_ongoing``, the one with fewer requests; None when there is none."""
        nonlocal pick
        serving = s.serving()
        open_ = serving if cap == math.inf else [r for r in serving if r.queue.count + r.running < cap]
        if len(open_) <= 1:
            return open_[0] if open_ else None
        first = int(picks[pick % len(picks)] * len(open_))
        second = int(picks[(pick + 1) % len(picks)] * (len(open_) - 1))  # two different replicas, as Serve draws
        pick += 2
        a, b = open_[first], open_[second + (second >= first)]
        return a if a.queue.count + a.running <= b.queue.count + b.running else b

    def feed(i: int, r: _Replica, t: float) -> None:
        """Start replica r's next batch if it is free and has work (a stopped replica works off its own
        queue, as in Serve, but takes nothing more from a shared one)."""
        if r.ready and not r.busy and r.queue.count and not (r.draining and shared):
            start_batch(i, r, t)

    def route(i: int, t: float) -> None:
        """Hand the stage's waiting requests to replicas: the caller's held requests to replicas below
        ``max_ongoing`` (Serve), or the shared queue to free replicas."""
        s = st[i]
        if shared:
            for free in s.serving():
                if not s.pending.count:
                    break
                feed(i, free, t)
            return
        while s.pending.count:
            r = choose(s)
            if r is None:
                break
            r.queue.put(s.pending.take(len(s.pending.chunks[0]) - s.pending.head))
            r.sent = True
            feed(i, r, t)

    def arrive(i: int, ids: np.ndarray, t: float) -> None:
        """A request (ids) arrives at stage i: to a replica's own queue (Serve), or, while requests are held
        at the caller or on a shared queue, behind them."""
        s = st[i]
        r = None if shared or s.pending.count else choose(s)
        if r is None:
            s.pending.put(ids)
            route(i, t)
        else:
            r.queue.put(ids)
            r.sent = True
            feed(i, r, t)

    def advance_starts(t: float) -> None:
        """Progress every start-up to ``t``, and forget the replicas stopped while starting (a starting replica
        holds no requests, so stopping it removes it at once)."""
        nonlocal starts_t, starting
        rate = startup_rate(len(starting), config.startup_slots)
        for _, r in starting:
            r.left_s -= (t - starts_t) * rate
        starts_t = t
        starting = [(i, r) for i, r in starting if not r.draining]

    def schedule_starts(t: float) -> None:
        """One event at the next start-up's end (those scheduled before are stale: ``starts_version``)."""
        nonlocal seq, starts_version
        starts_version += 1
        if starting:
            rate = startup_rate(len(starting), config.startup_slots)
            seq += 1
            ends = t + max(0.0, min(r.left_s for _, r in starting)) / rate
            heapq.heappush(events, (ends, seq, _READY, -1, starts_version, 0.0))

    def ready(i: int, r: _Replica, t: float) -> None:
        r.ready = True
        st[i].changed()
        route(i, t)

    def reconcile(i: int, t: float) -> None:
        """Move stage i towards its target: undrain, start (GPU budget permitting) or stop replicas. Stopped
        first: replicas still starting, then those with the fewest requests; a stopped replica with requests
        finishes them (Serve's graceful shutdown; on a shared queue, its running batch) and then goes."""
        nonlocal seq, n_alive, n_gpu
        s, gpu = st[i], stages[i].gpu_fraction
        serving = [r for r in s.replicas if not r.draining]
        if s.target > len(serving):
            for r in [r for r in s.replicas if r.draining][: s.target - len(serving)]:
                r.draining = False
            have = sum(not r.draining for r in s.replicas)
            free = budget - sum(x.alive * x.model.gpu_fraction for x in st)
            add = s.target - have
            if gpu > 0 and free < math.inf:
                add = min(add, int(free / gpu + 1e-9))
            if add > 0:
                advance_starts(t)
                for _ in range(add):
                    r = s.new_replica(ready=False)
                    r.left_s = config.startup_s
                    s.replicas.append(r)
                    starting.append((i, r))
                schedule_starts(t)
            s.changed()
            route(i, t)
        elif s.target < len(serving):
            order = sorted(serving, key=lambda r: (r.ready, r.running + (0 if shared else r.queue.count)))
            stopped = order[: len(serving) - s.target]
            for r in stopped:
                r.draining = True
                if not r.busy and (shared or not r.queue.count):
                    s.replicas.remove(r)
            if any(not r.ready for r in stopped):  # the other start-ups may speed up
                advance_starts(t)
                schedule_starts(t)
            s.changed()
            if not shared:  # their requests not yet started stay with them; new ones go elsewhere
                route(i, t)
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
            snap = Snapshot(time_s=t, arrived=ai, stages=tuple(s.snapshot() for s in st))
            decided = controller.decide(snap)
            for i, (s, target) in enumerate(zip(st, decided)):
                actions += target != s.target
                s.target = target
                reconcile(i, t)
            ticks.append(t)
            replica_rows.append([sum(not r.draining for r in s.replicas) for s in st])
            ready_rows.append([sum(r.ready and not r.draining for r in s.replicas) for s in st])
            next_tick = t + config.tick_s
            if progress is not None:
                progress(t)
        elif t_arr <= t_ev:
            arrive(0, np.arange(ai, ai + 1), t)
            ai += 1
        else:
            _, _, kind, i, what, dur = heapq.heappop(events)
            if kind == _READY:  # the next start-up's end, unless the starting replicas changed since
                if what == starts_version:
                    advance_starts(t)
                    done = [(j, r) for j, r in starting if r.left_s <= 1e-9]
                    starting = [(j, r) for j, r in starting if r.left_s > 1e-9]
                    for j, r in done:
                        ready(j, r, t)
                    schedule_starts(t)
                continue
            s = st[i]
            r, ids = what
            r.busy, r.running = False, 0
            s.completed += len(ids)
            s.busy_s += dur
            r.busy_s += dur
            if len(ids) == s.model.max_batch_size:
                s.full_ms += dur * 1000.0
                s.full_batches += 1
                r.full_ms += dur * 1000.0
                r.full_batches += 1
            if i + 1 < len(st):
                arrive(i + 1, ids, t)
            else:
                finish[ids] = t
            if r.draining and (shared or not r.queue.count):
                s.replicas.remove(r)
                n_alive -= 1
                n_gpu -= s.model.gpu_fraction
            else:
                feed(i, r, t)
            if not shared:  # a request held at the caller may now fit under max_ongoing
                route(i, t)
    account(duration_s)
    return SimResult(
        arrivals_s=arrivals_s,
        finish_s=finish,
        tick_s=np.asarray(ticks),
        replicas=np.asarray(replica_rows, dtype=int).reshape(len(ticks), len(st)),
        ready=np.asarray(ready_rows, dtype=int).reshape(len(ticks), len(st)),
        replica_seconds=cost,
        gpu_seconds=gpu_cost,
        scale_actions=int(actions),
        duration_s=duration_s,
        stage_names=[m.name for m in stages],
    )
