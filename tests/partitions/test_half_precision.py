"""Plans in half precision (``--dtype``): weights, activations, costs and shards in the dtype; verify against the
float32 model and against the model cast the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from partitions.compress.api import calibration_inputs, compress
from partitions.dtypes import BFLOAT16
from partitions.errors import PlanError
from partitions.partition import PlanOptions, build_plan
from partitions.plan import PLAN_FILE, Plan
from partitions.runtime import load_pipeline, run_pipeline
from partitions.source import load_model
from partitions.storage import read_plan
from partitions.verify import HALF_TOLERANCE, SAME_DTYPE_TOLERANCE, verify
from tests import REPO

FAST = {"repeats": 1, "warmup": 1, "refine": 0}
MLP = ("demo-mlp", {"depth": 3, "width": 64})
TRANSFORMER = ("demo-transformer", {"layers": 2, "width": 32, "seq_len": 8})


def plan_in(model: tuple[str, dict], dtype: str | None, uri: str, stages: int = 2) -> Plan:
    spec, options = model
    return build_plan(load_model(spec, options, batch_size=4), uri, PlanOptions(stages=stages, dtype=dtype, **FAST))


@pytest.mark.parametrize(
    "model", [MLP, pytest.param(TRANSFORMER, marks=pytest.mark.slow)], ids=["mlp", "transformer"]
)  # the transformer: two plans and a verify, ~15 s
def test_bf16_plan_halves_the_weights_and_verifies(model: tuple[str, dict], tmp_path) -> None:
    fp32 = plan_in(model, None, str(tmp_path / "fp32"))
    uri = str(tmp_path / "bf16")
    bf16 = plan_in(model, "bfloat16", uri)
    assert (fp32.dtype, bf16.dtype) == ("float32", "bfloat16")
    assert bf16.summary["weight_bytes"] * 2 == fp32.summary["weight_bytes"]
    assert bf16.summary["shard_weight_bytes"] == bf16.summary["weight_bytes"]
    assert sum(s.memory_bytes for s in bf16.stages) < sum(s.memory_bytes for s in fp32.stages)  # caps count it
    floats = [t for s in bf16.stages for t in s.computed if t.dtype != "int64"]
    assert floats and all(t.dtype == "bfloat16" for t in floats)  # activations cross the cuts in bf16
    raw = json.loads((tmp_path / "bf16" / PLAN_FILE).read_text())
    assert raw["dtype"] == "bfloat16" and read_plan(uri) == bf16

    report = verify(uri)
    assert report.passed, report.to_json()
    assert report.tolerance == HALF_TOLERANCE["bfloat16"]
    assert report.same_dtype_tolerance == SAME_DTYPE_TOLERANCE["bfloat16"]
    assert report.same_dtype_rel_error is not None and report.same_dtype_rel_error <= report.max_rel_error
    assert 0 < report.max_rel_error <= HALF_TOLERANCE["bfloat16"]  # it is bf16, not float32 in disguise
    assert len(report.stage_errors) == 2 and report.worst_stage in (0, 1)
    out = run_pipeline(load_pipeline(uri), {t.name: v for t, v in zip(bf16.inputs, _inputs(bf16))})
    assert next(iter(out.values())).dtype == BFLOAT16


def _inputs(plan: Plan) -> list[np.ndarray]:
    from partitions.inputs import random_inputs

    return list(random_inputs(plan.inputs, 3, 0, plan.input_ranges).values())


def test_fp32_plan_is_unchanged_by_default(tmp_path) -> None:
    plan = plan_in(MLP, None, str(tmp_path / "p"))
    report = verify(str(tmp_path / "p"))
    assert plan.dtype == "float32" and report.tolerance == 1e-6
    assert report.same_dtype_cases == [] and report.stage_errors == []


def test_fp16_on_cpu_plans_or_names_cuda(tmp_path) -> None:
    uri = str(tmp_path / "fp16")
    try:
        plan = plan_in(MLP, "float16", uri)
    except PlanError as exc:
        assert "--device cuda" in exc.fix
        return
    assert plan.dtype == "float16"
    assert verify(uri).passed


@pytest.mark.slow  # compresses (timing both models), plans and verifies
def test_compressed_bf16_model_plans_and_verifies(tmp_path) -> None:
    source = load_model(*TRANSFORMER, batch_size=4)
    compress(source, calibration_inputs(source, None, 8, 0), quantization="bf16", repeats=1, output=str(tmp_path / "c"))
    plan = plan_in((str(tmp_path / "c"), {}), None, str(tmp_path / "plan"))
    assert plan.dtype == "bfloat16"  # the model's own: its weights are bf16
    assert [t.dtype for t in plan.inputs] == ["int64"] and [t.dtype for t in plan.outputs] == ["float32"]
    assert any(t.dtype == "bfloat16" for s in plan.stages for t in s.computed)
    report = verify(str(tmp_path / "plan"))
    assert report.passed and report.tolerance == SAME_DTYPE_TOLERANCE["bfloat16"], report.to_json()


@pytest.mark.slow  # imports transformers, exports a Llama
def test_llama_causal_lm_in_bf16(tmp_path) -> None:
    pytest.importorskip("transformers")
    model = ("tests.models:tiny_llama", {})
    fp32 = plan_in(model, None, str(tmp_path / "fp32"), stages=3)
    bf16 = plan_in(model, "bfloat16", str(tmp_path / "bf16"), stages=3)
    assert bf16.summary["weight_bytes"] * 2 == fp32.summary["weight_bytes"]
    report = verify(str(tmp_path / "bf16"))
    assert report.passed, report.to_json()


@pytest.mark.slow  # two CLI processes that plan and verify
def test_cli_plans_and_verifies_bf16_in_a_fresh_process(tmp_path) -> None:
    env = {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    uri = str(tmp_path / "plan")
    args = ["plan", "demo-transformer", "--layers", "2", "--width", "32", "--seq-len", "8", "--stages", "2"]
    run = [sys.executable, "-m", "partserve"]
    planned = subprocess.run(
        [*run, *args, "--dtype", "bfloat16", "--repeats", "1", "-o", uri, "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert planned.returncode == 0, planned.stderr
    assert json.loads(planned.stdout)["dtype"] == "bfloat16"
    verified = subprocess.run(
        [*run, "verify", uri, "--json"], capture_output=True, text=True, env=env, cwd=REPO, timeout=600
    )
    assert verified.returncode == 0, verified.stderr
    report = json.loads(verified.stdout)
    assert report["passed"] and report["dtype"] == "bfloat16" and report["worst_stage"] is not None
