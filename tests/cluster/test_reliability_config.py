"""Bounded queues and retry settings in the Serve config (no Ray started)."""

from __future__ import annotations

import pytest
from ray.serve.schema import ServeDeploySchema

from cluster.deploy import serve_config
from serve_app.app import AppArgs
from tests.serve_fixtures import PlannedModel


def test_every_deployment_has_a_bounded_queue(mlp: PlannedModel) -> None:
    config = serve_config(mlp.uri, entrance_max_ongoing_requests=64, retry_after_s=2.5)
    (app,) = ServeDeploySchema.model_validate(config).applications
    deployments = {d.name: d for d in app.deployments}
    entrance = deployments["entrance"]
    assert entrance.max_queued_requests == AppArgs.model_fields["entrance_max_queued_requests"].default
    assert entrance.backpressure_config.status_code == 503 and entrance.backpressure_config.retry_after_s == 2.5
    for stage in mlp.plan.stages:
        assert deployments[f"stage-{stage.index}"].max_queued_requests == 64  # the entrance's bound governs


def test_queue_and_retry_options(mlp: PlannedModel) -> None:
    config = serve_config(mlp.uri, entrance_max_queued_requests=8, max_queued_requests=3, retry_attempts=2)
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    assert deployments["entrance"]["max_queued_requests"] == 8
    assert {d["max_queued_requests"] for n, d in deployments.items() if n.startswith("stage-")} == {3}
    assert AppArgs.model_validate(config["applications"][0]["args"]).retry_attempts == 2
    for bad in ({"retry_attempts": 0}, {"max_queued_requests": 0}, {"retry_after_s": -1}):
        with pytest.raises(ValueError):
            AppArgs(plan_uri=mlp.uri, **bad)
