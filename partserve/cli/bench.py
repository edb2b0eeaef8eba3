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

        fig, (top, bottom, right) = plt.subplots(3, 1, figsize=(7, 10))
        closed = [r for r in rows if r.get("mode") == "closed" and r.get("path", "handle") == "handle"]
        for setup in dict.fromkeys(str(r["setup"]) for r in closed):
            mine = [r for r in closed if r["setup"] == setup]
            levels = [r["level"] for r in mine]
            top.plot(levels, [r["throughput_samples_per_s"] for r in mine], marker="o", label=setup)
            bottom.plot(levels, [r["p50_ms"] for r in mine], marker="o", label=setup)
            right.plot(
                [r["p99_ms"] for r in mine], [r["throughput_samples_per_s"] for r in mine], marker="o", label=setup
            )
        for r in rows:
            if r.get("mode") == "bound":
                top.axhline(r["throughput_samples_per_s"], linestyle="--", color="gray", label=f"{r['setup']} bound")
        top.set_ylabel("samples/s")
        bottom.set_ylabel("p50 latency (ms)")
        bottom.set_xlabel("requests in flight")
        top.set_xscale("log", base=2)
        bottom.set_xscale("log", base=2)
        right.set_xlabel("p99 latency (ms)")
        right.set_ylabel("samples/s")
        right.set_xscale("log")
        top.legend()
        right.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=100)


@click.command()
@click.argument("target", required=False)
@click.option(
    "--compare",
    is_flag=True,
    help="Measure torch alone, plain Serve (the whole model in one replica or one per core; chained stages) and "
    "partserve.",
)
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
@click.option(
    "--by-value-max-bytes",
    type=click.IntRange(min=0),
    default=1 << 20,
    show_default=True,
    help="With --compare: batches whose messages between stages are estimated at most this many bytes go by "
    "value over Serve's gRPC, larger ones by reference (0: all by reference), in partserve and the chain.",
)
@click.option("--slo-ms", type=click.FloatRange(min=0), help="p99 bound of the SLO figure (default: 4x torch's batch).")
@click.option(
    "--http-level",
    type=click.IntRange(min=0),
    default=16,
    show_default=True,
    help="With --compare: requests in flight of one HTTP run per setup (0: none).",
)
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
    by_value_max_bytes: int,
    slo_ms: float | None,
    http_level: int,
    parquet: str | None,
    plot: str | None,
    as_json: bool,
) -> None:
    """Closed-loop concurrency and open-loop Poisson sweeps: throughput, p50/p90/p99, stage utilisation."""

    from partitions.errors import PartserveError
    from serve_app import bench as b

    load = b.Load(
        [int(c) for c in _floats(concurrency)],
        _floats(rates),
        duration_s,
        warmup_s,
        samples_per_request,
        http_level=http_level,
    )
    if sum(map(bool, (compare, url, app_name))) != 1:
        raise PartserveError("say what to measure", "pass one of --compare, --url URL or --app NAME")
    if compare:
        from partserve.cli.serving import resolve_plan
        from serve_app.app import AppArgs
        from serve_app.stop_signals import stop_on_signals

        uri = resolve_plan(target, None, 8, not as_json)
        args = AppArgs(
            plan_uri=uri,
            num_cpus=0,
            max_batch_size=max_batch_size,
            entrance_replicas=entrance_replicas,
            by_value_max_bytes=by_value_max_bytes,
        )
        report = (lambda step: None) if as_json else (lambda step: err_console.print(f"measuring {step} ..."))
        stop_on_signals()  # each setup's process shuts its Ray down when this one stops
        out = asyncio.run(b.compare(uri, load, args, report))
        out["summary"] = b.summary(out["rows"], slo_ms)
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
            r.get("path", ""),
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
    console.print(
        table("bench", ["setup", "path", "mode", "level", "samples/s", "p50 ms", "p90 ms", "p99 ms", "errors"], rows)
    )
    for name, figures in out.get("stage_figures", {}).items():
        console.print(
            f"{name} stages: "
            + ", ".join(
                f"{f['stage']}: {100 * f['utilisation']:.0f}% busy, {f['batch_samples']:.1f} samples/batch"
                for f in figures
            )
        )
    if "summary" in out:
        _print_summary(out)


