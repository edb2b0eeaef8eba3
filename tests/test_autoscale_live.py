"""Coordinated autoscaling on a real local Ray Serve, and ``partserve status`` against the running app.

The model: three ``Delay`` blocks, each sleeping ``MS_PER_SAMPLE`` ms per sample, planned into three stages,
so a stage's batch takes real time without using the (shared) CPU. It is deployed through a Serve config
with the application-level policy (:mod:`cluster.serve_policy`), 1 to 3 replicas per stage and short delays.

Shortened Serve settings, in the stage deployments' ``autoscaling_config`` (no environment variables needed):
``metrics_interval_s`` (how often replicas and handles push their ongoing requests to the controller, default
10 s; deprecated in favour of ``RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S``, which Ray 2.60 does not read
yet) and ``look_back_period_s`` (the averaging window of those figures, default 30 s). The controller's
control loop runs every ``RAY_SERVE_CONTROL_LOOP_INTERVAL_S`` (0.1 s), calling the policy each time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from ray import serve
from torch import nn

from cluster import local
from cluster.deploy import pipeline_policy, serve_config
from cluster.serve_policy import policy_section
from cluster.status import gather
from partitions.partition import PlanOptions, build_plan
from partitions.source import load_model
from serve_app.app import AppArgs
from serve_app.ray_internals import serve_details
from tests.serve_fixtures import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
APP = "partserve"
STAGES = ["stage-0", "stage-1", "stage-2"]
WIDTH = 8
MS_PER_SAMPLE = 20.0
BATCH = 4
"""Samples per pipeline batch: a full batch takes BATCH * MS_PER_SAMPLE = 80 ms per stage."""
CLIENTS = 16
"""Concurrent clients while the load is on, each sending BATCH-sample requests back to back (a request of a
full batch goes through the pipeline alone, so the stages see all of them at once)."""
UPSCALE_DELAY_S = 1.0
DOWNSCALE_DELAY_S = 5.0
DRAIN_TIME_S = 2.0
"""The policy sizes a stage to work off its backlog within this many seconds."""
SERVE_METRICS = {"metrics_interval_s": 0.5, "look_back_period_s": 2.0}
UP_DECISION_S = 30.0
"""Generous bounds for a loaded 2-core machine: every stage's target must rise within this after the load
starts, and fall back within DOWN_DECISION_S after it stops; replicas start within REPLICAS_UP_S."""
DOWN_DECISION_S = 40.0
REPLICAS_UP_S = 120.0


class Delay(nn.Module):
    """A linear layer that also sleeps ``ms_per_sample`` per sample: stage time that costs no CPU. torch.export
    cannot keep a sleep, so it refuses export and the plan cuts the nn.Sequential at its children."""

    def __init__(self, width: int, ms_per_sample: float) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.ms_per_sample = ms_per_sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            raise RuntimeError("Delay sleeps in Python; torch.export cannot capture it")
        time.sleep(self.ms_per_sample * len(x) / 1e3)
        return self.linear(x)


def delay_pipeline(blocks: int = 3, width: int = WIDTH, ms_per_sample: float = MS_PER_SAMPLE, batch_size: int = 2):
    """``blocks`` Delay blocks in an nn.Sequential; importable by the replicas as ``tests.test_autoscale_live``."""
    torch.manual_seed(0)
    return nn.Sequential(*(Delay(width, ms_per_sample) for _ in range(blocks))).eval(), torch.randn(batch_size, width)


@dataclass
class Served:
    gcs_address: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    uri = str(tmp_path_factory.mktemp("plans") / "delay")
    source = load_model(f"{__name__}:delay_pipeline", {}, batch_size=BATCH)
    plan = build_plan(source, uri, PlanOptions(stages=len(STAGES), repeats=1, warmup=1, refine=0))
    assert len(plan.stages) == len(STAGES)
    args = {"num_cpus": 0, "min_replicas": 1, "max_replicas": 3, "max_batch_size": BATCH}
    stage_specs = pipeline_policy(plan, AppArgs(plan_uri=uri, **args))["policy_kwargs"]["stages"]
    policy = policy_section(
        stage_specs, upscale_delay_s=UPSCALE_DELAY_S, downscale_delay_s=DOWNSCALE_DELAY_S, drain_time_s=DRAIN_TIME_S
    )
    config = serve_config(uri, host="127.0.0.1", port=free_port(), autoscaling_policy=policy, **args)
    for deployment in config["applications"][0]["deployments"]:
        if deployment["name"] in STAGES:
            deployment["autoscaling_config"] = {**deployment["autoscaling_config"], **SERVE_METRICS}
    with pytest.MonkeyPatch.context() as env:  # the replicas import this module to rebuild the Delay blocks
        env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        ray.init(num_cpus=2, include_dashboard=False)
    try:
        local.wait_running(local.deploy_config(config), timeout_s=240)
        yield Served(ray.get_runtime_context().gcs_address)
    finally:
        local.stop()


Counts = dict[str, tuple[int, int]]


def replica_counts() -> Counts:
    """``(running, target)`` replicas per stage, from the controller's details (what ``serve.status()`` reads,
    plus the target)."""
    details = serve_details()
    assert details is not None
    deployments = details.applications[APP].deployments
    return {
        name: (sum(r.state == "RUNNING" for r in deployments[name].replicas), deployments[name].target_num_replicas)
        for name in STAGES
    }


class Timeline:
    """Polls the replica counts every ``period_s`` in a thread and keeps the changes, in seconds since start."""

    def __init__(self, period_s: float = 0.5) -> None:
        self.start = time.monotonic()
        self.changes: list[tuple[float, Counts]] = []
        self.events: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, args=(period_s,), daemon=True)
        self.thread.start()

    def _poll(self, period_s: float) -> None:
        while not self.stop.is_set():
            counts = replica_counts()
            if not self.changes or counts != self.changes[-1][1]:
                self.changes.append((self.now(), counts))
            self.stop.wait(period_s)

    def now(self) -> float:
        return time.monotonic() - self.start

    def mark(self, event: str) -> float:
        self.events.append((self.now(), event))
        return self.events[-1][0]

    def when(self, condition: Callable[[Counts], bool], since_s: float, timeout_s: float) -> float | None:
        """First time from ``since_s`` on that ``condition(counts)`` held, waiting up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            changes = list(self.changes)
            earlier = [c for c in changes if c[0] < since_s][-1:]  # the state at since_s
            for t, counts in earlier + [c for c in changes if c[0] >= since_s]:
                if condition(counts):
                    return max(t, since_s)
            if time.monotonic() > deadline:
                return None
            time.sleep(0.25)

    def close(self) -> str:
        """Stop polling; the timeline as text."""
        self.stop.set()
        self.thread.join(timeout=10)
        rows = [(t, "  ".join(f"{s} {r}/{n}" for s, (r, n) in c.items())) for t, c in self.changes]
        return "\n".join(f"{t:6.1f} s  {line}" for t, line in sorted(rows + self.events))


