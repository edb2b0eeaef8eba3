"""``partserve tune``: each stage's threads and the entrance's batch, measured with the stages running at once."""

from __future__ import annotations

import click

from partserve.cli.output import console, domain_errors, emit_json, err_console, json_option, table


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{text!r} is not a list of batch sizes; use e.g. 1,2,4,8")
    return sizes


@click.command()
@click.argument("plan_dir")
@click.option("--batch-sizes", default="1,2,4,8,16", show_default=True, help="Batch sizes to try (samples).")
@click.option("--seconds", type=click.FloatRange(min=0.1), default=2.0, show_default=True, help="Seconds per trial.")
@click.option("--cores", type=click.IntRange(min=1), help="Cores the stages share [default: all of this machine's].")
@click.option(
    "--call-overhead-ms",
    type=click.FloatRange(min=0),
    help="CPU ms serving spends per stage call, spent after every call in the trials (0: the stages alone) "
    "[default: partitions.tune.CALL_OVERHEAD_MS, measured on a 2-core machine].",
)
@json_option
@domain_errors
def tune(
    plan_dir: str, batch_sizes: str, seconds: float, cores: int | None, call_overhead_ms: float | None, as_json: bool
) -> None:
    """Measure PLAN_DIR's stages on their engines, all at once as when served, across threads and batch sizes,
    and write the best setting into its plan.json (serving then uses it)."""
    from partitions.tune import CALL_OVERHEAD_MS
    from partitions.tune import tune as run_tune

    sizes = _sizes(batch_sizes)
    say = None if as_json else lambda line: err_console.print(line)
    overhead = CALL_OVERHEAD_MS if call_overhead_ms is None else call_overhead_ms
    result = run_tune(plan_dir, sizes, seconds, cores, say, overhead)
    if as_json:
        emit_json(result.to_json())
        return
    ms = lambda t: " ".join(f"{x:.2f}" for x in t.stage_ms)
    rows = [[t.batch_size, ",".join(map(str, t.threads)), ms(t), f"{t.samples_per_s:.1f}"] for t in result.trials]
    columns = ["batch", "threads", "stage ms", "samples/s"]
    title = f"tune {plan_dir} on {result.cores} cores, {result.call_overhead_ms:g} ms of serving CPU per call"
    console.print(table(title, columns, rows))
    best, before = result.best, result.before
    console.print(
        f"kept batch {best.batch_size}, threads {','.join(map(str, best.threads))}: {best.samples_per_s:.1f} "
        f"samples/s against {before.samples_per_s:.1f} at the plan's batch {before.batch_size} "
        f"({result.gain:.2f}x, all stages at once); wrote {plan_dir}",
        highlight=False,
    )
