"""The served pipeline end to end on the session's Ray + Serve (4 logical GPUs, no CUDA needed).

Two applications: ``mlp`` at ``/`` (stages reserve their planned GPU shares) and ``transformer`` at
``/transformer`` (int64 input, CPU only). A model of two inputs (a DAG plan) is served in test_serve_dag.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
import tritonclient.http as triton
from ray import serve

from cluster import local
from partitions.dtypes import from_oip, np_dtype, oip_datatype
from partitions.plan import PLAN_FILE
from serve_app import codecs
from serve_app.app import AppArgs, build_app
from serve_app.entrance import run_stages, send_batch
from serve_app.names import stage_name
from serve_app.tensors import BadRequest
from serve_app.transport import StageHandles, hop_sample_bytes, too_large
from tests import REPO
from tests.serve_fixtures import TRANSFORMER, PlannedModel, Planner, rel_err
from tests.serve_session import delete_apps

pytestmark = pytest.mark.slow

MAX_BODY = 2**20


@dataclass
class Served:
    url: str
    mlp: PlannedModel
    transformer: PlannedModel


def as_version_1(uri: str, out: Path) -> str:
    """A copy of the plan at ``uri`` as schema version 1 wrote it: without input limits (nor processing)."""
    shutil.copytree(uri, out)
    doc = json.loads((out / PLAN_FILE).read_text())
    doc.update(schema_version=1)
    for key in ("input_limits", "processing"):
        doc.pop(key)
    (out / PLAN_FILE).write_text(json.dumps(doc))
    return str(out)


@pytest.fixture(scope="module")
def served(
    serve_instance: str, mlp: PlannedModel, planned: Planner, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    transformer = planned(TRANSFORMER)
    url = serve_instance
    port = int(url.rsplit(":", 1)[1])
    # A version-1 plan loads; having no input limits, it lets token ids past the vocabulary reach the model.
    transformer_v1 = as_version_1(transformer.uri, tmp_path_factory.mktemp("v1") / "transformer")
    try:
        # Deploy the transformer in the background while local.start deploys the MLP.
        args = AppArgs(plan_uri=transformer_v1, num_cpus=0, max_batch_size=4, batch_wait_timeout_s=0.002)
        serve.run_many(
            [serve.RunTarget(build_app(args), name="transformer", route_prefix="/transformer")],
            wait_for_applications_running=False,
        )
        local.start(mlp.uri, name="mlp", port=port, num_cpus=0, gpus=True, max_body_bytes=MAX_BODY, model_name="mlp")
        local.wait_ready(url, 60)
        local.wait_ready(f"{url}/transformer", 120)
        yield Served(url, mlp, transformer)
    finally:
        delete_apps(["mlp", "transformer"])


def infer_url(served: Served, app: str) -> str:
    return (
        f"{served.url}/v2/models/mlp/infer"
        if app == "mlp"
        else f"{served.url}/transformer/v2/models/demo-transformer/infer"
    )


def oip_json(inputs: dict[str, np.ndarray]) -> dict:
    return {
        "inputs": [
            {"name": k, "shape": list(v.shape), "datatype": oip_datatype(v.dtype), "data": v.ravel().tolist()}
            for k, v in inputs.items()
        ]
    }


def post_json(url: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    r = httpx.post(url, json=oip_json(inputs), timeout=60)
    assert r.status_code == 200, r.text
    return {
        t["name"]: np.asarray(t["data"], dtype=np_dtype(from_oip(t["datatype"]))).reshape(t["shape"])
        for t in r.json()["outputs"]
    }


def post_npy(url: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    buf = io.BytesIO()
    np.save(buf, next(iter(inputs.values())))
    r = httpx.post(url, content=buf.getvalue(), headers={"content-type": codecs.NPY}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == codecs.NPY
    return {"output": np.load(io.BytesIO(r.content), allow_pickle=False)}


def post_arrow(url: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    r = httpx.post(url, content=codecs.encode_arrow(inputs), headers={"content-type": codecs.ARROW}, timeout=60)
    assert r.status_code == 200, r.text
    return codecs.read_arrow(r.content)


POSTS = {"json": post_json, "npy": post_npy, "arrow": post_arrow}


@pytest.mark.parametrize("app", ["mlp", "transformer"])
def test_http_formats_match_whole_model(served: Served, app: str) -> None:
    model: PlannedModel = getattr(served, app)
    # Requests of different sizes in flight together, so they are batched and the results split back.
    jobs = [
        (fmt, batch, model.sample(batch, seed=i))
        for i, (fmt, batch) in enumerate((fmt, batch) for batch in (1, 3, 7) for fmt in POSTS)
    ]
    since = time.time()
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: POSTS[job[0]](infer_url(served, app), job[2]), jobs))
    for (fmt, batch, inputs), got in zip(jobs, answers):
        want = model.reference(inputs)["output"]
        assert got["output"].shape == want.shape == (batch, 10), fmt
        assert got["output"].dtype == np.float32, fmt
        assert rel_err(got["output"], want) <= 1e-6, (fmt, batch)
    first = [b for b in serve.get_deployment_handle("stage-0", app).busy_intervals.remote().result() if b[0] >= since]
    assert sum(n for _, _, _, n in first) == sum(batch for _, batch, _ in jobs)  # every sample, once
    assert len(first) < len(jobs), "no two requests were ever batched together"
    stats = serve.get_deployment_handle("stage-0", app).record_autoscaling_stats.remote().result()
    assert stats["full_batch_ms"] > 0


def test_metadata_and_stock_oip_client(served: Served) -> None:
    meta = httpx.get(f"{served.url}/v2/models/mlp").json()
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 256]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]

    client = triton.InferenceServerClient(served.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mlp")
    assert client.get_model_metadata("mlp")["inputs"][0]["shape"] == [-1, 256]
    inputs = served.mlp.sample(4, seed=7)
    want = served.mlp.reference(inputs)["output"]
    for binary in (True, False):
        tensor = triton.InferInput("features", [4, 256], "FP32")
        tensor.set_data_from_numpy(inputs["features"], binary_data=binary)
        outputs = [triton.InferRequestedOutput("output", binary_data=binary)]
        for requested in (None, outputs):  # no outputs named: the client asks for binary answers
            got = client.infer("mlp", [tensor], outputs=requested, request_id="r1")
            assert got.get_response()["id"] == "r1"
            assert rel_err(got.as_numpy("output"), want) <= 1e-6
    client.close()


DRIVER = """
import json, sys
import numpy as np
import ray
from ray import serve