def step_load(stop: threading.Event, done: list[int]) -> None:
    """One client: full-batch requests back to back until ``stop``."""
    handle = serve.get_app_handle(APP)
    x = np.zeros((BATCH, WIDTH), np.float32)
    while not stop.is_set():
        handle.infer.remote(x).result(timeout_s=120)
        done.append(1)


def all_targets(test: Callable[[int], bool]) -> Callable[[Counts], bool]:
    return lambda counts: all(test(target) for _, target in counts.values())


def test_step_load_scales_every_stage_up_then_down(served: Served) -> None:
    timeline = Timeline()
    stop, done = threading.Event(), []
    clients = [threading.Thread(target=step_load, args=(stop, done), daemon=True) for _ in range(CLIENTS)]
    try:
        idle = timeline.when(lambda c: all(rt == (1, 1) for rt in c.values()), 0.0, 60.0)
        assert idle is not None, "the stages did not settle at 1 replica before the load"
        load_on = timeline.mark(f"load on: {CLIENTS} clients")
        for c in clients:
            c.start()
        up = timeline.when(all_targets(lambda n: n >= 2), load_on, UP_DECISION_S)
        assert up is not None, f"not every stage's target rose above 1 within {UP_DECISION_S} s of the load"
        running = timeline.when(lambda c: all(r >= 2 for r, _ in c.values()), load_on, REPLICAS_UP_S)
        assert running is not None, f"not every stage ran 2 replicas within {REPLICAS_UP_S} s of the load"
        under_load = {d.name: d.stage for d in gather(APP)[0].deployments if d.stage is not None}
        stop.set()
        load_off = timeline.mark("load off")
        for c in clients:
            c.join(timeout=130)
        timeline.mark(f"last of {len(done)} requests answered")
        down = timeline.when(all_targets(lambda n: n == 1), load_off, DOWN_DECISION_S)
        assert down is not None, f"not every stage's target fell back to 1 within {DOWN_DECISION_S} s after the load"
        under = [counts for t, counts in list(timeline.changes) if up <= t < load_off]
        assert all(all_targets(lambda n: n >= 2)(c) for c in under), "a stage went back to 1 replica under load"
        timeline.when(lambda c: all(r == 1 for r, _ in c.values()), load_off, 30.0)  # for the printed timeline
    finally:
        stop.set()
        print("\nreplicas running/target per stage:\n" + timeline.close())
    print(f"every target >= 2 after {up - load_on:.1f} s of load, back to 1 {down - load_off:.1f} s after it")
    assert sorted(under_load) == STAGES
    assert all(f.utilisation > 0.2 and f.requests_per_s > 0 for f in under_load.values()), under_load


def test_status_json_of_running_app(served: Served) -> None:
    handle = serve.get_app_handle(APP)
    for r in [handle.infer.remote(np.zeros((BATCH, WIDTH), np.float32)) for _ in range(4)]:
        r.result(timeout_s=60)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "partserve", "status", "--address", served.gcs_address, "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    (app,) = json.loads(r.stdout)["applications"]
    assert app["name"] == APP and app["status"] == "RUNNING"
    deployments = {d["name"]: d for d in app["deployments"]}
    assert list(deployments) == ["entrance", *STAGES]
    assert deployments["entrance"]["stage"] is None
    for name in STAGES:
        d = deployments[name]
        assert d["target_replicas"] >= 1 and d["replicas"].get("RUNNING", 0) >= 1, d
        figures = d["stage"]
        assert figures["replicas_reporting"] >= 1 and figures["batch_samples"] >= 1, d
        assert figures["latency_ms_p50"] >= 0.9 * MS_PER_SAMPLE, d  # a batch sleeps at least one sample's time
        assert 0 < figures["utilisation"] <= 1 and figures["queued_requests"] >= 0, d
