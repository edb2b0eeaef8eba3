"""What deployments rely on beyond the local disk: a plan on S3-compatible object storage, and the stages'
Prometheus metrics scraped from Ray's metrics endpoint. Real servers on 127.0.0.1, real Serve."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import numpy as np
import pyarrow.fs as pafs
import pytest
from moto.server import ThreadedMotoServer

from partitions.partition import PlanOptions, build_plan
from partitions.source import load_model
from partitions.storage import read_plan
from partitions.verify import verify
from serve_app.app import AppArgs
from serve_app.ports import free_port
from serve_app.ray_internals import metrics_export_port
from tests.serve_fixtures import MLP, PlannedModel, rel_err
from tests.serve_session import serve_apps

BUCKET = "plans"
APP = "s3mlp"


@pytest.fixture(scope="module")
def s3_uri() -> Iterator[str]:
    """An empty bucket on an S3-compatible server (moto) on 127.0.0.1, as a pyarrow URI prefix that carries its
    endpoint and (dummy) credentials, so Ray's workers reach it with no environment of their own."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        fs = pafs.S3FileSystem(
            access_key="test",
            secret_key="test",
            endpoint_override=f"127.0.0.1:{port}",
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        )
        fs.create_dir(BUCKET)
        yield f"s3://test:test@{BUCKET}/{{name}}?{query}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_model(s3_uri: str) -> PlannedModel:
    """The MLP planned straight into the bucket (plan.json and the shards live there only)."""
    uri = s3_uri.format(name="mlp")
    spec, options = MLP
    source = load_model(spec, dict(options))
    build_plan(source, uri, PlanOptions(stages=2, repeats=1, warmup=1, refine=1))
    return PlannedModel(uri, read_plan(uri), source)


@pytest.fixture(scope="module")
def url(s3_model: PlannedModel, serve_instance: str) -> Iterator[str]:
    """The base URL of ``s3mlp``, served from the bucket; both tests use it (one application, three replicas)."""
    with serve_apps(serve_instance, {APP: AppArgs(plan_uri=s3_model.uri, num_cpus=0)}) as base:
        yield f"{base}/{APP}"


def test_plan_on_s3_plans_verifies_and_serves(s3_model: PlannedModel, url: str) -> None:
    assert [s.artifact.path for s in s3_model.plan.stages] == ["stage-000.pt2", "stage-001.pt2"]
    assert verify(s3_model.uri).passed
    x = s3_model.sample(3)
    body = {
        "inputs": [{"name": "features", "shape": [3, 256], "datatype": "FP32", "data": x["features"].ravel().tolist()}]
    }
    r = httpx.post(f"{url}/v2/models/demo-mlp/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(3, 10)
    assert rel_err(got, s3_model.reference(x)["output"]) <= 1e-6


def test_stage_metrics_scrape_from_rays_endpoint(url: str) -> None:
    body = {"inputs": [{"name": "features", "shape": [1, 256], "datatype": "FP32", "data": [0.5] * 256}]}
    for _ in range(8):
        assert httpx.post(f"{url}/v2/models/demo-mlp/infer", json=body, timeout=60).status_code == 200
    wanted = [
        "partserve_stage_batch_latency_ms_bucket",
        "partserve_stage_batch_samples_bucket",
        "partserve_stage_busy_seconds_total",
    ]
    stages = ("stage-0", "stage-1")

    def missing(text: str) -> list[str]:
        lines = [line for line in text.splitlines() if f'app="{APP}"' in line]
        return [
            f"{name} of {stage}"
            for name in wanted
            for stage in stages
            if not any(name in line and f'stage="{stage}"' in line for line in lines)
        ]

    gaps, deadline = ["nothing scraped"], time.monotonic() + 60  # replicas export every few seconds
    while gaps and time.monotonic() < deadline:
        gaps = missing(httpx.get(f"http://127.0.0.1:{metrics_export_port()}/metrics", timeout=10).text)
        time.sleep(0 if not gaps else 2)
    assert not gaps, f"not in Ray's /metrics: {gaps}"
