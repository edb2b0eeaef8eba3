"""``partserve bench``: load sweeps against a running deployment, or ``--compare`` with plain Ray Serve."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import click

from partserve.cli.output import console, domain_errors, emit_json, err_console, table


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _write(rows: list[dict[str, Any]], parquet: str | None, plot: str | None) -> None:
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), parquet)
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
        for setup in dict.fromkeys(str(r["setup"]) for r in rows if r.get("mode") == "closed"):
            mine = [r for r in rows if r["setup"] == setup and r.get("mode") == "closed"]
            levels = [r["level"] for r in mine]
            top.plot(levels, [r["throughput_samples_per_s"] for r in mine], marker="o", label=setup)
            bottom.plot(levels, [r["p50_ms"] for r in mine], marker="o", label=setup)
        for r in rows:
            if r.get("mode") == "bound":
                top.axhline(r["throughput_samples_per_s"], linestyle="--", color="gray", label="torch bound")
        top.set_ylabel("samples/s")
        bottom.set_ylabel("p50 latency (ms)")
        bottom.set_xlabel("requests in flight")
        top.set_xscale("log", base=2)
        top.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=100)


@click.command()
@click.argument("target", required=False)
@click.option("--compare", is_flag=True, help="Measure torch alone, plain Serve (whole, chained) and partserve.")
@click.option("--url", help="Benchmark a running server over HTTP (e.g. http://127.0.0.1:8000).")
@click.option("--app", "app_name", help="Benchmark a running Serve app through its Python handle.")
@click.option("--address", default="auto", show_default=True, help="Ray cluster of --app.")
@click.option("--model", "model_name", help="Model name in /v2/models/NAME (with --url).")
@click.option("--concurrency", default="1,8,32,64", show_default=True, help="Closed-loop levels (requests).")
@click.option("--rates", default="", help="Open-loop Poisson rates (requests/s), e.g. 50,100.")
@click.option("--duration-s", type=click.FloatRange(min=0.5), default=5.0, show_default=True)
@click.option("--warmup-s", type=click.FloatRange(min=0), default=2.0, show_default=True)
@click.option("--samples-per-request", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--max-batch-size", type=click.IntRange(min=1), help="Samples per batch (default: the plan's).")
@click.option("--entrance-replicas", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--out", "parquet", type=click.Path(dir_okay=False), help="Write all rows to this Parquet file.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write throughput and latency curves (PNG).")
@click.option("--json", "as_json", is_flag=True)
@domain_errors
def bench(
    target: str | None,
    compare: bool,
    url: str | None,
    app_name: str | None,
    address: str,
    model_name: str | None,
    concurrency: str,
    rates: str,
    duration_s: float,
    warmup_s: float,
    samples_per_request: int,
    max_batch_size: int | None,
    entrance_replicas: int,
    parquet: str | None,
    plot: str | None,
    as_json: bool,
) -> None:
    """Closed-loop concurrency and open-loop Poisson sweeps: throughput, p50/p90/p99, stage utilisation."""

    from partitions.errors import PartserveError
    from serve_app import bench as b

    load = b.Load([int(c) for c in _floats(concurrency)], _floats(rates), duration_s, warmup_s, samples_per_request)
    if sum(map(bool, (compare, url, app_name))) != 1:
        raise PartserveError("say what to measure", "pass one of --compare, --url URL or --app NAME")
    if compare:
        from partserve.cli.serving import resolve_plan
        from serve_app.app import AppArgs

        uri = resolve_plan(target, 4, 8, not as_json)
        args = AppArgs(plan_uri=uri, num_cpus=0, max_batch_size=max_batch_size, entrance_replicas=entrance_replicas)
        report = (lambda step: None) if as_json else (lambda step: err_console.print(f"measuring {step} ..."))
        out = asyncio.run(b.compare(uri, load, args, report))
        out["summary"] = b.summary(out["rows"])
        _report(out, parquet, plot, as_json)
    else:
        _report(asyncio.run(_against_running(url, app_name, address, model_name, target, load)), parquet, plot, as_json)


def _report(out: dict[str, Any], parquet: str | None, plot: str | None, as_json: bool) -> None:
    """Write the files, then print the JSON or the tables."""
    _write(out["rows"], parquet, plot)
    if as_json:
        emit_json(out)
        return
    rows = [
        [
            r["setup"],
            r.get("mode"),
            r.get("level"),
            f"{r['throughput_samples_per_s']:.1f}",
            f"{r.get('p50_ms', float('nan')):.1f}",
            f"{r.get('p90_ms', float('nan')):.1f}",
            f"{r.get('p99_ms', float('nan')):.1f}",
            r.get("errors", 0),
        ]
        for r in out["rows"]
    ]
    console.print(table("bench", ["setup", "mode", "level", "samples/s", "p50 ms", "p90 ms", "p99 ms", "errors"], rows))
    for name, figures in out.get("stage_figures", {}).items():
        console.print(
            f"{name} stages: "
            + ", ".join(
                f"{f['stage']}: {100 * f['utilisation']:.0f}% busy, {f['batch_samples']:.1f} samples/batch"
                for f in figures
            )
        )
    if "summary" in out:
        console.print(
            table(
                "compare (best throughput of each setup)",
                ["setup", "samples/s", "vs (a) torch", "vs (b) serve-whole"],
                [
                    [
                        s["setup"],
                        f"{s['throughput_samples_per_s']:.1f}",
                        f"{s['vs_torch']:.2f}",
                        f"{s['vs_serve_whole']:.2f}",
                    ]
                    for s in out["summary"]
                ],
            )
        )


async def _against_running(
    url: str | None, app_name: str | None, address: str, model_name: str | None, target: str | None, load: Any
) -> dict[str, Any]:
    import httpx
    import numpy as np

    from partitions.artifacts import read_plan
    from partitions.errors import PartserveError
    from serve_app import bench as b

    if target is None:
        raise PartserveError("bench needs the plan directory to make inputs", "pass PLAN_DIR as TARGET")
    plan = read_plan(target)
    requests = b.payloads(plan, load.samples_per_request)
    if url:
        if len(plan.inputs) != 1:
            raise PartserveError("--url sends .npy bodies, which carry one input", "use --app for this model")
        from serve_app.app import default_model_name

        endpoint = f"{url.rstrip('/')}/v2/models/{model_name or default_model_name(plan)}/infer"
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=1024)) as client:

            async def send(payload: dict[str, np.ndarray]) -> None:
                body = io.BytesIO()
                np.save(body, next(iter(payload.values())), allow_pickle=False)
                r = await client.post(endpoint, content=body.getvalue(), headers={"content-type": "application/x-npy"})
                r.raise_for_status()

            results = await b.sweep(b.cycling(send, requests), load)
        return {"rows": [{"setup": url, **r.row(), "first_error": r.first_error} for r in results]}
    import ray
    from ray import serve

    ray.init(address=address, log_to_driver=False)
    handle = serve.get_app_handle(app_name)
    start = time.time()
    results = await b.sweep(b.cycling(handle.infer.remote, requests), load)
    return {
        "rows": [{"setup": app_name, **r.row(), "first_error": r.first_error} for r in results],
        "stage_figures": {app_name: await b.stage_figures(app_name, plan, start, time.time())},
    }
