"""Coordinated pipeline autoscaling: one decision for every stage per tick. Pure: no Ray, no clock, no I/O.

Ray Serve's default policy scales each deployment from its own ongoing requests, so a load step cascades:
stage 2 only sees load once stage 1 has scaled and drained. Here the pipeline is one system, as in
InferLine (Crankshaw et al., SoCC'20) and AlpaServe (Li et al., OSDI'23):

1. Service rates. Each stage's full-batch service time starts at the plan's profiled cost and follows live
   measurements through an EWMA; a replica serves ``mu_i = batch_size_i / service_s_i`` requests/s.
2. Arrival rate at the entrance: measured, when the observation carries one (the entrance's arrival counter,
   over its window, or its newest interval when that departs from the window: see :mod:`cluster.observe`),
   taken once per new sample;
   otherwise from conservation, arrivals = growth of the entrance's ongoing requests + its completions
   (measured, or ``running / service_s`` by Little's law). Either is smoothed by an EWMA.
3. Backlogs, brought up to now: ``backlog_i`` counts the requests queued at stage i and every request still
   upstream of it (they will all pass through stage i). A sample taken ``age`` seconds ago is moved forward
   by what the pipeline did since: ``+ (lambda - min_{j <= i} ready_j * mu_j) * age``, never below 0.
4. Demand, for all stages at once: ``lambda / (mu_i * target_utilisation)`` plus a drain term
   ``backlog_i / (drain_time_s * mu_i)``: a rise at the entrance sizes every stage before its queue grows.
5. Bounds: no stage gets more replicas than pass on what the slowest stage carries at its maximum
   (``ceil(min_j max_j * mu_j / mu_i)``: more would idle, however large the backlog), per-stage min/max, then
   a GPU budget: when demand does not fit, the replicas that fit maximise the
   bottleneck throughput ``min_i r_i * mu_i`` (greedy water-filling on the bottleneck; optimal, see
   :func:`bottleneck_allocation`); the same allocation gives out new replicas when at most ``max_starting``
   may start at once (a node starts a few replica processes at a time: those that raise the bottleneck
   start first).
6. A band against the noise of a measured rate (``rate_noise_sigmas`` of its Poisson noise): a stage scales
   up only when its demand exceeds its replicas by more than the band, and down to the replicas that carry
   its demand within it (so a reading a little over a whole replica neither adds one nor holds one back; at
   a high rate the band narrows to nothing); hysteresis (a downscale must cut at least ``hysteresis`` of the
   replicas) and upscale/downscale delays; an idle pipeline goes to the minimum.

Ray adapter (:mod:`cluster.serve_policy`): Ray 2.60 calls an application-level policy with
``{DeploymentID: AutoscalingContext}`` and expects ``({DeploymentID: replicas}, {DeploymentID: state dict})``.
:mod:`cluster.observe` turns the contexts (the stages', and the entrance's when it has an
``autoscaling_config``) into a :class:`PipelineObservation`; the adapter calls :func:`step` and keeps the
:class:`PolicyState` between ticks. The simulator (:mod:`cluster.sim`) feeds the same function the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cluster.errors import check

_EPS = 1e-9


@dataclass(frozen=True)
class StageSpec:
    """A stage as the policy sees it: profiled full-batch cost, GPU share per replica, replica bounds."""

    name: str
    service_ms: float
    """Profiled wall time of one full batch (``batch_size`` requests)."""
    batch_size: int = 1
    gpu_fraction: float = 1.0
    min_replicas: int = 1
    max_replicas: int = 100

    def __post_init__(self) -> None:
        n = self.name
        check(self.service_ms > 0, f"service_ms ({self.service_ms}) of stage {n!r} must be > 0")
        check(self.batch_size >= 1, f"batch_size ({self.batch_size}) of stage {n!r} must be >= 1")
        check(self.gpu_fraction >= 0, f"gpu_fraction ({self.gpu_fraction}) of stage {n!r} must be >= 0")
        check(self.min_replicas >= 0, f"min_replicas ({self.min_replicas}) of stage {n!r} must be >= 0")
        check(
            self.max_replicas >= max(1, self.min_replicas),
            f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas}) and >= 1"
            f" for stage {n!r}",
        )


@dataclass(frozen=True)
class PolicyConfig:
    stages: tuple[StageSpec, ...]
    target_utilisation: float = 0.85
    """Fraction of a replica's full-batch rate the steady-state demand may use (a backlog gets replicas of its
    own, ``drain_time_s``). Lower keeps more headroom for bursts at more replica-seconds: in the simulator's
    bursty run 0.7 kept the SLO for 97.4% of requests at 16,881 replica-s, 0.85 for 87.3% at 14,725
    (BENCHMARKS.md, "Autoscaling")."""
    drain_time_s: float = 10.0
    """A backlog is sized to be worked off within this time."""
    gpu_budget: float | None = None
    """GPUs for all stage replicas together (sum of replicas x gpu_fraction); None: unlimited."""
    max_starting: int | None = None
    """Replicas that may be starting at once over all stages (None: no limit). Where a node starts its replica
    processes a few at a time (Ray starts at most as many worker processes at once as the node has CPUs), a
    larger upscale is only queued behind itself: with a limit, the new replicas that raise the bottleneck's
    throughput most start first (:func:`startup_allocation`)."""
    upscale_delay_s: float = 0.0
    downscale_delay_s: float = 120.0
    hysteresis: float = 0.1
    """A downscale must remove at least this fraction of a stage's replicas."""
    rate_noise_sigmas: float = 1.5
    """Width of the band against rate noise (:func:`banded_target`), in standard deviations of the measured
    arrival rate (Poisson: ``1 / sqrt(events)`` of it). A 30 s window at 5 requests/s counts ~150 requests,
    8% noise: without the band each high reading added a replica (``upscale_delay_s`` 0) and each reading
    just over a whole replica restarted the downscale delay. 0: no band."""
    rate_smoothing: float = 0.5
    """EWMA weight of the newest arrival-rate sample estimated from the first stage's flow (each tick)."""
    counter_smoothing: float = 1.0
    """EWMA weight of each new measured arrival-rate sample (the entrance's counter: already a mean over
    Serve's record interval)."""
    latency_smoothing: float = 0.3
    """EWMA weight of the newest service-time sample."""

    def __post_init__(self) -> None:
        check(len(self.stages) >= 1, "a pipeline needs at least 1 stage (got 0)")
        check(0 < self.target_utilisation <= 1, f"target_utilisation ({self.target_utilisation}) must be in (0, 1]")
        check(self.drain_time_s > 0, f"drain_time_s ({self.drain_time_s}) must be > 0")
        check(self.upscale_delay_s >= 0, f"upscale_delay_s ({self.upscale_delay_s}) must be >= 0")
        check(self.downscale_delay_s >= 0, f"downscale_delay_s ({self.downscale_delay_s}) must be >= 0")
        check(0 <= self.hysteresis < 1, f"hysteresis ({self.hysteresis}) must be in [0, 1)")
        check(self.max_starting is None or self.max_starting >= 1, f"max_starting ({self.max_starting}) must be >= 1")
        check(self.rate_noise_sigmas >= 0, f"rate_noise_sigmas ({self.rate_noise_sigmas}) must be >= 0")
        for name in ("rate_smoothing", "counter_smoothing", "latency_smoothing"):
            value = getattr(self, name)
            check(0 < value <= 1, f"{name} ({value}) must be in (0, 1]")
        if self.gpu_budget is not None:
            floor = sum(s.min_replicas * s.gpu_fraction for s in self.stages)
            check(
                self.gpu_budget >= floor - _EPS,
                f"gpu_budget ({self.gpu_budget}) is below the GPUs the minimum replicas need ({floor:g})",
                "raise the budget or lower min_replicas",
            )


