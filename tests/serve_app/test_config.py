"""The entrance's and stages' configs: keyword-only, validated with the values in the message, picklable."""

from __future__ import annotations

import pickle

import pytest

from serve_app.app import AppArgs, entrance_config, stage_config
from serve_app.config import EntranceConfig, StageConfig
from tests.serve_fixtures import PlannedModel


def test_configs_resolve_defaults_from_the_plan(mlp: PlannedModel) -> None:
    args = AppArgs(plan_uri=mlp.uri, torch_threads=2)
    entrance, stage = entrance_config(mlp.plan, args), stage_config(mlp.plan, args, 1)
    assert entrance.max_batch_size == mlp.plan.batch_size and entrance.model_name == "demo-mlp"
    assert (stage.index, stage.max_batch_size, stage.torch_threads) == (1, 4 * mlp.plan.batch_size, 2)
    assert pickle.loads(pickle.dumps(entrance)) == entrance and pickle.loads(pickle.dumps(stage)) == stage


def test_configs_are_keyword_only_frozen_and_checked() -> None:
    with pytest.raises(TypeError):
        StageConfig("p", 0, 8)  # type: ignore[misc]
    stage = StageConfig(plan_uri="p", index=0, max_batch_size=8)
    with pytest.raises(AttributeError):
        stage.index = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"StageConfig.max_batch_size \(0\) must be >= 1"):
        StageConfig(plan_uri="p", index=0, max_batch_size=0)
    with pytest.raises(ValueError, match=r"batch_wait_timeout_s \(nan\)"):
        EntranceConfig(
            plan_uri="p",
            model_name="m",
            max_body_bytes=1,
            max_batch_size=1,
            batch_wait_timeout_s=float("nan"),
            max_concurrent_batches=1,
        )
