"""``partserve`` commands: each prints a table, or JSON with ``--json``; user errors exit with code 2."""

from __future__ import annotations

import json
from typing import Any

import click
import numpy as np

from partitions.dtypes import PLAN_DTYPES
from partitions.plan import ENGINE_CHOICES
from partitions.planner import OBJECTIVES
from partserve.cli.output import (
    console,
    domain_errors,
    emit_json,
    human_bytes,
    json_option,
    parse_bytes,
    parse_pairs,
    progress_bar,
    table,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="partserve")
def main() -> None:
    """Cut a PyTorch model into balanced stages and serve them as a pipeline on Ray Serve."""


def _model_options(pairs: tuple[str, ...], named: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in named.items() if v is not None}, **parse_pairs(pairs, "-O")}


@main.command()
@click.argument("model")
@click.option("-o", "--output", "out", required=True, help="Plan directory: a path or s3://, gs://, hdfs:// URI.")
@click.option("--stages", type=click.IntRange(min=1), help="Number of stages (default: fewest under the cap).")
@click.option("--max-stage-memory", help="Cap on weights + peak activations per stage, e.g. 2GiB.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Batch the costs are measured at (samples).",
)
@click.option("--device", default="auto", show_default=True, help="Device to profile on: auto, cpu, cuda.")
@click.option(
    "--bandwidth-gbps",
    type=click.FloatRange(min=1e-6),
    default=1.0,
    show_default=True,
    help="Link bandwidth between stages (GB/s) for transfer costs.",
)
@click.option(
    "--objective",
    type=click.Choice(OBJECTIVES),
    default="throughput",
    show_default=True,
    help="Minimise the bottleneck stage (throughput) or the critical path (latency).",
)
@click.option(
    "--branches/--no-branches",
    default=True,
    show_default=True,
    help="Run independent branches (fork/join) as parallel stages where the cost model gains.",
)
@click.option(
    "--hop-ms",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Fixed cost of each hand-off between stages (ms).",
)
@click.option("--threads", type=click.IntRange(min=1), help="torch threads while profiling on CPU (as in serving).")
@click.option(
    "--dtype",
    type=click.Choice(PLAN_DTYPES),
    help="Weights and float activations in this dtype (costs, memory and shards too) [default: the model's].",
)
@click.option(
    "--engine",
    type=click.Choice(ENGINE_CHOICES),
    default="eager",
    show_default=True,
    help="What runs each stage; auto: the fastest per stage that matches eager (onnxruntime needs partserve[onnx], "
    "tensorrt a CUDA device and partserve[gpu], cudagraphs a CUDA device).",
)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Timed repeats per node.")
@click.option("--layers", type=int, help="Model option: number of layers (zoo transformer).")
@click.option("--width", type=int, help="Model option: hidden width.")
@click.option("--seq-len", type=int, help="Model option: sequence length.")
@click.option("-O", "--model-option", "model_opts", multiple=True, help="Model option KEY=VALUE (repeatable).")
@json_option
@domain_errors
def plan(
    model: str,
    out: str,
    stages: int | None,
    max_stage_memory: str | None,
    batch_size: int,
    device: str,
    bandwidth_gbps: float,
    objective: str,
    branches: bool,
    hop_ms: float,
    threads: int | None,
    dtype: str | None,
    engine: str,
    repeats: int,
    layers: int | None,
    width: int | None,
    seq_len: int | None,
    model_opts: tuple[str, ...],
    as_json: bool,
) -> None:
    """Profile MODEL and write an optimal stage plan with one weight shard per stage to OUTPUT.

    MODEL is a zoo name (see `partserve zoo`), package.module:factory, or a Hugging Face model directory.
    """
    from partitions.errors import PlanError
    from partitions.partition import PlanOptions, build_plan
    from partitions.source import load_model

    cap = parse_bytes(max_stage_memory) if max_stage_memory else None
    if stages is None and cap is None:
        raise PlanError("neither --stages nor --max-stage-memory was given", "pass one of them (or both)")
    options = _model_options(model_opts, {"layers": layers, "width": width, "seq_len": seq_len})
    source = load_model(model, options, batch_size)
    opts = PlanOptions(
        stages=stages,
        max_stage_bytes=cap,
        device=device,
        bandwidth_bytes_per_ms=bandwidth_gbps * 1e6,
        repeats=repeats,
        objective=objective,
        branches=branches,
        hop_ms=hop_ms,
        threads=threads,
        dtype=dtype,
        engine=engine,
    )
    with progress_bar(not as_json) as progress:
        result = build_plan(source, out, opts, progress)
    if as_json:
        emit_json(json.loads(result.to_json()))
        return
    m = result.model
    console.print(f"captured [bold]{m['spec']}[/bold] by {m['capture']}: {m['capture_reason']}", highlight=False)
    for note in m.get("notes", []):
        console.print(f"[yellow]note[/yellow]: {note}", highlight=False)
    if result.processing is not None:
        p = result.processing
        text = f"text in ({p.max_length} tokens)" if p.tokenizer else "tensors in"
        console.print(f"entrance: {text}, {p.task} answers out; input limits {result.input_limits}", highlight=False)
    rows = [
        [
            s.index,
            ",".join(map(str, s.after)) or "in",
            f"{s.node_range[0]}:{s.node_range[1]}",
            result.nodes[s.node_range[0]]["module"] or "-",
            f"{s.params / 1e6:.2f}M",
            human_bytes(s.memory_bytes),
            human_bytes(s.transfer_bytes),
            f"{s.cost_ms:.2f}",
            f"{s.measured_ms:.2f}",
            s.engine.name if s.engine.up_to is None else f"{s.engine.name} <= {s.engine.up_to}, eager",
            f"{rate:.1f}",
            f"{s.gpu_fraction:.2f}",
        ]
        for s, rate in zip(result.stages, result.summary["stage_gflops"])
    ]
    columns = ["stage", "after", "nodes", "starts at", "params", "memory", "sends", "cost ms", "measured"]
    columns += ["engine", "GFLOP/s", "gpu"]
    title = f"plan for {m['spec']} in {result.dtype} at batch {result.batch_size} on {result.device}"
    console.print(table(title, columns, rows))
    s = result.summary
    for line in _engine_lines(result):
        console.print(line, highlight=False)
    console.print(_shape_line(result), highlight=False)
    console.print(
        f"bottleneck {s['bottleneck_ms']:.2f} ms, balance (bottleneck/mean) {s['balance']:.3f} planned, "
        f"{s['measured_balance']:.3f} measured; {s['throughput_samples_per_s']:.1f} samples/s; "
        f"weights {human_bytes(s['weight_bytes'])} in shards of {human_bytes(s['shard_weight_bytes'])}; "
        f"wrote {out}",
        highlight=False,
    )


