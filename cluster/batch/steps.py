"""What runs inside the Ray Data pipeline of a batch job: the layout of its rows, the read step and the stage
actors.

Rows flow as Arrow tables: the key columns, ``_input`` (file), ``_row`` (index in that file) and ``_reason``
(null, or why the row was rejected), the model inputs and activations as flat fixed-size lists under
``__ps_v:NAME`` (their shapes come from the plan), and each step's share of busy seconds per row for the report.
A stage actor computes only the rows without a reason; when its stage raises on a batch it halves the batch
until the rows that raise alone are found and rejects those. This module imports torch only inside the stage
actors, so the read tasks' worker processes stay light.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from cluster.batch.files import (
    INPUT,
    REASON,
    ROW,
    BatchInputError,
    InputFile,
    column_problem,
    flat_array,
    flat_view,
    output_array,
    read_rows,
    to_tensor,
)
from cluster.batch.pools import pool_name
from partitions.plan import Plan
from partitions.types import TensorSpec

VALUE = "__ps_v:"
"""Prefix of the columns that hold model inputs and activations inside the pipeline."""
BUSY = "__ps_busy_s:"
"""Prefix of the per-row share of a step's busy seconds (``read``, ``stage-0``, ``stages-1-2``, ...: the
step's name in the report)."""
STARTED = "__ps_started"
"""Wall-clock time at which the first stage started a row's batch (for the report's streaming time)."""
READ_STEP = "read"


class StageFailed(Exception):
    """A stage of a step raised on a batch: which stage, and what it raised."""

    def __init__(self, stage: int, error: Exception) -> None:
        super().__init__(f"stage {stage}: {error}")
        self.stage = stage
        self.error = error


@dataclass
class Layout:
    """What flows between the steps: key columns, model inputs by column, and which values each step keeps."""

    plan: Plan
    keys: list[str]
    columns: dict[str, str]
    """Model input name -> input column."""
    keep_after: list[list[str]] = field(default_factory=list)
    """Per stage: the values still needed after it (read by later stages, or model outputs)."""

    def __post_init__(self) -> None:
        later: set[str] = set(self.plan.output_values)
        keep: list[list[str]] = []
        for stage in reversed(self.plan.stages):
            keep.append(sorted(later))
            later |= set(stage.reads)
        self.keep_after = keep[::-1]

    def spec(self, value: str) -> TensorSpec:
        for s in self.plan.inputs:
            if s.name == value:
                return s
        for stage in self.plan.stages:
            for t in stage.computed:
                if t.name == value:
                    return t
        raise KeyError(value)


def resolve_layout(
    plan: Plan, files: Sequence[InputFile], mapping: Mapping[str, str], keys: Sequence[str] | None
) -> Layout:
    """Check every file's schema against the plan's inputs once, before anything runs.

    ``mapping``: input column -> model input (``--map col=input``); other model inputs read the column of
    their own name. ``keys``: the columns to keep beside the outputs (default: all that feed no input)."""
    names = {s.name for s in plan.inputs}
    unknown = sorted(set(mapping.values()) - names)
    if unknown:
        raise BatchInputError(f"--map names {unknown}, the model's inputs are {sorted(names)}", "map COLUMN=INPUT")
    columns = {s.name: s.name for s in plan.inputs}
    columns.update({model_input: col for col, model_input in mapping.items()})
    outputs = {s.name for s in plan.outputs}
    for f in files:
        have = set(f.schema.names)
        missing = {inp: col for inp, col in columns.items() if col not in have}
        if missing:
            raise BatchInputError(
                f"{f.uri} has no column {sorted(missing.values())} for model inputs {sorted(missing)} "
                f"(columns: {f.schema.names})",
                "pass --map COLUMN=INPUT for each model input",
            )
        for spec in plan.inputs:
            problem = column_problem(f.schema.field(columns[spec.name]).type, spec)
            if problem:
                raise BatchInputError(
                    f"{f.uri}: column {columns[spec.name]!r} {problem}", f"write {spec.name} as {list(spec.shape)}"
                )
    first = files[0].schema.names
    chosen = list(keys) if keys is not None else [c for c in first if c not in columns.values()]
    for f in files:
        absent = [k for k in chosen if k not in f.schema.names]
        if absent:
            raise BatchInputError(f"{f.uri} has no key column {absent}", "pass --key for columns every file has")
    reserved = outputs | {INPUT, ROW, REASON}
    clash = sorted(c for c in chosen if c in reserved or c.startswith("__ps"))
    if clash:
        raise BatchInputError(f"key columns {clash} clash with output names", "choose the key columns with --key")
    return Layout(plan, chosen, columns)


# ---- the steps ------------------------------------------------------------------------------------------


def _reasons_array(reasons: Sequence[str | None]) -> pa.Array:
    return pa.array(list(reasons), type=pa.string())


def read_step(batch: pa.Table, layout: Layout, batch_size: int) -> Iterator[pa.Table]:
    """One row group of one file -> tables of ``batch_size`` rows: key columns, ``_input``, ``_row``,
    ``_reason`` and the model inputs as flat fixed-size lists."""
    for item in batch.to_pylist():
        start = time.perf_counter()
        fs, _ = pafs.FileSystem.from_uri(item["uri"])
        wanted = list(dict.fromkeys([*layout.keys, *layout.columns.values()]))
        table = read_rows(fs, item["path"], item["group"], wanted)
        n = table.num_rows
        reasons: list[str | None] = [None] * n
        values = {}
        for spec in layout.plan.inputs:
            arr, why = to_tensor(table.column(layout.columns[spec.name]), spec)
            values[spec.name] = arr
            reasons = [a or b for a, b in zip(reasons, why)]
        out = {k: table.column(k) for k in layout.keys}
        out[INPUT] = pa.array([item["uri"]] * n, type=pa.string())
        out[ROW] = pa.array(np.arange(item["offset"], item["offset"] + n, dtype=np.int64))
        out[REASON] = _reasons_array(reasons)
        for name, arr in values.items():
            out[VALUE + name] = flat_array(arr)
        full = pa.table(out)
        busy = (time.perf_counter() - start) / max(n, 1)
        full = full.append_column(BUSY + READ_STEP, pa.array(np.full(n, busy)))
        for lo in range(0, n, batch_size):
            yield full.slice(lo, batch_size)


