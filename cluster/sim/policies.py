"""Controllers for the simulator: the coordinated policy (the same :func:`cluster.policy.step` the live
controller runs) and a model of Ray Serve's default per-deployment policy.

The Ray model follows ``ray/serve/autoscaling_policy.py`` (2.60): each deployment alone, from its own ongoing
requests (handle-queued + running) averaged over ``look_back_period_s`` of samples recorded every
``metrics_record_interval_s`` and visible to the controller only after a push (every
``metrics_push_interval_s``); ``desired = total_ongoing / target_ongoing_requests``; upscaling/downscaling
factors relative to the running replicas; the cold-start fast path; upscale/downscale delays measured from the
first consecutive decision; then ``min_replicas``/``max_replicas``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from cluster.errors import check
from cluster.policy import (
    PipelineObservation,
    PolicyConfig,
    StageSpec,
    StageState,
    apply_delay,
    initial_state,
    step,
)
from cluster.sim.engine import StageModel


def policy_stages(models: Sequence[StageModel]) -> tuple[StageSpec, ...]:
    """The policy's view of simulated stages: profiled cost = the full-batch time."""
    return tuple(
        StageSpec(
            name=m.name,
            service_ms=m.full_batch_ms,
            batch_size=m.max_batch_size,
            gpu_fraction=m.gpu_fraction,
            min_replicas=m.min_replicas,
            max_replicas=m.max_replicas,
        )
        for m in models
    )


class Coordinated:
    """The pipeline-wide policy of :mod:`cluster.policy`."""

    name = "coordinated"

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.state = initial_state(config)

    def decide(self, observation: PipelineObservation, ready: Sequence[int]) -> list[int]:
        decision, self.state = step(observation, self.config, self.state)
        return [decision[s.name] for s in self.config.stages]


@dataclass(frozen=True)
class RayDefaultConfig:
    """Ray Serve 2.60 ``AutoscalingConfig`` defaults and metric cadence."""

    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    upscaling_factor: float = 1.0
    downscaling_factor: float = 1.0
    look_back_period_s: float = 30.0
    metrics_push_interval_s: float = 10.0
    metrics_record_interval_s: float = 2.0

    def __post_init__(self) -> None:
        check(self.target_ongoing_requests > 0, f"target_ongoing_requests ({self.target_ongoing_requests}) must be > 0")
        check(
            self.upscaling_factor > 0 and self.downscaling_factor > 0,
            f"upscaling_factor ({self.upscaling_factor}) and downscaling_factor ({self.downscaling_factor})"
            " must be > 0",
        )


def scaled_replicas(desired: float, current: int, config: RayDefaultConfig) -> int:
    """Ray's ``_apply_scaling_factors``: move ``factor`` of the way from ``current``; unstick a downscale."""
    if current == 0:
        return math.ceil(desired)
    factor = config.upscaling_factor if desired > current else config.downscaling_factor
    scaled = math.ceil(current + factor * (desired - current))
    if math.ceil(desired) < current and scaled == current:
        scaled -= 1
    return scaled


class _Deployment:
    """Metric samples and delay state of one deployment."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, float]] = deque()
        self.last_record_s = -math.inf
        self.last_push_s = -math.inf
        self.delay = StageState(service_ms=0.0)  # only the pending-decision fields are used

    def total_ongoing(self, now_s: float, ongoing: float, config: RayDefaultConfig) -> float | None:
        """Mean of the pushed samples within the look-back window; None before the first push."""
        if now_s - self.last_record_s >= config.metrics_record_interval_s - 1e-9:
            self.samples.append((now_s, ongoing))
            self.last_record_s = now_s
        if now_s - self.last_push_s >= config.metrics_push_interval_s - 1e-9:
            self.last_push_s = now_s
        while self.samples and self.samples[0][0] < now_s - config.look_back_period_s:
            self.samples.popleft()
        visible = [v for t, v in self.samples if t <= self.last_push_s]
        return sum(visible) / len(visible) if visible else None


class RayDefault:
    """Ray Serve's ``replica_queue_length_autoscaling_policy``, one deployment per stage, each on its own."""

    name = "ray-default"

    def __init__(self, stages: Sequence[StageSpec], config: RayDefaultConfig = RayDefaultConfig()) -> None:
        self.stages, self.config = tuple(stages), config
        self.deployments = [_Deployment() for _ in self.stages]
        self.delays = PolicyConfig(
            stages=self.stages, upscale_delay_s=config.upscale_delay_s, downscale_delay_s=config.downscale_delay_s
        )

    def decide(self, observation: PipelineObservation, ready: Sequence[int]) -> list[int]:
        now = observation.time_s
        out = []
        for spec, dep, obs, running in zip(self.stages, self.deployments, observation.stages, ready):
            target = obs.target_replicas
            total = dep.total_ongoing(now, obs.queued + obs.running, self.config)
            if total is None:
                out.append(target)
                continue
            if running == 0 and total > 0:  # cold start: no delay
                decision = max(math.ceil(self.config.upscaling_factor), target)
            else:
                desired = scaled_replicas(total / self.config.target_ongoing_requests, running, self.config)
                if desired < target and target > 1:
                    desired = max(1, desired)
                decision, dep.delay = apply_delay(max(0, desired), target, dep.delay, now, self.delays)
            out.append(min(spec.max_replicas, max(spec.min_replicas, decision)))
        return out
