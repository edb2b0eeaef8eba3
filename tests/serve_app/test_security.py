"""Security: bearer-token auth, no pickle from clients, bounded declared sizes, tampered shards refused.

The unit tests need no Ray; the last two deploy, on the session's Ray + Serve, an app with a token file and an
app whose shard was modified after planning.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
from ray import serve

from cluster import local
from partitions.errors import ArtifactError
from partitions.runtime import StageRunner
from partitions.verify import verify
from serve_app import auth, codecs
from serve_app.app import AppArgs
from serve_app.ray_internals import session_dir
from serve_app.tensors import BadRequest, check_inputs
from tests.serve_fixtures import PlannedModel, rel_err
from tests.serve_session import serve_apps

TOKEN = "s3cret-token-for-tests"
MAX_BODY = 2**20


class Tripwire:
    """Unpickling it creates ``path``: proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


# Auth ------------------------------------------------------------------------------------------------------


def test_token_from_file_or_env(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    assert auth.load_token(str(token_file), {auth.TOKEN_ENV: "other"}) == TOKEN  # the file wins
    assert auth.load_token(None, {auth.TOKEN_ENV: TOKEN}) == TOKEN
    assert auth.load_token(None, {}) is None and auth.load_token(None, {auth.TOKEN_ENV: ""}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(auth.AuthConfigError, match="empty"):
        auth.load_token(str(tmp_path / "empty"))
    with pytest.raises(auth.AuthConfigError, match="cannot read") as info:
        auth.load_token(str(tmp_path / "missing"))
    assert TOKEN not in str(info.value)


def test_authorized_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert auth.authorized(f"Bearer {TOKEN}", TOKEN) and auth.authorized(f"bearer  {TOKEN} ", TOKEN)
    assert compared and all(b == TOKEN.encode() for _, b in compared)
    for header in (None, "", TOKEN, f"Basic {TOKEN}", "Bearer", "Bearer wrong", f"Bearer {TOKEN}x", "Bearer é"):
        assert not auth.authorized(header, TOKEN), header
    assert auth.authorized(None, None)


# No pickle, bounded sizes ----------------------------------------------------------------------------------


def test_object_npy_is_refused_without_unpickling(mlp: PlannedModel, tmp_path: Path) -> None:
    tripwire = tmp_path / "ran"
    buf = io.BytesIO()
    np.save(buf, np.array([Tripwire(str(tripwire))], dtype=object), allow_pickle=True)
    with pytest.raises(BadRequest, match="Python objects") as info:
        codecs.decode(buf.getvalue(), codecs.NPY, None, mlp.plan.inputs)
    assert info.value.status == 400 and not tripwire.exists()


def test_arrow_pickled_extension_type_is_not_unpickled(mlp: PlannedModel, tmp_path: Path) -> None:
    """The legacy ``arrow.py_extension_type`` carries a pickle in the field metadata: it must stay data."""
    tripwire = tmp_path / "ran"
    field = pa.field(
        "features",
        pa.float32(),
        metadata={
            b"ARROW:extension:name": b"arrow.py_extension_type",
            b"ARROW:extension:metadata": pickle.dumps(Tripwire(str(tripwire))),
        },
    )
    table = pa.table([pa.array([1.0, 2.0], pa.float32())], schema=pa.schema([field]))
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(BadRequest):  # a plain float column of shape [2]: not the [-1, 256] input
        req = codecs.decode(sink.getvalue(), codecs.ARROW, None, mlp.plan.inputs)
        check_inputs(mlp.plan.inputs, req.arrays)
    assert not tripwire.exists()


def test_compressed_arrow_is_refused(mlp: PlannedModel) -> None:
    """A compressed stream could decode to far more than its body: refused before decompressing."""
    zeros = np.zeros((64, 256), np.float32)
    table = pa.table([pa.FixedShapeTensorArray.from_numpy_ndarray(zeros)], names=["features"])
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(table)
    assert len(sink.getvalue()) < zeros.nbytes / 10
    with pytest.raises(BadRequest, match="compressed"):
        codecs.decode(sink.getvalue(), codecs.ARROW, None, mlp.plan.inputs)
    plain = codecs.decode(codecs.encode_arrow({"features": zeros}), codecs.ARROW, None, mlp.plan.inputs)
    assert plain.arrays["features"].shape == (64, 256)


def declared_huge() -> dict[str, bytes]:
    """Small bodies declaring a [10**9, 256] FP32 tensor (1 TB), one per format."""
    doc = {"inputs": [{"name": "features", "shape": [10**9, 256], "datatype": "FP32", "data": [0.0] * 256}]}
    size = {"binary_data_size": 10**9 * 256 * 4}
    binary = {"inputs": [{"name": "features", "shape": [10**9, 256], "datatype": "FP32", "parameters": size}]}
    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 256), np.float32))
    npy = buf.getvalue().replace(b"(1, 256)", b"(1000000000, 256)")
    return {"json": json.dumps(doc).encode(), "binary": json.dumps(binary).encode() + b"\0" * 1024, "npy": npy}


