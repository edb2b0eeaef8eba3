"""``partserve build`` and ``partserve run`` as a user runs them: real processes, real Ray, real HTTP."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from tests.serve_fixtures import free_port

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "partserve"]


@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("plans") / "mlp")
    args = ["plan", "demo-mlp", "-O", "depth=2", "-O", "width=64", "--stages", "2", "--repeats", "1", "-o", out]
    subprocess.run([*CLI, *args], cwd=ROOT, check=True, capture_output=True, timeout=300)
    return out


def test_build_writes_a_config_serve_deploy_accepts(plan_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "serve_config.yaml"
    r = subprocess.run(
        [*CLI, "build", plan_dir, "-o", str(out), "--max-replicas", "3"],
        cwd=ROOT,
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


@pytest.mark.slow
def test_run_serves_until_interrupted(plan_dir: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "run", plan_dir, "--port", str(port), "--json"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        text = ""
        while not text.rstrip().endswith("}"):  # the ready line: JSON once the app runs and answers
            text += lines.get(timeout=240)
        ready = json.loads(text[text.index("{") :])
        assert ready["url"] == f"http://127.0.0.1:{port}" and ready["stages"] == 2
        body = {"inputs": [{"name": "features", "shape": [2, 256], "datatype": "FP32", "data": [0.5] * 512}]}
        r = httpx.post(f"{ready['url']}/v2/models/demo-mlp/infer", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["shape"] == [2, 10]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopping" in err


def test_bench_compare_measures_four_setups(plan_dir: str, tmp_path: Path) -> None:
    parquet, plot = tmp_path / "bench.parquet", tmp_path / "bench.png"
    args = ["--concurrency", "1,4", "--duration-s", "0.5", "--warmup-s", "0.2", "--out", str(parquet)]
    r = subprocess.run(
        [*CLI, "bench", plan_dir, "--compare", *args, "--plot", str(plot), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)  # stdout is the report alone, nothing of Ray's
    summary = {s["setup"]: s for s in out["summary"]}
    assert list(summary) == ["torch", "serve-whole", "serve-chain", "partserve"]
    assert summary["serve-whole"]["vs_serve_whole"] == 1.0 and summary["torch"]["vs_torch"] == 1.0
    served = [row for row in out["rows"] if row["mode"] == "closed"]
    assert len(served) == 3 * 2 and all(row["requests"] > 0 and row["errors"] == 0 for row in served)
    for setup in ("serve-chain", "partserve"):
        figures = out["stage_figures"][setup]
        assert [f["stage"] for f in figures] == [0, 1] and all(f["batches"] > 0 for f in figures)
    assert pq.read_table(parquet).num_rows == len(out["rows"]) and plot.stat().st_size > 0
