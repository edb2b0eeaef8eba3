"""``partserve batch --address`` on a multi-node ``ray.cluster_utils.Cluster``: a head with no CPUs and two
1-CPU workers, so the stage actors (one pool per stage, ``--pool-per-stage``) must spread over both workers
(their CPU requests pack whole per node)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from ray.cluster_utils import Cluster

from tests import REPO
from tests.batch_data import outputs, reference, write_inputs
from tests.serve_fixtures import TRANSFORMER, Planner

pytestmark = pytest.mark.own_ray


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c.address
    finally:
        c.shutdown()


def test_batch_on_a_multi_node_cluster(address: str, planned: Planner, tmp_path: Path) -> None:
    model = planned(TRANSFORMER)
    tokens = write_inputs(model, tmp_path / "in", files=2, rows=60)
    cmd = [sys.executable, "-m", "partserve", "batch", model.uri, "--input", str(tmp_path / "in"),
           "--output", str(tmp_path / "out"), "--map", "toks=tokens", "--batch-size", "16", "--address", address,
           "--json", "--pool-per-stage"]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    stages = report["steps"][1:]
    assert [s["actors"] for s in stages] == [1, 1, 1]
    assert all(s["num_cpus"] == 0.4375 for s in stages)  # two per 1-CPU worker, less an eighth for reads
    ids, got = outputs(tmp_path / "out")
    assert ids.tolist() == list(range(120))
    want = reference(model, tokens, batch=16)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-6
    assert pq.read_table(tmp_path / "out" / "part-1.parquet").num_rows == 60
