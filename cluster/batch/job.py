"""A batch job: check it, make its Ray Dataset, run it and write one output file per input file.

:func:`prepare` reads the plan and the inputs' footers and checks them against each other (no Ray yet).
:func:`dataset` makes the pipeline: read tasks (one per row group), then one ``map_batches`` actor pool per
stage, or per run of consecutive stages where the cluster has fewer CPUs than stages
(:mod:`cluster.batch.steps`), sized by :func:`cluster.batch.pools.plan_pools` for the connected cluster.
:func:`run_job` runs it, writes the outputs (:class:`cluster.batch.files.FileSink`), skipping input files
whose output is already complete, and returns a :class:`JobReport`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cluster.batch.files import (
    INPUT,
    REASON,
    ROW,
    BatchInputError,
    FileSink,
    InputFile,
    is_complete,
    list_inputs,
    output_type,
    resolve,
)
from cluster.batch.pools import Pool, plan_pools
from cluster.batch.steps import BUSY, READ_STEP, STARTED, Layout, StageStep, read_step, resolve_layout
from partitions.plan import Plan

if TYPE_CHECKING:
    import ray.data

DEFAULT_BATCH = 64
"""Rows per batch: large enough that per-batch costs (a task, an object per stage) are small against compute."""


# ---- the dataset ----------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A job, checked and ready to run: the plan, its inputs still to do, the layout; the pools are sized
    (:meth:`size`) from the Ray cluster this process is connected to when the dataset is made."""

    uri: str
    plan: Plan
    input_uri: str
    files: list[InputFile]
    skipped: list[InputFile]
    layout: Layout
    batch_size: int
    gpus: bool
    cpus: float | None
    device: str
    share_actors: bool = True
    """Consecutive stages share an actor where the cluster has fewer CPUs than stages."""
    pools: list[Pool] = field(default_factory=list)
    read_cpus: float = 0.0
    read_tasks: int = 2
    """Read tasks at once: two per node (each needs a worker process; reading is a small part of the work)."""

    def size(self) -> None:
        """Size the pools for the connected Ray (started here if none, as Ray Data would)."""
        import ray

        if not ray.is_initialized():
            ray.init()
        alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        nodes = [float(r.get("CPU", 0.0)) for r in alive if r.get("CPU", 0.0) > 0]
        have_gpus = sum(float(r.get("GPU", 0.0)) for r in alive)
        if not nodes:
            raise BatchInputError("the Ray cluster has no CPUs", "add a node with CPUs")
        if self.cpus and self.cpus < sum(nodes):  # the job's share of every node
            nodes = [c * self.cpus / sum(nodes) for c in nodes]
        self.pools, self.read_cpus = plan_pools(self.plan, nodes, have_gpus, self.gpus, self.share_actors)
        self.read_tasks = 2 * len(nodes)


def prepare(
    plan_uri: str,
    input_uri: str,
    *,
    output_uri: str | None = None,
    mapping: Mapping[str, str] | None = None,
    keys: Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH,
    gpus: bool = False,
    cpus: float | None = None,
    device: str | None = None,
    share_actors: bool = True,
) -> Prepared:
    """Read the plan and the inputs' footers and check them against each other (no Ray yet); drop inputs
    whose output under ``output_uri`` is complete. ``mapping``: input column -> model input; ``keys``: the
    columns kept beside the outputs; ``gpus``: each stage actor takes the plan's GPU share; ``cpus``: the
    CPUs the job may use (default: the cluster's); ``share_actors``: consecutive stages share an actor where
    the cluster has fewer CPUs than the plan has stages (False: one pool per stage)."""
    from partitions.storage import read_plan

    plan = read_plan(plan_uri)
    _, files = list_inputs(input_uri)
    if output_uri is not None:
        out_fs, out_base = resolve(output_uri)
        files = [f for f in files if not f.path.startswith(out_base.rstrip("/") + "/")]  # outputs under the input
        if not files:
            raise BatchInputError(f"no input files at {input_uri!r} outside {output_uri!r}", "pass another --input")
    layout = resolve_layout(plan, files, mapping or {}, keys)
    skipped: list[InputFile] = []
    if output_uri is not None:
        skipped = [f for f in files if is_complete(out_fs, out_base, f.rel)]
        files = [f for f in files if f not in skipped]
    device = device or ("cuda" if gpus else "cpu")
    return Prepared(plan_uri, plan, input_uri, files, skipped, layout, batch_size, gpus, cpus, device, share_actors)


