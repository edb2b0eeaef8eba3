"""Live twin of ``partserve simulate``: the real Serve application under the coordinated policy and under Ray
Serve's default policy, and the simulator on the same parameters, side by side. Not part of CI::

    PYTHONPATH=. python3 benchmarks/autoscale_twin.py --out twin.json --plot twin.png     # 4 x 300 s live
    PYTHONPATH=. python3 benchmarks/autoscale_twin.py --workloads step --policies coordinated --duration-s 120
    PYTHONPATH=. python3 benchmarks/autoscale_twin.py --resimulate twin.json --routing shared   # simulator only

The model: three ``Sleep`` blocks planned into three stages; a stage's batch time is spent sleeping (as a GPU
kernel's would be spent waiting), one batch at a time per replica, so the benchmark does not load the machine's
CPUs. A client request is one pipeline batch (``TwinSetup.batch`` samples): it goes through the pipeline
alone, and a stage replica runs one at a time, so a stage request is a batch in Serve's counts as in the
simulator's.

Both policies run at Serve's default metric settings (``metrics_interval_s`` 10 s, ``look_back_period_s``
30 s: records every 6 s, pushes every 10 s) and the same upscale and downscale delays; Ray's default policy
with its default ``target_ongoing_requests`` (2). Arrivals are the simulator's (:func:`cluster.sim.workloads.
arrivals`, same workload and seed), sent open-loop through the application's handle; replicas per stage are
polled every second. Each run reports what ``partserve simulate`` reports (:func:`cluster.sim.report.
summarize`: p50/p99, SLO attainment, replica-seconds, recovery after the step) plus the rolling p99, the
replicas over time and the latencies, and what it measured of the machine: each replica start-up (when its
target rose, when it ran), each stage's replica time per request, time in transit, when the entrance records
and pushes its metrics, and each stage's ongoing requests as Serve's controller aggregated them from the
handles (what Ray's default policy reads). The simulator then runs the same workload with those, under the
same observation model (``serve``) and delays, its start-ups sharing the machine's cores with one start-up
alone fitted to the run's (:func:`cluster.sim.startup.fit_startup_s`), at ``--phases`` draws of the other
metric sources' phases (the median is compared with live). The JSON is
written after every live run; stop a run with
SIGTERM (Ray's driver handler turns it into an exit that stops the local Ray).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cluster.policy import PolicyConfig
from cluster.sim.startup import fit_startup_s

REPO = Path(__file__).resolve().parent.parent
APP = "twin"
ALIVE = {"STARTING", "UPDATING", "RECOVERING", "RUNNING", "PENDING_MIGRATION", "STOPPING"}
"""Replica states that hold their resources (counted in replica-seconds)."""
STEP_PEAK = 0.6
"""The step goes from 10% to this share of the capacity at ``max_replicas``: with replicas starting in about a
minute on a loaded 2-core machine, a step to 80% leaves too little spare capacity to work off the backlog
within the run under either policy."""
HEALTH_CHECKS = {"health_check_period_s": 30.0, "health_check_timeout_s": 120.0}
"""Patient health checks (Serve's: every 10 s, 30 s to answer): on a shared 2-core machine a replica starved of
CPU for half a minute is slow, not dead, and replacing it would lose the run's requests."""


DEVICE = threading.Lock()
"""One device per replica process: its batches run one at a time, as kernels on a GPU do (a stage replica
runs a request of a full batch in a thread of its own, so without this sleeps would overlap)."""


class Sleep(nn.Module):
    """A linear layer that also sleeps ``ms_per_sample`` per sample, holding the process's :data:`DEVICE`: stage
    time that costs no CPU. torch.export cannot keep a sleep, so it refuses export and the plan cuts the
    nn.Sequential at its children."""

    def __init__(self, width: int, ms_per_sample: float) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.ms_per_sample = ms_per_sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            raise RuntimeError("Sleep sleeps in Python; torch.export cannot capture it")
        with DEVICE:
            time.sleep(self.ms_per_sample * len(x) / 1e3)
        return self.linear(x)


def sleep_pipeline(ms_per_sample: str = "80,120,100", width: int = 8, batch_size: int = 4):
    """One ``Sleep`` block per comma-separated time (ms per sample); importable by the replicas."""
    torch.manual_seed(0)
    blocks = [Sleep(width, float(ms)) for ms in ms_per_sample.split(",")]
    return nn.Sequential(*blocks).eval(), torch.randn(batch_size, width)


@dataclass(frozen=True)
class TwinSetup:
    ms_per_sample: tuple[float, ...] = (80.0, 120.0, 100.0)
    batch: int = 4
    """Samples per request and per pipeline batch."""
    width: int = 8
    min_replicas: int = 1
    max_replicas: int = 4
    slo_ms: float = 3600.0
    """Three times the pipeline's sleep per request (320 + 480 + 400 ms). At twice (2400 ms, runs 1-19) the
    10 s windows' p99 before the step already reached 2.0-2.2 s, and where both policies settle after it
    (67-85% busy) it moved between 1.7 and 2.7 s, so "back under the SLO" turned on one request in a window
    and was not a measurement of recovery. The policies do not read it: a stored run's figures at another
    SLO come from its latencies (``--resimulate RUN --slo-ms``, :func:`live_at_slo`)."""
    upscale_delay_s: float = 0.0
    downscale_delay_s: float = 60.0
    drain_time_s: float = 10.0
    """The coordinated policy's ``drain_time_s``."""
    target_utilisation: float = PolicyConfig.target_utilisation
    """The coordinated policy's ``target_utilisation`` (reports from before it was recorded ran at 0.7)."""
    rate_noise_sigmas: float = PolicyConfig.rate_noise_sigmas
    """The coordinated policy's ``rate_noise_sigmas`` (reports from before it was recorded ran at 0)."""
    max_starting: int | None = None
    """The coordinated policy's ``max_starting``."""
    metrics_interval_s: float = 10.0
    look_back_period_s: float = 30.0
    """Serve's defaults; the tests shorten them."""
    by_value_max_bytes: int | None = 0
    """The application's ``by_value_max_bytes`` (:mod:`serve_app.transport`). 0: every batch by reference,
    stage to stage through the object store, as a real model's activations travel (megabytes, over the
    application's by-value bound) and as runs 1-19 and 28 on ran. None: the application's default, by which
    the twin's 128-byte batches go by value, each stage's output back through the entrance to the next (runs
    20-27): on 2 shared cores the entrance's relaying raised the settled p99 by 1-2 s, which the simulator
    (a fixed time in transit) does not carry."""

    @property
    def request_ms(self) -> list[float]:
        """Sleep per request (a full batch) at each stage."""
        return [ms * self.batch for ms in self.ms_per_sample]

    @property
    def serve_metrics(self) -> Any:
        """Serve's metric settings as the simulator takes them (:class:`cluster.sim.metrics.ServeMetricsConfig`)."""
        from cluster.sim.metrics import ServeMetricsConfig

        return ServeMetricsConfig(
            metrics_interval_s=self.metrics_interval_s, look_back_period_s=self.look_back_period_s
        )

    @property
    def capacity_per_s(self) -> float:
        """Requests/s the pipeline carries at ``max_replicas`` everywhere."""
        return min(self.max_replicas * 1000.0 / ms for ms in self.request_ms)


@dataclass
class Timeline:
    """Replicas per stage over a run, polled from Serve's controller (seconds since the run began)."""

    times_s: list[float] = field(default_factory=list)
    running: list[list[int]] = field(default_factory=list)
    target: list[list[int]] = field(default_factory=list)
    alive: list[list[int]] = field(default_factory=list)

    service_ms: list[float | None] = field(default_factory=list)
    """Each stage's replica time per request at the end of the run (:func:`measured_service_ms`)."""
    handle_totals: list[list[float | None]] = field(default_factory=list)
    """Per poll, each stage's ongoing requests as Serve's controller aggregates them from the handles (what its
    default policy divides by ``target_ongoing_requests``; :func:`serve_app.ray_internals.handle_totals`)."""
    entrance_points: list[tuple[float, float]] = field(default_factory=list)
    """(poll, the newest entrance record Serve's controller held then), seconds since the run began: when the
    entrance records and pushes its metrics (:func:`entrance_offsets`)."""

    def replica_seconds(self, until_s: float) -> float:
        """Integral of the replicas holding resources, from 0 to ``until_s`` (each poll holds until the next)."""
        t = np.asarray([*self.times_s, until_s])
        n = np.asarray([sum(a) for a in self.alive])
        keep = t[:-1] < until_s
        return float(np.sum(n[keep] * np.diff(np.minimum(t, until_s))[keep]))

    def startups(self) -> list[tuple[int, float, float]]:
        """Each replica start-up seen: (stage, when its target rose, s; how long until it ran, s). A stage's
        first replica (started with the application) and a rise undone before its replica ran are left out."""
        out = []
        for k in range(len(self.target[0]) if self.target else 0):
            rose: dict[int, float] = {}
            for t, tg, run in zip(self.times_s, (x[k] for x in self.target), (x[k] for x in self.running)):
                for level in range(1, tg + 1):
                    rose.setdefault(level, t)
                for level in [lv for lv in rose if lv <= run]:
                    start = rose.pop(level)
                    if level > 1 and t > start:
                        out.append((k, start, t - start))
                for level in [lv for lv in rose if lv > tg]:
                    rose.pop(level)  # the target fell before this replica ran
        return out

    def startup_s(self) -> float | None:
        """Median time from a target's rise to the replica it added running (None: no rise seen)."""
        waits = [took for _, _, took in self.startups()]
        return statistics.median(waits) if waits else None


def entrance_offsets(points: list[tuple[float, float]], record_s: float, push_s: float) -> tuple[float, float] | None:
    """When the entrance first records and first pushes in a run (seconds in [0, record_s) and [0, push_s)),
    from ``points`` (:attr:`Timeline.entrance_points`): its records' own times, and the pushes' as the middle
    of the polls between which the controller's newest record changed; each a circular mean over the run.
    None: fewer than two pushes seen."""
    records = sorted({t for _, t in points})
    pushes = [(a[0] + b[0]) / 2 for a, b in zip(points, points[1:]) if b[1] != a[1]]
    if len(records) < 2 or len(pushes) < 2:
        return None
    return _circular_mean(records, record_s), _circular_mean(pushes, push_s)


def _circular_mean(times: list[float], period: float) -> float:
    """The mean phase of ``times`` on a circle of ``period`` seconds, in [0, period)."""
    angles = np.asarray(times) * 2 * np.pi / period
    mean = float(np.arctan2(np.sin(angles).mean(), np.cos(angles).mean()))
    return (mean % (2 * np.pi)) * period / (2 * np.pi)


def _stage_names(n: int) -> list[str]:
    from serve_app.names import stage_name

    return [stage_name(i) for i in range(n)]


class Poller:
    """Polls replica counts every ``period_s`` in a thread."""

    def __init__(self, stages: list[str], start: float, epoch_s: float, period_s: float = 1.0) -> None:
        """``start``: the run's start on ``time.monotonic()``, ``epoch_s`` on ``time.time()`` (Serve's clock)."""
        self.stages, self.start, self.epoch_s, self.period_s = stages, start, epoch_s, period_s
        self.timeline = Timeline()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from serve_app.names import ARRIVED_METRIC, ENTRANCE
        from serve_app.ray_internals import handle_totals, replica_metrics, serve_details

        while not self.stop.is_set():
            details = serve_details()
            now = time.monotonic() - self.start
            recorded = [s[-1][0] for s in replica_metrics(APP, ENTRANCE).get(ARRIVED_METRIC, []) if s]
            if recorded:
                self.timeline.entrance_points.append((now, max(recorded) - self.epoch_s))
            if details is not None and APP in details.applications:
                deployments = details.applications[APP].deployments
                if all(s in deployments for s in self.stages):
                    d = [deployments[s] for s in self.stages]
                    self.timeline.times_s.append(now)
                    self.timeline.handle_totals.append(handle_totals(APP, self.stages))
                    self.timeline.running.append([sum(r.state == "RUNNING" for r in x.replicas) for x in d])
                    self.timeline.target.append([x.target_num_replicas for x in d])
                    self.timeline.alive.append(
                        [sum(getattr(r.state, "value", r.state) in ALIVE for r in x.replicas) for x in d]
                    )
            self.stop.wait(self.period_s)

    def close(self) -> Timeline:
        self.stop.set()
        self.thread.join(timeout=30)
        return self.timeline


def measured_service_ms(stages: list[str], asks: int = 12, last: int = 200) -> list[float | None]:
    """Each stage's replica time per request as its replicas measured it (the union of their last ``last``
    requests' busy intervals over their count, the figure ``full_batch_ms`` reports): the median over
    ``asks`` answers, each from whichever replica the handle picks. On a loaded machine it exceeds the sleep:
    the device idles while the next request's thread waits for a CPU."""
    from ray import serve

    from serve_app.metrics import union_s

    out: list[float | None] = []
    for name in stages:
        handle = serve.get_deployment_handle(name, APP)
        figures = []
        for _ in range(asks):
            try:
                busy = handle.busy_intervals.remote().result(timeout_s=60)[-last:]
            except Exception:
                continue
            if busy:
                figures.append(union_s([(a, b) for a, b, _, _ in busy]) * 1e3 / sum(n for _, _, n, _ in busy))
        out.append(statistics.median(figures) if figures else None)
    return out


def plan_twin(setup: TwinSetup, uri: str) -> Any:
    """Plans the ``Sleep`` pipeline into one stage per block at ``uri``."""
    from partitions.partition import PlanOptions, build_plan
    from partitions.source import load_model

    spec = "benchmarks.autoscale_twin:sleep_pipeline"
    options = {"ms_per_sample": ",".join(f"{ms:g}" for ms in setup.ms_per_sample), "width": setup.width}
    source = load_model(spec, options, batch_size=setup.batch)
    stages = len(setup.ms_per_sample)
    plan = build_plan(source, uri, PlanOptions(stages=stages, repeats=1, warmup=1, refine=0))
    assert len(plan.stages) == stages, plan.stages
    return plan


def app_args(setup: TwinSetup) -> dict[str, Any]:
    """The application's arguments: one batch per request and per stage run, nothing capped at the entrance."""
    from serve_app.app import AppArgs

    args: dict[str, Any] = {
        "num_cpus": 0,
        "torch_threads": 1,
        "min_replicas": setup.min_replicas,
        "max_replicas": setup.max_replicas,
        "max_batch_size": setup.batch,
        "stage_max_batch_size": setup.batch,
        "max_concurrent_batches": 4096,
        "entrance_max_ongoing_requests": 4096,
        "entrance_max_queued_requests": 4096,
    }
    if "request_timeout_s" in AppArgs.model_fields:
        args["request_timeout_s"] = 900.0
    if setup.by_value_max_bytes is not None:
        args["by_value_max_bytes"] = setup.by_value_max_bytes
    return args


def stage_specs(plan: Any, uri: str, setup: TwinSetup) -> list[dict[str, Any]]:
    """The coordinated policy's stages (:func:`cluster.deploy.pipeline_policy`: profiled time per request)."""
    from cluster.deploy import pipeline_policy
    from serve_app.app import AppArgs

    return pipeline_policy(plan, AppArgs(plan_uri=uri, **app_args(setup)))["policy_kwargs"]["stages"]


def twin_config(plan: Any, uri: str, setup: TwinSetup, policy: str, port: int) -> dict[str, Any]:
    """The Serve config of one run: the coordinated policy (application level, the entrance seen with
    min = max replicas) or Ray's default (per stage), with the same delays and metric settings."""
    from cluster.deploy import serve_config
    from cluster.serve_policy import policy_section

    metrics = {"metrics_interval_s": setup.metrics_interval_s, "look_back_period_s": setup.look_back_period_s}
    section = None
    if policy == "coordinated":
        section = policy_section(
            stage_specs(plan, uri, setup),
            upscale_delay_s=setup.upscale_delay_s,
            downscale_delay_s=setup.downscale_delay_s,
            drain_time_s=setup.drain_time_s,
            target_utilisation=setup.target_utilisation,
            rate_noise_sigmas=setup.rate_noise_sigmas,
            max_starting=setup.max_starting,
        )
    config = serve_config(uri, app_name=APP, host="127.0.0.1", port=port, autoscaling_policy=section, **app_args(setup))
    for d in config["applications"][0]["deployments"]:
        d.update(HEALTH_CHECKS)
        scaling = d.get("autoscaling_config")
        if scaling is None:
            continue
        scaling.update(metrics)
        if policy != "coordinated":  # Ray's default policy with the same delays
            scaling.update(upscale_delay_s=setup.upscale_delay_s, downscale_delay_s=setup.downscale_delay_s)
    return config


async def _drive(times_s: np.ndarray, x: np.ndarray, start: float, drain_s: float) -> np.ndarray:
    """Sends one request at each of ``times_s`` (seconds after ``start``); finish times (inf: no answer)."""
    from ray import serve

    handle = serve.get_app_handle(APP)
    finish = np.full(len(times_s), np.inf)
    errors: list[str] = []

    async def one(i: int) -> None:
        try:
            await handle.infer.remote(x)
            finish[i] = time.monotonic() - start
        except Exception as exc:
            if len(errors) < 3:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])

    tasks = []
    for i, t in enumerate(times_s):
        delay = start + t - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i)))
    await asyncio.wait(tasks, timeout=drain_s)
    for task in tasks:
        task.cancel()
    if errors:
        print(f"  {int(np.isinf(finish).sum())} requests without an answer, e.g. {errors}", file=sys.stderr)
    return finish


