"""Soak test: 120% of measured capacity for a long time, with every Ray worker's memory sampled.

Deploys a plan on a new local Ray + Serve instance (127.0.0.1 only), measures capacity with a closed loop,
then offers ``--overload`` times that rate (Poisson arrivals) for ``--duration-s`` seconds. The excess must
be refused with 503 + ``Retry-After`` (bounded queues) instead of queueing without bound, and the resident
memory (RSS) of every process under this Ray instance's raylet must stay flat. Not part of CI::

    PYTHONPATH=. python3 benchmarks/soak.py                          # demo-mlp, 10 minutes
    PYTHONPATH=. python3 benchmarks/soak.py --duration-s 150 --sample-s 10 --out soak.json
    PYTHONPATH=. python3 benchmarks/soak.py --plan plans/t24 --model-name t24

Prints one line per sample (seconds, answers so far by status, total RSS in MiB) and a summary per process:
RSS at the start and end of the second half of the run and its slope there (MiB/min). Exits 1 when a
slope exceeds ``--max-slope-mib-per-min`` or a request ends other than 200 or 503 + Retry-After.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from cluster import local
from partitions.dtypes import oip_datatype
from partitions.inputs import random_inputs
from partitions.storage import read_plan
from serve_app.loadgen import closed_loop, open_loop
from serve_app.ports import free_port

MIB = 2**20


@dataclass
class Samples:
    """RSS in bytes per process (``pid name``) at each sample time (seconds since the soak began)."""

    times_s: list[float] = field(default_factory=list)
    rss: dict[str, list[tuple[float, int]]] = field(default_factory=dict)

    def add(self, t_s: float, by_process: dict[str, int]) -> None:
        self.times_s.append(t_s)
        for name, rss in by_process.items():
            self.rss.setdefault(name, []).append((t_s, rss))


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid``: psutil if installed, else /proc."""
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        found, frontier = [], [pid]
        while frontier:
            kids = [c for c, p in parents.items() if p in frontier]
            found += kids
            frontier = kids
        return found


def _rss_and_name(pid: int) -> tuple[int, str] | None:
    """Resident bytes and command line of ``pid`` from /proc (a Ray worker's title without the task it runs
    now: ``ray::ServeReplica:app:stage-0``); None once it exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    rss = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    if cmdline.startswith("ray::"):
        cmdline = cmdline.split(".", 1)[0]
    return rss, cmdline[:60]


def ray_processes() -> dict[str, int]:
    """RSS in bytes of every process under this driver's raylet, keyed ``pid name``."""
    from serve_app.ray_internals import raylet_pid

    raylet = raylet_pid()
    sampled = {pid: _rss_and_name(pid) for pid in [raylet, *_children(raylet)]}
    return {f"{pid} {info[1]}": info[0] for pid, info in sampled.items() if info is not None}


