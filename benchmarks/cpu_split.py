"""Where the CPU goes under load: CPU seconds of every process on this machine while one Serve setup takes a
closed-loop load through its Python handle, per request served.

On a machine with few cores the pipeline's throughput is CPU time per request: model compute in the stages,
plus the per-request and per-batch work of the entrance, the load generator and Ray. This splits it up::

    PYTHONPATH=. python3 benchmarks/cpu_split.py PLAN_DIR --setup partserve --concurrency 16
    PYTHONPATH=. python3 benchmarks/cpu_split.py PLAN_DIR --setup partserve -O max_concurrent_batches=8
    PYTHONPATH=. python3 benchmarks/cpu_split.py PLAN_DIR --setup serve-whole

``-O key=value`` sets an :class:`~serve_app.app.AppArgs` field of the partserve setup (values read as Python
literals). Prints throughput, CPU ms per request for each process, and the stages' utilisation and mean batch.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import time

import psutil
import ray
from ray import serve

from partitions.storage import read_plan
from serve_app import bench
from serve_app.app import AppArgs
from serve_app.loadgen import closed_loop


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """Per process id: its title (Ray names actors ``ray::ServeReplica:app:deployment``) and CPU seconds."""
    out = {}
    for p in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        try:
            times = p.info["cpu_times"]
            out[p.info["pid"]] = (" ".join(p.info["cmdline"] or [])[:80], times.user + times.system)
        except (psutil.Error, TypeError):
            continue
    return out


async def measure(plan_uri: str, setup: str, concurrency: int, duration_s: float, options: dict) -> None:
    plan = read_plan(plan_uri)
    config, make = bench.serve_setups(plan, AppArgs(plan_uri=plan_uri, num_cpus=0, **options))[setup]
    print(config)
    handle = serve.run(make(), name="split", route_prefix=None)
    call = bench.cycling(handle.infer.remote, bench.payloads(plan, 1))
    await closed_loop(call, concurrency, duration_s=3.0, warmup_s=1.0)
    before, start = cpu_seconds(), time.time()
    result = await closed_loop(call, concurrency, duration_s, warmup_s=0.0)
    after, end = cpu_seconds(), time.time()
    spent = sorted(((after[p][1] - before[p][1], after[p][0]) for p in after if p in before), reverse=True)
    total = sum(s for s, _ in spent)
    print(
        f"{setup} at {concurrency} in flight: {result.throughput_samples_per_s:.1f} samples/s, "
        f"p50 {result.percentile_ms(50):.0f} ms; {total:.1f} CPU s in {end - start:.1f} s, "
        f"{1e3 * total / result.requests:.1f} CPU ms per request"
    )
    for s, title in spent[:10]:
        print(f"  {1e3 * s / result.requests:6.2f} ms/request  {title}")
    if setup not in bench.WHOLE_SETUPS:
        for f in await bench.stage_figures("split", plan, start, end):
            print(f"  stage {f['stage']}: {f['utilisation']:.0%} busy, {f['batch_samples']:.1f} samples per batch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plan")
    parser.add_argument("--setup", choices=list(bench.SERVE_SETUPS), default="partserve")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("-O", dest="options", action="append", default=[], help="AppArgs field, key=value")
    args = parser.parse_args()
    options = {k: ast.literal_eval(v) for k, v in (o.split("=", 1) for o in args.options)}
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        asyncio.run(measure(args.plan, args.setup, args.concurrency, args.duration_s, options))
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