@pytest.mark.parametrize("fmt", ["json", "binary", "npy"])
def test_huge_declared_shape_is_refused_before_allocating(fmt: str, mlp: PlannedModel) -> None:
    body = declared_huge()[fmt]
    header_length = str(len(body) - 1024) if fmt == "binary" else None
    content_type = codecs.NPY if fmt == "npy" else codecs.JSON
    tracemalloc.start()
    try:
        with pytest.raises(BadRequest, match="over the") as info:
            codecs.decode(body, content_type, header_length, mlp.plan.inputs, max_tensor_bytes=4 * MAX_BODY)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.status == 413 and peak < 10 * 2**20


def test_arrow_rows_beyond_the_limit_are_refused(mlp: PlannedModel) -> None:
    body = codecs.encode_arrow({"features": np.zeros((4, 256), np.float32)})
    with pytest.raises(BadRequest, match="4 rows of 1024 bytes") as info:
        codecs.decode(body, codecs.ARROW, None, mlp.plan.inputs, max_tensor_bytes=3 * 1024)
    assert info.value.status == 413


# Tampered shards -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tampered(mlp: PlannedModel, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A copy of the MLP plan whose stage-1 shard has one byte flipped after planning."""
    uri = str(tmp_path_factory.mktemp("tampered") / "mlp")
    shutil.copytree(mlp.uri, uri)
    shard = Path(uri) / mlp.plan.stages[1].artifact.path
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return uri


def test_tampered_shard_is_refused_naming_it(mlp: PlannedModel, tampered: str) -> None:
    shard = mlp.plan.stages[1].artifact.path
    StageRunner(tampered, 0)  # the untouched shard still loads
    with pytest.raises(ArtifactError, match=f"shard {shard} has sha256"):
        StageRunner(tampered, 1)
    with pytest.raises(ArtifactError, match="modified or corrupted"):
        verify(tampered)


def test_shard_replaced_by_a_pickle_is_refused_before_loading(mlp: PlannedModel, tmp_path: Path) -> None:
    uri = str(tmp_path / "mlp")
    shutil.copytree(mlp.uri, uri)
    tripwire = tmp_path / "ran"
    (Path(uri) / mlp.plan.stages[0].artifact.path).write_bytes(pickle.dumps(Tripwire(str(tripwire))))
    with pytest.raises(ArtifactError, match="sha256"):
        StageRunner(uri, 0)
    assert not tripwire.exists()


# Deployed --------------------------------------------------------------------------------------------------


@dataclass
class Deployed:
    url: str
    tampered_error: str


@pytest.fixture(scope="module")
def deployed(
    serve_instance: str, mlp: PlannedModel, tampered: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployed]:
    token_file = tmp_path_factory.mktemp("secrets") / "token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    secure = AppArgs(plan_uri=mlp.uri, model_name="mlp", num_cpus=0, auth_token_file=str(token_file))
    broken = AppArgs(plan_uri=tampered, model_name="mlp", num_cpus=0)
    with serve_apps(serve_instance, {"secure": secure}, background={"tampered": broken}) as url:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="deploy failed"):
            local.wait_running(["tampered"], timeout_s=240)
        message = serve.status().applications["tampered"].deployments["stage-1"].message
        last_line = message.strip().splitlines()[-1]
        print(f"\ntampered app failed to deploy after {time.monotonic() - start:.0f} s more: {last_line}")
        yield Deployed(url, message)


@pytest.mark.slow
def test_tampered_plan_fails_to_deploy_clearly(deployed: Deployed, mlp: PlannedModel) -> None:
    shard = mlp.plan.stages[1].artifact.path
    assert "ArtifactError" in deployed.tampered_error and f"shard {shard} has sha256" in deployed.tampered_error


PROTECTED = (
    ("GET", "/v2"),
    ("GET", "/v2/models/mlp"),
    ("GET", "/v2/models/mlp/ready"),
    ("POST", "/v2/models/mlp/infer"),
)


@pytest.mark.slow
def test_bearer_token_guards_all_but_health(deployed: Deployed, mlp: PlannedModel) -> None:
    base = f"{deployed.url}/secure"
    x = mlp.sample(2, seed=3)
    doc = {
        "inputs": [{"name": "features", "shape": [2, 256], "datatype": "FP32", "data": x["features"].ravel().tolist()}]
    }
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert httpx.get(base + path, timeout=30).status_code == 200, path
    wrong = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}]
    for headers in wrong:
        for method, path in PROTECTED:
            r = httpx.request(method, base + path, headers=headers, json=doc if method == "POST" else None, timeout=30)
            assert r.status_code == 401, (headers, path, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer") and TOKEN not in r.text
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(base + "/v2/models/mlp", headers=good, timeout=30).status_code == 200
    r = httpx.post(base + "/v2/models/mlp/infer", headers=good, json=doc, timeout=60)
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(2, 10)
    assert rel_err(got, mlp.reference(x)["output"]) <= 1e-6
    logs = Path(session_dir()) / "logs"
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not leaked, f"the token appears in {leaked}"
