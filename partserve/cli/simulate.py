"""``partserve simulate``: replay a workload on a simulated pipeline under the coordinated policy and/or a model
of Ray Serve's default autoscaler (and whole-model replicas under it), and report latency, SLO attainment,
cost, and what each policy saw and its delays."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from cluster.errors import ScalingConfigError, check
from cluster.policy import PolicyConfig
from cluster.sim.engine import ROUTINGS, SimConfig, StageModel, with_initial_replicas
from cluster.sim.engine import simulate as run_pipeline
from cluster.sim.metrics import ServeMetricsConfig, metrics_model
from cluster.sim.policies import Coordinated, RayDefault, RayDefaultConfig, policy_stages, whole_model
from cluster.sim.report import plot, summarize
from cluster.sim.workloads import KINDS, Workload, arrivals
from partserve.cli.output import console, domain_errors, emit_json, progress_bar, table
from serve_app.names import stage_name

_PROGRESS_MIN_REQUESTS = 100_000
WHOLE_MODEL = "whole-model"


def parse_rate(text: str, capacity_rate_per_s: float) -> float:
    """``"40"`` -> 40 requests/s; ``"10%"`` -> 10% of the pipeline's capacity."""
    try:
        return float(text[:-1]) / 100 * capacity_rate_per_s if text.endswith("%") else float(text)
    except ValueError as exc:
        fix = "use requests/s (40) or a share of capacity (10%)"
        raise ScalingConfigError(f"rate {text!r} is not a number", fix) from exc


def load_stages(
    plan_dir: str | None,
    service_ms: str | None,
    batch_size: int,
    fixed_ms: float,
    gpu_fraction: float,
    min_replicas: int,
    max_replicas: int,
) -> list[StageModel]:
    """Stages from the plan in ``plan_dir`` (``run_ms`` per batch of ``batch_size``) or ``--service-ms``."""
    gpus: list[float]
    if plan_dir is not None:
        from partitions.storage import read_plan

        plan = read_plan(plan_dir)  # a local path or an s3:// ... URI, checked as serving checks it
        full_ms = [s.run_ms for s in plan.stages]
        batch_size = plan.batch_size
        gpus = [s.gpu_fraction for s in plan.stages]
    else:
        check(service_ms is not None, "no stages given", "pass --service-ms 170,250,210,130 or --plan DIR")
        try:
            full_ms = [float(x) for x in str(service_ms).split(",")]
        except ValueError as exc:
            raise ScalingConfigError(f"--service-ms {service_ms!r} is not a list of numbers", "e.g. 170,250") from exc
        gpus = [gpu_fraction] * len(full_ms)
    for i, ms in enumerate(full_ms):
        check(ms > fixed_ms, f"stage {i}: service time ({ms} ms) must exceed fixed_ms ({fixed_ms} ms)")
    return [
        StageModel(
            name=stage_name(i),
            fixed_ms=fixed_ms,
            per_sample_ms=(ms - fixed_ms) / batch_size,
            max_batch_size=batch_size,
            gpu_fraction=g,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
        )
        for i, (ms, g) in enumerate(zip(full_ms, gpus))
    ]


def _row(name: str, s: dict[str, Any]) -> list[Any]:
    recovery = "-" if s["recovery_s"] is None and s.get("step_s") is None else s["recovery_s"]
    return [
        name,
        f"{s['p50_ms']:.0f}",
        f"{s['p99_ms']:.0f}",
        f"{100 * s['slo_attainment']:.2f}%",
        f"{s['replica_seconds']:.0f}",
        f"{s['gpu_seconds']:.0f}",
        s["scale_actions"],
        s["max_replicas"],
        "not recovered" if recovery is None else recovery,
    ]


