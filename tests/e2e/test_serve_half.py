"""Half-precision plans served: stage replicas run the plan's dtype, the entrance takes it and float32, and
answers in it or in float32 when asked; a stock Triton client sends BF16 and FP16."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as triton

from partitions.compress.api import calibration_inputs, compress
from partitions.errors import PlanError
from partitions.partition import PlanOptions, build_plan
from partitions.source import load_model
from serve_app import codecs
from serve_app.app import AppArgs
from tests.serve_fixtures import MLP, PlannedModel, Planner, rel_err
from tests.serve_session import serve_apps

pytestmark = pytest.mark.slow

HALF_REL = 1e-2
"""Pipeline against the whole model in the same dtype: batches are formed differently, so a GEMM may round a
few outputs one bf16 step (2^-7 relative) apart."""


@dataclass
class Half:
    url: str
    models: dict[str, PlannedModel]
    """OIP datatype -> the MLP planned in it (FP16 only where CPU kernels take it)."""
    compressed_uri: str


@pytest.fixture(scope="module")
def half(serve_instance: str, planned: Planner, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Half]:
    models = {"BF16": planned(MLP, stages=2, dtype="bfloat16")}
    with contextlib.suppress(PlanError):  # torch's CPU kernels may refuse float16: the plan names --device cuda
        models["FP16"] = planned(MLP, stages=2, dtype="float16")
    root = tmp_path_factory.mktemp("half")
    source = load_model("demo-transformer", {"layers": 2, "width": 32, "seq_len": 8}, 4)
    compress(source, calibration_inputs(source, None, 8, 0), quantization="bf16", repeats=1, output=str(root / "c"))
    compressed = str(root / "plan")
    build_plan(load_model(str(root / "c"), {}, 4), compressed, PlanOptions(stages=2, repeats=1, warmup=0, refine=0))
    apps = {f"mlp-{d.lower()}": AppArgs(plan_uri=m.uri, num_cpus=0, model_name="mlp") for d, m in models.items()}
    apps["t-bf16"] = AppArgs(plan_uri=compressed, num_cpus=0, model_name="t")
    with serve_apps(serve_instance, apps) as url:
        yield Half(url, models, compressed)


@pytest.mark.parametrize("datatype", ["BF16", "FP16"])
def test_tritonclient_sends_half_inputs_and_sees_the_datatypes(half: Half, datatype: str) -> None:
    if datatype not in half.models:
        pytest.skip("torch's CPU kernels take no float16 for this model")
    model = half.models[datatype]
    client = triton.InferenceServerClient(f"{half.url.removeprefix('http://')}/mlp-{datatype.lower()}")
    meta = client.get_model_metadata("mlp")
    assert meta["inputs"][0]["datatype"] == datatype
    assert meta["inputs"][0]["parameters"]["accepted_datatypes"] == [datatype, "FP32"]
    assert meta["outputs"][0]["datatype"] == datatype
    assert meta["outputs"][0]["parameters"]["output_datatypes"] == [datatype, "FP32"]
    x = model.sample(4, seed=3)["features"]
    want = model.reference({"features": x})["output"].astype(np.float64)

    tensor = triton.InferInput("features", [4, 256], datatype)
    tensor.set_data_from_numpy(x, binary_data=True)  # BF16: raw words, the only way tritonclient sends it
    got = client.infer("mlp", [tensor]).as_numpy("output")
    assert got.dtype == x.dtype and rel_err(got, want) <= HALF_REL

    as_fp32 = triton.InferInput("features", [4, 256], "FP32")  # cast at the entrance: the same values
    as_fp32.set_data_from_numpy(x.astype(np.float32), binary_data=False)
    answer = client.infer("mlp", [as_fp32], parameters={"output_datatype": "FP32"})
    assert answer.get_output("output")["datatype"] == "FP32"
    assert answer.as_numpy("output").dtype == np.float32 and rel_err(answer.as_numpy("output"), want) <= HALF_REL
    client.close()


def test_npy_and_arrow_carry_bf16_as_float32_or_words(half: Half) -> None:
    model = half.models["BF16"]
    url = f"{half.url}/mlp-bf16/v2/models/mlp/infer"
    x = model.sample(2, seed=5)["features"]
    want = model.reference({"features": x})["output"].astype(np.float64)
    buf = io.BytesIO()
    np.save(buf, x.astype(np.float32))
    r = httpx.post(url, content=buf.getvalue(), headers={"content-type": codecs.NPY}, timeout=60)
    assert r.status_code == 200, r.text
    got = np.load(io.BytesIO(r.content))
    assert got.dtype == np.float32 and rel_err(got, want) <= HALF_REL
    headers = {"content-type": codecs.NPY, codecs.OUTPUT_DATATYPE_HEADER: "BF16"}
    r = httpx.post(url, content=buf.getvalue(), headers=headers, timeout=60)
    words = np.load(io.BytesIO(r.content))
    assert words.dtype == np.uint16 and rel_err(words.view(ml_dtypes.bfloat16), want) <= HALF_REL
    arrow = codecs.encode_arrow({"features": x.view(np.uint16)})  # bf16 as its raw words
    r = httpx.post(url, content=arrow, headers={"content-type": codecs.ARROW}, timeout=60)
    assert r.status_code == 200, r.text
    assert codecs.read_arrow(r.content)["output"].dtype == np.float32
    r = httpx.post(url, json={"inputs": [], "parameters": {"output_datatype": "FP64"}}, timeout=60)
    assert r.status_code == 400 and "one of FP32, BF16" in r.json()["error"]


def test_compressed_bf16_model_serves(half: Half) -> None:
    client = triton.InferenceServerClient(f"{half.url.removeprefix('http://')}/t-bf16")
    tokens = triton.InferInput("tokens", [3, 8], "INT64")
    tokens.set_data_from_numpy(np.arange(24, dtype=np.int64).reshape(3, 8) % 100)
    out = client.infer("t", [tokens]).as_numpy("output")
    assert out.dtype == np.float32 and out.shape[0] == 3 and np.isfinite(out).all()  # the graph casts back
    client.close()
