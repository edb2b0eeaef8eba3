"""``partserve batch`` on a local Ray (2 CPUs): outputs equal the whole model's, bad rows go to ``_rejected``, a
killed job restarts without redoing complete files, ``--json`` prints only JSON, consecutive stages share an
actor where the CPUs are fewer than the stages, ``partserve.batch`` returns a Ray Dataset. The throughput
figure is measured by benchmarks/batch.py, not here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

import partserve
from tests import REPO
from tests.batch_data import BAD, BATCH, check_rejected, outputs, reference, write_bad, write_inputs
from tests.serve_fixtures import TRANSFORMER, PlannedModel, Planner

pytestmark = pytest.mark.own_ray


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    """A local Ray with 2 CPUs for the module; the CLI joins it with --address."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def model(planned: Planner) -> PlannedModel:
    return planned(TRANSFORMER)


def test_python_entry_outputs_equal_the_whole_model(address: str, model: PlannedModel, tmp_path: Path) -> None:
    """``partserve.batch`` returns a lazy Ray Dataset: outputs within 1e-6 of the whole model's at the same
    batch size, in the input's order; the malformed rows come out with their reasons instead."""
    tokens = write_inputs(model, tmp_path / "in", files=2, rows=120)
    bad_tokens = write_bad(model, tmp_path / "in" / "zz-bad.parquet")
    ds = partserve.batch(model.uri, str(tmp_path / "in" / "*.parquet"), mapping={"toks": "tokens"}, batch_size=BATCH)
    assert isinstance(ds, ray.data.Dataset)
    rows = sorted(ds.take_all(), key=lambda r: (r["_input"], r["_row"]))  # in any order unless preserve_order
    assert set(rows[0]) == {"id", "output", "_input", "_row", "_reason"}
    ok = [r for r in rows if r["_reason"] is None]
    assert [r["id"] for r in ok] == list(range(240)) + [10_000 + i for i in range(100) if i not in BAD]
    got = np.stack([r["output"] for r in ok])
    want = reference(model, tokens)
    assert np.abs(got[:240] - want).max() / np.abs(want).max() <= 1e-6
    good = [i for i in range(100) if i not in BAD]
    want = reference(model, bad_tokens[good], batch=1)  # the batches the job ran differ around the bad rows
    assert np.abs(got[240:] - want).max() / np.abs(want).max() <= 1e-5
    check_rejected([r for r in rows if r["_reason"] is not None])
    assert {r["_input"] for r in rows} == {str(p) for p in sorted((tmp_path / "in").glob("*.parquet"))}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "partserve", "batch", *args]


def _env() -> dict[str, str]:
    """This process's environment as it is now: ``ray.init`` turned token auth on in it (RAY_AUTH_MODE)."""
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_killed_job_restarts_without_redoing_files(address: str, model: PlannedModel, tmp_path: Path) -> None:
    """Killed (SIGKILL) after its first output file; the rerun (``--json --strict``) skips the complete files,
    writes each input row exactly once, puts the 3 bad rows in ``_rejected`` and exits with code 3; a third
    run finds nothing to do (and starts no Ray)."""
    tokens = write_inputs(model, tmp_path / "in", files=4, rows=200)
    write_bad(model, tmp_path / "in" / "zz-bad.parquet")
    out = tmp_path / "out"
    args = [model.uri, "--input", str(tmp_path / "in"), "--output", str(out), "--map", "toks=tokens"]
    proc = subprocess.Popen(_cli(*args, "--batch-size", "8", "--address", address), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not list(out.glob("*.parquet")):
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert 1 <= len(done) < 5, f"the job was killed with {len(done)} of 5 files done"

    r = subprocess.run(_cli(*args, "--json", "--strict", "--batch-size", str(BATCH), "--address", address),
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 3, r.stderr[-3000:]  # --strict: finished, and rows were rejected
    report = json.loads(r.stdout)  # stdout holds the JSON report and nothing else
    assert report["skipped_files"] == len(done) and report["files"] == 5 - len(done)
    assert report["rows"] == 200 * (4 - len(done)) + 100 and report["rejected"] == 3
    steps = [s["step"] for s in report["steps"]]  # 3 stages on 2 CPUs: two pools, one of them runs two stages
    assert steps in (["read", "stages-0-1", "stage-2"], ["read", "stage-0", "stages-1-2"])
    assert report["bottleneck"] in steps[1:] and [s["num_cpus"] for s in report["steps"][1:]] == [0.875, 0.875]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet") if p.name in done} == done
    ids, got = outputs(out)
    assert sorted(ids.tolist()) == list(range(800)) + [10_000 + i for i in range(100) if i not in BAD]
    want = reference(model, tokens)
    part = ids < 10_000
    assert np.abs(got[part][np.argsort(ids[part])] - want).max() / np.abs(want).max() <= 1e-6
    check_rejected(pq.read_table(out / "_rejected" / "zz-bad.parquet").to_pylist())
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial")]

    r = subprocess.run(_cli(*args), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped 5 files with complete outputs (900 rows)" in r.stdout
