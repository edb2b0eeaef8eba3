"""Run the stages in sequence and compare with the original model.

A plan in the model's own dtype must match it to :data:`SAME_DTYPE_TOLERANCE` (the stages run the model's own
operations). A plan cast to half precision (``partserve plan --dtype``) is compared twice: with the model as
loaded (float32), within :data:`HALF_TOLERANCE` of its dtype, and with the model cast to the plan's dtype in
this process, within :data:`SAME_DTYPE_TOLERANCE`. Each stage's own rounding is measured too: its outputs
against the same stage widened to float32 on the same inputs; the worst stage is named.

A plan whose stages run on engines (``partserve plan --engine``) is held to at least :data:`ENGINE_TOLERANCE`,
and each stage is also run eager on the same inputs: the stage whose engine strays furthest is named.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import fx, nn

from partitions.dtypes import accept, to_numpy, to_torch, torch_dtype
from partitions.engines import EAGER, max_errors, rel_error
from partitions.errors import PartserveError
from partitions.inputs import random_inputs
from partitions.runtime import StageRunner, load_pipeline, run_pipeline, stage_payload
from partitions.source import ModelSource, load_model
from partitions.storage import read_plan
from partitions.types import Payload, TensorSpec

DEFAULT_TOLERANCE = 1e-6
SAME_DTYPE_TOLERANCE: dict[str, float] = {"float32": 1e-6, "float16": 2.0**-10, "bfloat16": 2.0**-7}
"""Max relative error of a plan against the model in the same dtype: float32 1e-6 (reordered sums); half
precision one epsilon (an operation exported differently rounds once more)."""
HALF_TOLERANCE: dict[str, float] = {"float16": 1e-2, "bfloat16": 5e-2}
"""Max relative error of a half-precision plan against the float32 model, about six epsilons (2^-7 for
bfloat16, 2^-10 for float16) of accumulated rounding."""
ENGINE_TOLERANCE = 1e-4
"""fp32, some stage on another engine: fused and reordered float arithmetic (see
:data:`partitions.engine_choice.TOLERANCE`, which each stage met against eager at plan time)."""
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
    """Max relative error against the model as loaded."""
    cases: list[Case]
    """Against the model as loaded (float32, unless the model itself is in another dtype)."""
    dtype: str = "float32"
    """The plan's dtype."""
    same_dtype_tolerance: float | None = None
    same_dtype_cases: list[Case] = field(default_factory=list)
    """Against the model cast to the plan's dtype in this process (only when the plan was cast)."""
    stage_errors: list[float | None] = field(default_factory=list)
    """Per stage, max relative error of its outputs against a reference on the same inputs: with engines, the
    stage run eager (worst over the cases); else, when the plan was cast, the stage widened to float32 (None:
    the stage could not be widened)."""
    tolerance_reason: str = ""
    engines: list[str] = field(default_factory=list)
    """Each stage's engine, as run."""

    @property
    def max_rel_error(self) -> float:
        return max(c.max_rel_error for c in self.cases)

    @property
    def max_abs_error(self) -> float:
        return max(c.max_abs_error for c in self.cases)

    @property
    def same_dtype_rel_error(self) -> float | None:
        return max((c.max_rel_error for c in self.same_dtype_cases), default=None)

    @property
    def worst_stage(self) -> int | None:
        """The stage whose own rounding is largest (None when not measured)."""
        known = [(e, i) for i, e in enumerate(self.stage_errors) if e is not None]
        return max(known)[1] if known else None

    @property
    def passed(self) -> bool:
        same = self.same_dtype_rel_error
        within = same is None or self.same_dtype_tolerance is None or same <= self.same_dtype_tolerance
        return self.max_rel_error <= self.tolerance and within

    def to_json(self) -> dict:
        return {
            "uri": self.uri,
            "dtype": self.dtype,
            "tolerance": self.tolerance,
            "passed": self.passed,
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "cases": [asdict(c) for c in self.cases],
            "same_dtype_tolerance": self.same_dtype_tolerance,
            "same_dtype_rel_error": self.same_dtype_rel_error,
            "same_dtype_cases": [asdict(c) for c in self.same_dtype_cases],
            "stage_errors": self.stage_errors,
            "worst_stage": self.worst_stage,
            "tolerance_reason": self.tolerance_reason,
            "engines": self.engines,
        }


def default_tolerance(plan_dtype: str, model_dtype: str) -> float:
    """Max relative error of a plan in ``plan_dtype`` against a model in ``model_dtype``."""
    if plan_dtype == model_dtype:
        return SAME_DTYPE_TOLERANCE.get(plan_dtype, DEFAULT_TOLERANCE)
    return HALF_TOLERANCE.get(plan_dtype, DEFAULT_TOLERANCE)


