"""Parquet inputs and the whole-model reference for the batch tests (tests/e2e/test_batch*.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tests.serve_fixtures import PlannedModel

BATCH = 32
"""Rows per batch in the jobs of the tests (the reference runs at the same batch size)."""


def write_inputs(model: PlannedModel, folder: Path, files: int, rows: int, seed: int = 0) -> np.ndarray:
    """``files`` Parquet files of ``rows`` rows (ids counting on from file to file, tokens as fixed-size
    lists, row groups of 50); returns all tokens in order."""
    folder.mkdir(parents=True)
    spec = model.plan.inputs[0]
    tokens = model.sample(files * rows, seed)[spec.name]
    for i in range(files):
        part = tokens[i * rows : (i + 1) * rows]
        column = pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1)), spec.shape[1])
        ids = np.arange(i * rows, (i + 1) * rows)
        pq.write_table(pa.table({"id": ids, "toks": column}), folder / f"part-{i}.parquet", row_group_size=50)
    return tokens


def reference(model: PlannedModel, tokens: np.ndarray, batch: int = BATCH) -> np.ndarray:
    """The whole model's outputs, ``batch`` rows at a time."""
    outs = [
        model.source.forward_flat({model.plan.inputs[0].name: torch.from_numpy(tokens[i : i + batch])})[0].numpy()
        for i in range(0, len(tokens), batch)
    ]
    return np.concatenate(outs)


def outputs(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, outputs)`` of every output file in ``folder``, by file name."""
    tables = [pq.read_table(p) for p in sorted(folder.glob("*.parquet"))]
    table = pa.concat_tables(tables)
    out = table.column("output").combine_chunks()
    return table.column("id").to_numpy(), out.flatten().to_numpy().reshape(len(out), -1)


def write_bad(model: PlannedModel, path: Path, rows: int = 100, seed: int = 7) -> np.ndarray:
    """A file whose rows 3, 50 and 77 do not fit the model: no tokens, one token short, and a token id the
    embedding does not have (its stage raises on that row alone). Returns the tokens, bad rows included."""
    tokens = model.sample(rows, seed)[model.plan.inputs[0].name]
    values: list = tokens.tolist()
    values[3] = None
    values[50] = values[50][:-1]
    values[77] = [10**6, *values[77][1:]]
    table = pa.table({"id": np.arange(10_000, 10_000 + rows), "toks": pa.array(values, pa.list_(pa.int64()))})
    pq.write_table(table, path)
    return tokens


BAD = [3, 50, 77]


def check_rejected(rows: list[dict]) -> None:
    assert [r["_row"] for r in rows] == BAD and [r["id"] for r in rows] == [10_000 + i for i in BAD]
    reasons = [r["_reason"] for r in rows]
    assert reasons[0] == "tokens: null"
    assert "15 values" in reasons[1] and "[16]" in reasons[1]
    assert reasons[2].startswith("stage 0: IndexError")