def wait_settled(stages: list[str], timeout_s: float = 300.0) -> None:
    """Wait until every stage runs ``min_replicas`` and targets it (the state every run starts from)."""
    from serve_app.ray_internals import serve_details

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        details = serve_details()
        if details is not None and APP in details.applications:
            deps = details.applications[APP].deployments
            if all(
                s in deps
                and deps[s].target_num_replicas == 1
                and sum(r.state == "RUNNING" for r in deps[s].replicas) == 1
                and len(deps[s].replicas) == 1
                for s in stages
            ):
                return
        time.sleep(1.0)
    raise TimeoutError(f"stages not settled at 1 replica within {timeout_s:.0f} s")


def run_live(
    plan: Any, uri: str, setup: TwinSetup, policy: str, times_s: np.ndarray, duration_s: float, drain_s: float = 120.0
) -> tuple[Any, Timeline]:
    """One live run: deploy, settle, send ``times_s``, poll; the run as a :class:`~cluster.sim.engine.SimResult`
    (replicas at each poll, replica-seconds from the polls) and the timeline."""
    from ray import serve

    from cluster import local
    from cluster.sim.engine import SimResult
    from serve_app.ports import free_port

    stages = _stage_names(len(plan.stages))
    if APP in serve.status().applications:
        serve.delete(APP)
    local.wait_running(local.deploy_config(twin_config(plan, uri, setup, policy, free_port())), timeout_s=300)
    wait_settled(stages)
    x = np.zeros((setup.batch, setup.width), np.float32)
    for _ in range(3):  # warm the path (handles, routers) before the clock starts
        serve.get_app_handle(APP).infer.remote(x).result(timeout_s=60)
    start, epoch_s = time.monotonic(), time.time()
    poller = Poller(stages, start, epoch_s)
    try:
        finish = asyncio.run(_drive(times_s, x, start, duration_s - float(times_s[-1]) + drain_s))
        while time.monotonic() - start < duration_s:
            time.sleep(0.5)
    finally:
        timeline = poller.close()
    timeline.service_ms = measured_service_ms(stages)
    keep = [k for k, t in enumerate(timeline.times_s) if t <= duration_s]
    result = SimResult(
        arrivals_s=times_s,
        finish_s=finish,
        tick_s=np.asarray([timeline.times_s[k] for k in keep]),
        replicas=np.asarray([timeline.alive[k] for k in keep], dtype=int).reshape(len(keep), len(stages)),
        ready=np.asarray([timeline.running[k] for k in keep], dtype=int).reshape(len(keep), len(stages)),
        replica_seconds=timeline.replica_seconds(duration_s),
        gpu_seconds=0.0,
        scale_actions=sum(
            a != b for k in range(1, len(keep)) for a, b in zip(timeline.target[keep[k]], timeline.target[keep[k - 1]])
        ),
        duration_s=duration_s,
        stage_names=stages,
    )
    return result, timeline


