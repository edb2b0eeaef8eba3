"""``partserve batch``: offline inference over Parquet through a plan, on Ray Data (:mod:`cluster.batch`)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from partserve.cli.output import console, domain_errors, emit_json, err_console, json_option, table

STRICT_EXIT = 3
"""``--strict`` and rows were rejected (1 is an unexpected failure, 2 a user error)."""


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.0f} rows/s" if task.speed else "- rows/s")


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything written to file descriptor 1 (Ray's and Ray Data's logs, workers' output forwarded to
    the driver) to stderr, so that stdout holds only what the command prints afterwards."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextmanager
def _ray(address: str | None) -> Iterator[None]:
    """Join the Ray at ``address``, or start a local one for this job (never one it happens to find); leave
    (and so stop the local one) at the end."""
    import ray

    ray.init(address=address or "local", include_dashboard=False if not address else None, logging_level=logging.ERROR)
    try:
        import ray.data  # configures its loggers on import; quiet them after

        logging.getLogger("ray.data").setLevel(logging.ERROR)
        yield
    finally:
        ray.shutdown()


@contextmanager
def _progress(total: int) -> Iterator[Callable[[int, int], None]]:
    """A live bar on stderr: rows done of ``total``, rows/s over the last 10 s, ETA, elapsed."""
    columns = (
        TextColumn("batch"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} rows"),
        _RateColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console, speed_estimate_period=10.0) as bar:
        task = bar.add_task("batch", total=total or 1)
        yield lambda done, total: bar.update(task, completed=done, total=total or 1)


@click.command()
@click.argument("plan_dir")
@click.option("--input", "input_uri", required=True, help="Parquet file, directory or glob (path, s3://, gs://).")
@click.option("--output", "output_uri", required=True, help="Output directory: one Parquet file per input file.")
@click.option("--map", "maps", multiple=True, help="Feed model input INPUT from column COLUMN: COLUMN=INPUT.")
@click.option("--key", "keys", multiple=True, help="Column to keep beside the outputs (default: all not mapped).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Rows per batch.")
@click.option("--gpus", is_flag=True, help="Give each stage actor the plan's GPU share.")
@click.option("--cpus", type=click.FloatRange(min=0.01), help="CPUs the job may use (default: the cluster's).")
@click.option(
    "--pool-per-stage",
    is_flag=True,
    help="One actor pool per stage even on fewer CPUs than stages (default: consecutive stages share an actor then).",
)
@click.option("--address", help="Ray cluster to run on (default: a new local Ray).")
@click.option("--strict", is_flag=True, help=f"Exit with code {STRICT_EXIT} when any row was rejected.")
@json_option
@domain_errors
def batch(
    plan_dir: str,
    input_uri: str,
    output_uri: str,
    maps: tuple[str, ...],
    keys: tuple[str, ...],
    batch_size: int,
    gpus: bool,
    cpus: float | None,
    pool_per_stage: bool,
    address: str | None,
    strict: bool,
    as_json: bool,
) -> None:
    """Run the stages of PLAN_DIR over the Parquet rows at --input and write the outputs to --output.

    One actor pool per stage (sized from the plan's stage times; on a cluster with fewer CPUs than stages,
    consecutive stages share an actor unless --pool-per-stage), one output file per input file, written
    under a temporary name and renamed when complete; rows that do not fit the model go to
    OUTPUT/_rejected/ with the reason. Run again after a stop: inputs with complete outputs are skipped.
    """
    from cluster.batch import prepare, run_job

    mapping = {}
    for pair in maps:
        column, sep, model_input = pair.partition("=")
        if not sep or not column or not model_input:
            raise click.BadParameter(f"{pair!r} is not COLUMN=INPUT", param_hint="--map")
        mapping[column] = model_input
    job = prepare(
        plan_dir,
        input_uri,
        output_uri=output_uri,
        mapping=mapping,
        keys=list(keys) or None,
        batch_size=batch_size,
        gpus=gpus,
        cpus=cpus,
        share_actors=not pool_per_stage,
    )
    if not any(f.rows for f in job.files):  # e.g. a restart after the last file was done: no Ray needed
        report = run_job(job, output_uri)
    elif as_json:
        with _stdout_to_stderr(), _ray(address):
            report = run_job(job, output_uri)
    else:
        with _stdout_to_stderr(), _ray(address), _progress(sum(f.rows for f in job.files)) as progress:
            report = run_job(job, output_uri, progress)
    data = report.to_json()
    if as_json:
        emit_json(data)
    else:
        _print_report(data, output_uri)
    if strict and report.rejected:
        raise SystemExit(STRICT_EXIT)


def _print_report(r: dict[str, Any], output_uri: str) -> None:
    rows = [
        [
            s["step"],
            s["actors"] or "tasks",
            f"{s['num_cpus']:.3g}",
            f"{s['num_gpus']:.3g}",
            f"{s['busy_s']:.1f}",
            f"{s['rows_per_s']:,.0f}",
            f"{s['utilisation']:.0%}",
        ]
        for s in r["steps"]
    ]
    if r["files"]:
        console.print(
            table(
                f"batch of {r['rows']:,} rows at batch {r['batch_size']}",
                ["step", "actors", "cpus each", "gpus each", "busy s", "rows/s it can do", "busy"],
                rows,
            )
        )
    skipped = f"; skipped {r['skipped_files']} files with complete outputs ({r['skipped_rows']:,} rows)"
    console.print(
        f"{r['rows']:,} rows from {r['files']} files in {r['seconds']:.1f} s: {r['rows_per_s']:,.1f} rows/s "
        f"({r['streaming_rows_per_s']:,.1f} rows/s from the first batch on)" + (skipped if r["skipped_files"] else ""),
        highlight=False,
    )
    if r["files"]:
        console.print(f"bottleneck {r['bottleneck']}; outputs in {output_uri}", highlight=False)
    if r["rejected"]:
        console.print(
            f"[yellow]{r['rejected']} rows rejected[/yellow], with reasons, in: {', '.join(r['rejected_files'])}",
            highlight=False,
        )
