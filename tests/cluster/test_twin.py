"""The live twin's pure parts (``benchmarks/autoscale_twin.py``): the entrance's metric phase read from a run, the
replica start-ups a run saw, a stored run's figures at another SLO, many runs taken together."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest

from benchmarks.autoscale_twin import Timeline, TwinSetup, entrance_offsets, live_at_slo, pooled, workload_of
from cluster.sim.metrics import ServeMetrics, ServeMetricsConfig, Snapshot
from cluster.sim.workloads import arrivals


def test_entrance_offsets_from_polls_of_the_controller() -> None:
    # An entrance that records every 6 s from 4.6 s and pushes every 10 s from 2.4 s (a live run's, measured),
    # polled every 1.1 s: each poll holds the newest record of the last push.
    points = []
    for k in range(250):
        poll = 0.3 + 1.1 * k
        pushed = 2.4 + 10 * ((poll - 2.4) // 10)
        if pushed < 0:
            continue
        points.append((poll, 4.6 + 6 * ((pushed - 4.6) // 6)))
    record_s, push_s = entrance_offsets(points, 6.0, 10.0)
    assert record_s == pytest.approx(4.6, abs=1e-6)
    assert push_s == pytest.approx(2.4, abs=0.3)  # polls 1.1 s apart place each push within one
    assert entrance_offsets(points[:3], 6.0, 10.0) is None  # no two pushes seen yet


def test_simulated_entrance_records_and_pushes_at_the_offsets_given() -> None:
    metrics = ServeMetrics(["s"], ServeMetricsConfig(), seed=3, entrance_offsets_s=(4.6, 2.4))
    drawn = ServeMetrics(["s"], ServeMetricsConfig(), seed=3)
    for t in range(0, 40):
        entrance, _ = metrics.view(Snapshot(float(t), arrived=t, stages=()))
        drawn.view(Snapshot(float(t), arrived=t, stages=()))
    times = [t for t, _ in entrance.raw["arrived"][0]]
    assert times == [5.0, 11.0, 17.0, 23.0, 29.0]  # ticks at or after 4.6 + 6k, as pushed at 33 (at or after 2.4 + 10k)
    assert metrics.handles[0].next_record == drawn.handles[0].next_record  # the other sources keep their phases


def test_start_ups_from_the_polled_targets_and_running_replicas() -> None:
    """Stage 0 rises to 3 at 10 s (ready at 14 and 20 s), stage 1 to 2 at 12 s and back to 1 at 13 s before its
    replica ran: two start-ups, 4 and 10 s; the undone rise and the replicas of the start are not ones."""
    times = [0.0, 10.0, 12.0, 13.0, 14.0, 20.0]
    target = [[1, 1], [3, 1], [3, 2], [3, 1], [3, 1], [3, 1]]
    running = [[1, 1], [1, 1], [1, 1], [1, 1], [2, 1], [3, 1]]
    timeline = Timeline(times_s=times, running=running, target=target)
    assert timeline.startups() == [(0, 10.0, 4.0), (0, 10.0, 10.0)]
    assert timeline.startup_s() == 7.0


def test_a_stored_run_at_another_slo_from_its_latencies() -> None:
    setup = TwinSetup()
    times = arrivals(workload_of("step", setup, 60.0), 300.0, 0)
    # 1.5 s everywhere but 3 s for the requests arriving in [60, 100) s, one of them never answered.
    latency = np.where((times >= 60) & (times < 100), 3000.0, 1500.0)
    stored = [None if k == int(np.argmax(times >= 70)) else float(v) for k, v in enumerate(latency)]
    report = {
        "setup": {**asdict(setup), "slo_ms": 2400.0, "duration_s": 300.0, "change_s": 60.0, "seed": 0},
        "runs": {"step/coordinated": {"live": {"latency_ms": stored, "recovery_s": 40.0, "slo_attainment": 0.9}}},
    }
    live_at_slo(report, 3600.0)
    run = report["runs"]["step/coordinated"]["live"]
    assert run["recovery_s"] == pytest.approx(20.0)  # only [70, 80) s is over: the one never answered
    assert run["slo_attainment"] == pytest.approx(1 - 1 / len(times))
    assert report["setup"]["slo_ms"] == 3600.0 and report["setup"]["slo_ms_measured"] == 2400.0
    live_at_slo(report, 2400.0)
    assert report["runs"]["step/coordinated"]["live"]["recovery_s"] == pytest.approx(40.0)
    assert report["setup"]["slo_ms_measured"] == 2400.0  # what the run was measured at stays


def test_runs_taken_together() -> None:
    def run(live_s: float | None, seconds: float, phases: list[float | None], off: float) -> dict:
        live = {"recovery_s": live_s, "replica_seconds": seconds}
        return {
            "live": live,
            "sim_phases": {"recovery_s": phases},
            "sim_vs_live": {"recovery_s": off, "replica_seconds": 0.1},
        }

    def report(coordinated: dict, ray: dict | None = None) -> dict:
        runs = {"step/coordinated": coordinated} | ({} if ray is None else {"step/ray-default": ray})
        return {"setup": {"duration_s": 300.0, "change_s": 60.0}, "runs": runs}

    reports = [
        report(run(50.0, 2400, [50.0, 60.0], 0.1), run(70.0, 2700, [60.0, None], -0.2)),
        report(run(80.0, 2500, [50.0, 50.0], -0.4), run(None, 2600, [70.0, 230.0], -0.1)),
        report(run(50.0, 2300, [40.0, 50.0], 0.0)),
    ]
    together = pooled(reports)
    coordinated, ray = together["coordinated"], together["ray-default"]
    assert coordinated["live_recovery_s"] == {"median": 50.0, "mean": 60.0}
    assert coordinated["sim_recovery_s"]["median"] == 50.0
    assert (coordinated["runs_sim_within"], coordinated["live_runs_within_own_median"]) == (2, 2)  # 80 s: +60%
    # never back counts as the 240 s after the step, live and simulated
    assert ray["live_recovery_s"]["median"] == 155.0 and ray["sim_recovery_s"]["median"] == 150.0
    assert together["coordinated_vs_ray_default"] == {
        "runs": 2, "sooner": 2, "as_soon": 0, "later": 0, "fewer_replica_seconds": 2
    }  # fmt: skip