def _engine_lines(result: Any) -> list[str]:
    """The machine's GEMM rate against the stages', each stage's engine reason, and the engines' gain."""
    s = result.summary
    lines = [
        f"machine fp32 GEMM {s['gemm_gflops']:.1f} GFLOP/s; stages reach {min(s['stage_gflops']):.1f}-"
        f"{max(s['stage_gflops']):.1f} GFLOP/s on their engines (GFLOP/s column, at batch {result.batch_size})"
    ]
    lines += [f"stage {st.index}: {st.engine.name}: {st.engine.reason}" for st in result.stages if st.engine.reason]
    if "engine_sum_ms" in s:
        gains = [
            f"batch {b}: {e:.2f} -> {c:.2f} ms ({e / c:.2f}x)"
            for b, e, c in zip(s["engine_batches"], s["eager_sum_ms"], s["engine_sum_ms"])
        ]
        lines.append("summed stage time, eager -> engines: " + "; ".join(gains))
    return lines


def _shape_line(result: Any) -> str:
    """Why the plan is a chain or has parallel branches, in the objective's terms."""
    s = result.summary
    key = "bottleneck_ms" if result.objective == "throughput" else "latency_ms"
    what = "bottleneck" if result.objective == "throughput" else "critical path"
    if s["shape"] == "chain":
        return f"chain: no parallel split beats sequential cuts ({what} {s[key]:.2f} ms)"
    groups: dict[tuple[int, ...], list[int]] = {}
    for st in result.stages:
        groups.setdefault(tuple(st.after), []).append(st.index)
    parallel = [f"stages {','.join(map(str, g))} in parallel" for g in groups.values() if len(g) > 1]
    return f"dag: {'; '.join(parallel)}; {what} {s[key]:.2f} ms against {s['chain_' + key]:.2f} ms as a chain"