def run_sim(
    specs: list[dict[str, Any]],
    setup: TwinSetup,
    policy: str,
    times_s: np.ndarray,
    duration_s: float,
    startup_s: float,
    service_ms: list[float | None] | None = None,
    transit_ms: float = 0.0,
    routing: str = "replicas",
    startup_slots: float = 0.0,
    seed: int = 0,
    entrance_offsets_s: tuple[float, float] | None = None,
) -> Any:
    """The simulator on the twin's parameters: the same stages, arrivals, delays, Serve metrics and routing
    (``routing``; each stage replica holding up to the application's ``max_ongoing_requests``), with the
    run's measured start-up, replica time per request (``service_ms``; the sleep where None) and time in
    transit (``transit_ms``: what a request spends outside the stages' replicas, added to its latency).
    ``startup_slots``: start-ups that share the machine (:attr:`cluster.sim.engine.SimConfig.startup_slots`;
    ``startup_s`` is then one start-up alone). ``seed`` draws the metric sources' phases and the router's
    choices; ``entrance_offsets_s`` sets the entrance's phase (:func:`entrance_offsets`)."""
    from cluster.policy import PolicyConfig, StageSpec
    from cluster.sim.engine import SimConfig, StageModel, simulate
    from cluster.sim.metrics import ServeMetrics
    from cluster.sim.policies import Coordinated, RayDefault, RayDefaultConfig

    measured = service_ms or [None] * len(specs)
    models = [
        StageModel(
            s["name"], 0.0, ms if m is None else m, 1, min_replicas=setup.min_replicas, max_replicas=setup.max_replicas
        )
        for s, ms, m in zip(specs, setup.request_ms, measured)
    ]
    metrics = ServeMetrics([m.name for m in models], setup.serve_metrics, seed, entrance_offsets_s)
    config = PolicyConfig(
        stages=tuple(StageSpec(**s) for s in specs),
        upscale_delay_s=setup.upscale_delay_s,
        downscale_delay_s=setup.downscale_delay_s,
        drain_time_s=setup.drain_time_s,
        target_utilisation=setup.target_utilisation,
        rate_noise_sigmas=setup.rate_noise_sigmas,
        max_starting=setup.max_starting,
    )
    ray = RayDefaultConfig(upscale_delay_s=setup.upscale_delay_s, downscale_delay_s=setup.downscale_delay_s)
    controller: Any = (
        Coordinated(config, metrics) if policy == "coordinated" else RayDefault(config.stages, ray, metrics)
    )
    from serve_app.app import STAGE_MAX_ONGOING

    ongoing = app_args(setup).get("max_ongoing_requests") or STAGE_MAX_ONGOING
    sim = SimConfig(
        startup_s=startup_s,
        startup_slots=startup_slots,
        drain_s=120.0,
        max_ongoing=ongoing,
        routing=routing,
        seed=seed,
    )
    result = simulate(models, times_s, controller, duration_s, sim)
    result.finish_s = result.finish_s + transit_ms / 1e3
    return result


