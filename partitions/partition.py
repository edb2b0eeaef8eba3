"""Join the steps: model -> graph -> costs -> plan -> shards. The only module that knows them all."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch

from partitions import artifacts, storage
from partitions.capture import CapturedGraph, capture, embedding_limits
from partitions.costs import NodeCost, gemm_gflops, measure_ms, profile
from partitions.dtypes import PLAN_DTYPES
from partitions.engine_choice import choose
from partitions.engines import EAGER, ENGINE_CHOICES, ONNX_FORMAT, current_target
from partitions.errors import PlanError
from partitions.plan import Artifact, Plan, Stage, StageEngine
from partitions.planner import Objective, Partition, Problem, solve
from partitions.processing import write_processing
from partitions.runtime import pick_device, stage_payload
from partitions.source import ModelSource
from partitions.stages import StageProgram, stage_program
from partitions.types import Bytes, TensorSpec

Progress = Callable[[str, int, int], None]
"""``progress(step, done, total)``: reports long steps (profiling passes, stage exports)."""


@dataclass
class PlanOptions:
    stages: int | None = None
    max_stage_bytes: Bytes | None = None
    device: str | None = None
    bandwidth_bytes_per_ms: float = 1e6
    """1e6 bytes/ms = 1 GB/s, a conservative figure for activations through Ray's object store."""
    repeats: int = 5
    warmup: int = 2
    refine: int = 2
    """Rounds of profile-guided refinement: time the planned stages whole, rescale node costs to match, re-plan."""
    objective: Objective = "throughput"
    branches: bool = True
    """Consider running independent branches of the graph as parallel stages."""
    hop_ms: float = 1.0
    """Fixed cost of each hand-off between stages through the serving layer, ms."""
    threads: int | None = None
    """torch intra-op threads while profiling on CPU; match the stage replicas' (Ray gives each one thread
    per reserved CPU, at least one). None: torch's default."""
    dtype: str | None = None
    """Weights and float activations in this dtype (``float32``, ``float16``, ``bfloat16``): the model and its
    float inputs are cast before capture, so costs, memory and shards are all in it. None: the model's own."""
    engine: str = EAGER
    """What runs each stage (:data:`partitions.engines.ENGINE_CHOICES`); ``auto``: the fastest per stage
    that matches eager (:mod:`partitions.engine_choice`)."""


def problem_of(cg: CapturedGraph, costs: list[NodeCost], batch_size: int, opts: PlanOptions) -> Problem:
    """The planner's pure input: per-unit costs and the tensor edges between units."""
    edges = [(v.producer, v.consumers, v.spec.sample_bytes() * batch_size) for v in cg.values.values()]
    return Problem(
        compute_ms=[c.latency_ms for c in costs],
        weight_bytes=[c.param_bytes for c in costs],
        activation_bytes=[c.activation_bytes for c in costs],
        edges=edges,
        bandwidth_bytes_per_ms=opts.bandwidth_bytes_per_ms,
        hop_ms=opts.hop_ms,
    )


def solve_for(cg: CapturedGraph, costs: list[NodeCost], batch_size: int, opts: PlanOptions) -> Partition:
    problem = problem_of(cg, costs, batch_size, opts)
    return solve(problem, opts.stages, opts.max_stage_bytes, opts.objective, opts.branches)