@main.command()
@click.argument("plan_dir")
@click.option(
    "--inputs",
    "inputs_path",
    type=click.Path(exists=True, dir_okay=False),
    help="An .npz file of named input arrays to check as well.",
)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--tolerance",
    type=float,
    help="Max relative error against the model [default: 1e-6; float16 1e-2, bfloat16 5e-2; engines at least 1e-4].",
)
@json_option
@domain_errors
def verify(plan_dir: str, inputs_path: str | None, device: str, tolerance: float | None, as_json: bool) -> None:
    """Run the stages of PLAN_DIR on their engines, in sequence, and compare with the original model (and,
    for a plan cast to half precision, with the model cast the same way)."""
    from partitions.verify import verify as run_verify

    user = dict(np.load(inputs_path, allow_pickle=False)) if inputs_path else None
    report = run_verify(plan_dir, user, device, tolerance)
    if as_json:
        emit_json(report.to_json())
    else:
        rows = [[c.name, c.batch, f"{c.max_abs_error:.3g}", f"{c.max_rel_error:.3g}"] for c in report.cases]
        console.print(table(f"verify {plan_dir}", ["inputs", "batch", "max abs error", "max rel error"], rows))
        worst = report.worst_stage
        if worst is not None and any(e != "eager" for e in report.engines):
            console.print(
                f"engines {','.join(report.engines)}; worst stage {worst} ({report.engines[worst]}): "
                f"{report.stage_errors[worst]:.3g} relative to eager on the same inputs",
                highlight=False,
            )
        verdict = "[green]passed[/green]" if report.passed else "[red]FAILED[/red]"
        against = "the model" if report.same_dtype_tolerance is None else "the float32 model"
        console.print(
            f"{verdict}: {report.dtype} plan, max relative error {report.max_rel_error:.3g} against {against} "
            f"(tolerance {report.tolerance:g}: {report.tolerance_reason})"
        )
        if report.same_dtype_tolerance is not None:
            errors = ", ".join("-" if e is None else f"{e:.3g}" for e in report.stage_errors)
            console.print(
                f"against the model in {report.dtype}: {report.same_dtype_rel_error:.3g} "
                f"(tolerance {report.same_dtype_tolerance:g}); each stage against itself in float32: {errors}"
                + ("" if worst is None else f"; worst stage {worst}"),
                highlight=False,
            )
    if not report.passed:
        raise SystemExit(1)


@main.command()
@json_option
def zoo(as_json: bool) -> None:
    """List the built-in demo models and their options."""
    import inspect

    from partitions.zoo import ZOO

    entries = []
    for name, factory in ZOO.items():
        params = inspect.signature(factory).parameters
        opts = {k: p.default for k, p in params.items() if k != "batch_size"}
        entries.append({"name": name, "description": (factory.__doc__ or "").strip(), "options": opts})
    if as_json:
        emit_json(entries)
        return
    rows = [[e["name"], e["description"], ", ".join(f"{k}={v}" for k, v in e["options"].items())] for e in entries]
    console.print(table("model zoo", ["model", "description", "options (-O KEY=VALUE)"], rows))


def _register() -> None:
    """Commands that live beside the subsystem they drive."""
    from partserve.cli.batch import batch
    from partserve.cli.bench import bench
    from partserve.cli.compress import compress
    from partserve.cli.k8s import k8s
    from partserve.cli.serving import build, run
    from partserve.cli.simulate import simulate
    from partserve.cli.status import status
    from partserve.cli.tune import tune

    for command in (run, build, status, bench, batch, compress, simulate, k8s, tune):
        main.add_command(command)


_register()
