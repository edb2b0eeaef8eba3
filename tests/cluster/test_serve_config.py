"""The Serve config written for a plan, validated by Serve's own schema (no Ray started)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from ray.serve.schema import ServeDeploySchema

from cluster.deploy import serve_config
from serve_app.app import AppArgs, batch_wait_s, default_model_name, in_flight_batches, parallel_devices
from serve_app.names import APP_IMPORT_PATH
from tests.serve_fixtures import PlannedModel


def test_config_validates_and_reserves_planned_gpu_shares(mlp: PlannedModel) -> None:
    config = serve_config(mlp.uri, app_name="m", port=8100, gpus=True, max_replicas=3, num_cpus=0.5)
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == APP_IMPORT_PATH and app.route_prefix == "/"
    assert AppArgs.model_validate(app.args) == AppArgs(plan_uri=mlp.uri, gpus=True, max_replicas=3, num_cpus=0.5)
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"entrance"} | {f"stage-{s.index}" for s in mlp.plan.stages}
    assert deployments["entrance"].ray_actor_options.num_gpus is None
    for stage in mlp.plan.stages:
        d = deployments[f"stage-{stage.index}"]
        assert (d.ray_actor_options.num_cpus, d.ray_actor_options.num_gpus) == (0.5, stage.gpu_fraction)
        assert d.max_ongoing_requests == 64  # batches the entrance formed, queued at a stage
        assert d.autoscaling_config["max_replicas"] == 3
    assert all(not d.logging_config.enable_access_log for d in deployments.values())


def test_config_options(mlp: PlannedModel) -> None:
    app = serve_config(mlp.uri, max_ongoing_requests=8, gpus=True, num_gpus_per_stage=0.25)["applications"][0]
    stages = [d for d in app["deployments"] if d["name"].startswith("stage-")]
    assert {d["ray_actor_options"]["num_gpus"] for d in stages} == {0.25}
    assert {d["max_ongoing_requests"] for d in stages} == {8}
    cpu_only = serve_config(mlp.uri)["applications"][0]["deployments"]
    assert not any("num_gpus" in d["ray_actor_options"] for d in cpu_only)
    policy = {"policy_function": "cluster.serve_policy:PipelineAutoscalingPolicy", "policy_kwargs": {"stages": []}}
    config = serve_config(mlp.uri, autoscaling_policy=policy)
    assert ServeDeploySchema.model_validate(config).applications[0].autoscaling_policy["policy_kwargs"] == {
        "stages": []
    }
    with pytest.raises(ValueError, match="max_batch_sizes"):
        serve_config(mlp.uri, max_batch_sizes=4)


def test_default_model_name(mlp: PlannedModel, tmp_path: Path) -> None:
    assert default_model_name(mlp.plan) == "demo-mlp"
    try:  # the session's plan: put the spec back whatever happens
        mlp.plan.model["spec"] = "my.models:build net"
        assert default_model_name(mlp.plan) == "build_net"
        mlp.plan.model["spec"] = f"{tmp_path}/bert-base/"
        assert default_model_name(mlp.plan) == "bert-base"
    finally:
        mlp.plan.model["spec"] = "demo-mlp"


def test_pipeline_defaults_follow_devices_and_stage_times(mlp: PlannedModel) -> None:
    # One batch per device that can run a stage at once, plus one in transit; never more than stages + 1.
    assert [in_flight_batches(4, d) for d in (0, 1, 2, 4, 16)] == [2, 2, 3, 5, 5]
    stages = len(mlp.plan.stages)
    shares = sum(s.gpu_fraction for s in mlp.plan.stages)
    assert parallel_devices(mlp.plan, AppArgs(plan_uri=mlp.uri, gpus=True)) == math.ceil(round(shares, 6))
    assert parallel_devices(mlp.plan, AppArgs(plan_uri=mlp.uri, gpus=True, num_gpus_per_stage=1.0)) == stages
    # Autoscaled stages may fill more GPUs: up to their shares at max_replicas.
    scaled = AppArgs(plan_uri=mlp.uri, gpus=True, num_gpus_per_stage=0.5, max_replicas=3)
    assert parallel_devices(mlp.plan, scaled) == math.ceil(stages * 0.5 * 3)
    # The wait for a batch to fill: the slowest stage's planned time, scaled to the entrance's batch.
    slowest_ms = max(s.measured_ms for s in mlp.plan.stages)
    assert batch_wait_s(mlp.plan, AppArgs(plan_uri=mlp.uri)) == pytest.approx(slowest_ms / 1e3)
    doubled = AppArgs(plan_uri=mlp.uri, max_batch_size=2 * mlp.plan.batch_size)
    assert batch_wait_s(mlp.plan, doubled) == pytest.approx(2 * slowest_ms / 1e3)
    assert batch_wait_s(mlp.plan, AppArgs(plan_uri=mlp.uri, batch_wait_timeout_s=0.0)) == 0.0