def build_plan(source: ModelSource, uri: str, opts: PlanOptions, progress: Progress | None = None) -> Plan:
    """Capture, profile and partition ``source``, then write plan.json and one shard per stage to ``uri``."""
    report = progress or (lambda step, done, total: None)
    if opts.engine not in ENGINE_CHOICES:
        raise PlanError(f"unknown engine {opts.engine!r}", f"pass one of {', '.join(ENGINE_CHOICES)}")
    device = pick_device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    batch_size = next(iter(source.example_inputs.values())).shape[0]
    if opts.dtype is not None:
        if opts.dtype not in PLAN_DTYPES:
            raise PlanError(f"dtype {opts.dtype!r} cannot be planned", f"pass one of {', '.join(PLAN_DTYPES)}")
        source = source.to_dtype(opts.dtype)
    report("capture", 0, 1)
    cg = capture(source)
    report("capture", 1, 1)
    if opts.stages is not None and opts.stages > len(cg.units):
        raise PlanError(
            f"{opts.stages} stages requested but the graph has only {len(cg.units)} cuttable nodes",
            f"pass --stages {len(cg.units)} or fewer",
        )
    source.module.to(device)
    check_kernels(source, device)
    inputs = [x.to(device) for x in source.example_inputs.values()]
    passes = opts.warmup + opts.repeats
    costs = profile(cg, inputs, device, opts.repeats, opts.warmup, lambda i: report("profile", i, passes))
    whole_ms = measure_ms(
        lambda: source.forward(dict(zip(source.example_inputs, inputs))), device, opts.repeats, opts.warmup
    )
    example = dict(zip(source.example_inputs, inputs))
    part, costs, measured = _refine(cg, costs, example, batch_size, device, opts, report)
    stages = _write_stages(cg, part, costs, measured, example, uri, opts, device, report)
    gemm = gemm_gflops(device)
    plan = Plan(
        model={
            "spec": source.spec,
            "options": source.options,
            "kind": source.kind,
            "capture": cg.method,
            "capture_reason": cg.reason,
            "notes": source.notes,
        },
        device=str(device),
        batch_size=batch_size,
        bandwidth_bytes_per_ms=opts.bandwidth_bytes_per_ms,
        max_stage_bytes=opts.max_stage_bytes,
        inputs=cg.inputs,
        outputs=cg.outputs,
        output_values=cg.output_values,
        input_ranges=dict(source.int_ranges),
        nodes=[c.to_json() for c in costs],
        stages=stages,
        summary={
            **_summary(part, stages, costs, whole_ms, batch_size),
            **_chain_alternative(cg, costs, batch_size, opts),
            **_engine_summary(stages, costs, gemm),
        },
        objective=opts.objective,
        dtype=source.dtype,
        input_limits=embedding_limits(cg),
        processing=write_processing(source.processing, cg.outputs, uri),
        engine=opts.engine,
    )
    problems = plan.problems()
    assert not problems, problems
    storage.write_plan(uri, plan)
    return plan


