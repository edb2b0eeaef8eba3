"""cluster.batch.steps and prepare: columns checked against the plan before anything runs; a stage actor
rejects only the rows its stage raises on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.batch import prepare
from cluster.batch.files import BatchInputError, list_inputs
from cluster.batch.steps import Layout, StageStep, resolve_layout
from tests.serve_fixtures import PlannedModel


def test_layout_checks_columns_before_anything_runs(tmp_path: Path, mlp: PlannedModel) -> None:
    spec = mlp.plan.inputs[0]
    x = np.zeros((2, spec.shape[1]), np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), spec.shape[1])
    pq.write_table(pa.table({"id": [1, 2], "feat": column, "note": ["a", "b"]}), tmp_path / "a.parquet")
    _, files = list_inputs(str(tmp_path))
    with pytest.raises(BatchInputError, match="--map"):
        resolve_layout(mlp.plan, files, {}, None)
    with pytest.raises(BatchInputError, match="model's inputs"):
        resolve_layout(mlp.plan, files, {"feat": "nope"}, None)
    layout = resolve_layout(mlp.plan, files, {"feat": spec.name}, None)
    assert layout.keys == ["id", "note"] and layout.columns == {spec.name: "feat"}
    assert layout.keep_after[-1] == sorted(mlp.plan.output_values)
    pq.write_table(pa.table({"_row": [1, 2], "feat": column}), tmp_path / "clash.parquet")
    with pytest.raises(BatchInputError, match="clash"):
        resolve_layout(mlp.plan, list_inputs(str(tmp_path / "clash.parquet"))[1], {"feat": spec.name}, None)
    (tmp_path / "clash.parquet").unlink()
    with pytest.raises(BatchInputError, match="holds string"):
        resolve_layout(mlp.plan, files, {"note": spec.name}, None)
    job = prepare(mlp.uri, str(tmp_path), mapping={"feat": spec.name}, keys=["id"])
    assert job.layout.keys == ["id"] and job.pools == [] and len(job.files) == 1


def test_stage_step_rejects_only_the_rows_that_fail(mlp: PlannedModel) -> None:
    """A stage that raises on a batch is retried on halves until the rows that raise alone are found."""
    spec = mlp.plan.inputs[0]
    layout = Layout(mlp.plan, ["id"], {spec.name: spec.name})
    step = StageStep(mlp.uri, 0, layout.keys, layout.columns, 1, "cpu", final=False)
    x = mlp.sample(6)[spec.name]
    good = step._run({spec.name: x})
    calls = []
    run = step._run

    def flaky(payload):  # row 4 "does not fit" the model
        calls.append(len(next(iter(payload.values()))))
        if any(np.array_equal(row, x[4]) for row in next(iter(payload.values()))):
            raise ValueError("bad row")
        return run(payload)

    step._run = flaky  # type: ignore[method-assign]
    reasons: list[str | None] = [None] * 6
    out = step._run_rows({spec.name: x}, np.arange(6), reasons)
    assert reasons == [None] * 4 + ["stage 0: ValueError: bad row", None]
    for name, want in good.items():
        keep = [0, 1, 2, 3, 5]
        np.testing.assert_allclose(out[name][keep], want[keep], rtol=1e-5, atol=1e-6)
        assert not out[name][4].any()
