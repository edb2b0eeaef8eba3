"""Hugging Face directories served with their processing: raw text in, labels, probabilities and embeddings
out, over OIP (JSON and binary BYTES), KServe v1 ``:predict`` and OpenAI ``/v1/embeddings``; token ids
outside the vocabulary answer 400."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from partitions.partition import PlanOptions, build_plan
from partitions.source import load_model
from serve_app.app import AppArgs
from tests import hf_dirs
from tests.serve_session import serve_apps

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")

CLS, ST = "cls", "st"
"""The applications: a BERT classifier and a sentence-transformers-style encoder, each at ``/{name}``."""


@dataclass
class Served:
    url: str
    classifier_dir: Path
    encoder_dir: Path


@pytest.fixture(scope="module")
def served(serve_instance: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("text")
    dirs = {CLS: hf_dirs.bert_classifier_dir(root / "bert-cls"), ST: hf_dirs.bert_encoder_dir(root / "bert-st")}
    apps = {}
    for name, model_dir in dirs.items():
        uri = str(root / f"plan-{name}")
        source = load_model(str(model_dir), {"seq_len": hf_dirs.SEQ_LEN}, batch_size=4)
        build_plan(source, uri, PlanOptions(stages=2, repeats=1, warmup=1, refine=0))
        apps[name] = AppArgs(plan_uri=uri, model_name=name, num_cpus=0, batch_wait_timeout_s=0.002)
    with serve_apps(serve_instance, apps) as url:
        yield Served(url, dirs[CLS], dirs[ST])


def text_body(texts: list[str]) -> dict:
    return {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}


def test_classifier_answers_raw_text_like_the_saved_model(served: Served) -> None:
    want = hf_dirs.reference(served.classifier_dir, hf_dirs.TEXTS)
    probabilities = np.exp(want["logits"]) / np.exp(want["logits"]).sum(-1, keepdims=True)
    labels = [hf_dirs.LABELS[i] for i in want["logits"].argmax(-1)]
    r = httpx.post(f"{served.url}/{CLS}/v2/models/{CLS}/infer", json=text_body(hf_dirs.TEXTS), timeout=60)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["label"]["datatype"] == "BYTES" and outputs["label"]["data"] == labels
    got = np.array(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"])
    np.testing.assert_allclose(got, probabilities, rtol=1e-5, atol=1e-6)

    r = httpx.post(f"{served.url}/{CLS}/v1/models/{CLS}:predict", json={"instances": hf_dirs.TEXTS}, timeout=60)
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert [p["label"] for p in predictions] == labels
    np.testing.assert_allclose([p["probabilities"] for p in predictions], probabilities, rtol=1e-5, atol=1e-6)

    meta = httpx.get(f"{served.url}/{CLS}/v2/models/{CLS}", timeout=30).json()
    assert {"name": "text", "datatype": "BYTES", "shape": [-1]} in meta["inputs"]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities", "label"]


def test_binary_bytes_from_the_triton_client(served: Served) -> None:
    client = triton.InferenceServerClient(served.url.removeprefix("http://") + f"/{CLS}")
    text = triton.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in hf_dirs.TEXTS[:2]], dtype=object), binary_data=True)
    result = client.infer(CLS, [text], outputs=[triton.InferRequestedOutput("label", binary_data=True)])
    want = hf_dirs.reference(served.classifier_dir, hf_dirs.TEXTS[:2])["logits"].argmax(-1)
    assert result.as_numpy("label").tolist() == [hf_dirs.LABELS[i].encode() for i in want]


def test_embeddings_match_the_reference_for_the_openai_request(served: Served) -> None:
    hidden = hf_dirs.reference(served.encoder_dir, hf_dirs.TEXTS)
    mask = hidden["attention_mask"][..., None]
    want = (hidden["last_hidden_state"] * mask).sum(1) / mask.sum(1)
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    base = f"{served.url}/{ST}/v1"
    vectors = {}
    for fmt in ("float", "base64"):
        body = {"model": ST, "input": hf_dirs.TEXTS, "encoding_format": fmt}
        r = httpx.post(f"{base}/embeddings", json=body, timeout=60)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["object"] == "list" and doc["model"] == ST
        assert doc["usage"]["prompt_tokens"] == int(hidden["attention_mask"].sum())
        data = sorted(doc["data"], key=lambda d: d["index"])
        if fmt == "base64":
            vectors[fmt] = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in data])
        else:
            vectors[fmt] = np.array([d["embedding"] for d in data], np.float32)
    np.testing.assert_array_equal(vectors["float"], vectors["base64"])
    cosine_distance = 1 - (vectors["float"] * want).sum(-1)
    assert np.all(cosine_distance < 1e-5), cosine_distance

    try:
        import openai
    except ImportError:
        return  # the same request shapes, sent above with httpx
    client = openai.OpenAI(base_url=base, api_key="unused")
    answer = client.embeddings.create(model=ST, input=hf_dirs.TEXTS)  # base64 on the wire, decoded by the client
    np.testing.assert_allclose([d.embedding for d in answer.data], vectors["float"], rtol=1e-6, atol=1e-7)


def test_out_of_vocabulary_ids_answer_400_naming_the_range(served: Served) -> None:
    ids = np.zeros((1, hf_dirs.SEQ_LEN), np.int64)
    ids[0, 3] = hf_dirs.VOCAB  # one past the last row
    body = {
        "inputs": [
            {"name": "input_ids", "shape": list(ids.shape), "datatype": "INT64", "data": ids.ravel().tolist()},
            {"name": "attention_mask", "shape": list(ids.shape), "datatype": "INT64", "data": [1] * ids.size},
        ]
    }
    r = httpx.post(f"{served.url}/{CLS}/v2/models/{CLS}/infer", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert f"[0, {hf_dirs.VOCAB})" in r.json()["error"]
    ids[0, 3] = hf_dirs.VOCAB - 1  # the last row is valid, though no word of the tokenizer maps to it
    body["inputs"][0]["data"] = ids.ravel().tolist()
    assert httpx.post(f"{served.url}/{CLS}/v2/models/{CLS}/infer", json=body, timeout=60).status_code == 200


def test_text_routes_refuse_what_they_cannot_answer(served: Served) -> None:
    cls_url = f"{served.url}/{CLS}"
    r = httpx.post(f"{cls_url}/v1/embeddings", json={"model": CLS, "input": "x"}, timeout=30)
    assert r.status_code == 404 and ":predict" in r.json()["error"]
    r = httpx.post(f"{cls_url}/v1/models/{CLS}:predict", json={"instances": [1, 2]}, timeout=30)
    assert r.status_code == 400
    r = httpx.post(f"{cls_url}/v1/models/{CLS}:predict", content=b"{not json", timeout=30)
    assert r.status_code == 400
    bad = text_body(["ok"])
    bad["inputs"][0]["data"] = [json.dumps({"not": "text"}), "two"]  # shape [1] but two strings
    assert httpx.post(f"{cls_url}/v2/models/{CLS}/infer", json=bad, timeout=30).status_code == 400
