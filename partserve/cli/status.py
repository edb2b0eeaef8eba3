"""``partserve status``: the Serve applications on a running Ray cluster, each deployment's replicas, and the
live figures of every pipeline stage, as a table (redrawn with ``--watch``) or JSON."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import click
from rich.console import Group
from rich.live import Live
from rich.table import Table

from partserve.cli.output import console, domain_errors, emit_json, table

if TYPE_CHECKING:
    from cluster.status import AppState, DeploymentState

COLUMNS = ["deployment", "replicas", "queue", "p50\nms", "p99\nms", "util", "req/\nbatch", "smp/\nbatch", "req/s"]
MARKS = {"HEALTHY": "", "UPSCALING": " ↑", "DOWNSCALING": " ↓"}
"""Deployment status after its name (any other status is written out)."""


def _number(value: float | None) -> str:
    """Two significant digits below 10, none after the point above: ``0.25``, ``2.5``, ``25``, ``250``."""
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.2g}"


def _replicas(dep: DeploymentState) -> str:
    """``running/target``, then the replicas in other states than RUNNING and STARTING (which the target
    implies), e.g. ``1/1 (2 STOPPING)``."""
    others = ", ".join(f"{n} {s}" for s, n in sorted(dep.replicas.items()) if s not in ("RUNNING", "STARTING"))
    text = f"{dep.replicas.get('RUNNING', 0)}/{dep.target_replicas}"
    return f"{text} ({others})" if others else text


def _row(dep: DeploymentState) -> list[str]:
    name = dep.name + MARKS.get(dep.status, f" {dep.status}")
    s = dep.stage
    if s is None:
        return [name, _replicas(dep), *["-"] * (len(COLUMNS) - 2)]
    return [
        name,
        _replicas(dep),
        str(s.queued_requests),
        _number(s.latency_ms_p50),
        _number(s.latency_ms_p99),
        f"{s.utilisation:.0%}",
        _number(s.batch_requests),
        _number(s.batch_samples),
        _number(s.requests_per_s),
    ]


def render(apps: list[AppState], window_s: float) -> Group:
    """One table per application."""
    tables: list[Table] = []
    for app in apps:
        title = f"{app.name}: {app.status}" + (f" ({app.message})" if app.message and app.status != "RUNNING" else "")
        t = table(title, COLUMNS, [_row(d) for d in app.deployments])
        t.columns[0].min_width = max(len(cell) for cell in t.columns[0].cells)  # names stay whole
        t.caption = f"{time.strftime('%H:%M:%S')}; ↑ upscaling, ↓ downscaling; stage figures: last {window_s:.0f} s"
        tables.append(t)
    return Group(*tables)


@click.command("status")
@click.option(
    "--address",
    default="auto",
    show_default=True,
    help="Ray cluster: auto (the one this machine runs or RAY_ADDRESS names), HOST:PORT or ray://HOST:10001.",
)
@click.option("--app", "app_name", help="Only this Serve application.")
@click.option("--watch", type=click.FloatRange(min=0.5), metavar="SECONDS", help="Redraw every SECONDS until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON once.")
@domain_errors
def status(address: str, app_name: str | None, watch: float | None, as_json: bool) -> None:
    """Replicas (running/target) of each deployment; queued requests, batch latency p50/p99, utilisation
    (busy / wall time), batch size and throughput of each stage over its last 10 seconds."""
    if as_json and watch is not None:
        raise click.UsageError("--json prints once; drop --watch")
    import ray

    from cluster.status import connect, gather, to_json
    from serve_app.metrics import WINDOW_S

    connected = connect(address)
    try:
        if as_json:
            emit_json(to_json(gather(app_name)))
        elif watch is None:
            console.print(render(gather(app_name), WINDOW_S))
        else:
            with Live(render(gather(app_name), WINDOW_S), console=console, auto_refresh=False) as live:
                while True:
                    time.sleep(watch)
                    live.update(render(gather(app_name), WINDOW_S), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        if connected:
            ray.shutdown()
