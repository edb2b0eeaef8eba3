"""Stage engines: each engine's round trip (plan -> file -> load -> verify), the choice, and the fallbacks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from partitions.engine_choice import candidates, pick
from partitions.engines import (
    AUTO,
    CUDAGRAPHS,
    EAGER,
    INDUCTOR,
    ONNX_FORMAT,
    ONNXRUNTIME,
    TENSORRT,
    current_target,
    load,
    padded,
    stages_engine,
    unavailable,
)
from partitions.partition import PlanOptions, build_plan
from partitions.plan import PLAN_FILE
from partitions.runtime import StageRunner, load_pipeline, pick_device
from partitions.source import load_model
from partitions.storage import read_plan
from partitions.verify import ENGINE_TOLERANCE, verify

pytest.importorskip("onnxruntime")

MLP = ("demo-mlp", {"depth": 3, "width": 64, "features": 32})


def plan_on(engine: str, tmp_path, model: tuple[str, dict] = MLP, stages: int = 2, device: str | None = None):
    uri = str(tmp_path / "plan")
    opts = PlanOptions(stages=stages, repeats=2, warmup=1, refine=0, engine=engine, device=device)
    return build_plan(load_model(model[0], model[1], batch_size=4), uri, opts), uri


def test_pick_keeps_at_each_batch_what_was_faster() -> None:
    ms = {EAGER: [10.0, 20.0], ONNXRUNTIME: [7.0, 19.0], INDUCTOR: [6.0, 22.0]}
    notes: list[str] = []
    # onnxruntime: 0.7 and 0.95 of eager, faster at both; inductor: faster at batch 1 only (0.6, then 1.1).
    assert pick(AUTO, ms, notes, [1, 2]) == (ONNXRUNTIME, None)
    assert any(n.startswith("inductor not kept") for n in notes)
    # Every engine slower: eager stays.
    assert pick(AUTO, {EAGER: [10.0], ONNXRUNTIME: [10.5]}, [], [1]) == (EAGER, None)
    # An engine slower at the plan's batch (by 2% here) is kept for the batches where it is faster, eager above.
    notes = []
    assert pick(AUTO, {EAGER: [10.0, 10.0], ONNXRUNTIME: [5.0, 10.2]}, notes, [1, 8]) == (ONNXRUNTIME, 1)
    assert "onnxruntime kept up to batch 1: 0.50x at 1, 1.02x at 8 eager's time; eager above" in notes
    # ... the one fastest at batch 1 of those
    ms = {EAGER: [10.0, 10.0, 10.0], ONNXRUNTIME: [6.0, 9.0, 11.0], INDUCTOR: [5.0, 12.0, 12.0]}
    assert pick(AUTO, ms, [], [1, 4, 8]) == (INDUCTOR, 1)
    ms = {EAGER: [10.0, 10.0, 10.0], ONNXRUNTIME: [6.0, 9.0, 11.0]}
    assert pick(AUTO, ms, [], [1, 4, 8]) == (ONNXRUNTIME, 4)
    # A named engine that runs is kept, however it times, at every batch.
    assert pick(ONNXRUNTIME, {EAGER: [10.0], ONNXRUNTIME: [12.0]}, [], [1]) == (ONNXRUNTIME, None)


def test_candidates_are_what_is_installed() -> None:
    cpu = pick_device("cpu")
    assert candidates(EAGER, cpu) == ([], [])
    tried, skipped = candidates(AUTO, cpu)
    assert EAGER not in tried and ONNXRUNTIME in tried
    assert all(": " in s for s in skipped)
    # TensorRT and CUDA graphs run on a GPU only: on a CPU ``auto`` says so, and a plan asking for one keeps
    # eager, saying why.
    for engine in (TENSORRT, CUDAGRAPHS):
        assert engine not in tried and f"{engine} skipped: {engine} needs a CUDA device" in skipped
        assert unavailable(engine, cpu) == f"{engine} needs a CUDA device"
        assert candidates(engine, cpu) == ([], [f"{engine} skipped: {engine} needs a CUDA device"])


def test_padded_runs_each_batch_at_its_bucket_and_returns_its_own_rows() -> None:
    """The ``cudagraphs`` engine's batching: a batch of n runs at the smallest bucket >= n, padded with copies
    of its last row; the answer is the batch's own rows, as the program run on the batch alone gives them."""
    weights = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    program = lambda arrays: [arrays[0] @ weights, arrays[0].sum(axis=1)]  # two outputs, rows independent
    seen: list[tuple[str, int]] = []

    def on(name: str):
        def run(arrays):
            seen.append((name, len(arrays[0])))
            return program(arrays)

        return run

    run = padded(on("graphs"), (1, 2, 4, 8), above=on("eager"))
    for n in range(10):
        seen.clear()
        x = np.linspace(-1, 1, n * 3, dtype=np.float32).reshape(n, 3)
        got = run([x])
        for g, want in zip(got, program([x]), strict=True):
            np.testing.assert_array_equal(g, want)
        bucket = next((b for b in (1, 2, 4, 8) if b >= n), None)
        assert seen == ([("graphs", bucket)] if n and bucket else [("eager", n)])