def transit_ms(latency_ms: list[float | None], service_ms: list[float]) -> float:
    """The 2nd percentile of the latencies (requests that found the queues empty) less the replicas' time per
    request: what a request spends between them."""
    answered = [v for v in latency_ms if v is not None]
    return max(0.0, float(np.percentile(answered, 2)) - sum(service_ms)) if answered else 0.0


def figures(result: Any, setup: TwinSetup, step_s: float | None, window_s: float = 10.0) -> dict[str, Any]:
    """:func:`cluster.sim.report.summarize` plus p99 and replicas per stage over time."""
    from cluster.sim.report import rolling_p99_ms, summarize

    starts, p99 = rolling_p99_ms(result, window_s)
    ticks = np.asarray(result.tick_s)
    every = [int(np.searchsorted(ticks, t, side="right")) - 1 for t in starts]
    seen = Timeline(times_s=ticks.tolist(), running=result.ready.tolist(), target=result.replicas.tolist())
    return {
        **summarize(result, setup.slo_ms, step_s, window_s),
        "startup_s": seen.startup_s(),
        "latency_ms": [None if np.isinf(v) else round(float(v), 1) for v in result.latency_ms],
        "p99_over_time": [[float(t), None if np.isnan(v) else float(min(v, 1e9))] for t, v in zip(starts, p99)],
        "replicas_over_time": [
            [float(t), result.replicas[k].tolist() if k >= 0 else None] for t, k in zip(starts, every)
        ],
    }