class StageStep:
    """A Ray Data actor running one stage of the plan, or consecutive ``stages`` back to back (the
    activations between them stay in the actor), on Arrow batches; loads the stages' shards once."""

    def __init__(
        self,
        uri: str,
        stages: Sequence[int],
        keys: list[str],
        columns: dict[str, str],
        threads: int,
        device: str | None,
        final: bool,
    ) -> None:
        import torch

        from partitions.runtime import StageRunner

        if device in (None, "auto", "cpu"):
            torch.set_num_threads(threads)
        from partitions.storage import read_plan

        layout = Layout(read_plan(uri), keys, columns)  # small constructor arguments: the plan is read here
        self.runners = [StageRunner(uri, i, device, layout.plan, threads=threads) for i in stages]
        self.layout = layout
        self.stages = list(stages)
        self.key = pool_name(self.stages)
        self.final = final
        first = self.runners[0].stage
        self.specs = {t.name: t for t in first.inputs}
        self.specs.update({c: layout.spec(c) for c in first.carried})
        self.keep = set(layout.keep_after[self.stages[-1]])
        self.produced = [t for r in self.runners for t in r.stage.computed if t.name in self.keep]
        """What this step adds to the batch: the values its stages compute that are needed after them."""

    def _run(self, payload: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The step's stages back to back; an exception says which stage raised (``StageFailed``)."""
        values = dict(payload)
        for index, runner in zip(self.stages, self.runners):
            try:
                out = runner(values)
            except Exception as exc:
                raise StageFailed(index, exc) from exc
            values.update({name: out[name] for name in runner.output_names})
        return {t.name: values[t.name] for t in self.produced}

    def _run_rows(
        self, payload: Mapping[str, np.ndarray], rows: np.ndarray, reasons: list[str | None]
    ) -> dict[str, np.ndarray]:
        """Run ``rows`` together; when that raises, halve until the rows that raise alone are found and
        rejected (their outputs stay zeros)."""
        try:
            return self._run({k: v[rows] for k, v in payload.items()})
        except StageFailed as failed:
            if len(rows) == 1:
                exc = failed.error
                reasons[int(rows[0])] = f"stage {failed.stage}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                return {}
            mid = len(rows) // 2
            parts = [self._run_rows(payload, part, reasons) for part in (rows[:mid], rows[mid:])]
            merged: dict[str, np.ndarray] = {}
            for t in self.produced:
                got = [p[t.name] if p else None for p in parts]
                shapes = [(len(part), *t.shape[1:]) for part in (rows[:mid], rows[mid:])]
                blocks = [g if g is not None else np.zeros(s, t.np_dtype) for g, s in zip(got, shapes)]
                merged[t.name] = np.concatenate(blocks)
            return merged

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        n = batch.num_rows
        reasons: list[str | None] = batch.column(REASON).to_pylist()
        ok = np.array([r is None for r in reasons], dtype=bool)
        payload = {name: flat_view(batch.column(VALUE + name), spec) for name, spec in self.specs.items()}
        computed: dict[str, np.ndarray] = {}
        if ok.all():
            try:
                computed = self._run(payload)
            except StageFailed:
                computed = self._run_rows(payload, np.arange(n), reasons)
        elif ok.any():
            rows = np.flatnonzero(ok)
            got = self._run_rows(payload, rows, reasons)
            for t in self.produced:
                full = np.zeros((n, *t.shape[1:]), t.np_dtype)
                if got:
                    full[rows] = got[t.name]
                computed[t.name] = full
        for t in self.produced:
            computed.setdefault(t.name, np.zeros((n, *t.shape[1:]), t.np_dtype))
        drop = [c for c in batch.column_names if c.startswith(VALUE) and c[len(VALUE) :] not in self.keep]
        batch = batch.drop_columns(drop)
        batch = batch.set_column(batch.schema.get_field_index(REASON), REASON, _reasons_array(reasons))
        for name, arr in computed.items():
            batch = batch.append_column(VALUE + name, flat_array(arr))
        if self.final:
            batch = self._finish(batch, reasons)
        busy = (time.perf_counter() - start) / max(n, 1)
        if self.stages[0] == 0:
            batch = batch.append_column(STARTED, pa.array(np.full(n, time.time() - (time.perf_counter() - start))))
        return batch.append_column(BUSY + self.key, pa.array(np.full(n, busy)))

    def _finish(self, batch: pa.Table, reasons: list[str | None]) -> pa.Table:
        """Model outputs under their names (null for rejected rows); the activations go."""
        rejected = np.array([r is not None for r in reasons], dtype=bool)
        plan = self.layout.plan
        for spec, value in zip(plan.outputs, plan.output_values):
            arr = flat_view(batch.column(VALUE + value), spec)
            batch = batch.append_column(spec.name, output_array(arr, spec, rejected if rejected.any() else None))
        return batch.drop_columns([c for c in batch.column_names if c.startswith(VALUE)])
