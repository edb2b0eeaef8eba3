"""cluster.batch.files: tensors from Arrow columns (and a reason per bad row), output columns, input listing,
output files renamed only when complete."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.batch.files import (
    BatchInputError,
    FileSink,
    final_paths,
    glob_match,
    list_inputs,
    output_array,
    partial_path,
    resolve,
    to_tensor,
)
from partitions.types import TensorSpec

TOKENS = TensorSpec("tokens", (-1, 4), "int64")
IMAGE = TensorSpec("image", (-1, 2, 3), "float32")


def test_to_tensor_reads_every_layout() -> None:
    x = np.arange(12, dtype=np.int64).reshape(3, 4)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 4)
    variable = pa.array(x.tolist(), pa.list_(pa.int32()))
    for column in (fixed, variable, pa.chunked_array([variable.slice(0, 1), variable.slice(1)])):
        got, reasons = to_tensor(column, TOKENS)
        assert got.dtype == np.int64 and np.array_equal(got, x) and reasons == [None] * 3
    img = np.random.default_rng(0).standard_normal((2, 2, 3)).astype(np.float32)
    nested = pa.array(img.tolist(), pa.list_(pa.list_(pa.float64(), 3), 2))
    flat = pa.FixedSizeListArray.from_arrays(pa.array(img.reshape(-1)), 6)
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(img)
    for column in (nested, flat, tensor):
        got, reasons = to_tensor(column, IMAGE)
        assert np.allclose(got, img) and reasons == [None, None]
    got, _ = to_tensor(pa.array([1.5, 2.5]), TensorSpec("x", (-1,), "float32"))
    assert got.tolist() == [1.5, 2.5]


def test_to_tensor_gives_a_reason_per_bad_row() -> None:
    rows = [[1, 2, 3, 4], None, [1, 2, 3], [1, None, 3, 4], [5, 6, 7, 8]]
    got, reasons = to_tensor(pa.array(rows, pa.list_(pa.int64())), TOKENS)
    assert reasons[0] is None and reasons[4] is None
    assert reasons[1] == "tokens: null"
    assert "3 values" in reasons[2] and "[4]" in reasons[2]
    assert reasons[3] == "tokens: null element"
    assert got[4].tolist() == [5, 6, 7, 8] and not got[1:4].any()
    _, reasons = to_tensor(pa.array([[1.0, 2, 3, 4], [1.5, 2, 3, 4]]), TOKENS)
    assert reasons[0] is None and "1.5 is not a int64" in str(reasons[1])
    _, reasons = to_tensor(pa.array([[[1.0, 2, 3]] * 2, [[1.0, 2, 3], [1.0, 2]]]), IMAGE)
    assert reasons[0] is None and "level 1" in str(reasons[1])


def test_output_columns_round_trip_through_parquet(tmp_path: Path) -> None:
    vec = TensorSpec("logits", (-1, 3), "float32")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    img = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    table = pa.table({"logits": output_array(x, vec), "map": output_array(img, IMAGE, np.array([False, True]))})
    pq.write_table(table, tmp_path / "o.parquet")
    back = pq.read_table(tmp_path / "o.parquet")
    assert back.schema.field("logits").type == pa.list_(pa.float32(), 3)
    assert np.array_equal(np.stack(back.column("logits").to_numpy(zero_copy_only=False)), x)
    assert isinstance(back.schema.field("map").type, pa.FixedShapeTensorType)
    assert back.column("map").null_count == 1
    assert np.array_equal(back.column("map").chunk(0).storage.flatten().to_numpy()[:6], img[0].reshape(-1))


def _write(path: Path, rows: int, start: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.arange(start * 4, (start + rows) * 4, dtype=np.int64)
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(x), 4)
    pq.write_table(pa.table({"id": np.arange(start, start + rows), "tokens": tokens}), path, row_group_size=3)


def test_list_inputs_file_dir_and_glob(tmp_path: Path) -> None:
    _write(tmp_path / "in" / "a.parquet", 5)
    _write(tmp_path / "in" / "sub" / "b.parquet", 2)
    _write(tmp_path / "in" / "_rejected" / "a.parquet", 1)
    _write(tmp_path / "in" / ".a.parquet.partial", 1)
    _, files = list_inputs(str(tmp_path / "in"))
    assert [(f.rel, f.rows, f.row_groups) for f in files] == [("a.parquet", 5, (3, 2)), ("sub/b.parquet", 2, (2,))]
    _, files = list_inputs(str(tmp_path / "in" / "*.parquet"))
    assert [f.rel for f in files] == ["a.parquet"]
    _, files = list_inputs(str(tmp_path / "in" / "**" / "?.parquet"))
    assert [f.rel for f in files] == ["a.parquet", "sub/b.parquet"]
    assert glob_match("x/a1.parquet", "x/[a-c]?.parquet") and not glob_match("x/d1.parquet", "x/[!d]?.parquet")
    _, files = list_inputs(str(tmp_path / "in" / "sub" / "b.parquet"))
    assert [(f.rel, f.uri) for f in files] == [("b.parquet", str(tmp_path / "in" / "sub" / "b.parquet"))]
    for missing in ("nothing-here", "in/*.csv"):
        with pytest.raises(BatchInputError):
            list_inputs(str(tmp_path / missing))


def test_file_sink_renames_only_when_complete(tmp_path: Path) -> None:
    _write(tmp_path / "in" / "a.parquet", 4)
    _, (source,) = list_inputs(str(tmp_path / "in"))
    fs, base = resolve(str(tmp_path / "out"))
    schema = pa.schema([("id", pa.int64())])
    final, rejected = final_paths(base, source.rel)
    sink = FileSink(fs, base, source, schema)
    sink.add(pa.table({"id": [0, 1]}), None)
    assert Path(partial_path(final)).exists() and not Path(final).exists() and not sink.done
    sink.add(pa.table({"id": [3]}), pa.table({"id": [2], "_row": [2], "_reason": ["bad"]}))
    assert sink.done
    sink.finish()
    assert pq.read_table(final).column("id").to_pylist() == [0, 1, 3]
    assert pq.read_table(rejected).to_pylist() == [{"id": 2, "_row": 2, "_reason": "bad"}]
    assert not Path(partial_path(final)).exists()
    again = FileSink(fs, base, source, schema)
    again.add(pa.table({"id": [0]}), None)
    again.abandon()
    assert not Path(partial_path(final)).exists()