def check_kernels(source: ModelSource, device: torch.device) -> None:
    """Run the model once in its dtype on ``device``; a dtype torch has no kernels for there (float16 on some
    CPUs) is a :class:`PlanError` naming the fix. Float32 models are not run."""
    if source.dtype == "float32":
        return
    try:
        source.forward({k: v.to(device) for k, v in source.example_inputs.items()})
    except (RuntimeError, NotImplementedError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise PlanError(
            f"torch {torch.__version__} cannot run {source.spec} in {source.dtype} on {device} ({first})",
            "plan it with --device cuda, or with --dtype bfloat16" if device.type == "cpu" else "use --dtype float32",
        ) from exc


def _refine(
    cg: CapturedGraph,
    costs: list[NodeCost],
    example: dict[str, torch.Tensor],
    batch_size: int,
    device: torch.device,
    opts: PlanOptions,
    report: Progress,
) -> tuple[Partition, list[NodeCost], list[float]]:
    """Plan, time each stage as a whole, scale its nodes' latencies to that time, and plan again.

    Per-node timings miss fusion and cache effects and add per-call overhead; whole-stage timings do not.
    Returns the candidate with the lowest measured bottleneck, its calibrated costs and stage times (ms).
    """
    best: tuple[Partition, list[NodeCost], list[float]] | None = None
    for round_ in range(opts.refine + 1):
        report("plan", round_, opts.refine + 1)
        part = solve_for(cg, costs, batch_size, opts)
        measured = _measure_stages(cg, part, example, device, opts)
        if best is None or _figure(part, measured, opts) < _figure(*best[::2], opts):
            best = (part, costs, measured)
        costs = _calibrate(costs, part, measured)
    report("plan", opts.refine + 1, opts.refine + 1)
    assert best is not None
    return best


def _figure(part: Partition, measured: list[float], opts: PlanOptions) -> float:
    """The objective with measured stage times (ms): the bottleneck, or the critical path."""
    if opts.objective == "throughput":
        return max(measured)
    finish: list[float] = []
    for after, ms in zip(part.after, measured):
        finish.append(max((finish[j] for j in after), default=0.0) + ms)
    return max(finish)


def _calibrate(costs: list[NodeCost], part: Partition, measured: list[float]) -> list[NodeCost]:
    """Scale each stage's node latencies so they sum to the stage's measured time."""
    out = list(costs)
    for (a, b), ms in zip(part.spans, measured):
        total = sum(c.latency_ms for c in costs[a:b])
        factor = ms / total if total > 0 else 1.0
        out[a:b] = [replace(c, latency_ms=c.latency_ms * factor) for c in costs[a:b]]
    return out


def _programs(
    cg: CapturedGraph, part: Partition, example: dict[str, torch.Tensor]
) -> Iterator[tuple[StageProgram, list[torch.Tensor], Sequence[torch.Tensor]]]:
    """Each stage's program, its example arguments and outputs, running the stages on ``example``."""
    sent: dict[int, dict[str, torch.Tensor]] = {}
    for i, ((a, b), after) in enumerate(zip(part.spans, part.after)):
        program = stage_program(cg, a, b, part.segment_end[i] if part.carries[i] else None)
        payload = stage_payload(list(after), sent, example)
        args = [payload[name] for name in program.inputs]
        with torch.no_grad():  # not inference_mode: export refuses inference tensors as examples
            outs = program.gm(*args)
        sent[i] = {**{k: payload[k] for k in program.carried}, **dict(zip(program.computed, outs))}
        yield program, args, outs


def _measure_stages(
    cg: CapturedGraph, part: Partition, example: dict[str, torch.Tensor], device: torch.device, opts: PlanOptions
) -> list[float]:
    """Median wall time (ms) of each stage program on the example batch.

    Stages are timed round-robin, one call each per round, so drift in machine load hits them alike.
    """
    calls = [partial(program.gm, *args) for program, args, _ in _programs(cg, part, example)]
    warm = max(opts.warmup, 1)
    rounds = [[measure_ms(call, device, repeats=1, warmup=0) for call in calls] for _ in range(warm + opts.repeats)]
    rounds = rounds[warm:]
    return [statistics.median(r[i] for r in rounds) for i in range(len(calls))]


def _write_stages(
    cg: CapturedGraph,
    part: Partition,
    costs: list[NodeCost],
    measured: list[float],
    example: dict[str, torch.Tensor],
    uri: str,
    opts: PlanOptions,
    device: torch.device,
    report: Progress,
) -> list[Stage]:
    stages: list[Stage] = []
    shares = _gpu_fractions(part.memory_bytes)
    for i, (program, args, _) in enumerate(_programs(cg, part, example)):
        report("export stages", i, part.stages)
        a, b = part.spans[i]
        children = _children(cg, a, b) if cg.method == "modules" else None
        data, fmt, exported = artifacts.encode_stage(program.gm, args, children)
        name = f"stage-{i:03d}" + (".pt2" if fmt == artifacts.EXPORTED else ".safetensors")
        storage.write_file(uri, name, data)
        engine = _stage_engine(i, exported, args, uri, opts, device)
        weights = [p for p in program.gm.state_dict().values()]
        stage_costs = costs[a:b]
        stages.append(
            Stage(
                index=i,
                node_range=(a, b),
                inputs=[_spec(cg, n) for n in program.inputs],
                computed=[_spec(cg, n) for n in program.computed],
                carried=program.carried,
                artifact=Artifact(name, fmt, storage.sha256(data), len(data), children or []),
                params=sum(t.numel() for t in weights),
                weight_bytes=sum(t.numel() * t.element_size() for t in weights),
                memory_bytes=part.memory_bytes[i],
                compute_ms=sum(c.latency_ms for c in stage_costs),
                transfer_bytes=part.transfer_bytes[i],
                cost_ms=part.cost_ms[i],
                measured_ms=measured[i],
                gpu_fraction=shares[i],
                after=list(part.after[i]),
                engine=engine,
            )
        )
        del data
    report("export stages", part.stages, part.stages)
    return stages


def _stage_engine(
    index: int,
    exported: torch.export.ExportedProgram | None,
    args: Sequence[torch.Tensor],
    uri: str,
    opts: PlanOptions,
    device: torch.device,
) -> StageEngine:
    """Choose stage ``index``'s engine and write the file it runs beside the shard."""
    choice = choose(opts.engine, exported, args, device, opts.repeats, opts.warmup)
    artifact = None
    if choice.artifact is not None:
        name = f"stage-{index:03d}.{ONNX_FORMAT}"
        storage.write_file(uri, name, choice.artifact)
        artifact = Artifact(name, ONNX_FORMAT, storage.sha256(choice.artifact), len(choice.artifact))
    target = current_target(device) if choice.name != EAGER else ""
    return StageEngine(choice.name, artifact, target, choice.reason, choice.batches, choice.ms, up_to=choice.up_to)


def _engine_summary(stages: list[Stage], costs: list[NodeCost], gemm: float) -> dict:
    """The machine's fp32 GEMM rate, each stage's achieved rate on its engine at the plan's batch (GFLOP/s),
    and, when every stage was timed on engines, the summed stage times of eager and of the chosen engines
    (ms, per timed batch)."""
    rates = []
    for s in stages:
        a, b = s.node_range
        rates.append(sum(c.flops for c in costs[a:b]) / s.run_ms / 1e6 if s.run_ms > 0 else 0.0)
    out: dict = {"gemm_gflops": gemm, "stage_gflops": rates}
    timed = [s.engine for s in stages if s.engine.ms]
    if timed and len(timed) == len(stages) and all(e.batches == timed[0].batches for e in timed):
        out["engine_batches"] = timed[0].batches
        out["eager_sum_ms"] = [sum(e.ms[EAGER][k] for e in timed) for k in range(len(timed[0].batches))]
        out["engine_sum_ms"] = [sum(e.ms_at(k) for e in timed) for k in range(len(timed[0].batches))]
    return out


def _spec(cg: CapturedGraph, name: str) -> TensorSpec:
    if name in cg.values:
        return cg.values[name].spec
    return next(t for t in cg.inputs if t.name == name)


def _children(cg: CapturedGraph, a: int, b: int) -> list[str]:
    return [str(cg.node(n).target) for u in cg.units[a:b] for n in u.nodes if cg.node(n).op == "call_module"]


def _gpu_fractions(memory: tuple[int, ...]) -> list[float]:
    """Memory-proportional shares of one GPU, rounded down to 0.01 so they pack onto it (min 0.01)."""
    total = sum(memory) or 1
    return [max(0.01, math.floor(100 * m / total) / 100) for m in memory]


def _chain_alternative(cg: CapturedGraph, costs: list[NodeCost], batch_size: int, opts: PlanOptions) -> dict:
    """The best chain plan's figures under the same costs, to show what parallel branches gain."""
    try:
        chain = solve_for(cg, costs, batch_size, replace(opts, branches=False))
    except PlanError:
        return {"chain_bottleneck_ms": None, "chain_latency_ms": None}
    return {"chain_bottleneck_ms": chain.bottleneck_ms, "chain_latency_ms": chain.latency_ms}


def _summary(part: Partition, stages: list[Stage], costs: list[NodeCost], whole_ms: float, batch: int) -> dict:
    measured = [s.measured_ms for s in stages]
    planned_mean = statistics.fmean(part.cost_ms)
    return {
        "stages": part.stages,
        "nodes": len(costs),
        "bottleneck_ms": part.bottleneck_ms,
        "mean_stage_ms": planned_mean,
        "balance": part.bottleneck_ms / planned_mean if planned_mean else 1.0,
        "measured_bottleneck_ms": max(measured),
        "measured_balance": max(measured) / statistics.fmean(measured) if any(measured) else 1.0,
        "throughput_samples_per_s": batch * 1e3 / part.bottleneck_ms if part.bottleneck_ms else math.inf,
        "latency_ms": part.latency_ms,
        "measured_latency_ms": _figure(part, measured, PlanOptions(objective="latency")),
        "shape": "chain" if part.is_chain else "dag",
        "whole_model_ms": whole_ms,
        "profiled_ms": sum(c.latency_ms for c in costs),
        "params": sum(c.params for c in costs),
        "weight_bytes": sum(c.param_bytes for c in costs),
        "shard_weight_bytes": sum(s.weight_bytes for s in stages),
        "shard_bytes": sum(s.artifact.size_bytes for s in stages),
    }
