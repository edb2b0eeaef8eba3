"""The Ray adapter, driven through Ray's own application-level wrapper (delays 0, factors 1)."""

from __future__ import annotations

from ray.serve._private.common import ReplicaID
from ray.serve._private.metrics_utils import TimeStampedValue
from ray.serve.autoscaling_policy import _apply_app_level_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext, DeploymentID

from cluster.serve_policy import PipelineAutoscalingPolicy


def context(
    name: str, queued: float, running: float, raw: dict | None = None, now: float = 10.0
) -> tuple[DeploymentID, AutoscalingContext]:
    dep = DeploymentID(name=name, app_name="partserve")
    config = AutoscalingConfig(min_replicas=1, max_replicas=50, upscale_delay_s=0, downscale_delay_s=0)
    return dep, AutoscalingContext(
        dep, name, "partserve", 1, 1, [], queued + running, queued, {}, raw, 1, 50, {}, None, None, now, config
    )


def test_ray_contexts_map_onto_the_pipeline_step() -> None:
    stages = [{"name": "stage-0", "service_ms": 100.0}, {"name": "stage-1", "service_ms": 200.0}]
    pipeline = PipelineAutoscalingPolicy(stages=stages, rate_smoothing=1.0, target_utilisation=0.7)
    policy = _apply_app_level_autoscaling_config(pipeline)
    contexts = dict([context("stage-0", 2, 8), context("stage-1", 0, 1)])
    decisions, _ = policy(contexts)
    # No entrance context (no autoscaling_config): lambda from Little's law, 8 running / 0.1 s = 80/s;
    # stage-0: 80 / (10 * 0.7) + 2 / 100 = 11.45 -> 12; stage-1: 80 / (5 * 0.7) + 10 / 50 = 23.06 -> 24
    assert {d.name: n for d, n in decisions.items()} == {"stage-0": 12, "stage-1": 24}


def series(*points: tuple[float, float]) -> list[TimeStampedValue]:
    return [TimeStampedValue(t, v) for t, v in points]


def replica(deployment: str, unique: str) -> ReplicaID:
    return ReplicaID(unique, DeploymentID(name=deployment, app_name="partserve"))


def test_raw_custom_metrics_drive_every_stage_from_the_entrance_counter() -> None:
    stages = [{"name": "stage-0", "service_ms": 100.0}, {"name": "stage-1", "service_ms": 200.0}]
    policy = _apply_app_level_autoscaling_config(PipelineAutoscalingPolicy(stages=stages, target_utilisation=0.7))
    arrived = {"arrived": {replica("entrance", "e1"): series((0.0, 0.0), (6.0, 210.0))}}  # 210 / 6 = 35/s
    idle = {
        "queued": {replica("stage-0", "a"): series((6.0, 0.0))},
        "running": {replica("stage-0", "a"): series((6.0, 0.0))},
    }
    contexts = dict(
        [
            context("entrance", 0, 0, arrived, now=6.0),
            # Serve's window means still show an idle pipeline; the replicas' newest points too
            context("stage-0", 0, 0, idle, now=6.0),
            context("stage-1", 0, 0, now=6.0),
        ]
    )
    decisions, _ = policy(contexts)
    # 35/s sizes both stages at once: 35 / (10 * 0.7) = 5; 35 / (5 * 0.7) = 10; the entrance keeps its own
    assert {d.name: n for d, n in decisions.items()} == {"stage-0": 5, "stage-1": 10}