@dataclass(frozen=True)
class StageObservation:
    """One stage at one tick."""

    queued: float
    running: float
    target_replicas: int
    """Replicas the stage is currently set to (running or starting)."""
    completed: float | None = None
    """Requests the stage finished since the previous tick; None: estimated as ``running / service_s``."""
    service_ms: float | None = None
    """Mean measured wall time of full batches since the previous tick; None: no full batch measured."""
    ready_replicas: int | None = None
    """Replicas serving now (not starting); None: ``target_replicas``."""
    sampled_at_s: float | None = None
    """When ``queued`` and ``running`` were recorded; None: at the observation's ``time_s``."""


@dataclass(frozen=True)
class PipelineObservation:
    time_s: float
    stages: tuple[StageObservation, ...]
    arrival_rate_per_s: float | None = None
    """Arrivals/s at the entrance, measured over an interval ending at ``rate_sampled_at_s``; None: estimate
    them from the first stage's flow."""
    rate_sampled_at_s: float | None = None
    arrival_events: float | None = None
    """The arrivals the measured rate counts (its relative Poisson noise is ``1 / sqrt`` of it); None: unknown,
    no band against noise."""
    entrance_queued: float = 0.0
    """Requests waiting at the entrance, upstream of every stage (in stage requests)."""


@dataclass(frozen=True)
class StageState:
    service_ms: float
    """EWMA of the full-batch service time."""
    pending_direction: int = 0
    """+1 while an upscale waits for its delay, -1 for a downscale, 0 otherwise."""
    pending_since_s: float | None = None


