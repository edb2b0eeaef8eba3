"""``serve deploy`` of the written config on a Ray cluster this test starts (``ray start --head --block``) in
its own temp dir and ports, then stops by signalling that process: no ``ray stop``, which would stop every
Ray instance on the machine."""

from __future__ import annotations

import contextlib
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
HEAD_STARTS = 3
"""``ray start`` attempts: it gives up when its raylet has not registered with the GCS within 30 s (Ray's own
fixed wait, ``node.py``), which a loaded 2-core machine has missed."""


class HeadNode:
    """A fresh single-node cluster (``ray start --head --block``) in its own temp dir and ports, started again
    if its ``ray start`` gave up; :meth:`stop` stops it by signalling that process."""

    def __init__(self) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        # Token auth for the cluster and its clients alike (`serve deploy` only sends the token in token mode).
        self.env |= {"PYTHONPATH": str(REPO), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_AUTH_MODE": "token"}
        self.starts = 0
        self.temp = ""
        self.process: subprocess.Popen[bytes] | None = None
        self.dashboard = ""
        self.start()

    @property
    def log(self) -> Path:
        return Path(self.temp) / "ray-start.log"

    def start(self) -> None:
        self.starts += 1
        self.temp = tempfile.mkdtemp(prefix="psr", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        dashboard = free_port()
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        ports = {
            "--port": free_port(),
            "--dashboard-port": dashboard,
            "--ray-client-server-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
        }
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                ["ray", "start", "--head", "--block", "--include-dashboard=true", "--num-cpus=2", "--num-gpus=0",
                 f"--temp-dir={self.temp}", *(f"{k}={v}" for k, v in ports.items())],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO, start_new_session=True,
            )  # fmt: skip

    def restart_if_gave_up(self) -> None:
        """Start the cluster again (at most ``HEAD_STARTS`` starts in all) if its ``ray start`` exited."""
        if self.process is not None and self.process.poll() is not None and self.starts < HEAD_STARTS:
            self.stop()
            self.start()

    def stop(self) -> None:
        """Stop every process of this node (SIGTERM to ``ray start --block``; SIGKILL to its process group after
        60 s, or at once if it had exited) and remove its temp dir."""
        head, self.process = self.process, None
        if head is not None:
            if head.poll() is None:
                head.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    head.wait(60)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)  # what a failed start left (its GCS, raylet)
            head.wait(10)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[HeadNode]:
    node = HeadNode()
    try:
        yield node
    finally:
        node.stop()


def test_serve_deploy_of_written_config(cluster: HeadNode, mlp: PlannedModel, tmp_path: Path) -> None:
    model = mlp
    port = free_port()
    config = serve_config(model.uri, host="127.0.0.1", port=port, num_cpus=0)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    deadline = time.monotonic() + DASHBOARD_WAIT_S
    while True:  # the dashboard takes a while to accept deployments
        cluster.restart_if_gave_up()
        deploy = subprocess.run(
            ["serve", "deploy", str(path), "-a", cluster.dashboard],
            capture_output=True, text=True, env=cluster.env, timeout=60,
        )  # fmt: skip
        if deploy.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert deploy.returncode == 0, (
        f"{deploy.stdout}{deploy.stderr}\nray start ({cluster.starts} starts), last:\n{cluster.log.read_text()[-3000:]}"
    )
    url = f"http://127.0.0.1:{port}"
    local.wait_ready(url, 180)
    x = model.sample(3)["features"]
    body = {"inputs": [{"name": "features", "shape": [3, 256], "datatype": oip_datatype(x.dtype), "data": x.tolist()}]}
    r = httpx.post(f"{url}/v2/models/demo-mlp/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(3, 10)
    assert rel_err(got, model.reference({"features": x})["output"]) <= 1e-6