@click.command("simulate")
@click.option("--plan", "plan_dir", help="Plan directory or URI (stage costs).")
@click.option("--service-ms", help="Full-batch service time per stage, comma-separated (without --plan).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Without --plan.")
@click.option(
    "--fixed-ms",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Part of each batch's time that does not grow with its size.",
)
@click.option("--gpu-fraction", type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option("--min-replicas", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--max-replicas", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "--initial-replicas",
    default="min",
    show_default=True,
    help="'min', 'auto' (sized for the starting rate) or a number.",
)
@click.option("--workload", type=click.Choice(KINDS), default="step", show_default=True)
@click.option("--rate", default="10%", show_default=True, help="Requests/s, or a share of capacity such as 10%.")
@click.option("--peak-rate", default="80%", show_default=True, help="Rate after the step / top of ramp and diurnal.")
@click.option("--change-s", type=float, default=300.0, show_default=True, help="Time of the step / start of the ramp.")
@click.option("--ramp-s", type=float, default=60.0, show_default=True)
@click.option("--period-s", type=float, default=300.0, show_default=True, help="Diurnal period.")
@click.option("--cv", type=float, help="Inter-arrival coefficient of variation [default: 4 for bursty, else 1].")
@click.option("--duration-s", type=float, default=1200.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--slo-ms", type=float, default=1200.0, show_default=True)
@click.option("--gpu-budget", type=float, help="GPUs for all stage replicas together.")
@click.option("--startup-s", type=float, default=10.0, show_default=True, help="Replica start-up time, alone.")
@click.option(
    "--startup-slots",
    type=float,
    default=0.0,
    show_default=True,
    help="Start-ups that run at full speed at once; more share them (a machine's cores, where every replica "
    "starts on it). 0: no limit.",
)
@click.option("--service-cv", type=float, default=0.0, show_default=True, help="Noise on batch service times.")
@click.option("--target-utilisation", type=float, default=PolicyConfig.target_utilisation, show_default=True)
@click.option(
    "--max-starting",
    type=click.IntRange(min=1),
    help="The coordinated policy: replicas starting at once over all stages, bottleneck first [default: no limit].",
)
@click.option(
    "--rate-noise-sigmas",
    type=click.FloatRange(min=0),
    default=PolicyConfig.rate_noise_sigmas,
    show_default=True,
    help="The coordinated policy's band against rate noise, in standard deviations of the measured rate (0: none).",
)
@click.option("--drain-time-s", type=float, default=10.0, show_default=True)
@click.option("--upscale-delay-s", type=float, default=0.0, show_default=True)
@click.option("--downscale-delay-s", type=float, default=120.0, show_default=True)
@click.option(
    "--ray-target-ongoing",
    type=float,
    default=2.0,
    show_default=True,
    help="Ray default policy: target_ongoing_requests.",
)
@click.option("--ray-upscale-delay-s", type=float, help="Ray default policy [default: --upscale-delay-s].")
@click.option("--ray-downscale-delay-s", type=float, help="Ray default policy [default: --downscale-delay-s].")
@click.option(
    "--metrics",
    type=click.Choice(["serve", "exact"]),
    default="serve",
    show_default=True,
    help="What every policy sees: Ray Serve's metrics path, or the exact state at each tick (an upper bound).",
)
@click.option(
    "--routing",
    type=click.Choice(list(ROUTINGS)),
    default="replicas",
    show_default=True,
    help="replicas: Serve's (a queue per replica, power of two choices); shared: one queue per stage.",
)
@click.option("--metrics-interval-s", type=float, default=10.0, show_default=True, help="Serve: push interval.")
@click.option("--look-back-period-s", type=float, default=30.0, show_default=True, help="Serve: look-back window.")
@click.option(
    "--whole-target-ongoing",
    type=float,
    help="Whole-model replicas: Ray's target_ongoing_requests [default: --ray-target-ongoing].",
)
@click.option(
    "--whole-max-replicas",
    type=click.IntRange(min=1),
    help="Whole-model replicas at most [default: as many as carry the pipeline's capacity].",
)
@click.option(
    "--compare",
    is_flag=True,
    help="Run the coordinated policy, Ray's default, and whole-model replicas under Ray's default on the same "
    "arrivals.",
)
@click.option(
    "--policy",
    type=click.Choice([Coordinated.name, RayDefault.name, WHOLE_MODEL]),
    default=Coordinated.name,
    show_default=True,
)
@click.option("--plot", "plot_path", type=click.Path(path_type=Path, dir_okay=False), help="PNG of replicas and p99.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@domain_errors
def simulate(**o: Any) -> None:
    """Simulate autoscaling of a pipeline: p50/p99, SLO attainment, replica-seconds, recovery after a step."""
    stages = load_stages(
        o["plan_dir"],
        o["service_ms"],
        o["batch_size"],
        o["fixed_ms"],
        o["gpu_fraction"],
        o["min_replicas"],
        o["max_replicas"],
    )
    capacity = min(s.rate_per_s * s.max_replicas for s in stages)
    cv = o["cv"] if o["cv"] is not None else (4.0 if o["workload"] == "bursty" else 1.0)
    workload = Workload(
        o["workload"],
        parse_rate(o["rate"], capacity),
        parse_rate(o["peak_rate"], capacity),
        change_s=o["change_s"],
        ramp_s=o["ramp_s"],
        period_s=o["period_s"],
        cv=cv,
    )
    stages = with_initial_replicas(stages, o["initial_replicas"], workload.rate_per_s, o["target_utilisation"])
    policy = PolicyConfig(
        stages=policy_stages(stages),
        target_utilisation=o["target_utilisation"],
        rate_noise_sigmas=o["rate_noise_sigmas"],
        max_starting=o["max_starting"],
        drain_time_s=o["drain_time_s"],
        gpu_budget=o["gpu_budget"],
        upscale_delay_s=o["upscale_delay_s"],
        downscale_delay_s=o["downscale_delay_s"],
    )
    ray = RayDefaultConfig(
        target_ongoing_requests=o["ray_target_ongoing"],
        upscale_delay_s=o["upscale_delay_s"] if o["ray_upscale_delay_s"] is None else o["ray_upscale_delay_s"],
        downscale_delay_s=o["downscale_delay_s"] if o["ray_downscale_delay_s"] is None else o["ray_downscale_delay_s"],
    )
    whole_ray = replace(ray, target_ongoing_requests=o["whole_target_ongoing"] or ray.target_ongoing_requests)
    serve_metrics = ServeMetricsConfig(
        metrics_interval_s=o["metrics_interval_s"], look_back_period_s=o["look_back_period_s"]
    )

    def seen(models: list[StageModel]) -> Any:
        return metrics_model(o["metrics"], [s.name for s in models], serve_metrics, o["seed"])

    whole_rate = stages[0].max_batch_size * 1000.0 / whole_model(stages, 1).full_batch_ms
    whole_max = o["whole_max_replicas"] or math.ceil(capacity / whole_rate - 1e-9)
    whole = with_initial_replicas(
        [whole_model(stages, whole_max)], o["initial_replicas"], workload.rate_per_s, o["target_utilisation"]
    )
    runs: list[tuple[Any, list[StageModel]]] = [
        (Coordinated(policy, seen(stages)), stages),
        (RayDefault(policy.stages, ray, seen(stages)), stages),
        (RayDefault(policy_stages(whole), whole_ray, seen(whole), name=WHOLE_MODEL), whole),
    ]
    if not o["compare"]:
        runs = [(c, m) for c, m in runs if c.name == o["policy"]]
    sim = SimConfig(
        tick_s=1.0,
        startup_s=o["startup_s"],
        startup_slots=o["startup_slots"],
        service_cv=o["service_cv"],
        gpu_budget=o["gpu_budget"],
        seed=o["seed"],
        routing=o["routing"],
    )
    times = arrivals(workload, o["duration_s"], o["seed"])
    step_s = o["change_s"] if o["workload"] == "step" else None
    results, report = [], {}
    with progress_bar(not o["as_json"] and len(times) >= _PROGRESS_MIN_REQUESTS) as progress:
        for c, models in runs:
            total = int(o["duration_s"])
            result = run_pipeline(
                models,
                times,
                c,
                o["duration_s"],
                sim,
                lambda t, name=c.name, total=total: progress(name, int(t), total),
            )
            results.append((c.name, result))
            report[c.name] = {**summarize(result, o["slo_ms"], step_s), **c.describe()}
    if o["plot_path"] is not None:
        plot(results, o["slo_ms"], o["plot_path"])
    header = {
        "capacity_rate_per_s": capacity,
        "requests": len(times),
        "slo_ms": o["slo_ms"],
        "step_s": step_s,
        "routing": o["routing"],
        "startup_s": o["startup_s"],
        "startup_slots": o["startup_slots"],
    }
    if o["as_json"]:
        emit_json({**header, "policies": report})
        return
    columns = [
        "policy",
        "p50 ms",
        "p99 ms",
        "SLO attained",
        "replica-s",
        "GPU-s",
        "scale actions",
        "peak replicas",
        "recovery s",
    ]
    title = (
        f"{len(stages)} stages, {o['workload']} workload, {len(times)} requests, capacity "
        f"{capacity:.0f}/s, SLO {o['slo_ms']:g} ms, {o['routing']} routing, start-up {o['startup_s']:g} s"
        + (f" shared by {o['startup_slots']:g} slots" if o["startup_slots"] else "")
    )
    console.print(table(title, columns, [_row(name, {**s, "step_s": step_s}) for name, s in report.items()]))
    for name, s in report.items():
        seen_by = s["observation"]
        how = (
            "exact state at every tick"
            if seen_by["model"] == "exact"
            else f"Serve metrics (recorded every {seen_by['record_interval_s']:g} s, pushed every "
            f"{seen_by['push_interval_s']:g} s, look-back {seen_by['look_back_period_s']:g} s)"
        )
        console.print(
            f"{name}: saw {how}: {seen_by['signals']}; upscale delay {s['upscale_delay_s']:g} s, downscale delay "
            f"{s['downscale_delay_s']:g} s"
        )
