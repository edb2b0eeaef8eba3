"""The model-directory path end to end: ``partserve run DIR`` (a process, as a user starts it) on three small
directories saved with ``save_pretrained`` (tests/hf_dirs.py), each compared with the saved model run in
this process: a BERT classifier answering raw text over OIP JSON and KServe v1 ``:predict`` (labels,
largest probability difference), token ids past its vocabulary (status and message), a
sentence-transformers-style encoder over ``/v1/embeddings`` through the ``openai`` client (largest cosine
distance), and a ViT classifier from ``pixel_values`` (largest logit difference). Prints the figures as
JSON, and the console of the first run::

    PYTHONPATH=. python3 benchmarks/text_front_door.py [--root /tmp/front-door]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from serve_app.ports import free_port
from tests import hf_dirs

ROOT = Path("/tmp/front-door")
PORT = free_port()
URL = f"http://127.0.0.1:{PORT}"


def serve(model_dir: Path, name: str) -> tuple[subprocess.Popen, Path]:
    log = ROOT / f"run-{name}.txt"
    cmd = [sys.executable, "-m", "partserve", "run", str(model_dir), "--stages", "2", "--port", str(PORT)]
    cmd += ["--max-replicas", "1", "-O", f"seq_len={hf_dirs.SEQ_LEN}"] if name != "vit" else ["--max-replicas", "1"]
    env = {**os.environ, "PARTSERVE_CACHE": str(ROOT / "cache"), "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        if "ready" in log.read_text() and "Try:" in log.read_text():
            return proc, log
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(1)
    raise TimeoutError(log.read_text())


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    global ROOT
    parser = argparse.ArgumentParser(description=__doc__.split("::")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="model directories, plans and consoles")
    ROOT = parser.parse_args().root
    ROOT.mkdir(parents=True, exist_ok=True)
    figures: dict = {}
    cls_dir = ROOT / "bert-cls"
    st_dir = ROOT / "bert-st"
    vit_dir = ROOT / "vit"
    if not cls_dir.exists():
        hf_dirs.bert_classifier_dir(cls_dir)
        hf_dirs.bert_encoder_dir(st_dir)
        hf_dirs.vit_classifier_dir(vit_dir)

    # 1. classifier: OIP JSON text and KServe v1 :predict against the saved model in process
    proc, log = serve(cls_dir, "bert-cls")
    try:
        text = log.read_text()
        figures["console_lines_before_ready"] = text[: text.index("ready")].count("\n")
        figures["console"] = text
        want = hf_dirs.reference(cls_dir, hf_dirs.TEXTS)
        probs = np.exp(want["logits"]) / np.exp(want["logits"]).sum(-1, keepdims=True)
        labels = [hf_dirs.LABELS[i] for i in want["logits"].argmax(-1)]
        body = {"inputs": [{"name": "text", "shape": [4], "datatype": "BYTES", "data": hf_dirs.TEXTS}]}
        out = {
            o["name"]: o for o in httpx.post(f"{URL}/v2/models/bert-cls/infer", json=body, timeout=60).json()["outputs"]
        }
        got = np.array(out["probabilities"]["data"]).reshape(4, 3)
        figures["oip_labels_equal"] = out["label"]["data"] == labels
        figures["oip_max_abs_prob_diff"] = float(np.abs(got - probs).max())
        r = httpx.post(f"{URL}/v1/models/bert-cls:predict", json={"instances": hf_dirs.TEXTS}, timeout=60).json()
        figures["v1_labels_equal"] = [p["label"] for p in r["predictions"]] == labels
        figures["v1_max_abs_prob_diff"] = float(
            np.abs(np.array([p["probabilities"] for p in r["predictions"]]) - probs).max()
        )
        ids = [[0] * hf_dirs.SEQ_LEN]
        ids[0][2] = hf_dirs.VOCAB
        oov = {
            "inputs": [
                {"name": "input_ids", "shape": [1, 16], "datatype": "INT64", "data": ids[0]},
                {"name": "attention_mask", "shape": [1, 16], "datatype": "INT64", "data": [1] * 16},
            ]
        }
        r = httpx.post(f"{URL}/v2/models/bert-cls/infer", json=oov, timeout=60)
        figures["oov"] = [r.status_code, r.json()]
    finally:
        stop(proc)

    # 2. embeddings through the openai client
    proc, _ = serve(st_dir, "bert-st")
    try:
        ref = hf_dirs.reference(st_dir, hf_dirs.TEXTS)
        m = ref["attention_mask"][..., None]
        want = (ref["last_hidden_state"] * m).sum(1) / m.sum(1)
        want /= np.linalg.norm(want, axis=-1, keepdims=True)
        try:
            import openai

            client = openai.OpenAI(base_url=f"{URL}/v1", api_key="x")
            got = np.array([d.embedding for d in client.embeddings.create(model="bert-st", input=hf_dirs.TEXTS).data])
            figures["embedding_client"] = f"openai {openai.__version__}"
        except ImportError:
            r = httpx.post(
                f"{URL}/v1/embeddings", json={"model": "bert-st", "input": hf_dirs.TEXTS, "encoding_format": "base64"}
            )
            got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in r.json()["data"]])
            figures["embedding_client"] = "httpx"
        figures["max_cosine_distance"] = float((1 - (got * want).sum(-1)).max())
    finally:
        stop(proc)

    # 3. ViT from pixel_values
    proc, _ = serve(vit_dir, "vit")
    try:
        x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
        body = {
            "inputs": [
                {"name": "pixel_values", "shape": [2, 3, 32, 32], "datatype": "FP32", "data": x.ravel().tolist()}
            ]
        }
        r = httpx.post(f"{URL}/v2/models/vit/infer", json=body, timeout=60)
        out = {o["name"]: o for o in r.json()["outputs"]}
        import torch
        import transformers

        model = transformers.ViTForImageClassification.from_pretrained(vit_dir).eval()
        with torch.inference_mode():
            logits = model(pixel_values=torch.from_numpy(x)).logits.numpy()
        figures["vit_status"] = r.status_code
        figures["vit_max_abs_logit_diff"] = float(np.abs(np.array(out["logits"]["data"]).reshape(2, 2) - logits).max())
        figures["vit_labels"] = out["label"]["data"]
    finally:
        stop(proc)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
