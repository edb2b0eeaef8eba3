"""The command line as a user runs it: real processes, exit codes, JSON and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests import REPO


def partserve(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "partserve", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


@pytest.mark.slow  # plans and verifies a transformer in two processes
def test_plan_and_verify_json(tmp_path) -> None:
    out = tmp_path / "plan"
    small = ["--layers", "2", "--width", "32", "--seq-len", "8", "--repeats", "1"]
    r = partserve("plan", "demo-transformer", *small, "--stages", "2", "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert len(plan["stages"]) == 2
    assert plan["summary"]["balance"] >= 1.0
    r = partserve("verify", str(out), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] and report["max_rel_error"] <= 1e-6


@pytest.mark.slow  # plans in a process
def test_plan_table_names_capture_path(tmp_path) -> None:
    r = partserve("plan", "demo-mlp", "-O", "depth=2", "-O", "width=32", "--stages", "2", "-o", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr
    assert "captured demo-mlp by export" in r.stdout
    assert "balance" in r.stdout


@pytest.mark.slow  # plans on onnxruntime and verifies in two processes
def test_plan_on_onnxruntime_reports_rates_and_verify_names_the_worst_stage(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    out = str(tmp_path / "p")
    mlp = ["-O", "depth=2", "-O", "width=32", "--stages", "2", "--repeats", "1"]
    r = partserve("plan", "demo-mlp", *mlp, "--engine", "onnxruntime", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "machine fp32 GEMM" in r.stdout and "GFLOP/s" in r.stdout
    assert "summed stage time, eager -> engines: batch 1:" in r.stdout
    r = partserve("verify", out, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["engines"] == ["onnxruntime", "onnxruntime"] and report["worst_stage"] in (0, 1)
    assert report["tolerance"] == 1e-4 and report["passed"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "no-such-model", "--stages", "2", "-o", "{tmp}/p"], "unknown model"),
        (["plan", "demo-mlp", "-O", "depth=1", "--stages", "99", "-o", "{tmp}/p"], "--stages"),
        (["plan", "demo-mlp", "--max-stage-memory", "1KB", "-o", "{tmp}/p"], "raise --max-stage-memory"),
        (["plan", "demo-mlp", "-O", "colour=red", "--stages", "2", "-o", "{tmp}/p"], "accepted options"),
        (["plan", "demo-mlp", "-o", "{tmp}/p"], "--stages"),
        (["plan", "demo-mlp", "-O", "depth=oops", "--stages", "2", "-o", "{tmp}/p"], "check the option values"),
        (["verify", "{tmp}/missing"], "partserve plan"),
    ],
)
def test_bad_input_is_one_line_exit_2(args: list[str], message: str, tmp_path) -> None:
    r = partserve(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert message in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:")


def test_zoo_json() -> None:
    r = partserve("zoo", "--json")
    assert r.returncode == 0
    names = {m["name"] for m in json.loads(r.stdout)}
    assert {"demo-mlp", "demo-transformer", "demo-resnet"} <= names
