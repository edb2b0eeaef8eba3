"""``partserve status`` without a cluster: the figures' arithmetic, the table, and the one-line error when no
Ray is running. Against a live application: ``tests/e2e/test_autoscale_live.py``."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from rich.console import Console

from cluster.status import AppState, DeploymentState, stage_figures
from partserve.cli.status import render
from serve_app.metrics import merge_sketches, sketch_key, sketch_quantile, window_summary
from serve_app.ports import free_port
from tests import REPO


def test_sketch_quantiles_within_bucket_error() -> None:
    latencies = [float(ms) for ms in range(1, 1001)]
    sketch: dict[int, int] = {}
    for ms in latencies:
        sketch[sketch_key(ms)] = sketch.get(sketch_key(ms), 0) + 1
    assert sketch_quantile(sketch, 0.5) == pytest.approx(500, rel=0.025)
    assert sketch_quantile(sketch, 0.99) == pytest.approx(990, rel=0.025)
    assert sketch_quantile({}, 0.5) is None
    assert merge_sketches([{1: 2}, {1: 1, 3: 4}]) == {1: 3, 3: 4}


def test_window_summary_clips_to_window_and_counts_running_batch() -> None:
    batches = [(0.0, 1.0, 1, 1), (94.0, 96.0, 2, 8), (97.0, 98.0, 4, 16)]  # the first ends before the window
    s = window_summary(batches, now_s=100.0, since_s=0.0, running_since_s=99.5, window_s=5.0)
    assert s["window_s"] == 5.0
    assert s["busy_s"] == pytest.approx(1.0 + 1.0 + 0.5)  # 95-96 clipped, 97-98, running 99.5-100
    assert (s["batches"], s["requests"], s["samples"]) == (2, 6, 24)
    assert sum(s["latency_sketch"].values()) == 2
    # Batches that overlap (each in its own thread, waiting there for the device) count their common time once.
    both = window_summary([(96.0, 98.0, 1, 4), (96.5, 99.0, 1, 4)], 100.0, 0.0, running_since_s=98.5, window_s=5.0)
    assert both["busy_s"] == pytest.approx(4.0)  # 96-100, not 2 + 2.5 + 1.5
    young = window_summary(batches, now_s=100.0, since_s=98.0, window_s=5.0)  # replica started 2 s ago
    assert young["window_s"] == 2.0 and young["batches"] == 0


def test_stage_figures_combine_replicas() -> None:
    def replica(busy_s: float, batches: int, ms: float, queued: int) -> dict:
        return {
            "queued_requests": queued,
            "window_s": 10.0,
            "busy_s": busy_s,
            "batches": batches,
            "requests": 2 * batches,
            "samples": 8 * batches,
            "latency_sketch": {sketch_key(ms): batches},
        }

    f = stage_figures([replica(9.0, 90, 100.0, 3), replica(1.0, 10, 200.0, 0)])
    assert f.replicas_reporting == 2 and f.queued_requests == 3
    assert f.utilisation == pytest.approx(0.5)
    assert f.requests_per_s == pytest.approx(20.0)
    assert (f.batch_requests, f.batch_samples) == (2.0, 8.0)
    assert f.latency_ms_p50 == pytest.approx(100, rel=0.025)
    assert f.latency_ms_p99 == pytest.approx(200, rel=0.025)


def test_table_shows_replicas_and_figures() -> None:
    figures = stage_figures([{"queued_requests": 4, "window_s": 10.0, "busy_s": 7.5, "batches": 5, "requests": 5,
                              "samples": 20, "latency_sketch": {sketch_key(40.0): 5}}])  # fmt: skip
    app = AppState(
        "partserve",
        "RUNNING",
        "",
        [
            DeploymentState("entrance", "HEALTHY", 1, {"RUNNING": 1}),
            DeploymentState("stage-0", "UPSCALING", 3, {"RUNNING": 1, "STARTING": 2}, stage=figures),
            DeploymentState("stage-1", "DOWNSCALING", 1, {"RUNNING": 1, "STOPPING": 2}),
        ],
    )
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(render([app], 10.0))
    text = console.export_text()
    assert "partserve: RUNNING" in text and "1/1 (2 STOPPING)" in text
    stage = [c.strip() for c in next(line for line in text.splitlines() if "stage-0" in line).split("│")]
    assert stage[1:-1] == ["stage-0 ↑", "1/3", "4", "41", "41", "75%", "1", "4", "0.5"]


def run_status(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "partserve", "status", *args],
        capture_output=True,
        text=True,
        env=base | (env or {}),
        cwd=REPO,
        timeout=120,
    )


@pytest.mark.parametrize("how", ["address", "RAY_ADDRESS"])
def test_no_cluster_is_one_line_error(how: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    r = run_status("--json", "--address", dead) if how == "address" else run_status(env={"RAY_ADDRESS": dead})
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no Ray cluster at "), r.stderr


def test_json_and_watch_exclude_each_other() -> None:
    r = run_status("--json", "--watch", "1")
    assert r.returncode == 2 and "--json prints once" in r.stderr
