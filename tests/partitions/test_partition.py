"""Plan, write and verify real models end to end (capture -> costs -> plan -> shards -> verify)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from partitions.inputs import random_inputs
from partitions.partition import PlanOptions, build_plan
from partitions.plan import PLAN_FILE, SCHEMA_VERSION
from partitions.runtime import StageRunner, load_pipeline, run_pipeline, stage_payload
from partitions.source import load_model
from partitions.storage import read_plan
from partitions.verify import verify
from tests import REPO

FAST = PlanOptions(repeats=2, warmup=1, refine=1)


def plan_of(spec: str, stages: int, tmp_path, **options):
    uri = str(tmp_path / "plan")
    opts = PlanOptions(stages=stages, repeats=FAST.repeats, warmup=FAST.warmup, refine=FAST.refine)
    return build_plan(load_model(spec, options, batch_size=4), uri, opts), uri


@pytest.mark.parametrize(
    ("spec", "stages", "options"),
    [
        ("demo-mlp", 3, {"depth": 3, "width": 64}),
        pytest.param("demo-transformer", 4, {"layers": 4, "width": 64, "seq_len": 16}, marks=pytest.mark.slow),
        ("demo-resnet", 4, {"blocks": 1, "width": 8, "image_size": 16}),
        ("tests.models:two_inputs", 2, {}),
    ],
)
def test_plan_verifies_against_the_model(spec: str, stages: int, options: dict, tmp_path) -> None:
    plan, uri = plan_of(spec, stages, tmp_path, **options)
    assert plan.model["capture"] == "export"
    assert len(plan.stages) == stages
    report = verify(uri)
    assert report.passed, report.to_json()
    assert report.max_rel_error <= 1e-6
    assert {c.batch for c in report.cases} >= {1, 4, 5}  # the dynamic batch works


def test_plan_json_is_versioned_and_complete(tmp_path) -> None:
    plan, uri = plan_of("demo-transformer", 2, tmp_path, layers=2, width=32, seq_len=8)
    raw = json.loads((tmp_path / "plan" / PLAN_FILE).read_text())
    assert raw["schema_version"] == SCHEMA_VERSION
    assert raw["input_limits"] == {"tokens": [0, 1000]}  # the embedding's rows (vocab 1000), not the example's ids
    assert raw["processing"] is None
    for key in ("model", "inputs", "outputs", "nodes", "stages", "summary"):
        assert key in raw
    node = raw["nodes"][0]
    assert set(node) >= {"params", "param_bytes", "flops", "activation_bytes", "latency_ms"}
    assert sum(n["flops"] for n in raw["nodes"]) > 0
    stage = raw["stages"][0]
    assert set(stage) >= {"inputs", "computed", "artifact", "cost_ms", "measured_ms", "memory_bytes", "gpu_fraction"}
    assert stage["inputs"][0] == {"name": "tokens", "shape": [-1, 8], "dtype": "int64"}
    # Shards hold exactly the model's weights, split: nothing duplicated, nothing lost.
    assert plan.summary["shard_weight_bytes"] == plan.summary["weight_bytes"]
    assert read_plan(uri) == plan


def test_skip_connections_are_carried_across_cuts(tmp_path) -> None:
    # One stage per node of a residual network: some cut must fall inside a block, with its skip crossing.
    source = load_model("demo-resnet", {"blocks": 1, "width": 4, "image_size": 8}, batch_size=2)
    uri = str(tmp_path / "plan")
    plan = build_plan(source, uri, PlanOptions(stages=12, repeats=1, warmup=0, refine=0))
    widths = [len(s.inputs) + len(s.carried) for s in plan.stages[1:]]
    assert max(widths) >= 2, "a residual must travel beside the main path"
    assert verify(uri).passed


def test_fallback_to_module_boundaries(tmp_path) -> None:
    plan, uri = plan_of("tests.models:gated_sequential", 3, tmp_path)
    assert plan.model["capture"] == "modules"
    assert "torch.export failed" in plan.model["capture_reason"]
    formats = {s.artifact.format for s in plan.stages}
    assert "module-weights" in formats  # the stage holding the gate cannot export; its weights still ship
    assert verify(uri).passed


def test_a_replica_loads_only_its_stage(tmp_path) -> None:
    plan, uri = plan_of("demo-mlp", 3, tmp_path, depth=3, width=64)
    runner = StageRunner(uri, 1)
    loaded = sum(t.numel() for t in runner.module.state_dict().values())
    assert loaded == plan.stages[1].params
    assert loaded < plan.summary["params"]


def test_file_uri_and_dynamic_batch(tmp_path) -> None:
    plan, _ = plan_of("demo-mlp", 2, tmp_path, depth=2, width=32)
    uri = (tmp_path / "plan").as_uri()  # file:// through pyarrow.fs
    runners = load_pipeline(uri)
    inputs = random_inputs(plan.inputs, 7, 0, plan.input_ranges)
    out = run_pipeline(runners, inputs)
    assert out["output"].shape == (7, 10)
    assert np.isfinite(out["output"]).all()


@pytest.mark.slow  # imports transformers, exports a BERT
def test_bert_from_config_with_attention_mask(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    model_dir = tmp_path / "bert"
    transformers.BertConfig(
        vocab_size=500, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(model_dir)
    uri = str(tmp_path / "plan")
    opts = PlanOptions(stages=3, repeats=1, warmup=1, refine=1)
    plan = build_plan(load_model(str(model_dir), {"seq_len": 16}, batch_size=4), uri, opts)
    assert [t.name for t in plan.inputs] == ["input_ids", "attention_mask"]
    assert len(plan.stages) == 3
    report = verify(uri)
    assert report.passed, report.to_json()


@pytest.mark.slow  # a 12-layer, 512-wide transformer planned in a fresh process
def test_plan_peak_memory_below_twice_the_weights() -> None:
    # Measured in a fresh process: peak resident memory over a warmed-up baseline, model included.
    import subprocess
    import sys

    root = REPO
    result = subprocess.run(
        [sys.executable, "benchmarks/plan_memory.py", "--layers", "12", "--width", "512", "--repeats", "1"],
        capture_output=True,
        text=True,
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        timeout=600,
        check=True,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["shard_weight_bytes"] == figures["weight_bytes"]
    assert figures["peak_over_weights"] < 2.0, figures


def test_two_tower_latency_plan_runs_the_towers_in_parallel(tmp_path) -> None:
    uri = str(tmp_path / "plan")
    source = load_model("demo-two-tower", {"width": 256, "depth": 3}, batch_size=8)
    opts = PlanOptions(stages=3, objective="latency", hop_ms=0.0, repeats=2, warmup=1, refine=1)
    plan = build_plan(source, uri, opts)
    assert plan.summary["shape"] == "dag"
    assert [s.after for s in plan.stages] == [[], [], [0, 1]]  # towers from the inputs, joined by the head
    assert {t.name for t in plan.stages[0].inputs} | {t.name for t in plan.stages[1].inputs} == {"query", "item"}
    # Each tower is sent only the input it reads, not its sibling's.
    assert sorted([plan.stages[0].reads, plan.stages[1].reads]) == [["item"], ["query"]]
    inputs = {name: np.zeros(1) for name in ("query", "item")}
    assert stage_payload([], {}, inputs, plan.stages[0].reads).keys() == set(plan.stages[0].reads)
    assert plan.summary["latency_ms"] < plan.summary["chain_latency_ms"]
    assert verify(uri).passed


@pytest.mark.slow  # exports a transformers CLIP
def test_clip_towers_branch_plan_has_no_empty_stage(tmp_path) -> None:
    """Export keeps runtime checks and, through them, values nothing reads (CLIP's logits, one branch of
    its pooling); cut for latency those became a stage with no outputs, which torch.export cannot save."""
    uri = str(tmp_path / "plan")
    source = load_model("tests.models:clip_towers", {}, batch_size=4)
    plan = build_plan(source, uri, PlanOptions(stages=3, objective="latency", repeats=1, warmup=1, refine=1))
    assert plan.summary["shape"] == "dag"
    assert all(s.computed for s in plan.stages)
    assert len(plan.outputs) == 2
    report = verify(uri)
    assert report.passed, report


def test_inception_branches_verify(tmp_path) -> None:
    uri = str(tmp_path / "plan")
    source = load_model("demo-inception", {"blocks": 1, "width": 4, "image_size": 8}, batch_size=4)
    plan = build_plan(source, uri, PlanOptions(stages=6, objective="latency", hop_ms=0.0, repeats=1, refine=0))
    assert not plan.is_chain
    assert max(len(s.after) for s in plan.stages) >= 2  # a join stage merges branch outputs
    report = verify(uri)
    assert report.passed and report.max_rel_error <= 1e-6


def test_no_branches_gives_a_chain(tmp_path) -> None:
    uri = str(tmp_path / "plan")
    source = load_model("demo-two-tower", {"width": 64, "depth": 2}, batch_size=4)
    plan = build_plan(source, uri, PlanOptions(stages=3, branches=False, repeats=1, refine=0))
    assert plan.is_chain and plan.summary["shape"] == "chain"
    assert verify(uri).passed