@dataclass(frozen=True)
class PolicyState:
    stages: tuple[StageState, ...]
    arrival_rate_per_s: float = 0.0
    entrance_ongoing: float = 0.0
    time_s: float | None = None
    rate_sampled_at_s: float | None = None
    """Time of the last measured arrival-rate sample taken into the EWMA (each sample is taken once)."""


def initial_state(config: PolicyConfig) -> PolicyState:
    """Service times from the profiled costs, no arrivals seen yet."""
    return PolicyState(stages=tuple(StageState(service_ms=s.service_ms) for s in config.stages))


def ewma(previous: float, sample: float, weight: float) -> float:
    """``previous + weight * (sample - previous)``."""
    return previous + weight * (sample - previous)


def replica_rate_per_s(service_ms: float, batch_size: int) -> float:
    """Requests/s one replica serves with full batches: ``batch_size / (service_ms / 1000)``."""
    return batch_size * 1000.0 / service_ms


def arrival_rate_sample(
    entrance: StageObservation, previous_ongoing: float, dt_s: float | None, service_ms: float
) -> float:
    """Arrivals/s at the entrance: ongoing growth + completions (conservation of requests)."""
    ongoing = entrance.queued + entrance.running
    if dt_s is None or dt_s <= 0:
        return entrance.running * 1000.0 / service_ms
    done = entrance.completed if entrance.completed is not None else entrance.running * 1000.0 / service_ms * dt_s
    return max(0.0, (ongoing - previous_ongoing + done) / dt_s)


def backlogs(stages: Sequence[StageObservation]) -> list[float]:
    """Requests that stage i still has to serve beyond the steady flow: its own queue plus everything upstream."""
    out, upstream = [], 0.0
    for s in stages:
        out.append(upstream + s.queued)
        upstream += s.queued + s.running
    return out


def projected_backlogs(
    stages: Sequence[StageObservation],
    arrival_rate_per_s: float,
    rates_per_s: Sequence[float],
    now_s: float,
    entrance_queued: float = 0.0,
) -> list[float]:
    """:func:`backlogs` (plus the entrance's queue) brought forward from when they were sampled to ``now_s``:
    stage i's grows by ``(lambda - min_{j <= i} ready_j * mu_j) * age`` (shrinks when that is negative), >= 0."""
    out, capacity = [], math.inf
    for b, s, mu in zip(backlogs(stages), stages, rates_per_s):
        ready = s.target_replicas if s.ready_replicas is None else s.ready_replicas
        capacity = min(capacity, ready * mu)
        age = 0.0 if s.sampled_at_s is None else max(0.0, now_s - s.sampled_at_s)
        out.append(max(0.0, b + entrance_queued + (arrival_rate_per_s - capacity) * age))
    return out


def demand_replicas(arrival_rate_per_s: float, backlog: float, rate_per_s: float, config: PolicyConfig) -> float:
    """``lambda / (mu * target_utilisation) + backlog / (drain_time_s * mu)`` (fractional replicas)."""
    return arrival_rate_per_s / (rate_per_s * config.target_utilisation) + backlog / (config.drain_time_s * rate_per_s)


