"""Shared helpers of the serving tests: small plans and the whole-model reference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from partitions.dtypes import to_numpy, to_torch
from partitions.inputs import random_inputs
from partitions.partition import PlanOptions, build_plan
from partitions.plan import Plan
from partitions.source import ModelSource, load_model

MLP = ("demo-mlp", {})
TRANSFORMER = ("demo-transformer", {"layers": 3, "width": 64, "seq_len": 16})


@dataclass
class PlannedModel:
    uri: str
    plan: Plan
    source: ModelSource

    def sample(self, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs of ``batch`` samples (integers within the plan's input ranges)."""
        return random_inputs(self.plan.inputs, batch, seed, self.plan.input_ranges)

    def reference(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The whole, unpartitioned model's outputs by name (in the plan's dtype: planning casts the source)."""
        flat = self.source.forward_flat({k: to_torch(np.ascontiguousarray(v)) for k, v in inputs.items()})
        return {spec.name: to_numpy(t) for spec, t in zip(self.plan.outputs, flat)}


def plan_model(spec: str, options: dict[str, Any], uri: str, stages: int = 3, **plan_options: Any) -> PlannedModel:
    """Plan ``spec`` into ``stages`` stages at ``uri`` (a couple of seconds for the small zoo models);
    ``plan_options``: further :class:`PlanOptions` fields."""
    source = load_model(spec, dict(options))
    plan = build_plan(source, uri, PlanOptions(stages=stages, repeats=2, warmup=1, **plan_options))
    return PlannedModel(uri, plan, source)


Planner = Callable[..., PlannedModel]
"""The ``planned`` fixture (tests/conftest.py): ``planned(MLP, stages=2, **plan_options)``, once per session."""


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """``|got - want| / |want|`` (Frobenius norms)."""
    return float(np.linalg.norm(got.astype(np.float64) - want) / max(np.linalg.norm(want), 1e-30))