def slope_mib_per_min(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time, in MiB per minute (0 for fewer than 2 points)."""
    if len(points) < 2:
        return 0.0
    t = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points], dtype=np.float64) / MIB
    return float(np.polyfit(t / 60.0, y, 1)[0]) if np.ptp(t) > 0 else 0.0


def request_body(plan_uri: str, batch: int) -> dict[str, object]:
    """A valid OIP JSON request of ``batch`` samples of random inputs."""
    plan = read_plan(plan_uri)
    arrays = random_inputs(plan.inputs, batch, 0, plan.input_ranges)
    inputs = []
    for spec in plan.inputs:
        data = arrays[spec.name]
        inputs.append(
            {
                "name": spec.name,
                "shape": list(data.shape),
                "datatype": oip_datatype(spec.dtype),
                "data": data.ravel().tolist(),
            }
        )
    return {"inputs": inputs}


async def soak(args: argparse.Namespace, url: str, body: dict[str, object]) -> dict[str, object]:
    statuses: Counter[str] = Counter()
    samples = Samples()
    limits = httpx.Limits(max_connections=args.max_in_flight, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=args.timeout_s, limits=limits) as client:

        async def call() -> None:
            r = await client.post(url, json=body)
            ok = r.status_code == 200 or (r.status_code == 503 and r.headers.get("retry-after", "").isdigit())
            statuses[str(r.status_code) if ok else f"unexpected {r.status_code}"] += 1
            if not ok:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")

        capacity = await closed_loop(call, args.concurrency, args.capacity_s, warmup_s=2.0)
        rate = args.overload * capacity.requests / capacity.wall_s
        measured = capacity.requests / capacity.wall_s
        print(
            f"capacity {measured:.1f} requests/s at concurrency {args.concurrency}; offering {rate:.1f}/s", flush=True
        )
        statuses.clear()
        start = time.monotonic()

        async def sampler() -> None:
            while (t := time.monotonic() - start) < args.duration_s:
                by_process = ray_processes()
                samples.add(t, by_process)
                print(f"{t:7.0f} s  {dict(statuses)}  total RSS {sum(by_process.values()) / MIB:8.1f} MiB", flush=True)
                await asyncio.sleep(args.sample_s)

        offered, _ = await asyncio.gather(
            open_loop(call, rate, args.duration_s, max_in_flight=args.max_in_flight), sampler()
        )
    samples.add(time.monotonic() - start, ray_processes())
    half = args.duration_s / 2
    processes = {}
    for name, points in samples.rss.items():
        late = [p for p in points if p[0] >= half]
        if late:
            processes[name] = {
                "rss_mib_at_half": late[0][1] / MIB,
                "rss_mib_at_end": late[-1][1] / MIB,
                "slope_mib_per_min": slope_mib_per_min(late),
            }
    ok = offered.latencies_ms
    return {
        "capacity_requests_per_s": capacity.requests / capacity.wall_s,
        "offered_requests_per_s": rate,
        "duration_s": args.duration_s,
        "statuses": dict(statuses),
        "errors": offered.errors,
        "first_error": offered.first_error,
        "latency_ms_p50": float(np.percentile(ok, 50)) if ok else None,
        "latency_ms_p99": float(np.percentile(ok, 99)) if ok else None,
        "processes": processes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", help="plan directory (default: plan demo-mlp into 2 stages in a temp dir)")
    parser.add_argument("--model-name", default="model")
    parser.add_argument("--duration-s", type=float, default=600.0, help="soak length, seconds (default 600)")
    parser.add_argument("--overload", type=float, default=1.2, help="offered rate / measured capacity")
    parser.add_argument("--capacity-s", type=float, default=20.0, help="seconds of the capacity measurement")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients measuring capacity")
    parser.add_argument("--batch", type=int, default=1, help="samples per request")
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--max-in-flight", type=int, default=512, help="open-loop bound on outstanding requests")
    parser.add_argument("--entrance-max-ongoing", type=int, default=64, help="AppArgs.entrance_max_ongoing_requests")
    parser.add_argument("--entrance-max-queued", type=int, default=64, help="AppArgs.entrance_max_queued_requests")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per-request timeout, seconds")
    parser.add_argument("--max-slope-mib-per-min", type=float, default=2.0)
    parser.add_argument("--out", help="write the summary as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plan_uri = args.plan
        if plan_uri is None:
            from partitions.partition import PlanOptions, build_plan
            from partitions.source import load_model

            plan_uri = f"{tmp}/mlp"
            build_plan(load_model("demo-mlp", {}), plan_uri, PlanOptions(stages=2, repeats=2, warmup=1))
        port = free_port()
        try:
            local.start(
                plan_uri,
                port=port,
                num_cpus=0,
                model_name=args.model_name,
                entrance_max_ongoing_requests=args.entrance_max_ongoing,
                entrance_max_queued_requests=args.entrance_max_queued,
            )
            base = f"http://127.0.0.1:{port}"
            local.wait_ready(base, 300)
            url = f"{base}/v2/models/{args.model_name}/infer"
            summary = asyncio.run(soak(args, url, request_body(plan_uri, args.batch)))
        finally:
            local.stop()
    print(f"{'process':<66} {'RSS@half MiB':>12} {'RSS@end MiB':>12} {'MiB/min':>8}")
    for name, p in sorted(summary["processes"].items(), key=lambda kv: -kv[1]["rss_mib_at_end"]):
        print(f"{name:<66} {p['rss_mib_at_half']:>12.1f} {p['rss_mib_at_end']:>12.1f} {p['slope_mib_per_min']:>8.2f}")
    print(json.dumps({k: v for k, v in summary.items() if k != "processes"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    growing = [n for n, p in summary["processes"].items() if p["slope_mib_per_min"] > args.max_slope_mib_per_min]
    unexpected = summary["errors"] or any(k.startswith("unexpected") for k in summary["statuses"])
    if growing:
        print(f"memory grows in {growing}", file=sys.stderr)
    if unexpected:
        print(f"unexpected answers: {summary['first_error']}", file=sys.stderr)
    return 1 if growing or unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
