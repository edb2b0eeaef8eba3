"""The Ray adapter, driven through Ray's own application-level wrapper (delays 0, factors 1)."""

from __future__ import annotations

from ray.serve.autoscaling_policy import _apply_app_level_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext, DeploymentID

from cluster.serve_policy import PipelineAutoscalingPolicy


def context(name: str, queued: float, running: float) -> tuple[DeploymentID, AutoscalingContext]:
    dep = DeploymentID(name=name, app_name="partserve")
    config = AutoscalingConfig(min_replicas=1, max_replicas=50, upscale_delay_s=0, downscale_delay_s=0)
    return dep, AutoscalingContext(
        dep, name, "partserve", 1, 1, [], queued + running, queued, {}, None, 1, 50, {}, None, None, 10.0, config
    )


def test_ray_contexts_map_onto_the_pipeline_step() -> None:
    stages = [{"name": "stage-0", "service_ms": 100.0}, {"name": "stage-1", "service_ms": 200.0}]
    policy = _apply_app_level_autoscaling_config(PipelineAutoscalingPolicy(stages=stages, rate_smoothing=1.0))
    contexts = dict([context("stage-0", 2, 8), context("stage-1", 0, 1), context("entrance", 0, 3)])
    decisions, _ = policy(contexts)
    # lambda = 8 running / 0.1 s = 80/s; stage-0: 80 / (10 * 0.7) + 2 / 100 = 11.45 -> 12;
    # stage-1: 80 / (5 * 0.7) + 10 / 50 = 23.06 -> 24; the entrance keeps its own policy
    assert {d.name: n for d, n in decisions.items()} == {"stage-0": 12, "stage-1": 24}
