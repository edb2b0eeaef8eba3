"""Run the stages in sequence and compare with the original model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch

from partitions.artifacts import read_plan
from partitions.errors import PartserveError
from partitions.inputs import random_inputs
from partitions.runtime import load_pipeline, run_pipeline
from partitions.source import load_model

DEFAULT_TOLERANCE = 1e-6
RANDOM_BATCHES = (1, 5)
"""Batch sizes of the random cases; neither is the plan's, so the dynamic batch is exercised."""


@dataclass
class Case:
    name: str
    batch: int
    max_abs_error: float
    max_rel_error: float
    """max |pipeline - model| / max |model| over all outputs."""


@dataclass
class Report:
    uri: str
    tolerance: float
    cases: list[Case]

    @property
    def max_rel_error(self) -> float:
        return max(c.max_rel_error for c in self.cases)

    @property
    def max_abs_error(self) -> float:
        return max(c.max_abs_error for c in self.cases)

    @property
    def passed(self) -> bool:
        return self.max_rel_error <= self.tolerance

    def to_json(self) -> dict:
        return {
            "uri": self.uri,
            "tolerance": self.tolerance,
            "passed": self.passed,
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "cases": [asdict(c) for c in self.cases],
        }


def verify(
    uri: str,
    user_inputs: Mapping[str, np.ndarray] | None = None,
    device: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Report:
    plan = read_plan(uri)
    runners = load_pipeline(uri, device)
    source = load_model(plan.model["spec"], plan.model["options"], plan.batch_size)
    source.module.to(runners[0].device)
    cases: dict[str, dict[str, np.ndarray]] = {
        "example": {k: v.cpu().numpy() for k, v in source.example_inputs.items()},
    }
    for i, batch in enumerate(RANDOM_BATCHES):
        cases[f"random-{i}"] = random_inputs(plan.inputs, batch, i, plan.input_ranges)
    if user_inputs is not None:
        missing = [t.name for t in plan.inputs if t.name not in user_inputs]
        if missing:
            raise PartserveError(f"user inputs lack {missing}", f"provide arrays named {[t.name for t in plan.inputs]}")
        cases["user"] = {t.name: np.asarray(user_inputs[t.name]) for t in plan.inputs}
    results = []
    for name, arrays in cases.items():
        tensors = {k: torch.from_numpy(v).to(runners[0].device) for k, v in arrays.items()}
        reference = source.forward_flat(tensors)
        got = run_pipeline(runners, arrays)
        abs_err, scale = 0.0, 0.0
        for spec, ref in zip(plan.outputs, reference):
            ref_np = ref.detach().cpu().numpy().astype(np.float64)
            abs_err = max(abs_err, float(np.max(np.abs(got[spec.name].astype(np.float64) - ref_np), initial=0)))
            scale = max(scale, float(np.max(np.abs(ref_np), initial=0)))
        batch = next(iter(arrays.values())).shape[0]
        results.append(Case(name, batch, abs_err, abs_err / scale if scale else abs_err))
    return Report(uri, tolerance, results)
