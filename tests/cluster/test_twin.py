"""The live twin's pure parts (``benchmarks/autoscale_twin.py``): the entrance's metric phase read from a run."""

from __future__ import annotations

import pytest

from benchmarks.autoscale_twin import entrance_offsets
from cluster.sim.metrics import ServeMetrics, ServeMetricsConfig, Snapshot


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
