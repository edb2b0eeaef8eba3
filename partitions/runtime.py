"""Load one stage from a plan directory and run it on numpy payloads.

A payload is a ``dict[str, np.ndarray]`` keyed by value name; every array has the batch as dimension 0.
A stage reads its inputs from the payload and returns the next payload: what it carries plus what it
computes. Serving and ``verify`` use the same code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from partitions.artifacts import decode_stage, read_plan, read_shard
from partitions.dtypes import to_numpy, to_torch
from partitions.plan import Plan
from partitions.types import Payload

T = TypeVar("T")


def pick_device(preferred: str | None = None) -> torch.device:
    """``preferred`` if usable, else CUDA when present, else CPU (also when Ray assigned a GPU id but CUDA
    is absent)."""
    if preferred and preferred != "auto":
        device = torch.device(preferred)
        if device.type != "cuda" or torch.cuda.is_available():
            return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class StageRunner:
    """Runs stage ``index`` of the plan at ``uri``; loads only that stage's shard."""

    def __init__(self, uri: str, index: int, device: str | None = None, plan: Plan | None = None) -> None:
        self.plan = plan or read_plan(uri)
        self.stage = self.plan.stages[index]
        self.device = pick_device(device)
        data = read_shard(uri, self.stage.artifact)
        module = decode_stage(data, self.stage.artifact, self._rebuild_children)
        self.module: nn.Module = module.to(self.device)
        self.input_names = [t.name for t in self.stage.inputs]
        self.output_names = [t.name for t in self.stage.computed]

    def _rebuild_children(self) -> list[nn.Module]:
        from partitions.source import plan_model

        with torch.device("meta"):
            source = plan_model(self.plan, batch_size=1)
        return [source.module.get_submodule(name) for name in self.stage.artifact.children]

    def run_tensors(self, *args: torch.Tensor) -> list[torch.Tensor]:
        with torch.inference_mode():
            out = self.module(*args)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def __call__(self, payload: Mapping[str, np.ndarray]) -> Payload:
        args = [self._to_device(payload[name]) for name in self.input_names]
        outs = self.run_tensors(*args)
        result: Payload = {name: payload[name] for name in self.stage.carried}
        for name, t in zip(self.output_names, outs):
            result[name] = np.ascontiguousarray(to_numpy(t))
        return result

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        if not array.flags.writeable:  # a zero-copy view of Ray's object store: programs may write inputs
            array = array.copy()
        t = to_torch(np.ascontiguousarray(array))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t


def stage_payload(
    after: list[int], sent: Mapping[int, Mapping[str, T]], inputs: Mapping[str, T], reads: list[str] | None = None
) -> dict[str, T]:
    """What a stage receives: the merged outputs of the stages it reads from, or the model inputs (only
    ``reads`` of them when given: a branch gets its own inputs, not its siblings')."""
    if not after:
        return dict(inputs) if reads is None else {name: inputs[name] for name in reads}
    merged: dict[str, T] = {}
    for j in after:
        merged.update(sent[j])
    return merged


def outputs_of(plan: Plan, payload: Mapping[str, np.ndarray]) -> Payload:
    """The model outputs, under their user-facing names, from the last stage's payload."""
    return {spec.name: payload[value] for spec, value in zip(plan.outputs, plan.output_values)}


def run_pipeline(runners: list[StageRunner], inputs: Mapping[str, np.ndarray]) -> Payload:
    """Run all stages in this process, in index order (a valid order for chains and DAGs alike), and return
    the named model outputs."""
    plan = runners[0].plan
    sent: dict[int, Payload] = {}
    for runner in runners:
        stage = runner.stage
        sent[stage.index] = runner(stage_payload(stage.after, sent, inputs, stage.reads))
    return outputs_of(plan, stage_payload(plan.sinks(), sent, inputs))


def load_pipeline(uri: str, device: str | None = None) -> list[StageRunner]:
    plan = read_plan(uri)
    return [StageRunner(uri, i, device, plan) for i in range(len(plan.stages))]