def verify(
    uri: str,
    user_inputs: Mapping[str, np.ndarray] | None = None,
    device: str | None = None,
    tolerance: float | None = None,
) -> Report:
    """Compare the plan at ``uri``, each stage on its engine, with its model on the example, random and
    ``user_inputs``; ``tolerance`` (max relative error against the model as loaded) defaults to
    :func:`default_tolerance`, at least :data:`ENGINE_TOLERANCE` when a stage runs on an engine."""
    plan = read_plan(uri)
    runners = load_pipeline(uri, device)
    source = load_model(plan.model["spec"], plan.model["options"], plan.batch_size)
    source.module.to(runners[0].device)
    model_dtype = source.dtype
    example = {k: to_numpy(v) for k, v in source.example_inputs.items()}
    cases: dict[str, Payload] = {"example": _as_inputs(plan.inputs, example)}
    for i, batch in enumerate(RANDOM_BATCHES):
        cases[f"random-{i}"] = random_inputs(plan.inputs, batch, i, plan.input_ranges)
    if user_inputs is not None:
        missing = [t.name for t in plan.inputs if t.name not in user_inputs]
        if missing:
            raise PartserveError(f"user inputs lack {missing}", f"provide arrays named {[t.name for t in plan.inputs]}")
        cases["user"] = _as_inputs(plan.inputs, {t.name: np.asarray(user_inputs[t.name]) for t in plan.inputs})
    engines = [r.engine for r in runners]
    on_engines = any(e != EAGER for e in engines)
    eager = load_pipeline(uri, device, EAGER) if on_engines else None
    engine_errors = [0.0] * len(runners)
    got = {name: run_pipeline(runners, arrays, eager, engine_errors) for name, arrays in cases.items()}
    on = runners[0].device
    tol = default_tolerance(plan.dtype, model_dtype) if tolerance is None else tolerance
    why = f"{plan.dtype} against a {model_dtype} model" if tolerance is None else "given"
    if tolerance is None and on_engines and tol < ENGINE_TOLERANCE:
        tol, why = ENGINE_TOLERANCE, "stages on engines (fused fp32 arithmetic)"
    report = Report(uri, tol, _compare(source, cases, got, on), plan.dtype, tolerance_reason=why, engines=engines)
    if on_engines:
        report.stage_errors = list(engine_errors)
    if model_dtype != plan.dtype:
        source.to_dtype(plan.dtype)
        report.same_dtype_cases = _compare(source, cases, got, on)
        report.same_dtype_tolerance = default_tolerance(plan.dtype, plan.dtype)
        report.stage_errors = report.stage_errors or stage_errors(runners, cases["example"])
    return report


def _as_inputs(specs: Sequence[TensorSpec], arrays: Mapping[str, np.ndarray]) -> Payload:
    """``arrays`` in the dtypes of the plan's inputs (float32 cast to half precision, as the entrance does)."""
    out = {}
    for spec in specs:
        a = np.ascontiguousarray(arrays[spec.name])
        out[spec.name] = accepted if (accepted := accept(a, spec.dtype)) is not None else a
    return out


def _compare(
    source: ModelSource, cases: Mapping[str, Payload], got: Mapping[str, Payload], device: torch.device
) -> list[Case]:
    """Each case's error of the pipeline outputs ``got`` against ``source`` run on ``device`` on the same
    inputs (float inputs in the dtype of the source's example inputs)."""
    results = []
    for name, arrays in cases.items():
        tensors = {k: to_torch(v).to(device, source.example_inputs[k].dtype) for k, v in arrays.items()}
        reference = source.forward_flat(tensors)
        abs_err, scale = max_errors(list(got[name].values()), [to_numpy(ref) for ref in reference])
        batch = next(iter(arrays.values())).shape[0]
        results.append(Case(name, batch, abs_err, abs_err / scale if scale else abs_err))
    return results


def stage_errors(runners: list[StageRunner], inputs: Payload) -> list[float | None]:
    """Per stage: max relative error of its outputs on ``inputs`` (passed down the pipeline) against the same
    stage widened to float32 (:func:`widened`) on the same inputs; None where a stage cannot be widened."""
    sent: dict[int, Payload] = {}
    errors: list[float | None] = []
    for runner in runners:
        stage = runner.stage
        payload = stage_payload(stage.after, sent, inputs, stage.reads)
        sent[stage.index] = runner(payload)
        args = [to_torch(np.ascontiguousarray(payload[n])).to(runner.device) for n in runner.input_names]
        narrow = torch_dtype(runner.plan.dtype)
        if runner.module is None:  # a stage on an engine that does not load the exported program
            errors.append(None)
            continue
        try:
            wide = widened(runner.module, narrow)
            with torch.inference_mode():
                out = wide(*[a.float() if a.dtype == narrow else a for a in args])
        except Exception:  # a program whose graph pins its dtype in ways a rewrite misses
            errors.append(None)
            continue
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        errors.append(rel_error([sent[stage.index][n] for n in runner.output_names], [to_numpy(t) for t in outs]))
    return errors


def widened(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` with its floating-point weights in float32 and, in a graph module, every ``dtype``
    argument (``_to_copy(dtype=torch.bfloat16)``, ``full(..., dtype=...)``) made float32."""
    wide = copy.deepcopy(module).float()
    if isinstance(wide, fx.GraphModule):
        for node in wide.graph.nodes:
            node.args = fx.node.map_aggregate(node.args, lambda a: torch.float32 if a is dtype else a)
            node.kwargs = fx.node.map_aggregate(node.kwargs, lambda a: torch.float32 if a is dtype else a)
        wide.recompile()
    return wide