def bottleneck_allocation(
    lower: Sequence[int],
    upper: Sequence[int],
    rates_per_s: Sequence[float],
    gpu_fractions: Sequence[float],
    gpu_budget: float,
    give_back: bool = True,
) -> list[int]:
    """Integer replicas ``lower_i <= r_i <= upper_i`` with ``sum r_i g_i <= gpu_budget`` that maximise the
    bottleneck ``min_i r_i mu_i`` over the stages below ``upper``, at least cost (``give_back`` False: the
    whole budget spent, each replica where the bottleneck is at that moment).

    Greedy water-filling: add one replica to the slowest stage below its upper bound while it fits. Optimal:
    while the level L is below the optimum T*, every r_i <= max(lower_i, ceil(T*/mu_i)) (a stage was only raised
    while it was the bottleneck), so the bottleneck stage's next replica fits within the cost of the optimum.
    Replicas left above the reached level by ties are given back.
    """
    r = list(lower)
    spent = sum(n * g for n, g in zip(r, gpu_fractions))
    open_ = [i for i in range(len(r)) if r[i] < upper[i]]
    while open_:
        i = min(open_, key=lambda j: r[j] * rates_per_s[j])
        if spent + gpu_fractions[i] > gpu_budget + _EPS:
            break
        r[i] += 1
        spent += gpu_fractions[i]
        if r[i] >= upper[i]:
            open_.remove(i)
    unsaturated = [i for i in range(len(r)) if r[i] < upper[i]]
    if unsaturated and give_back:
        level = min(r[i] * rates_per_s[i] for i in unsaturated)
        r = [min(n, max(lo, math.ceil(level / mu - _EPS))) for n, lo, mu in zip(r, lower, rates_per_s)]
    return r


def startup_allocation(
    desired: Sequence[int], stages: Sequence[StageObservation], rates_per_s: Sequence[float], max_starting: int
) -> list[int]:
    """``desired`` with at most ``max_starting`` replicas starting at once (those already starting count): the
    free start-up slots go one by one to the stage that is the bottleneck ``min_i r_i * mu_i`` at that moment
    (:func:`bottleneck_allocation` at one slot per replica, every slot used: what waits will start next);
    downscales are kept."""
    current = [o.target_replicas for o in stages]
    starting = sum(max(0, o.target_replicas - o.ready_replicas) for o in stages if o.ready_replicas is not None)
    lower = [min(c, d) for c, d in zip(current, desired)]
    budget = sum(lower) + max(0, max_starting - starting)
    if sum(desired) <= budget:
        return list(desired)
    return bottleneck_allocation(lower, desired, rates_per_s, [1.0] * len(desired), float(budget), give_back=False)


def noise_band(events: float | None, sigmas: float) -> float:
    """Relative band ``sigmas / sqrt(events)`` of a rate counted over ``events`` arrivals; 0 when unknown."""
    return sigmas / math.sqrt(events) if events is not None and events > 0 else 0.0


def banded_target(wanted: float, desired: int, current: int, band: float, lowest: int) -> int:
    """Replicas within a relative ``band`` of fractional demand ``wanted`` (``desired``: its ceiling, or less
    under a GPU budget or a start-up limit): ``desired`` when ``wanted`` exceeds ``current`` by more than the
    band; ``ceil(wanted / (1 + band))`` (at most ``desired``, at least ``lowest``) when that is below
    ``current``; otherwise ``current``."""
    if desired > current:
        return desired if wanted > current * (1 + band) + _EPS else current
    carried = min(desired, max(lowest, math.ceil(wanted / (1 + band) - _EPS)))
    return carried if carried < current else current


def hysteresis_target(desired: int, current: int, hysteresis: float) -> int:
    """``current`` unless ``desired`` is above it or at least ``hysteresis`` of it below."""
    return desired if desired > current or desired <= current * (1 - hysteresis) else current


def apply_delay(
    desired: int, current: int, stage: StageState, now_s: float, config: PolicyConfig
) -> tuple[int, StageState]:
    """Ray-style delays: a change applies once the same direction has been wanted for its delay."""
    direction = (desired > current) - (desired < current)
    if direction == 0:
        return current, replace(stage, pending_direction=0, pending_since_s=None)
    pending = stage.pending_since_s if stage.pending_direction == direction else None
    since = now_s if pending is None else pending
    delay_s = config.upscale_delay_s if direction > 0 else config.downscale_delay_s
    if now_s - since + _EPS >= delay_s:
        return desired, replace(stage, pending_direction=0, pending_since_s=None)
    return current, replace(stage, pending_direction=direction, pending_since_s=since)


