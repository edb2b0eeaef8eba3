"""Shared helpers of the serving tests: small plans, the whole-model reference, free ports."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from partitions.partition import PlanOptions, build_plan
from partitions.plan import Plan
from partitions.source import ModelSource, load_model

MLP = ("demo-mlp", {})
TRANSFORMER = ("demo-transformer", {"layers": 3, "width": 64, "seq_len": 16})
TWO_TOWER = ("demo-two-tower", {"width": 256, "depth": 2})
"""Two inputs; planned for latency its towers become parallel stages joined by a third (a DAG plan)."""


@dataclass
class PlannedModel:
    uri: str
    plan: Plan
    source: ModelSource

    def sample(self, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs of ``batch`` samples (integers within the plan's input ranges)."""
        rng = np.random.default_rng(seed)
        out = {}
        for spec in self.plan.inputs:
            shape = (batch, *spec.shape[1:])
            if spec.name in self.plan.input_ranges:
                low, high = self.plan.input_ranges[spec.name]
                out[spec.name] = rng.integers(low, high, shape).astype(spec.dtype)
            else:
                out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        return out

    def reference(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The whole, unpartitioned model's outputs by name."""
        flat = self.source.forward_flat({k: torch.from_numpy(v) for k, v in inputs.items()})
        return {spec.name: t.detach().numpy() for spec, t in zip(self.plan.outputs, flat)}


def plan_model(spec: str, options: dict[str, Any], uri: str, stages: int = 3, **plan_options: Any) -> PlannedModel:
    """Plan ``spec`` into ``stages`` stages at ``uri`` (a couple of seconds for the small zoo models);
    ``plan_options``: further :class:`PlanOptions` fields."""
    source = load_model(spec, dict(options))
    plan = build_plan(source, uri, PlanOptions(stages=stages, repeats=2, warmup=1, **plan_options))
    return PlannedModel(uri, plan, source)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """``|got - want| / |want|`` (Frobenius norms)."""
    return float(np.linalg.norm(got.astype(np.float64) - want) / max(np.linalg.norm(want), 1e-30))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
