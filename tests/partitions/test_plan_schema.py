"""plan.json versions: older plans load with defaults for later fields, newer ones fail naming both."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from partitions import plan as plan_module
from partitions.errors import ArtifactError
from partitions.plan import OLDEST_VERSION, SCHEMA_VERSION, Artifact, Plan, Processing, ProcessingFile, Stage
from partitions.types import TensorSpec

IDS = TensorSpec("input_ids", (-1, 8), "int64")
LOGITS = TensorSpec("logits", (-1, 3), "float32")


def small_plan() -> Plan:
    stage = Stage(
        index=0,
        node_range=(0, 1),
        inputs=[IDS],
        computed=[LOGITS],
        carried=[],
        artifact=Artifact("stage-000.pt2", "exported-program", "ab" * 32, 10),
        params=1,
        weight_bytes=4,
        memory_bytes=8,
        compute_ms=1.0,
        transfer_bytes=0,
        cost_ms=1.0,
        measured_ms=1.0,
        gpu_fraction=1.0,
    )
    return Plan(
        model={"spec": "m", "options": {}},
        device="cpu",
        batch_size=4,
        bandwidth_bytes_per_ms=1e6,
        max_stage_bytes=None,
        inputs=[IDS],
        outputs=[LOGITS],
        output_values=["logits"],
        input_ranges={"input_ids": (0, 90)},
        nodes=[{"module": "m"}],
        stages=[stage],
        summary={},
    )


def test_schema_version_is_two_and_written_first() -> None:
    assert (OLDEST_VERSION, SCHEMA_VERSION) == (1, 2)
    assert next(iter(json.loads(small_plan().to_json()))) == "schema_version"


def test_a_version_1_plan_loads_with_defaults_for_later_fields() -> None:
    d = json.loads(small_plan().to_json())
    for key in ("input_limits", "processing", "objective"):
        d.pop(key)
    for stage in d["stages"]:
        stage.pop("after")
    d["schema_version"] = 1
    plan = Plan.from_json(json.dumps(d))
    assert plan.schema_version == 1
    assert plan.input_limits == {} and plan.processing is None and plan.objective == "throughput"
    assert plan.stages[0].after == []


def test_a_newer_plan_fails_naming_both_versions() -> None:
    d = json.loads(small_plan().to_json())
    d["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ArtifactError, match=f"schema version {SCHEMA_VERSION + 1}, newer .*1 to {SCHEMA_VERSION}"):
        Plan.from_json(json.dumps(d))
    for bad in (0, "2", None):
        d["schema_version"] = bad
        with pytest.raises(ArtifactError, match="schema version"):
            Plan.from_json(json.dumps(d))


def test_fields_this_build_does_not_know_are_ignored() -> None:
    d = json.loads(small_plan().to_json())
    d["placement_hints"] = {"kind": "rack"}  # an optional field a later build of version 2 adds
    d["stages"][0]["precision"] = "fp16"
    assert Plan.from_json(json.dumps(d)) == small_plan()


def test_limits_and_processing_round_trip() -> None:
    processing = Processing(
        task="classification",
        files=[ProcessingFile("processing/tokenizer.json", "cd" * 32, 100)],
        tokenizer=True,
        max_length=8,
        labels=["no", "maybe", "yes"],
    )
    plan = replace(small_plan(), input_limits={"input_ids": (0, 90)}, processing=processing)
    assert Plan.from_json(plan.to_json()) == plan


def test_a_plan_that_is_not_a_plan_is_an_artifact_error() -> None:
    with pytest.raises(ArtifactError, match="not a JSON object"):
        Plan.from_json("[1]")
    with pytest.raises(ArtifactError, match="does not hold a plan"):
        Plan.from_json(json.dumps({"schema_version": SCHEMA_VERSION, "inputs": []}))


def test_run_plan_cache_is_keyed_on_the_schema_version(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from partserve.cli.serving import plan_key

    key = plan_key("demo-mlp", 2, 8)
    assert plan_key("demo-mlp", 2, 8) == key
    monkeypatch.setattr(plan_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    assert plan_key("demo-mlp", 2, 8) != key
    monkeypatch.undo()
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    before = plan_key(str(model_dir), 2, 8)
    (model_dir / "model.safetensors").write_bytes(b"new weights")
    assert plan_key(str(model_dir), 2, 8) != before  # a model saved again is planned again


def test_limits_and_processing_must_fit_the_model() -> None:
    plan = replace(
        small_plan(),
        input_limits={"tokens": (0, 9)},
        processing=Processing(task="classification", logits_output="scores"),
    )
    problems = " ".join(plan.problems())
    assert "input_limits name ['tokens']" in problems and "reads output 'scores'" in problems
    with pytest.raises(ArtifactError, match="inconsistent"):
        Plan.from_json(plan.to_json())
