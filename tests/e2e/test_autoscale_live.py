"""Autoscaling on a real local Ray Serve, both policies, and ``partserve status`` against the running app.

A short run of the live twin (``benchmarks/autoscale_twin.py``, whose figures are in BENCHMARKS.md): three
``Sleep`` stages (a stage's batch time is spent sleeping, so the shared CPUs stay free), deployed through a
Serve config once under the coordinated policy (application level, the entrance seen with min = max replicas)
and once under Ray's default policy, with the same delays. Open-loop load for a while, then none; asserted is
only what does not depend on this machine's timing: every stage's target rises above 1 under the load and
falls back to 1 after it, and the run's report has the simulator's fields.

Shortened Serve settings, in the deployments' ``autoscaling_config`` (no environment variables needed):
``metrics_interval_s`` (how often replicas and handles push their metrics to the controller, default 10 s)
and ``look_back_period_s`` (the window of those figures, default 30 s); records every
``min(0.2 x look_back_period_s, metrics_interval_s)``. The controller calls the policy every
``RAY_SERVE_CONTROL_LOOP_INTERVAL_S`` (0.1 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import ray
from ray import serve

from benchmarks.autoscale_twin import APP, TwinSetup, figures, plan_twin, run_live
from cluster import local
from cluster.sim.workloads import Workload, arrivals
from serve_app.ray_internals import serve_details
from tests import REPO

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]

STAGES = ["stage-0", "stage-1", "stage-2"]
SETUP = TwinSetup(
    # A request (4 samples) sleeps 40, 80, 120 ms: 25, 12.5, 8.3 requests/s per replica. Each stage is slower
    # than the one before, so under Ray's default (each stage from its own queue) every stage's queue grows.
    ms_per_sample=(10.0, 20.0, 30.0),
    max_replicas=3,
    upscale_delay_s=1.0,
    downscale_delay_s=5.0,
    drain_time_s=2.0,
    metrics_interval_s=0.5,
    look_back_period_s=2.0,
)
RATE_PER_S = 30.0
"""Offered load from LOAD_ON_S to LOAD_OFF_S: more than one replica of any stage carries."""
LOAD_ON_S, LOAD_OFF_S, RUN_S = 1.0, 11.0, 13.0
"""Seconds into a run. Targets rise within about 5 s of the load (1 s upscale delay, 2 s look-back), so 10 s of
load shows every rise; the fall is awaited after the run (``DOWN_S``)."""
DOWN_S = 240.0
"""Generous bound for a loaded 2-core machine: every target back at 1 within this after the run."""
REPORT_FIELDS = {
    "requests",
    "unfinished",
    "p50_ms",
    "p99_ms",
    "slo_attainment",
    "replica_seconds",
    "scale_actions",
    "recovery_s",
    "p99_over_time",
    "replicas_over_time",
}


@dataclass
class Served:
    plan: Any
    uri: str
    gcs_address: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    uri = str(tmp_path_factory.mktemp("plans") / "sleep")
    plan = plan_twin(SETUP, uri)
    with pytest.MonkeyPatch.context() as env:  # the replicas import benchmarks.autoscale_twin for the stages
        env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        yield Served(plan, uri, ray.get_runtime_context().gcs_address)
    finally:
        local.stop()


def targets() -> list[int]:
    details = serve_details()
    assert details is not None
    deployments = details.applications[APP].deployments
    return [deployments[name].target_num_replicas for name in STAGES]


@pytest.mark.parametrize("policy", ["coordinated", "ray-default"])
def test_each_policy_scales_every_stage_up_then_down(served: Served, policy: str) -> None:
    times = LOAD_ON_S + arrivals(Workload("bursty", RATE_PER_S, cv=1.0), LOAD_OFF_S - LOAD_ON_S, seed=1)
    result, timeline = run_live(served.plan, served.uri, SETUP, policy, times, RUN_S, drain_s=60.0)
    report = figures(result, SETUP, step_s=LOAD_ON_S)
    deadline = time.monotonic() + DOWN_S
    while (after := targets()) != [1, 1, 1] and time.monotonic() < deadline:
        time.sleep(1.0)
    rows = "\n".join(
        f"{t:6.1f} s  target {tg}  running {r}" for t, tg, r in zip(timeline.times_s, timeline.target, timeline.running)
    )
    print(f"\n{policy}: replicas per stage\n{rows}\nafter the run: {after}")
    peak = np.max(np.asarray(timeline.target), axis=0)
    assert all(peak >= 2), f"{policy}: a stage's target never rose above 1 under load: {peak.tolist()}"
    assert after == [1, 1, 1], f"{policy}: not every target back at 1 within {DOWN_S:.0f} s of the run: {after}"
    assert set(report) >= REPORT_FIELDS, sorted(REPORT_FIELDS - set(report))
    assert report["requests"] == len(times) and report["replica_seconds"] > 0
    assert len(report["replicas_over_time"]) == len(report["p99_over_time"])
    # each stage's ongoing requests as Serve's controller aggregates them from the handles
    # (ray_internals.handle_totals): kept for every stage under either policy, above 0 under the load
    totals = np.asarray(timeline.handle_totals, dtype=float)
    assert totals.shape == (len(timeline.times_s), len(STAGES)) and not np.isnan(totals).any()
    assert all(totals.max(axis=0) > 0), f"{policy}: a stage's handle total never rose: {totals.max(axis=0)}"
    # the entrance's newest record as Serve's controller held it at each poll (ray_internals.replica_metrics):
    # only where the entrance has an autoscaling_config, as the coordinated policy's deployment gives it
    points = timeline.entrance_points
    if policy == "coordinated":
        assert points and all(t <= poll + 1.0 for poll, t in points)
    else:
        assert points == []


def status_after_requests(served: Served, attempts: int = 3) -> dict[str, Any]:
    """``partserve status --json`` after 4 requests, asked again (up to ``attempts`` times) while a stage reports
    no batch: the autoscaling tests before this one leave the app scaling down, and a replica that starts or
    replaces the one that served the requests has no batch in its window yet."""
    handle = serve.get_app_handle(APP)
    x = np.zeros((SETUP.batch, SETUP.width), np.float32)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(REPO)}
    for _ in range(attempts):
        for r in [handle.infer.remote(x) for _ in range(4)]:
            r.result(timeout_s=60)
        r = subprocess.run(
            [sys.executable, "-m", "partserve", "status", "--address", served.gcs_address, "--json"],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        stages = [d["stage"] for a in status["applications"] for d in a["deployments"] if d["name"] in STAGES]
        if all(s is not None and s["batch_samples"] is not None for s in stages):
            break
    return status


def test_status_json_of_running_app(served: Served) -> None:
    status = status_after_requests(served)
    (app,) = status["applications"]
    assert app["name"] == APP and app["status"] == "RUNNING"
    deployments = {d["name"]: d for d in app["deployments"]}
    assert list(deployments) == ["entrance", *STAGES]
    assert deployments["entrance"]["stage"] is None
    for name in STAGES:
        d = deployments[name]
        assert d["target_replicas"] >= 1 and d["replicas"].get("RUNNING", 0) >= 1, d
        stage = d["stage"]
        assert stage["replicas_reporting"] >= 1 and stage["batch_samples"] >= 1, d
        assert stage["latency_ms_p50"] >= 0.9 * SETUP.ms_per_sample[0], d  # a batch sleeps at least a sample's
        assert 0 < stage["utilisation"] <= 1 and stage["queued_requests"] >= 0, d