def step(
    observation: PipelineObservation, config: PolicyConfig, state: PolicyState
) -> tuple[dict[str, int], PolicyState]:
    """One control tick: ``{stage name: replicas}`` for every stage, and the next state."""
    obs, specs = observation.stages, config.stages
    check(len(obs) == len(specs), f"observation has {len(obs)} stages, config has {len(specs)}")
    service = [
        s.service_ms if o.service_ms is None else ewma(s.service_ms, o.service_ms, config.latency_smoothing)
        for s, o in zip(state.stages, obs)
    ]
    rates = [replica_rate_per_s(ms, spec.batch_size) for ms, spec in zip(service, specs)]
    dt_s = None if state.time_s is None else observation.time_s - state.time_s
    rate_at = state.rate_sampled_at_s
    if observation.arrival_rate_per_s is not None:
        sample = observation.arrival_rate_per_s
        fresh = observation.rate_sampled_at_s is None or observation.rate_sampled_at_s != state.rate_sampled_at_s
        first = state.rate_sampled_at_s is None
        arrival = sample if first else ewma(state.arrival_rate_per_s, sample, config.counter_smoothing)
        arrival = arrival if fresh else state.arrival_rate_per_s
        rate_at = observation.rate_sampled_at_s
    else:
        sample = arrival_rate_sample(obs[0], state.entrance_ongoing, dt_s, service[0])
        arrival = ewma(state.arrival_rate_per_s, sample, config.rate_smoothing)
    idle = sample == 0 and observation.entrance_queued == 0 and all(o.queued + o.running == 0 for o in obs)
    arrival = 0.0 if idle else arrival

    lower = [s.min_replicas for s in specs]
    if idle:
        desired, wanted = lower, [0.0] * len(specs)
    else:
        pending = projected_backlogs(obs, arrival, rates, observation.time_s, observation.entrance_queued)
        wanted = [demand_replicas(arrival, b, mu, config) for b, mu in zip(pending, rates)]
        # The pipeline's most, requests/s, at each stage's faster of profiled and measured rate: a stage whose
        # measurements run slow (a noisy neighbour, overlapping requests) must not choke the others.
        best = [max(mu, replica_rate_per_s(spec.service_ms, spec.batch_size)) for mu, spec in zip(rates, specs)]
        passable = min(spec.max_replicas * mu for spec, mu in zip(specs, best))
        wanted = [min(w, passable / mu) for w, mu in zip(wanted, rates)]
        desired = [min(s.max_replicas, max(s.min_replicas, math.ceil(w - _EPS))) for s, w in zip(specs, wanted)]
    gpus = [s.gpu_fraction for s in specs]
    if config.gpu_budget is not None:
        desired = bottleneck_allocation(lower, desired, rates, gpus, config.gpu_budget)
    if config.max_starting is not None:
        desired = startup_allocation(desired, obs, rates, config.max_starting)

    band = noise_band(observation.arrival_events, config.rate_noise_sigmas)
    decided, stage_states = [], []
    for want, w, spec, o, st in zip(desired, wanted, specs, obs, state.stages):
        if idle:
            held = want
        else:
            banded = banded_target(w, want, o.target_replicas, band, spec.min_replicas)
            held = hysteresis_target(banded, o.target_replicas, config.hysteresis)
        n, st = apply_delay(held, o.target_replicas, st, observation.time_s, config)
        decided.append(n)
        stage_states.append(st)
    if config.gpu_budget is not None and sum(n * g for n, g in zip(decided, gpus)) > config.gpu_budget + _EPS:
        decided = [min(n, want) for n, want in zip(decided, desired)]  # the budget overrides a held downscale

    new_state = PolicyState(
        stages=tuple(replace(st, service_ms=ms) for st, ms in zip(stage_states, service)),
        arrival_rate_per_s=arrival,
        entrance_ongoing=obs[0].queued + obs[0].running,
        time_s=observation.time_s,
        rate_sampled_at_s=rate_at,
    )
    return {s.name: n for s, n in zip(specs, decided)}, new_state