def _num(value: Any, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def _level_cell(figures: dict[str, Any] | None) -> str:
    """``samples/s (p50/p99)`` of one setup at one level."""
    if figures is None:
        return "-"
    t, p50, p99 = (figures[k] for k in ("throughput_samples_per_s", "p50_ms", "p99_ms"))
    return f"{_num(t)} ({_num(p50, 0)}/{_num(p99, 0)})"


def _print_summary(out: dict[str, Any]) -> None:
    """The comparison's tables: configurations, best against best, equal load, SLO, idle latency, HTTP."""
    from serve_app.bench import BASELINES, SERVE_SETUPS, summary_key

    s = out["summary"]
    keys = [
        "replicas",
        "torch_threads",
        "replica_cpus",
        "max_batch_size",
        "batch_wait_s",
        "stage_max_batch_size",
        "stage_batch_wait_s",
        "max_ongoing_requests",
        "in_flight_batches",
        "by_value_max_bytes",
        "access_log",
    ]
    configs = out["configs"]
    console.print(
        table(
            f"setups ({out['cores']} cores)",
            ["setup", *keys],
            [
                [name, *(_num(c[k], 3) if isinstance(c[k], float) else str(c[k]) for k in keys)]
                for name, c in configs.items()
            ],
        )
    )
    console.print(
        table(
            "best throughput of each setup (handles)",
            ["setup", "samples/s", "in flight", "p50 ms", "p99 ms", "vs torch", *(f"vs {b}" for b in BASELINES)],
            [
                [
                    r["setup"],
                    _num(r["throughput_samples_per_s"]),
                    str(r["at_level"]),
                    _num(r["p50_ms"]),
                    _num(r["p99_ms"]),
                    _num(r["vs_torch"], 2),
                    *(_num(r[f"vs_{summary_key(b)}"], 2) for b in BASELINES),
                ]
                for r in s["best"]
            ],
        )
    )
    setups = [n for n in SERVE_SETUPS if n in configs]
    console.print(
        table(
            "at equal load (samples/s, p50/p99 ms)",
            ["in flight", *setups, *(f"partserve / {b}" for b in BASELINES)],
            [
                [
                    str(e["level"]),
                    *(_level_cell(e.get(n)) for n in setups),
                    *(_num(e[f"partserve_vs_{summary_key(b)}"], 2) for b in BASELINES),
                ]
                for e in s["at_level"]
            ],
        )
    )
    console.print(
        f"under p99 <= {_num(s['slo_ms'])} ms: "
        + ", ".join(
            f"{n} {_num(v['throughput_samples_per_s'])} samples/s (at {v['level']})" for n, v in s["slo"].items()
        ),
        highlight=False,
    )
    idle = s["idle"]
    console.print(
        f"idle (1 in flight) p50: partserve {_num(idle['partserve_p50_ms'])} ms = "
        f"{_num(idle['vs_stages_in_process'], 2)}x its stages back to back in one process "
        f"({_num(idle['stages_in_process_p50_ms'])} ms), {_num(idle['vs_serve_whole'], 2)}x serve-whole "
        f"({_num(idle['serve_whole_p50_ms'])} ms)",
        highlight=False,
    )
    for name, h in s["http"].items():
        console.print(
            f"http {name} at {h['level']}: {_num(h['http_samples_per_s'])} samples/s (handles: "
            f"{_num(h['handle_samples_per_s'])}), p99 {_num(h['http_p99_ms'])} ms",
            highlight=False,
        )


async def _against_running(
    url: str | None, app_name: str | None, address: str, model_name: str | None, target: str | None, load: Any
) -> dict[str, Any]:
    import httpx
    import numpy as np

    from partitions.errors import PartserveError
    from partitions.storage import read_plan
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