def test_the_whole_model_baseline_runs_on_the_stages_engine() -> None:
    assert stages_engine([EAGER, TENSORRT, ONNXRUNTIME]) == TENSORRT
    assert stages_engine([EAGER, INDUCTOR]) == INDUCTOR
    assert stages_engine([EAGER, EAGER]) is None


def test_onnxruntime_runner_keeps_the_batch_dynamic_and_takes_read_only_arrays() -> None:
    from onnx import TensorProto, helper

    spec = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [spec("x")], [spec("y")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    run = load(ONNXRUNTIME, None, model.SerializeToString(), pick_device("cpu"), threads=1)
    for batch in (1, 5):
        x = np.linspace(-1, 1, batch * 3, dtype=np.float32).reshape(batch, 3)
        x.flags.writeable = False  # as a zero-copy view of Ray's object store arrives
        (y,) = run([x])
        np.testing.assert_array_equal(y, np.maximum(x, 0))


@pytest.mark.slow  # converts two stages to ONNX: seconds each
def test_onnxruntime_round_trip(tmp_path) -> None:
    plan, uri = plan_on(ONNXRUNTIME, tmp_path)
    assert plan.engine == ONNXRUNTIME
    for stage in plan.stages:
        assert stage.engine.name == ONNXRUNTIME, stage.engine.reason
        assert stage.engine.artifact is not None and stage.engine.artifact.format == ONNX_FORMAT
        assert (tmp_path / "plan" / stage.engine.artifact.path).stat().st_size == stage.engine.artifact.size_bytes
        assert stage.engine.target == current_target(pick_device("cpu"))
        assert stage.engine.batches == [1, 4] and set(stage.engine.ms) == {EAGER, ONNXRUNTIME}
    assert read_plan(uri) == plan
    assert [r.engine for r in load_pipeline(uri)] == [ONNXRUNTIME, ONNXRUNTIME]
    assert all(r.module is None for r in load_pipeline(uri))  # the exported program is not loaded beside it
    report = verify(uri)
    assert report.passed, report.to_json()
    assert report.tolerance == ENGINE_TOLERANCE and "engines" in report.tolerance_reason
    assert report.worst_stage in (0, 1) and max(report.stage_errors) <= ENGINE_TOLERANCE
    summary = plan.summary
    assert summary["gemm_gflops"] > 0 and len(summary["stage_gflops"]) == 2
    assert summary["engine_batches"] == [1, 4] and len(summary["engine_sum_ms"]) == 2
    # Kept for small batches only (``auto`` where eager wins at the plan's batch): batches of 1 run on ONNX
    # Runtime, larger ones on the exported program, both loaded; the outputs match eager's either way.
    path = tmp_path / "plan" / PLAN_FILE
    raw = json.loads(path.read_text())
    raw["stages"][0]["engine"]["up_to"] = 1
    path.write_text(json.dumps(raw))
    split, eager = StageRunner(uri, 0), StageRunner(uri, 0, engine=EAGER)
    assert split.engine == ONNXRUNTIME and split.module is not None and split.stage.engine.up_to == 1
    assert split.stage.run_ms == split.stage.engine.ms[EAGER][-1]  # batch 4 runs eager
    for batch in (1, 4):
        x = {k: v.numpy() for k, v in load_model(*MLP, batch_size=batch).example_inputs.items()}
        got, want = split(x), eager(x)
        for name in split.output_names:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)
    assert verify(uri).passed


