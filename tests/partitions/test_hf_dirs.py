"""Hugging Face model directories as saved: the head config.json names, the main input, the saved weights,
embedding limits and the processing (tokenizer, labels, pooling) copied into the plan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from partitions.errors import ArtifactError
from partitions.partition import PlanOptions, build_plan
from partitions.processing import Processor
from partitions.runtime import load_pipeline, run_pipeline
from partitions.source import load_model
from partitions.storage import read_plan
from partitions.verify import verify
from tests import hf_dirs

pytestmark = pytest.mark.slow  # imports transformers and exports BERT and ViT models
pytest.importorskip("transformers")

OPTS = PlanOptions(stages=3, repeats=1, warmup=1, refine=0)


def plan_dir(model_dir: Path, tmp_path: Path, **options: object) -> str:
    uri = str(tmp_path / "plan")
    build_plan(load_model(str(model_dir), dict(options), batch_size=4), uri, OPTS)
    return uri


def served(uri: str, texts: list[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The entrance's path in this process: tokenize, run the stages, add the answers."""
    plan = read_plan(uri)
    assert plan.processing is not None
    processor = Processor(uri, plan.processing, plan.inputs, plan.outputs)
    tokens = processor.tokenize(texts)
    return tokens, processor.finish(run_pipeline(load_pipeline(uri), tokens), tokens)


def test_classifier_dir_plans_with_its_head_and_answers_like_the_saved_model(tmp_path: Path) -> None:
    model_dir = hf_dirs.bert_classifier_dir(tmp_path / "bert-cls")
    uri = plan_dir(model_dir, tmp_path, seq_len=hf_dirs.SEQ_LEN)
    plan = read_plan(uri)
    assert [t.name for t in plan.inputs] == ["input_ids", "attention_mask"]
    assert [(t.name, t.shape) for t in plan.outputs] == [("logits", (-1, 3))]  # the head, not AutoModel's states
    assert plan.input_limits == {"input_ids": (0, hf_dirs.VOCAB)}  # the embedding's rows, not the example's ids
    assert "attention_mask" not in plan.input_limits
    p = plan.processing
    assert p is not None and p.task == "classification" and p.tokenizer and p.max_length == hf_dirs.SEQ_LEN
    assert p.labels == ["negative", "neutral", "positive"]
    assert {f.path for f in p.files} >= {"processing/tokenizer.json", "processing/config.json"}
    assert verify(uri).passed

    tokens, answers = served(uri, hf_dirs.TEXTS)
    want = hf_dirs.reference(model_dir, hf_dirs.TEXTS)
    np.testing.assert_array_equal(tokens["input_ids"], want["input_ids"])
    np.testing.assert_allclose(answers["logits"], want["logits"], rtol=1e-5, atol=1e-6)
    probabilities = np.exp(want["logits"]) / np.exp(want["logits"]).sum(-1, keepdims=True)
    np.testing.assert_allclose(answers["probabilities"], probabilities, rtol=1e-5, atol=1e-6)
    assert answers["label"].tolist() == [p.labels[i] for i in want["logits"].argmax(-1)]


def test_processing_files_are_checked_against_their_hashes(tmp_path: Path) -> None:
    uri = plan_dir(hf_dirs.bert_classifier_dir(tmp_path / "bert-cls"), tmp_path, seq_len=8)
    (Path(uri) / "processing" / "tokenizer.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"processing/tokenizer\.json has sha256"):
        served(uri, ["good"])


def test_sentence_transformers_dir_pools_as_its_config_says(tmp_path: Path) -> None:
    model_dir = hf_dirs.bert_encoder_dir(tmp_path / "st", pooling="cls")
    uri = plan_dir(model_dir, tmp_path, seq_len=hf_dirs.SEQ_LEN)
    p = read_plan(uri).processing
    assert p is not None and p.task == "embedding" and p.pooling == "cls"
    assert "processing/1_Pooling/config.json" in {f.path for f in p.files}
    _, answers = served(uri, hf_dirs.TEXTS)
    want = hf_dirs.reference(model_dir, hf_dirs.TEXTS)["last_hidden_state"][:, 0]
    want = want / np.linalg.norm(want, axis=-1, keepdims=True)
    cosine = (answers["embedding"] * want).sum(-1)
    assert np.all(1 - cosine < 1e-5), cosine
    np.testing.assert_allclose(np.linalg.norm(answers["embedding"], axis=-1), 1.0, rtol=1e-6)


def test_vit_dir_plans_from_pixel_values_at_the_preprocessor_size(tmp_path: Path) -> None:
    model_dir = hf_dirs.vit_classifier_dir(tmp_path / "vit", image_size=32)
    uri = plan_dir(model_dir, tmp_path)
    plan = read_plan(uri)
    assert [(t.name, t.shape, t.dtype) for t in plan.inputs] == [("pixel_values", (-1, 3, 32, 32), "float32")]
    assert plan.input_limits == {}
    assert plan.processing is not None and plan.processing.task == "classification"
    assert not plan.processing.tokenizer and plan.processing.labels == ["cat", "dog"]
    assert verify(uri).passed


def test_unknown_architecture_falls_back_to_automodel_with_a_note(tmp_path: Path) -> None:
    model_dir = hf_dirs.bert_classifier_dir(tmp_path / "bert-cls")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchBertHead"]}))
    source = load_model(str(model_dir), {"seq_len": 8}, batch_size=2)
    assert type(source.module).__name__ == "BertModel"
    assert any("AutoModel" in note and "NoSuchBertHead" in note for note in source.notes)
