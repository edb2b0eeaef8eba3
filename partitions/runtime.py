"""Load one stage from a plan directory and run it on numpy payloads.

A payload is a ``dict[str, np.ndarray]`` keyed by value name; every array has the batch as dimension 0.
A stage reads its inputs from the payload and returns the next payload: what it carries plus what it
computes. Serving and ``verify`` use the same code.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from partitions import engines
from partitions.artifacts import decode_stage, read_shard
from partitions.engines import EAGER, ONNX_ENGINES, current_target, unavailable
from partitions.plan import Plan
from partitions.storage import read_plan
from partitions.types import Payload

T = TypeVar("T")
log = logging.getLogger(__name__)


def pick_device(preferred: str | None = None) -> torch.device:
    """``preferred`` if usable, else CUDA when present, else CPU (also when Ray assigned a GPU id but CUDA
    is absent)."""
    if preferred and preferred != "auto":
        device = torch.device(preferred)
        if device.type != "cuda" or torch.cuda.is_available():
            return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class StageRunner:
    """Runs stage ``index`` of the plan at ``uri`` on its engine (``engine`` overrides the plan's: ``eager``
    runs the exported program); loads only that stage's files.

    ``threads``: intra-op threads of the engine (ONNX Runtime's); None: the plan's tuned figure, else torch's
    current setting. A stage whose engine cannot run here (built for another target, not installed) runs
    eager; ``engine_note`` says why and the log has it. A plan's engine kept for small batches only
    (``StageEngine.up_to``) runs those, eager the larger ones."""

    def __init__(
        self,
        uri: str,
        index: int,
        device: str | None = None,
        plan: Plan | None = None,
        engine: str | None = None,
        threads: int | None = None,
    ) -> None:
        self.plan = plan or read_plan(uri)
        self.stage = self.plan.stages[index]
        self.device = pick_device(device)
        self.engine, self.engine_note = self._engine(engine or self.stage.engine.name)
        if self.engine_note:
            log.warning("stage %d: %s", index, self.engine_note)
        self.threads = threads or self.stage.engine.threads or torch.get_num_threads()
        up_to = self.stage.engine.up_to if self.engine == self.stage.engine.name != EAGER else None
        self.module: nn.Module | None = None
        if self.engine not in ONNX_ENGINES or up_to is not None:
            module = decode_stage(read_shard(uri, self.stage.artifact), self.stage.artifact, self._rebuild_children)
            self.module = module.to(self.device)
        artifact = self.stage.engine.artifact
        data = read_shard(uri, artifact) if self.engine in ONNX_ENGINES and artifact else None
        self.run = engines.load(self.engine, self.module, data, self.device, self.threads)
        if up_to is not None:  # the engine for small batches, eager for the rest
            eager = engines.load(EAGER, self.module, None, self.device, self.threads)
            self.run = engines.by_batch(self.run, eager, up_to)
        self.input_names = [t.name for t in self.stage.inputs]
        self.output_names = [t.name for t in self.stage.computed]

    def _engine(self, wanted: str) -> tuple[str, str]:
        """The engine to run and, when it is not ``wanted``, why."""
        record = self.stage.engine
        if wanted == EAGER:
            return EAGER, ""
        if wanted in ONNX_ENGINES and record.artifact is None:
            return EAGER, f"{wanted} asked for, but the plan holds no ONNX file for this stage: running eager"
        here = current_target(self.device)
        if record.target and record.target != here:
            return EAGER, f"{wanted} was built and timed for {record.target!r}, this is {here!r}: running eager"
        why = unavailable(wanted, self.device)
        return (EAGER, f"{why}: running eager") if why else (wanted, "")

    def _rebuild_children(self) -> list[nn.Module]:
        from partitions.source import plan_model

        with torch.device("meta"):
            source = plan_model(self.plan, batch_size=1)
        return [source.module.get_submodule(name) for name in self.stage.artifact.children]

    def __call__(self, payload: Mapping[str, np.ndarray]) -> Payload:
        outs = self.run([payload[name] for name in self.input_names])
        result: Payload = {name: payload[name] for name in self.stage.carried}
        result.update(zip(self.output_names, outs))
        return result


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


def run_pipeline(
    runners: list[StageRunner],
    inputs: Mapping[str, np.ndarray],
    references: list[StageRunner] | None = None,
    rel_errors: list[float] | None = None,
) -> Payload:
    """Run all stages in this process, in index order (a valid order for chains and DAGs alike), and return
    the named model outputs. With ``references`` (the same stages on other engines), each stage's outputs
    are compared with its reference's on the same payload, and ``rel_errors[i]`` is raised to stage ``i``'s
    max |got - reference| / max |reference|."""
    plan = runners[0].plan
    sent: dict[int, Payload] = {}
    for runner in runners:
        stage = runner.stage
        payload = stage_payload(stage.after, sent, inputs, stage.reads)
        sent[stage.index] = runner(payload)
        if references is not None and rel_errors is not None:
            want, names = references[stage.index](payload), runner.output_names
            err = engines.rel_error([sent[stage.index][n] for n in names], [want[n] for n in names])
            rel_errors[stage.index] = max(rel_errors[stage.index], err)
    return plan.named_outputs(stage_payload(plan.sinks(), sent, inputs))


def load_pipeline(
    uri: str, device: str | None = None, engine: str | None = None, threads: int | None = None
) -> list[StageRunner]:
    """Every stage of the plan at ``uri``, on its engine (or ``engine`` for all), with ``threads`` (see
    :class:`StageRunner`)."""
    plan = read_plan(uri)
    return [StageRunner(uri, i, device, plan, engine, threads) for i in range(len(plan.stages))]