@pytest.mark.slow  # torch.compile of each stage: seconds per stage and batch class
def test_inductor_round_trip(tmp_path) -> None:
    plan, uri = plan_on(INDUCTOR, tmp_path)
    assert [s.engine.name for s in plan.stages] == [INDUCTOR, INDUCTOR], [s.engine.reason for s in plan.stages]
    assert all(s.engine.artifact is None for s in plan.stages)  # compiled from the shard when loaded
    report = verify(uri)
    assert report.passed and report.engines == [INDUCTOR, INDUCTOR], report.to_json()


@pytest.mark.slow  # times each stage on every engine, inductor's compiles included
def test_auto_keeps_an_engine_per_stage_never_slower_than_eager(tmp_path) -> None:
    """At every timed batch, what runs a stage under ``auto`` was at least as fast as eager."""
    plan, uri = plan_on(AUTO, tmp_path)
    for stage in plan.stages:
        ms = stage.engine.ms
        assert stage.engine.name in ms and EAGER in ms
        assert all(stage.engine.ms_at(k) <= e for k, e in enumerate(ms[EAGER]))  # what runs each batch
    assert verify(uri).passed


@pytest.mark.slow  # converts stages to ONNX: seconds each
def test_a_stage_onnx_cannot_take_falls_back_with_one_line(tmp_path) -> None:
    plan, uri = plan_on(ONNXRUNTIME, tmp_path, ("tests.models:running_max", {}), stages=3)
    engines = [s.engine.name for s in plan.stages]
    assert EAGER in engines and ONNXRUNTIME in engines, [s.engine.reason for s in plan.stages]
    for stage in plan.stages:
        if stage.engine.name == EAGER:
            assert stage.engine.reason.startswith("onnxruntime failed: ") and "aten.cummax" in stage.engine.reason
            assert "\n" not in stage.engine.reason and "Traceback" not in stage.engine.reason
            assert stage.engine.artifact is None
    assert verify(uri).passed


@pytest.mark.slow  # plans a model that does not export (capture falls back), on onnxruntime
def test_a_stage_that_did_not_export_runs_eager(tmp_path) -> None:
    plan, uri = plan_on(ONNXRUNTIME, tmp_path, ("tests.models:gated_sequential", {}), stages=3)
    weights = [s for s in plan.stages if s.artifact.format == "module-weights"]
    assert weights and all(s.engine.name == EAGER and "did not export" in s.engine.reason for s in weights)
    assert verify(uri).passed


@pytest.mark.slow  # converts two stages to ONNX: seconds each
def test_another_target_and_plans_without_engines_run_eager(tmp_path, caplog) -> None:
    _, uri = plan_on(ONNXRUNTIME, tmp_path)
    path = tmp_path / "plan" / PLAN_FILE
    raw = json.loads(path.read_text())
    raw["stages"][0]["engine"]["target"] = "cpu riscv64 v"
    path.write_text(json.dumps(raw))
    runner = StageRunner(uri, 0)
    assert runner.engine == EAGER and "cpu riscv64 v" in runner.engine_note
    assert "running eager" in caplog.text
    assert StageRunner(uri, 1).engine == ONNXRUNTIME
    # A plan written before engines existed: no engine fields at all.
    del raw["engine"]
    for stage in raw["stages"]:
        del stage["engine"]
    path.write_text(json.dumps(raw))
    assert [r.engine for r in load_pipeline(uri)] == [EAGER, EAGER]
    assert verify(uri).tolerance == 1e-6


@pytest.mark.slow
@pytest.mark.gpu  # tensorrt: ONNX Runtime's TensorRT provider, onnxruntime-gpu and TensorRT (partserve[gpu])
@pytest.mark.parametrize("engine", [TENSORRT, CUDAGRAPHS])
def test_gpu_engine_round_trip(engine: str, tmp_path) -> None:
    why = unavailable(engine, pick_device("cuda"), converting=True)
    if why:
        pytest.skip(why)
    plan, uri = plan_on(engine, tmp_path, device="cuda")
    for stage in plan.stages:
        assert stage.engine.name == engine, stage.engine.reason
        assert stage.engine.target == current_target(pick_device("cuda"))
        if engine == TENSORRT:
            assert stage.engine.artifact is not None and stage.engine.artifact.format == ONNX_FORMAT
    assert [r.engine for r in load_pipeline(uri, "cuda")] == [engine, engine]
    report = verify(uri)  # batches 8, 1 and 5: at a bucket, and padded up to one
    assert report.passed and report.engines == [engine, engine], report.to_json()
