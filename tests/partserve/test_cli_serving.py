"""``partserve build`` and ``partserve run`` as a user runs them: real processes, real Ray, real HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.ports import free_port
from tests import REPO
from tests.serve_fixtures import PlannedModel, Planner

CLI = [sys.executable, "-m", "partserve"]


@pytest.fixture(scope="module")
def plan_dir(planned: Planner) -> str:
    """A small MLP in two stages, planned in this process (``partserve plan`` as a process: test_cli.py)."""
    return planned(("demo-mlp", {"depth": 2, "width": 64}), stages=2).uri


@pytest.mark.slow  # a process; tests/partserve/test_deploy_commands.py runs build in this one
def test_build_writes_a_config_serve_deploy_accepts(mlp: PlannedModel, tmp_path: Path) -> None:
    plan_dir = mlp.uri
    out = tmp_path / "serve_config.yaml"
    r = subprocess.run(
        [*CLI, "build", plan_dir, "-o", str(out), "--max-replicas", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    config = yaml.safe_load(out.read_text())
    app = ServeDeploySchema.model_validate(config).applications[0]
    assert app.import_path == "serve_app.app:build_app" and app.args["plan_uri"] == plan_dir
    assert app.autoscaling_policy["policy_function"] == "cluster.serve_policy:PipelineAutoscalingPolicy"
    stages = [d for d in config["applications"][0]["deployments"] if d["name"].startswith("stage-")]
    assert [d["autoscaling_config"]["max_replicas"] for d in stages] == [3, 3]


def start_in_background(
    args: list[str], env: dict[str, str], tmp: Path
) -> tuple[subprocess.Popen[str], psutil.Process]:
    """``partserve ARGS`` as a background job of a shell script, which starts it with SIGINT ignored;
    returns the shell and the ``partserve`` process."""
    pid_file = tmp / "run.pid"
    script = f"{shlex.join([*CLI, *args])} & echo $! > {shlex.quote(str(pid_file))}; wait $!"
    shell = subprocess.Popen(
        ["bash", "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return shell, psutil.Process(int(pid_file.read_text()))


def lines_of(stream: Any) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True).start()
    return lines


def wait_for(lines: queue.Queue[str], done: Callable[[str], bool], timeout_s: float) -> str:
    """What the process printed until ``done(text)``."""
    seen = ""
    while not done(seen):
        seen += lines.get(timeout=timeout_s)
    return seen


def assert_stops(
    shell: subprocess.Popen[str], run: psutil.Process, sig: int, started: set[psutil.Process], code: int = 0
) -> None:
    """``sig`` stops ``run`` within 30 s, with exit code ``code``, and every process it started is gone."""
    started |= set(run.children(recursive=True))
    run.send_signal(sig)
    run.wait(timeout=30)
    assert shell.wait(timeout=10) == code  # the shell's `wait` returns the job's exit code
    _, alive = psutil.wait_procs(list(started), timeout=30)
    assert not alive, [p.pid for p in alive]


@pytest.mark.slow
def test_run_from_a_background_job_serves_until_sigint(plan_dir: str, tmp_path: Path) -> None:
    port = free_port()
    shell, run = start_in_background(["run", plan_dir, "--port", str(port), "--json"], dict(os.environ), tmp_path)
    started: set[psutil.Process] = set()
    try:
        out = lines_of(shell.stdout)
        text = wait_for(out, lambda t: t.rstrip().endswith("}"), 240)  # the ready line: JSON once the app answers
        ready = json.loads(text[text.index("{") :])
        assert ready["url"] == f"http://127.0.0.1:{port}" and ready["stages"] == 2
        body = {"inputs": [{"name": "features", "shape": [2, 256], "datatype": "FP32", "data": [0.5] * 512}]}
        r = httpx.post(f"{ready['url']}/v2/models/demo-mlp/infer", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["shape"] == [2, 10]
        assert_stops(shell, run, signal.SIGINT, started)
    finally:
        for p in [run, *started]:
            with contextlib.suppress(psutil.Error):
                p.kill()
        shell.kill()
    assert "stopping" in shell.stderr.read()


@pytest.mark.slow
def test_run_stops_on_sigterm_while_starting(tmp_path: Path) -> None:
    """Planning a model into an empty cache, then starting Ray: SIGTERM there stops it too."""
    env = {**os.environ, "PARTSERVE_CACHE": str(tmp_path)}
    shell, run = start_in_background(["run", "demo-mlp", "--stages", "2", "--port", str(free_port())], env, tmp_path)
    started: set[psutil.Process] = set()
    try:
        wait_for(lines_of(shell.stderr), lambda t: "deploying" in t, 240)
        time.sleep(1.0)  # Ray is starting
        assert_stops(shell, run, signal.SIGTERM, started)
    finally:
        for p in [run, *started]:
            with contextlib.suppress(psutil.Error):
                p.kill()
        shell.kill()


@pytest.mark.slow
def test_bench_compare_stops_on_sigterm_with_every_setup_process_and_ray_gone(plan_dir: str, tmp_path: Path) -> None:
    """SIGTERM while a setup's process runs its Ray: the bench exits (code 1, cut short) and leaves nothing."""
    args = ["bench", plan_dir, "--compare", "--concurrency", "1", "--duration-s", "60", "--http-level", "0"]
    shell, run = start_in_background(args, dict(os.environ), tmp_path)
    started: set[psutil.Process] = set()
    try:
        wait_for(lines_of(shell.stderr), lambda t: "measuring serve-whole" in t, 120)
        deadline = time.monotonic() + 120
        while not any("raylet" in p.name() for p in run.children(recursive=True)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert any("raylet" in p.name() for p in run.children(recursive=True)), "the setup's Ray never started"
        assert_stops(shell, run, signal.SIGTERM, started, code=1)
    finally:
        for p in [run, *started]:
            with contextlib.suppress(psutil.Error):
                p.kill()
        shell.kill()


@pytest.mark.slow  # five setups, each on a fresh local Ray
def test_bench_compare_measures_every_setup(plan_dir: str, tmp_path: Path) -> None:
    parquet, plot = tmp_path / "bench.parquet", tmp_path / "bench.png"
    args = ["--concurrency", "1,4", "--duration-s", "0.5", "--warmup-s", "1", "--http-level", "2"]  # a cold first call
    args += ["--out", str(parquet)]
    r = subprocess.run(
        [*CLI, "bench", plan_dir, "--compare", *args, "--plot", str(plot), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)  # stdout is the report alone, nothing of Ray's
    summary = {s["setup"]: s for s in out["summary"]["best"]}
    assert list(summary) == ["torch", "torch-stages", "serve-whole", "serve-replicas", "serve-chain", "partserve"]
    assert summary["serve-whole"]["vs_serve_whole"] == 1.0 and summary["torch"]["vs_torch"] == 1.0
    assert [e["level"] for e in out["summary"]["at_level"]] == [1, 4]
    assert set(out["summary"]["http"]) == {"serve-whole", "serve-replicas", "serve-chain", "partserve"}
    served = [row for row in out["rows"] if row["mode"] == "closed"]
    # Per setup: two levels through handles and one over HTTP, each with the setup's configuration.
    assert len(served) == 4 * 3 and all(row["requests"] > 0 and row["errors"] == 0 for row in served)
    assert all(row["cfg_access_log"] is False and row["cfg_torch_threads"] >= 1 for row in served)
    assert out["configs"]["serve-whole"]["torch_threads"] == out["cores"]
    assert out["configs"]["serve-replicas"]["replicas"] == out["cores"]
    for setup in ("serve-chain", "partserve"):
        figures = out["stage_figures"][setup]
        assert [f["stage"] for f in figures] == [0, 1] and all(f["batches"] > 0 for f in figures)
    assert pq.read_table(parquet).num_rows == len(out["rows"]) and plot.stat().st_size > 0
