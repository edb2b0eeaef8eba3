"""``serve deploy`` of the written config on a Ray cluster this test starts (``ray start --head --block``) in
its own temp dir and ports, then stops by signalling that process: no ``ray stop``, which would stop every
Ray instance on the machine."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from cluster import local
from cluster.deploy import serve_config
from partitions.dtypes import oip_datatype
from serve_app.ports import free_port
from tests import REPO
from tests.serve_fixtures import PlannedModel, rel_err

pytestmark = pytest.mark.slow


DASHBOARD_WAIT_S = 300.0
"""How long ``serve deploy`` is tried while the new cluster's dashboard comes up: under a minute on an idle
2-core machine, more than 90 s seen while the other test worker starts Serve replicas."""


@pytest.fixture
def cluster() -> Iterator[tuple[str, dict[str, str], Path]]:
    """The dashboard address of a fresh single-node cluster, the environment that reaches it, and the log of
    its ``ray start``."""
    temp = tempfile.mkdtemp(prefix="psr", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dashboard = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    # Token auth for the cluster and its clients alike (`serve deploy` only sends the token in token mode).
    env |= {"PYTHONPATH": str(REPO), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_AUTH_MODE": "token"}
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
    }
    with open(Path(temp) / "ray-start.log", "w") as log:
        head = subprocess.Popen(
            ["ray", "start", "--head", "--block", "--include-dashboard=true", "--num-cpus=2", "--num-gpus=0",
             f"--temp-dir={temp}", *(f"{k}={v}" for k, v in ports.items())],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True,
        )  # fmt: skip
        try:
            yield f"http://127.0.0.1:{dashboard}", env, Path(temp) / "ray-start.log"
        finally:
            head.terminate()  # --block: SIGTERM makes it stop every process of this node
            try:
                head.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait(10)
            shutil.rmtree(temp, ignore_errors=True)


def test_serve_deploy_of_written_config(
    cluster: tuple[str, dict[str, str], Path], mlp: PlannedModel, tmp_path: Path
) -> None:
    dashboard, env, ray_log = cluster
    model = mlp
    port = free_port()
    config = serve_config(model.uri, host="127.0.0.1", port=port, num_cpus=0)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    deadline = time.monotonic() + DASHBOARD_WAIT_S
    while True:  # the dashboard takes a while to accept deployments
        deploy = subprocess.run(
            ["serve", "deploy", str(path), "-a", dashboard], capture_output=True, text=True, env=env, timeout=60
        )
        if deploy.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert deploy.returncode == 0, f"{deploy.stdout}{deploy.stderr}\nray start:\n{ray_log.read_text()[-3000:]}"
    url = f"http://127.0.0.1:{port}"
    local.wait_ready(url, 180)
    x = model.sample(3)["features"]
    body = {"inputs": [{"name": "features", "shape": [3, 256], "datatype": oip_datatype(x.dtype), "data": x.tolist()}]}
    r = httpx.post(f"{url}/v2/models/demo-mlp/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(3, 10)
    assert rel_err(got, model.reference({"features": x})["output"]) <= 1e-6