def dataset(job: Prepared, stats: bool = False) -> ray.data.Dataset:
    """The lazy Ray Dataset of ``job``: per input row its key columns, the model outputs, ``_input``, ``_row``
    and ``_reason``; with ``stats`` also the per-row busy seconds of each step (``__ps_busy_s:*``)."""
    import ray.data

    if not job.files:
        raise BatchInputError(f"every input file at {job.input_uri!r} already has its output", "nothing to run")
    if not job.pools:
        job.size()
    items = []
    for f in job.files:  # a file without rows has no row groups, and so no read task
        offset = 0
        for g, rows in enumerate(f.row_groups):
            items.append({"uri": f.uri, "path": f.path, "group": g, "offset": offset})
            offset += rows
    ds: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        cast(Any, read_step),
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"layout": job.layout, "batch_size": job.batch_size},
        compute=ray.data.TaskPoolStrategy(size=job.read_tasks),
        num_cpus=job.read_cpus,
    )
    last = len(job.plan.stages) - 1
    for pool in job.pools:
        ds = ds.map_batches(
            StageStep,
            batch_size=job.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
            fn_constructor_kwargs={
                "uri": job.uri,
                "stages": list(pool.stages),
                "keys": job.layout.keys,
                "columns": job.layout.columns,
                "threads": pool.threads,
                "device": job.device,
                "final": pool.stages[-1] == last,
            },
            compute=ray.data.ActorPoolStrategy(size=pool.actors),
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus or None,
        )
    if not stats:
        ds = ds.drop_columns([STARTED, *[f"{BUSY}{s}" for s in [READ_STEP, *(p.name for p in job.pools)]]])
    return ds


def batch_dataset(plan_uri: str, input_uri: str, **options: Any) -> ray.data.Dataset:
    """The dataset for ``partserve.batch``: see :func:`prepare` for ``options`` (``output_uri`` skips inputs
    with complete outputs; nothing is written)."""
    return dataset(prepare(plan_uri, input_uri, **options))


# ---- running a job --------------------------------------------------------------------------------------


@dataclass
class StepReport:
    step: str
    actors: int
    """Actors of a stage's pool (or of the pool of consecutive stages, ``stages-0-1``); 0 for the read step
    (tasks, as many as Ray Data runs at once)."""
    num_cpus: float
    num_gpus: float
    busy_s: float
    rows_per_s: float
    """Rows per second the step can sustain: rows / busy seconds x actors."""
    utilisation: float
    """Busy time over (streaming time x actors)."""


@dataclass
class JobReport:
    rows: int
    rejected: int
    files: int
    skipped_files: int
    skipped_rows: int
    seconds: float
    """From :func:`run_job`'s start (the actors' start included, Ray's own start not) to the last file renamed."""
    streaming_seconds: float
    """From the first output row to the last."""
    rows_per_s: float
    streaming_rows_per_s: float
    batch_size: int
    steps: list[StepReport]
    bottleneck: str
    outputs: list[str]
    rejected_files: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _sink_schema(job: Prepared, f: InputFile) -> pa.Schema:
    fields = [f.schema.field(k) for k in job.layout.keys]
    fields += [pa.field(s.name, output_type(s)) for s in job.plan.outputs]
    return pa.schema(fields)


