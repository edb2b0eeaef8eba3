"""Benchmarks: sweeps against a running deployment, and ``--compare`` of partserve with plain Ray Serve.

``compare`` measures, on one machine and one model, in one run:

(a) ``torch``: the model's forward alone at the plan's batch size, in this process (last): the bound;
(b) ``serve-whole``: plain Ray Serve, the whole model in one deployment with ``@serve.batch``;
(c) ``serve-chain``: plain Ray Serve, one deployment per stage, ``@serve.batch`` each, chained per request;
(d) ``partserve``: the pipeline (batches formed at the entrance, several in flight across the stages).

Serve setups get the same closed-loop load through Python handles from this process, each on a fresh local
Ray (:func:`fresh_serve`).
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import ray
import torch
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from partitions.artifacts import read_plan
from partitions.costs import measure_ms
from partitions.plan import Plan
from partitions.runtime import pick_device
from partitions.source import load_model
from partitions.verify import random_inputs
from serve_app.app import AppArgs, batch_wait_s, build_app
from serve_app.baselines import plain_chain_app, whole_model_app
from serve_app.loadgen import Call, RunResult, closed_loop, open_loop
from serve_app.names import stage_name

SETUPS = ("torch", "serve-whole", "serve-chain", "partserve")


@dataclass
class Load:
    concurrency: list[int]
    rates_per_s: list[float]
    duration_s: float = 5.0
    warmup_s: float = 2.0
    samples_per_request: int = 1
    seed: int = 0


def payloads(plan: Plan, samples: int, count: int = 16, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """A few different random requests to cycle through (a cache, if on, sees repeats)."""
    return [random_inputs(plan, samples, seed + i) for i in range(count)]


def cycling(send: Callable[[dict[str, np.ndarray]], object], requests: list[dict[str, np.ndarray]]) -> Call:
    counter = iter(range(1 << 62))

    async def call() -> None:
        await send(requests[next(counter) % len(requests)])

    return call


async def sweep(call: Call, load: Load, progress: Callable[[], None] = lambda: None) -> list[RunResult]:
    results = []
    for c in load.concurrency:
        results.append(await closed_loop(call, c, load.duration_s, load.samples_per_request, load.warmup_s))
        progress()
    for rate in load.rates_per_s:
        results.append(await open_loop(call, rate, load.duration_s, load.samples_per_request, load.seed))
        progress()
    return results


def torch_bound(plan: Plan, repeats: int = 10) -> dict[str, float]:
    """Throughput (samples/s) and latency (ms) of the whole model's forward at the plan's batch size."""
    source = load_model(plan.model["spec"], plan.model["options"], plan.batch_size)
    device = pick_device()
    source.module.to(device)
    inputs = {k: v.to(device) for k, v in source.example_inputs.items()}
    ms = measure_ms(lambda: source.forward(inputs), device, repeats=repeats, warmup=3)
    return {"throughput_samples_per_s": plan.batch_size * 1e3 / ms, "p50_ms": ms, "threads": torch.get_num_threads()}


async def stage_figures(app: str, plan: Plan, since: float, until: float) -> list[dict[str, float]]:
    """Per stage: utilisation (busy share of the window) and mean samples per batch, from the replicas."""
    out = []
    for stage in plan.stages:
        handle = serve.get_deployment_handle(stage_name(stage.index), app)
        busy = [b for b in await handle.busy_intervals.remote() if b[1] > since and b[0] < until]
        busy_s = sum(min(end, until) - max(start, since) for start, end, _, _ in busy)
        out.append(
            {
                "stage": stage.index,
                "utilisation": busy_s / (until - since) if until > since else 0.0,
                "batch_samples": statistics.fmean(b[3] for b in busy) if busy else 0.0,
                "batches": len(busy),
            }
        )
    return out


def serve_setups(plan: Plan, args: AppArgs) -> dict[str, Callable[[], Application]]:
    """The Serve setups (b)-(d) by name, as application builders; all get the same batch size and wait."""
    batch = args.max_batch_size or plan.batch_size
    wait_s = batch_wait_s(plan, args)
    return {
        "serve-whole": lambda: whole_model_app(args.plan_uri, batch, wait_s),
        "serve-chain": lambda: plain_chain_app(args.plan_uri, batch, wait_s),
        "partserve": lambda: build_app(args),
    }


def entry(setup: str, handle: DeploymentHandle) -> DeploymentHandle:
    """What a setup's requests are sent to: partserve's ``infer`` method, the baselines' ``__call__``."""
    return handle.infer if setup == "partserve" else handle


@contextlib.contextmanager
def fresh_serve() -> Iterator[None]:
    """A local Ray with Serve, shut down on exit. Each setup gets its own: run one after another on one
    Ray, every setup measured slower than the one before it (the earlier setups' handles and routers kept
    working in this process and in Serve's controller)."""
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start()
        yield
    finally:
        with contextlib.redirect_stdout(sys.stderr):  # Ray's shutdown messages: stdout carries reports
            serve.shutdown()
            ray.shutdown()


async def compare(
    plan_uri: str, load: Load, args: AppArgs | None = None, progress: Callable[[str], None] = lambda step: None
) -> dict[str, object]:
    """Run (a)-(d) under the same closed-loop load, each Serve setup on a fresh local Ray; returns rows per
    setup and level, plus stage figures."""
    plan = read_plan(plan_uri)
    args = args or AppArgs(plan_uri=plan_uri, num_cpus=0)
    requests = payloads(plan, load.samples_per_request, seed=load.seed)
    rows: list[dict[str, object]] = []
    stages: dict[str, list[dict[str, float]]] = {}
    for name, make in serve_setups(plan, args).items():
        progress(name)
        app_name = f"bench-{name}"
        with fresh_serve():
            target = entry(name, serve.run(make(), name=app_name, route_prefix=None))
            start = time.time()
            for result in await sweep(cycling(target.remote, requests), load):
                rows.append({"setup": name, **result.row(), "first_error": result.first_error})
            if name != "serve-whole":
                stages[name] = await stage_figures(app_name, plan, start, time.time())
    # Last, with no Ray running: the model and torch's threads in this process slowed the load generator.
    progress("torch")
    rows.insert(0, {"setup": "torch", "mode": "bound", "level": plan.batch_size, **torch_bound(plan)})
    return {
        "plan": plan_uri,
        "model": plan.model["spec"],
        "stages": len(plan.stages),
        "batch_size": args.max_batch_size or plan.batch_size,
        "rows": rows,
        "stage_figures": stages,
    }


def summary(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Per setup: its best throughput (samples/s) and the p50 there, as ratios to (a) torch and (b) serve-whole."""
    best: dict[str, dict[str, object]] = {}
    for row in rows:
        s = str(row["setup"])
        if s not in best or float(row["throughput_samples_per_s"]) > float(best[s]["throughput_samples_per_s"]):
            best[s] = row
    bound = float(best["torch"]["throughput_samples_per_s"]) if "torch" in best else float("nan")
    whole = float(best["serve-whole"]["throughput_samples_per_s"]) if "serve-whole" in best else float("nan")
    return [
        {
            "setup": s,
            "throughput_samples_per_s": float(r["throughput_samples_per_s"]),
            "at_level": r["level"],
            "p50_ms": r.get("p50_ms"),
            "vs_torch": float(r["throughput_samples_per_s"]) / bound,
            "vs_serve_whole": float(r["throughput_samples_per_s"]) / whole,
        }
        for s, r in ((s, best[s]) for s in SETUPS if s in best)
    ]
