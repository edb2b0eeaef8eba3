"""``partserve batch`` without Ray: user errors are one line and exit code 2, found before Ray starts; a
rerun whose outputs are all complete reports the skipped files and starts nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner

from partserve.cli.main import main
from tests.serve_fixtures import PlannedModel


def _inputs(mlp: PlannedModel, folder: Path, column: str = "features") -> None:
    spec = mlp.plan.inputs[0]
    x = mlp.sample(4)[spec.name]
    folder.mkdir()
    values = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), spec.shape[1])
    pq.write_table(pa.table({"id": np.arange(4), column: values}), folder / "a.parquet")


def test_user_errors_exit_2_before_ray_starts(mlp: PlannedModel, tmp_path: Path) -> None:
    runner = CliRunner()
    _inputs(mlp, tmp_path / "in", column="x")
    base = ["batch", mlp.uri, "--output", str(tmp_path / "out")]
    cases = {
        "does not exist": [*base, "--input", str(tmp_path / "missing")],
        "--map COLUMN=INPUT": [*base, "--input", str(tmp_path / "in")],  # no column named after the input
        "model's inputs": [*base, "--input", str(tmp_path / "in"), "--map", "x=nope"],
    }
    for expected, args in cases.items():
        r = runner.invoke(main, args)
        assert r.exit_code == 2, (args, r.output)
        assert expected in r.output and r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    r = runner.invoke(main, [*base, "--input", str(tmp_path / "in"), "--map", "x"])
    assert r.exit_code == 2 and "COLUMN=INPUT" in r.output


def test_rerun_with_every_output_complete_starts_nothing(mlp: PlannedModel, tmp_path: Path) -> None:
    spec = mlp.plan.inputs[0]
    _inputs(mlp, tmp_path / "in", column=spec.name)
    (tmp_path / "out").mkdir()
    pq.write_table(pa.table({"id": [0]}), tmp_path / "out" / "a.parquet")  # a complete output, as far as names go
    args = ["batch", mlp.uri, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["skipped_files"] == 1 and report["skipped_rows"] == 4 and report["rows"] == 0


def test_empty_input_file_gets_an_empty_output(mlp: PlannedModel, tmp_path: Path) -> None:
    """Inside the input directory the output directory is not read as input; a file of no rows has an output
    of no rows (with the output columns), and no Ray is started for it."""
    spec = mlp.plan.inputs[0]
    (tmp_path / "in").mkdir()
    column = pa.array([], pa.list_(pa.float32(), spec.shape[1]))
    pq.write_table(pa.table({"id": pa.array([], pa.int64()), spec.name: column}), tmp_path / "in" / "e.parquet")
    out = tmp_path / "in" / "scored"
    for _ in range(2):
        r = CliRunner().invoke(main, ["batch", mlp.uri, "--input", str(tmp_path / "in"), "--output", str(out)])
        assert r.exit_code == 0, r.output
    assert "skipped 1 files" in r.output
    table = pq.read_table(out / "e.parquet")
    assert table.num_rows == 0 and table.schema.names == ["id", mlp.plan.outputs[0].name]