def setup_of(report: dict[str, Any]) -> TwinSetup:
    """The setup a stored report ran with (the policy's defaults of the time where it did not record them)."""
    fields = {k: v for k, v in report["setup"].items() if k in TwinSetup.__dataclass_fields__}
    fields.setdefault("target_utilisation", 0.7)
    fields.setdefault("rate_noise_sigmas", 0.0)
    return TwinSetup(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def live_at_slo(report: dict[str, Any], slo_ms: float, window_s: float = 10.0) -> None:
    """Each live run's SLO attainment and recovery of ``report`` again at ``slo_ms``, from its latencies and
    the workload's arrivals (the live runs are the same: neither policy reads the SLO)."""
    from cluster.sim.engine import SimResult
    from cluster.sim.report import summarize
    from cluster.sim.workloads import arrivals

    stored, setup = report["setup"], setup_of(report)
    for key, run in report["runs"].items():
        kind = key.split("/")[0]
        if "latency_ms" not in run["live"]:
            raise SystemExit(f"{key}: the report holds no latencies (recorded before runs kept them)")
        times = arrivals(workload_of(kind, setup, stored["change_s"]), stored["duration_s"], stored["seed"])
        latency = np.asarray([math.inf if v is None else v for v in run["live"]["latency_ms"]])
        empty = np.zeros((0, len(stored["ms_per_sample"])), dtype=int)
        result = SimResult(times, times + latency / 1e3, np.zeros(0), empty, empty, 0.0, 0.0, 0, stored["duration_s"])
        again = summarize(result, slo_ms, stored["change_s"] if kind == "step" else None, window_s)
        run["live"].update({k: again[k] for k in ("slo_attainment", "recovery_s")})
    stored.setdefault("slo_ms_measured", stored["slo_ms"])
    stored["slo_ms"] = slo_ms


def workload_of(kind: str, setup: TwinSetup, change_s: float) -> Any:
    from cluster.sim.workloads import Workload

    cap = setup.capacity_per_s
    if kind == "step":
        return Workload("step", 0.1 * cap, STEP_PEAK * cap, change_s=change_s)
    return Workload("bursty", 0.3 * cap, cv=4.0)


def compare(
    setup: TwinSetup,
    workloads: list[str],
    policies: list[str],
    duration_s: float,
    change_s: float,
    seed: int = 0,
    progress: Callable[[str], None] = print,
    checkpoint: Path | None = None,
    routing: str = "replicas",
    phases: int = 1,
) -> dict[str, Any]:
    """Every (workload, policy) live, then simulated with the start-up time the live runs measured
    (:func:`simulate_runs`)."""
    import ray

    from cluster import local
    from cluster.sim.workloads import arrivals

    report: dict[str, Any] = {"setup": {**asdict(setup), "capacity_per_s": setup.capacity_per_s}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        uri = str(Path(tmp) / "plan")
        plan = plan_twin(setup, uri)
        specs = stage_specs(plan, uri, setup)
        report["setup"]["stage_specs"] = specs
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        timelines: dict[str, Timeline] = {}
        try:
            for kind in workloads:
                times = arrivals(workload_of(kind, setup, change_s), duration_s, seed)
                for policy in policies:
                    progress(f"live {kind} {policy}: {len(times)} requests over {duration_s:g} s")
                    result, timelines[f"{kind}/{policy}"] = run_live(plan, uri, setup, policy, times, duration_s)
                    step_s = change_s if kind == "step" else None
                    live = figures(result, setup, step_s)
                    live["timeline"] = asdict(timelines[f"{kind}/{policy}"])
                    live["startup_s"] = timelines[f"{kind}/{policy}"].startup_s()
                    report["runs"][f"{kind}/{policy}"] = {"live": live}
                    progress(f"  {_line(report['runs'][f'{kind}/{policy}']['live'])}")
                    if checkpoint is not None:  # a long benchmark keeps what it has measured
                        checkpoint.write_text(json.dumps(report, indent=1))
        finally:
            local.stop()
    waits = [w for t in timelines.values() if (w := t.startup_s()) is not None]
    report["setup"].update(
        machine_cores=os.cpu_count() or 1,
        startup_s_measured=statistics.median(waits) if waits else 10.0,
        duration_s=duration_s,
        change_s=change_s,
        seed=seed,
    )
    for run in report["runs"].values():
        live = run["live"]
        startup_s = live["startup_s"] or report["setup"]["startup_s_measured"]  # each run's own machine
        service = [m if m is not None else ms for m, ms in zip(live["timeline"]["service_ms"], setup.request_ms)]
        metrics = setup.serve_metrics
        offsets = entrance_offsets(
            [tuple(p) for p in live["timeline"]["entrance_points"]],
            metrics.record_interval_s,
            metrics.metrics_interval_s,
        )
        run["sim_parameters"] = {
            "startup_s": startup_s,
            "service_ms": service,
            "transit_ms": transit_ms(live["latency_ms"], service),
            "entrance_offsets_s": offsets,
        }
    return simulate_runs(report, setup, routing, progress, report["setup"]["machine_cores"], phases)


def simulate_runs(
    report: dict[str, Any],
    setup: TwinSetup,
    routing: str = "replicas",
    progress: Callable[[str], None] = print,
    startup_slots: float = 0.0,
    phases: int = 1,
    entrance_offsets_s: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """The simulator on every live run of ``report`` with that run's ``sim_parameters`` (its measured
    start-up, replica time per request and transit), under ``routing``; adds ``sim`` and ``sim_vs_live``.

    ``phases``: the simulator runs that many times (seeds 0, 1, ...: each metrics source's phase, i.e. when it
    records and pushes relative to the load, and the router's random choices), since a live run's phases are
    one draw that nobody measures. ``sim`` holds seed 0's figures and ``sim_phases`` each seed's recovery,
    replica-seconds and attainment; ``sim_vs_live`` compares the median over the phases (a recovery that
    never comes counts as the longest) and says whether the live recovery lies within the phases' range. The
    entrance's phase is the one measured on the live run (``sim_parameters["entrance_offsets_s"]``), else
    ``entrance_offsets_s`` where given (a run recorded before it was measured); drawn like the others without.

    ``startup_slots``: the simulated start-ups share that many slots (the live machine's cores; 0: each takes
    the run's median start-up). One start-up alone is then fitted to each live run's own start-ups, when its
    targets rose and when the replicas ran (:func:`cluster.sim.startup.fit_startup_s`): on 2 cores a burst of
    seven took about three times as long as one start-up alone, live, which the median alone does not carry."""
    from cluster.sim.workloads import arrivals

    duration_s, change_s, seed = (report["setup"][k] for k in ("duration_s", "change_s", "seed"))
    specs = report["setup"]["stage_specs"]

    def sim(kind: str, policy: str, par: dict[str, Any], startup_s: float, phase: int = 0) -> Any:
        times = arrivals(workload_of(kind, setup, change_s), duration_s, seed)
        offsets = par.get("entrance_offsets_s") or entrance_offsets_s
        return run_sim(
            specs, setup, policy, times, duration_s, startup_s, par["service_ms"], par["transit_ms"], routing,
            startup_slots, phase, None if offsets is None else (offsets[0], offsets[1]),
        )  # fmt: skip

    for key, run in report["runs"].items():
        kind, policy = key.split("/")
        par = run["sim_parameters"]
        step = change_s if kind == "step" else None
        startup_s = par["startup_s"]
        alone = None
        if startup_slots > 0 and (begun := Timeline(**run["live"]["timeline"]).startups()):
            startup_s = alone = fit_startup_s([b for _, b, _ in begun], [w for _, _, w in begun], startup_slots)
        each = [figures(sim(kind, policy, par, startup_s, k), setup, step) for k in range(phases)]
        run["sim"] = {
            **each[0],
            "routing": routing,
            "startup_slots": startup_slots,
            "startup_alone_s": alone,
        }
        compared = ("recovery_s", "replica_seconds", "slo_attainment", "startup_s")
        run["sim_phases"] = {k: [f[k] for f in each] for k in compared}
        median = {k: _median(run["sim_phases"][k]) for k in compared}
        live = {**run["live"], "startup_s": par["startup_s"]}
        run["sim_vs_live"] = {k: _relative(median[k], live[k]) for k in compared}
        run["sim_vs_live"]["recovery_in_phase_range"] = _within(live["recovery_s"], run["sim_phases"]["recovery_s"])
        progress(
            f"sim {key}: {_line(run['sim'])}, start-up {run['sim']['startup_s']} s (live {par['startup_s']:.1f}); "
            f"vs live {run['sim_vs_live']}; recovery over {phases} phases {run['sim_phases']['recovery_s']}"
        )
    return report


def pooled(reports: list[dict[str, Any]], bound: float = 0.25) -> dict[str, Any]:
    """The step runs of many simulated reports (:func:`simulate_runs`) taken together, per policy:
    the live recoveries against every phase's simulated one (median and mean; a recovery that never came
    counts as the run's length after the change), the runs where the simulator's median is within ``bound`` of
    live on recovery and replica-seconds, and the live runs within ``bound`` of their own median (how far
    one live run stands in for another); and across policies, the runs where the coordinated policy was back
    under the SLO sooner, as soon or later than Ray's default, and where it spent fewer replica-seconds."""
    out: dict[str, Any] = {"runs": len(reports)}
    live_by: dict[str, dict[int, tuple[float, float]]] = {}
    """Per policy, by report: (live recovery, s; live replica-seconds)."""
    for policy in ("coordinated", "ray-default"):
        live, sim, close = [], [], []
        for k, report in enumerate(reports):
            run = report["runs"].get(f"step/{policy}")
            if run is None:
                continue
            never = report["setup"]["duration_s"] - report["setup"]["change_s"]
            recovery = never if run["live"]["recovery_s"] is None else run["live"]["recovery_s"]
            live_by.setdefault(policy, {})[k] = (recovery, run["live"]["replica_seconds"])
            live.append(recovery)
            sim += [never if v is None else v for v in run["sim_phases"]["recovery_s"]]
            versus = run["sim_vs_live"]
            close.append(
                versus["recovery_s"] is not None
                and abs(versus["recovery_s"]) <= bound
                and abs(versus["replica_seconds"]) <= bound
            )
        if not live:
            continue
        own = statistics.median(live)
        out[policy] = {
            "runs": len(live),
            "live_recovery_s": {"median": own, "mean": statistics.mean(live)},
            "sim_recovery_s": {"median": statistics.median(sim), "mean": statistics.mean(sim)},
            "runs_sim_within": sum(close),
            "live_runs_within_own_median": sum(abs(v - own) <= bound * own for v in live),
        }
    both = sorted(set(live_by.get("coordinated", {})) & set(live_by.get("ray-default", {})))
    pairs = [(live_by["coordinated"][k], live_by["ray-default"][k]) for k in both]
    out["coordinated_vs_ray_default"] = {
        "runs": len(pairs),
        "sooner": sum(c[0] < d[0] for c, d in pairs),
        "as_soon": sum(c[0] == d[0] for c, d in pairs),
        "later": sum(c[0] > d[0] for c, d in pairs),
        "fewer_replica_seconds": sum(c[1] < d[1] for c, d in pairs),
    }
    return out


def _median(values: list[float | None]) -> float | None:
    """The lower median, None (a recovery that never came) counting as the longest."""
    ordered = sorted(values, key=lambda v: math.inf if v is None else v)
    return ordered[(len(ordered) - 1) // 2] if ordered else None


def _within(live: float | None, phases: list[float | None]) -> bool:
    """Whether ``live`` lies between the phases' least and most (None: never, the most of all)."""
    key = [math.inf if v is None else v for v in phases]
    return min(key) <= (math.inf if live is None else live) <= max(key)


def _relative(sim: float | None, live: float | None) -> float | None:
    """(sim - live) / live; None when either is missing or live is 0."""
    if sim is None or live is None or live == 0:
        return None
    return round(float((sim - live) / live), 3)


def _line(s: dict[str, Any]) -> str:
    return (
        f"p99 {s['p99_ms']:.0f} ms, SLO {100 * s['slo_attainment']:.1f}%, replica-s {s['replica_seconds']:.0f}, "
        f"recovery {s['recovery_s']} s, unfinished {s.get('unfinished', '-')}"
    )


def plot(report: dict[str, Any], path: Path) -> None:
    """Per workload: replicas per stage (top) and rolling p99 (bottom), live solid, simulated dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({k.split("/")[0] for k in report["runs"]})
    fig, axes = plt.subplots(2, len(kinds), figsize=(7 * len(kinds), 7), squeeze=False, sharex=True)
    colours = {"coordinated": "tab:blue", "ray-default": "tab:orange"}
    for col, kind in enumerate(kinds):
        top, bottom = axes[0][col], axes[1][col]
        for key, run in report["runs"].items():
            if not key.startswith(kind + "/"):
                continue
            policy = key.split("/")[1]
            for source, style in (("live", "-"), ("sim", "--")):
                if "replicas_over_time" not in run.get(source, {}):  # a report of figures only
                    continue
                rows = [(t, sum(r)) for t, r in run[source]["replicas_over_time"] if r is not None]
                top.step(*zip(*rows), where="post", color=colours[policy], linestyle=style, label=f"{policy} {source}")
                p99 = [(t, v) for t, v in run[source]["p99_over_time"] if v is not None]
                bottom.step(
                    *zip(*p99), where="post", color=colours[policy], linestyle=style, label=f"{policy} {source}"
                )
        bottom.axhline(report["setup"]["slo_ms"], color="black", linestyle=":", label="SLO")
        top.set_title(f"{kind}: replicas (all stages)")
        bottom.set_yscale("log")
        bottom.set_ylabel("p99 over 10 s (ms)")
        bottom.set_xlabel("time (s)")
        top.legend(fontsize=8)
        bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="step,bursty")
    parser.add_argument("--policies", default="coordinated,ray-default")
    parser.add_argument("--duration-s", type=float, default=300.0)
    parser.add_argument("--change-s", type=float, default=60.0, help="Time of the step.")
    parser.add_argument("--max-replicas", type=int, default=TwinSetup.max_replicas)
    parser.add_argument("--upscale-delay-s", type=float, default=TwinSetup.upscale_delay_s)
    parser.add_argument("--downscale-delay-s", type=float, default=TwinSetup.downscale_delay_s)
    parser.add_argument(
        "--slo-ms",
        type=float,
        help=f"The SLO (default {TwinSetup.slo_ms:g} ms). With --resimulate: the stored live runs' figures at this "
        "SLO, from their latencies.",
    )
    parser.add_argument(
        "--target-utilisation", type=float, default=TwinSetup.target_utilisation, help="The coordinated policy's."
    )
    parser.add_argument(
        "--rate-noise-sigmas",
        type=float,
        help=f"The coordinated policy's band against rate noise, standard deviations (default: "
        f"{TwinSetup.rate_noise_sigmas}). With --resimulate, as with --max-starting: a what-if on the stored runs.",
    )
    parser.add_argument("--max-starting", type=int, help="The coordinated policy's start-up limit (default: none).")
    parser.add_argument(
        "--by-value-max-bytes",
        type=int,
        default=TwinSetup.by_value_max_bytes,
        help="The application's by_value_max_bytes (default 0: every batch by reference; -1: the application's "
        "own default).",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON report.")
    parser.add_argument("--plot", type=Path, help="PNG: replicas and p99 over time, live and simulated.")
    parser.add_argument(
        "--resimulate",
        type=Path,
        nargs="+",
        help="JSON reports of earlier live runs: run only the simulator on their measured parameters; with several, "
        "also their figures taken together (pooled; --out writes those).",
    )
    parser.add_argument("--routing", default="replicas", help="The simulator's routing: replicas or shared.")
    parser.add_argument(
        "--phases",
        type=int,
        default=8,
        help="Simulate each run at this many metric phases (seeds 0, 1, ...) and compare the median with live.",
    )
    parser.add_argument(
        "--entrance-offsets-s",
        help="With --resimulate: the entrance's first record and first push (s after the load began), e.g. 4.6,2.4, "
        "for runs recorded before they were measured (a run's own, where measured, comes first).",
    )
    parser.add_argument(
        "--startup-slots",
        type=float,
        help="With --resimulate: simulated start-ups share this many slots (default: the live machine's cores, "
        "recorded since run 26; 0: every start-up takes its run's median).",
    )
    a = parser.parse_args()
    setup = replace(
        TwinSetup(),
        max_replicas=a.max_replicas,
        upscale_delay_s=a.upscale_delay_s,
        downscale_delay_s=a.downscale_delay_s,
        slo_ms=TwinSetup.slo_ms if a.slo_ms is None else a.slo_ms,
        target_utilisation=a.target_utilisation,
        max_starting=a.max_starting,
        by_value_max_bytes=None if a.by_value_max_bytes < 0 else a.by_value_max_bytes,
    )
    what_if = {
        k: v for k, v in (("rate_noise_sigmas", a.rate_noise_sigmas), ("max_starting", a.max_starting)) if v is not None
    }
    setup = replace(setup, **what_if)
    if a.resimulate is not None:
        offsets = None if a.entrance_offsets_s is None else tuple(float(v) for v in a.entrance_offsets_s.split(","))
        reports = []
        for path in a.resimulate:
            report = json.loads(path.read_text())
            if a.slo_ms is not None:
                live_at_slo(report, a.slo_ms)
            setup = replace(setup_of(report), **what_if)  # the same runs' parameters under the policy settings given
            slots = report["setup"].get("machine_cores") if a.startup_slots is None else a.startup_slots
            if slots is None:
                raise SystemExit(f"{path} does not record its machine's cores: pass --startup-slots")
            report = simulate_runs(
                report, setup, a.routing, startup_slots=slots, phases=a.phases, entrance_offsets_s=offsets
            )
            reports.append(report)
        if len(reports) > 1:  # recovery after the step, so the step runs
            together = pooled([r for r in reports if any(key.startswith("step/") for key in r["runs"])])
            print(f"step runs of {len(reports)} reports taken together: {json.dumps(together)}")
            if a.out is not None:
                a.out.write_text(json.dumps(together, indent=1))
            return
        report = reports[0]
    else:
        report = compare(
            setup,
            a.workloads.split(","),
            a.policies.split(","),
            a.duration_s,
            a.change_s,
            a.seed,
            checkpoint=a.out,
            routing=a.routing,
            phases=a.phases,
        )
    if a.out is not None:
        a.out.write_text(json.dumps(report, indent=1))
    if a.plot is not None:
        plot(report, a.plot)
    for key, run in report["runs"].items():
        print(f"{key}: live {_line(run['live'])}")
        print(f"{' ' * len(key)}  sim  {_line(run['sim'])}")


if __name__ == "__main__":
    main()