def run_job(
    job: Prepared, output_uri: str, progress: Callable[[int, int], None] | None = None, preserve_order: bool = True
) -> JobReport:
    """Run ``job`` and write its outputs under ``output_uri``; ``progress(rows_done, rows_total)`` after each
    batch. Output rows keep the input's order when ``preserve_order``."""
    import ray.data

    started = time.perf_counter()
    fs, out_base = resolve(output_uri)
    total = sum(f.rows for f in job.files)
    sinks = {f.uri: FileSink(fs, out_base, f, _sink_schema(job, f)) for f in job.files}
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.enable_auto_log_stats)
    ctx.execution_options.preserve_order = preserve_order
    ctx.enable_progress_bars = False
    ctx.enable_auto_log_stats = False
    busy: dict[str, float] = {}
    done = rejected = 0
    first = math.inf
    finished: list[FileSink] = []
    try:
        if progress:
            progress(0, total)
        if total and not job.pools:
            job.size()
        for sink in sinks.values():
            if sink.done:  # an input file without rows: an output without rows
                sink.finish()
                finished.append(sink)
        batches = dataset(job, stats=True).iter_batches(batch_size=None, batch_format="pyarrow") if total else []
        for batch in batches:
            table = cast(pa.Table, batch)
            first = min(first, float(pc.min(table.column(STARTED)).as_py()))
            for name in table.column_names:
                if name.startswith(BUSY):
                    step = name[len(BUSY) :]
                    busy[step] = busy.get(step, 0.0) + float(np.asarray(table.column(name)).sum())
            reasons = table.column(REASON)
            bad = reasons.is_valid()
            paths = table.column(INPUT).to_numpy(zero_copy_only=False)
            for path in np.unique(paths):
                sink = sinks[str(path)]
                mine = table.filter(pa.array(paths == path))
                mine_bad = mine.filter(mine.column(REASON).is_valid())
                mine_ok = mine.filter(mine.column(REASON).is_null())
                rej = mine_bad.select([*job.layout.keys, ROW, REASON]) if mine_bad.num_rows else None
                sink.add(mine_ok, rej)
                if sink.done:
                    sink.finish()
                    finished.append(sink)
            done += table.num_rows
            rejected += int(pc.sum(bad.cast(pa.int64())).as_py() or 0)
            if progress:
                progress(done, total)
    except BaseException:
        for sink in sinks.values():
            if sink not in finished:
                sink.abandon()
        raise
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.enable_auto_log_stats = saved
    unfinished = [s.source.uri for s in sinks.values() if s not in finished]
    if unfinished:
        raise RuntimeError(f"the job ended with files unfinished: {unfinished}")
    seconds = time.perf_counter() - started
    streaming = min(time.time() - first, seconds) if total else 0.0
    return JobReport(
        rows=done,
        rejected=rejected,
        files=len(job.files),
        skipped_files=len(job.skipped),
        skipped_rows=sum(f.rows for f in job.skipped),
        seconds=seconds,
        streaming_seconds=streaming,
        rows_per_s=done / seconds if seconds else 0.0,
        streaming_rows_per_s=done / streaming if streaming else 0.0,
        batch_size=job.batch_size,
        steps=(steps := _step_reports(job, busy, done, streaming)),
        bottleneck=max(steps[1:], key=lambda s: s.utilisation).step if total else "",
        outputs=[s.final for s in finished],
        rejected_files=[s.rejected_final for s in finished if s.rejected],
    )


def _step_reports(job: Prepared, busy: Mapping[str, float], rows: int, seconds: float) -> list[StepReport]:
    out = []
    steps: list[tuple[str, int, float, float]] = [(READ_STEP, 0, job.read_cpus, 0.0)]
    steps += [(p.name, p.actors, p.num_cpus, p.num_gpus) for p in job.pools]
    for name, actors, cpus, gpus in steps:
        b = busy.get(name, 0.0)
        out.append(
            StepReport(
                step=name,
                actors=actors,
                num_cpus=round(cpus, 4),
                num_gpus=gpus,
                busy_s=b,
                rows_per_s=rows / b * max(actors, 1) if b else 0.0,
                utilisation=b / (seconds * max(actors, 1)) if seconds else 0.0,
            )
        )
    return out
