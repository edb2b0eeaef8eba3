"""The Serve config written for a plan, validated by Serve's own schema (no Ray started)."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray.serve.schema import ServeDeploySchema

from serve_app.app import IMPORT_PATH, AppArgs, default_model_name, serve_config
from tests.serve_fixtures import MLP, PlannedModel, plan_model


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> PlannedModel:
    return plan_model(*MLP, str(tmp_path_factory.mktemp("plan") / "mlp"))


def test_config_validates_and_reserves_planned_gpu_shares(mlp: PlannedModel) -> None:
    config = serve_config(mlp.uri, app_name="m", port=8100, gpus=True, max_replicas=3, num_cpus=0.5)
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == IMPORT_PATH and app.route_prefix == "/"
    assert AppArgs.model_validate(app.args) == AppArgs(plan_uri=mlp.uri, gpus=True, max_replicas=3, num_cpus=0.5)
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"entrance"} | {f"stage-{s.index}" for s in mlp.plan.stages}
    assert deployments["entrance"].ray_actor_options.num_gpus is None
    for stage in mlp.plan.stages:
        d = deployments[f"stage-{stage.index}"]
        assert (d.ray_actor_options.num_cpus, d.ray_actor_options.num_gpus) == (0.5, stage.gpu_fraction)
        assert d.max_ongoing_requests == 64  # batches the entrance formed, queued at a stage
        assert d.autoscaling_config["max_replicas"] == 3


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
    mlp.plan.model["spec"] = "my.models:build net"
    assert default_model_name(mlp.plan) == "build_net"
    mlp.plan.model["spec"] = f"{tmp_path}/bert-base/"
    assert default_model_name(mlp.plan) == "bert-base"
    mlp.plan.model["spec"] = "demo-mlp"
