"""cluster.batch.steps and prepare: columns checked against the plan before anything runs; a stage actor
rejects only the rows its stage raises on; an actor running two stages gives what two actors give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.batch import prepare
from cluster.batch.files import INPUT, REASON, ROW, BatchInputError, flat_array, list_inputs
from cluster.batch.steps import BUSY, STARTED, VALUE, Layout, StageStep, resolve_layout
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
    """A stage that raises on a batch is retried on halves until the rows that raise alone are found; the
    reason names the stage that raised, also inside a step that runs two stages."""
    spec = mlp.plan.inputs[0]
    layout = Layout(mlp.plan, ["id"], {spec.name: spec.name})
    step = StageStep(mlp.uri, [0, 1], layout.keys, layout.columns, 1, "cpu", final=True)
    x = mlp.sample(6)[spec.name]
    good = step._run({spec.name: x})
    second = step.runners[1]
    bad = {k: v for k, v in step.runners[0]({spec.name: x[4:5]}).items()}  # what stage 1 gets for row 4

    class Flaky:  # stage 1 raises on any batch holding row 4
        output_names = second.output_names
        stage = second.stage

        def __call__(self, payload):
            if any(np.allclose(row, bad[k][0], rtol=1e-5, atol=1e-6) for k in bad for row in payload[k]):
                raise ValueError("bad row")
            return second(payload)

    step.runners[1] = Flaky()  # type: ignore[assignment]
    reasons: list[str | None] = [None] * 6
    out = step._run_rows({spec.name: x}, np.arange(6), reasons)
    assert reasons == [None] * 4 + ["stage 1: ValueError: bad row", None]
    for name, want in good.items():
        keep = [0, 1, 2, 3, 5]
        np.testing.assert_allclose(out[name][keep], want[keep], rtol=1e-5, atol=1e-6)
        assert not out[name][4].any()


def test_a_step_of_two_stages_equals_two_steps(mlp: PlannedModel) -> None:
    """Stages 0 and 1 in one actor give the rows, columns and outputs of a step per stage."""
    spec = mlp.plan.inputs[0]
    layout = Layout(mlp.plan, ["id"], {spec.name: spec.name})
    x = mlp.sample(5)[spec.name]
    reasons = pa.array([None] * 5, pa.string())
    batch = pa.table(
        {"id": np.arange(5), INPUT: ["f"] * 5, ROW: np.arange(5), REASON: reasons, VALUE + spec.name: flat_array(x)}
    )
    args = (layout.keys, layout.columns, 1, "cpu")
    one = StageStep(mlp.uri, [0, 1], *args, final=True)(batch)
    two = StageStep(mlp.uri, [1], *args, final=True)(StageStep(mlp.uri, [0], *args, final=False)(batch))
    outputs = [o.name for o in mlp.plan.outputs]
    assert one.column_names == ["id", INPUT, ROW, REASON, *outputs, STARTED, BUSY + "stages-0-1"]
    assert set(two.column_names) == {*one.column_names[:-1], BUSY + "stage-0", BUSY + "stage-1"}
    for name in outputs:
        np.testing.assert_allclose(np.stack(one.column(name).to_numpy(zero_copy_only=False)),
                                   np.stack(two.column(name).to_numpy(zero_copy_only=False)), rtol=1e-6)  # fmt: skip