ray.init(address=sys.argv[1])
x = np.asarray(json.loads(sys.argv[2]), dtype=np.int64)
out = serve.get_app_handle("transformer").infer.remote({"tokens": x}).result()
print(json.dumps({k: v.tolist() for k, v in out.items()}))
"""


def test_python_handle_in_process_and_from_another_driver(served: Served) -> None:
    model = served.transformer
    inputs = model.sample(5, seed=3)
    want = model.reference(inputs)["output"]
    handle = serve.get_app_handle("transformer")
    got = handle.infer.remote(inputs["tokens"]).result()  # a bare array for a single-input model
    assert set(got) == {"output"} and rel_err(got["output"], want) <= 1e-6
    with pytest.raises(BadRequest, match=r"\[-1, 16\] INT64"):
        handle.infer.remote(inputs["tokens"].astype(np.int32)).result()

    address = ray.get_runtime_context().gcs_address
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, address, json.dumps(inputs["tokens"].tolist())],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    other = np.asarray(json.loads(proc.stdout.strip().splitlines()[-1])["output"], dtype=np.float32)
    assert rel_err(other, want) <= 1e-6


def test_batches_travel_by_value_or_by_reference_with_the_same_answers(served: Served) -> None:
    """The transformer's stages called from here as the entrance calls them: a small batch by value (gRPC) and
    by reference (object store) gives the model's outputs; a batch whose messages are over gRPC's 4 MiB
    (stage 0 answers 4 KiB per sample) is refused by value and :func:`send_batch` sends it by reference."""
    model = served.transformer
    plan = model.plan
    handles = [serve.get_deployment_handle(stage_name(s.index), "transformer") for s in plan.stages]
    small, large = model.sample(3, seed=5), model.sample(1100, seed=6)
    assert hop_sample_bytes(plan) * 1100 > 4 * 2**20 > hop_sample_bytes(plan) * 3
    both = StageHandles(plan, handles, by_value_max_bytes=2**30)
    assert both.goes_by_value(small, 3) and both.goes_by_value(large, 1100)
    for stages in (both.by_value, both.by_reference):
        got = asyncio.run(run_stages(plan, stages, small, by_value=stages is both.by_value))
        assert rel_err(got["output"], model.reference(small)["output"]) <= 1e-6
    with pytest.raises(Exception) as refused:
        asyncio.run(run_stages(plan, both.by_value, large, by_value=True))
    assert too_large(refused.value), refused.value
    got = asyncio.run(send_batch(both, large))
    assert rel_err(got["output"], model.reference(large)["output"]) <= 1e-6


def test_stages_get_planned_gpu_shares_and_run_on_cpu(served: Served) -> None:
    placements = [
        serve.get_deployment_handle(f"stage-{s.index}", "mlp").placement.remote().result()
        for s in served.mlp.plan.stages
    ]
    for stage, got in zip(served.mlp.plan.stages, placements):
        print(f"stage {stage.index}: planned GPU {stage.gpu_fraction}, assigned {got}")
        assert got["resources"]["GPU"] == pytest.approx(stage.gpu_fraction, abs=1e-3)
        assert got["resources"].get("CPU", 0) == 0
        assert got["device"] == "cpu"  # CUDA is absent: the runner falls back to the CPU
    assert sum(s.gpu_fraction for s in served.mlp.plan.stages) <= 1
    assert len({tuple(p["gpu_ids"]) for p in placements}) == 1, "stages did not pack onto one GPU"
    transformer_stage = serve.get_deployment_handle("stage-0", "transformer").placement.remote().result()
    assert "GPU" not in transformer_stage["resources"]


def busy_overlap(intervals: list[list[tuple[float, float]]], since: float, until: float) -> float:
    """Seconds within ``[since, until]`` during which at least two of the stages were busy."""
    events = sorted(
        (t, d)
        for stage in intervals
        for a, b in stage
        if b > since
        for t, d in ((max(a, since), 1), (min(b, until), -1))
    )
    busy, last, total = 0, since, 0.0
    for t, d in events:
        if busy >= 2:
            total += t - last
        busy, last = busy + d, t
    return total


def test_stages_overlap_with_requests_in_flight(served: Served) -> None:
    model = served.transformer
    stages = len(model.plan.stages)
    handle = serve.get_app_handle("transformer")
    # 32 samples a request (a batch of its own at max_batch_size 4): each stage's run outlasts a hop between
    # stages even on a starved machine, where batches of 4 ran in ~9 ms and never overlapped by chance.
    inputs = [model.sample(32, seed=i) for i in range(6 * stages)]
    start = time.time()
    answers = [handle.infer.remote(x) for x in inputs]  # all in flight before any is awaited
    results = [a.result() for a in answers]
    end = time.time()
    for x, got in zip(inputs, results):
        assert rel_err(got["output"], model.reference(x)["output"]) <= 1e-6
    intervals = [
        [
            (a, b)
            for a, b, _, _ in serve.get_deployment_handle(f"stage-{i}", "transformer").busy_intervals.remote().result()
        ]
        for i in range(stages)
    ]
    overlap = busy_overlap(intervals, start, end)
    busy = [sum(min(b, end) - max(a, start) for a, b in stage if b > start) for stage in intervals]
    print(
        f"\n{len(inputs)} requests through {stages} stages in {end - start:.3f} s; per-stage busy "
        f"{[round(b, 3) for b in busy]} s; >= 2 stages busy {overlap:.3f} s = {overlap / (end - start):.1%} of wall"
    )
    assert overlap > 0, "stages never ran at the same time"


def test_bad_input_answers_4xx_and_server_keeps_working(served: Served) -> None:
    url = infer_url(served, "mlp")
    good = served.mlp.sample(2, seed=11)

    def check(response: httpx.Response, status: int) -> str:
        assert response.status_code == status, response.text
        message = response.json()["error"]
        if status in (400, 415):
            assert "[-1, 256]" in message and "FP32" in message, message
        return message

    wrong_shape = oip_json({"features": np.zeros((2, 255), np.float32)})
    check(httpx.post(url, json=wrong_shape), 400)
    wrong_dtype = oip_json({"features": np.zeros((2, 256), np.int64)})
    check(httpx.post(url, json=wrong_dtype), 400)
    check(httpx.post(url, json={"inputs": []}), 400)
    check(
        httpx.post(
            url, json={"inputs": [{"name": "features", "shape": [1, 256], "datatype": "FP32", "data": ["x"] * 256}]}
        ),
        400,
    )
    check(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    buf = io.BytesIO()
    np.save(buf, good["features"])
    check(httpx.post(url, content=buf.getvalue()[:-5], headers={"content-type": codecs.NPY}), 400)
    buf = io.BytesIO()
    np.save(buf, good["features"].astype(np.float64))
    check(httpx.post(url, content=buf.getvalue(), headers={"content-type": codecs.NPY}), 400)
    check(httpx.post(url, content=b"not arrow", headers={"content-type": codecs.ARROW}), 400)
    check(httpx.post(url, content=b"x", headers={"content-type": "text/csv"}), 415)
    assert "mlp" in check(httpx.post(f"{served.url}/v2/models/nope/infer", json=oip_json(good)), 404)
    check(httpx.post(url, content=b"0" * (MAX_BODY + 1), headers={"content-type": codecs.NPY}), 413)

    # An input the plan accepts but the model rejects (token ids past the vocabulary, which a version-1 plan
    # has no limits for) fails alone.
    bad_tokens = {"tokens": np.full((1, 16), 10**6, np.int64)}
    fine = served.transformer.sample(3, seed=12)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        failing = pool.submit(httpx.post, infer_url(served, "transformer"), json=oip_json(bad_tokens), timeout=60)
        answers = list(pool.map(lambda x: post_json(infer_url(served, "transformer"), x), [fine] * 3))
    assert failing.result().status_code == 500 and "error" in failing.result().json()
    for got in answers:
        assert rel_err(got["output"], served.transformer.reference(fine)["output"]) <= 1e-6

    assert rel_err(post_json(url, good)["output"], served.mlp.reference(good)["output"]) <= 1e-6
