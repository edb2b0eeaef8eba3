"""Controllers for the simulator: the coordinated policy (the same :func:`cluster.policy.step` the live
controller runs, fed through the same :func:`cluster.observe.pipeline_observation`) and Ray Serve's default
per-deployment policy. Each reads the pipeline through a metrics model (:mod:`cluster.sim.metrics`): give both
the same model to compare them on equal terms.

The Ray model follows ``ray/serve/autoscaling_policy.py`` (2.60): each deployment alone, from its own ongoing
requests as the controller aggregates them (``total_num_requests``: a window mean of the handle's points);
``desired = total / target_ongoing_requests``; upscaling/downscaling factors relative to the running
replicas; the cold-start fast path; upscale/downscale delays measured from the first consecutive decision;
then ``min_replicas``/``max_replicas``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cluster.errors import check
from cluster.observe import pipeline_observation
from cluster.policy import PolicyConfig, StageSpec, StageState, apply_delay, initial_state, step
from cluster.sim.engine import StageModel
from cluster.sim.metrics import ExactMetrics, MetricsModel, Snapshot


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
    """The pipeline-wide policy of :mod:`cluster.policy`, seeing what ``metrics`` shows."""

    name = "coordinated"

    def __init__(self, config: PolicyConfig, metrics: MetricsModel | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else ExactMetrics([s.name for s in config.stages])
        self.state = initial_state(config)

    def decide(self, snapshot: Snapshot) -> list[int]:
        entrance, stages = self.metrics.view(snapshot)
        observation = pipeline_observation(snapshot.time_s, stages, entrance)
        decision, self.state = step(observation, self.config, self.state)
        return [decision[s.name] for s in self.config.stages]

    def describe(self) -> dict[str, Any]:
        """What this policy saw and its delays, for the report."""
        return {
            "observation": {
                **self.metrics.describe(),
                "signals": "entrance arrival counter (rate over its window, or its newest interval on a change), "
                "stage queued/running and full-batch time (newest points of each replica's custom metrics)",
            },
            "upscale_delay_s": self.config.upscale_delay_s,
            "downscale_delay_s": self.config.downscale_delay_s,
        }


@dataclass(frozen=True)
class RayDefaultConfig:
    """Ray Serve 2.60 ``AutoscalingConfig`` defaults and metric cadence."""

    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    upscaling_factor: float = 1.0
    downscaling_factor: float = 1.0

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


class RayDefault:
    """Ray Serve's ``replica_queue_length_autoscaling_policy``, one deployment per stage, each on its own,
    seeing what ``metrics`` shows."""

    name = "ray-default"

    def __init__(
        self,
        stages: Sequence[StageSpec],
        config: RayDefaultConfig = RayDefaultConfig(),
        metrics: MetricsModel | None = None,
        name: str | None = None,
    ) -> None:
        self.stages, self.config = tuple(stages), config
        self.metrics = metrics if metrics is not None else ExactMetrics([s.name for s in self.stages])
        self.name = name or self.name
        self.delay_state = [StageState(service_ms=0.0) for _ in self.stages]  # only the pending fields are used
        self.delays = PolicyConfig(
            stages=self.stages, upscale_delay_s=config.upscale_delay_s, downscale_delay_s=config.downscale_delay_s
        )

    def decide(self, snapshot: Snapshot) -> list[int]:
        now = snapshot.time_s
        _, views = self.metrics.view(snapshot)
        out = []
        for i, (spec, view) in enumerate(zip(self.stages, views)):
            target, running, total = view.target_replicas, view.current_replicas, view.total_requests
            if running == 0 and total > 0:  # cold start: no delay
                decision = max(math.ceil(self.config.upscaling_factor), target)
            else:
                wanted = total / self.config.target_ongoing_requests if running else target
                desired = scaled_replicas(wanted, running, self.config)
                if desired < target and target > 1:
                    desired = max(1, desired)
                pending = self.delay_state[i]
                decision, self.delay_state[i] = apply_delay(max(0, desired), target, pending, now, self.delays)
            out.append(min(spec.max_replicas, max(spec.min_replicas, decision)))
        return out

    def describe(self) -> dict[str, Any]:
        """What this policy saw and its delays, for the report."""
        return {
            "observation": {
                **self.metrics.describe(),
                "signals": "each deployment's ongoing requests (total_num_requests: window mean of the handle's "
                "points)",
            },
            "upscale_delay_s": self.config.upscale_delay_s,
            "downscale_delay_s": self.config.downscale_delay_s,
            "target_ongoing_requests": self.config.target_ongoing_requests,
        }


def whole_model(stages: Sequence[StageModel], max_replicas: int) -> StageModel:
    """The unpartitioned model as one deployment: a replica holds the sum of the stages' GPU shares and runs the
    stages back to back on each batch (their fixed and per-sample times add up)."""
    return StageModel(
        name="whole-model",
        fixed_ms=sum(s.fixed_ms for s in stages),
        per_sample_ms=sum(s.per_sample_ms for s in stages),
        max_batch_size=stages[0].max_batch_size,
        gpu_fraction=sum(s.gpu_fraction for s in stages),
        min_replicas=max(s.min_replicas for s in stages),
        max_replicas=max_replicas,
    )
