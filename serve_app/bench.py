"""Benchmarks: sweeps against a running deployment, and ``--compare`` of partserve with plain Ray Serve.

``compare`` measures, on one machine and one model, in one run:

(a) ``torch``: the model's forward alone at the plan's batch size with all cores, in this process (last):
    the bound; ``torch-stages``: the plan's stages back to back in one process, the same way (what cutting
    costs before any serving), and at one request's size with the stage replicas' threads (the latency an
    idle pipeline could reach);
(b) ``serve-whole``: plain Ray Serve, the whole model in one deployment with ``@serve.batch``, its replica
    given all cores; ``serve-replicas``: the same deployment with one replica per core, each given one core
    (the other way a Serve user spends the cores: replicas instead of threads);
(c) ``serve-chain``: plain Ray Serve, one deployment per stage, ``@serve.batch`` each with partserve's stage
    batch and wait and threads, chained per request;
(d) ``partserve``: the pipeline (batches formed at the entrance, several in flight across the stages).

Every setup's configuration (:class:`~serve_app.baselines.SetupConfig`: threads, CPUs, batch, wait, in flight,
access log) goes into its rows. Serve setups get the same closed-loop load through Python handles from this
process (no HTTP proxy on the path), each in its own process on a fresh local Ray, then one closed-loop
level over HTTP (``.npy`` bodies through Serve's proxy) so the proxy's share shows too. :func:`summary`
compares best against best, at every concurrency level, and under a p99 bound (``slo_ms``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import multiprocessing
import os
import statistics
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import partial
from multiprocessing.connection import Connection

import httpx
import numpy as np
import ray
import torch
from ray import serve
from ray.serve import Application

from partitions.costs import measure_ms
from partitions.dtypes import to_numpy
from partitions.engines import EAGER, ENGINES, stages_engine, whole_model
from partitions.errors import PartserveError
from partitions.inputs import random_inputs
from partitions.plan import Plan
from partitions.runtime import load_pipeline, pick_device, run_pipeline
from partitions.source import plan_model
from partitions.storage import read_plan
from serve_app.app import STAGE_MAX_ONGOING, AppArgs, build_app, default_model_name, entrance_config, stage_config
from serve_app.baselines import SetupConfig, plain_chain_app, whole_model_app
from serve_app.loadgen import Call, RunResult, closed_loop, open_loop
from serve_app.names import stage_name
from serve_app.ports import free_port
from serve_app.ray_internals import stop_signals_held
from serve_app.stop_signals import stop_on_signals

SETUPS = (
    "torch",
    *(f"torch-{engine}" for engine in ENGINES if engine != EAGER),
    "torch-stages",
    "serve-whole",
    "serve-replicas",
    "serve-chain",
    "partserve",
)
BASELINES = ("serve-whole", "serve-replicas", "serve-chain")
"""The plain Serve setups partserve is compared with, at every level and best against best."""
SERVE_SETUPS = (*BASELINES, "partserve")
WHOLE_SETUPS = ("serve-whole", "serve-replicas")
SETUP_EXIT_S = 60.0
"""How long a setup's process may take to shut its Ray down and exit, in s."""
SetupFigures = tuple[list[dict[str, object]], list[dict[str, float]] | None]
"""A setup's rows, and its per-stage figures (``None`` for the whole-model setups)."""


def summary_key(setup: str) -> str:
    """A setup's name in the keys of :func:`summary`'s ratios: ``serve-whole`` -> ``serve_whole``."""
    return setup.replace("-", "_")


@dataclass
class Load:
    concurrency: list[int]
    rates_per_s: list[float]
    duration_s: float = 5.0
    warmup_s: float = 2.0
    samples_per_request: int = 1
    seed: int = 0
    http_level: int = 16
    """Requests in flight of the one HTTP run per setup (0: none)."""


def payloads(plan: Plan, samples: int, count: int = 16, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """A few different random requests to cycle through (a cache, if on, sees repeats)."""
    return [random_inputs(plan.inputs, samples, seed + i, plan.input_ranges) for i in range(count)]


def cycling(send: Callable[[dict[str, np.ndarray]], Awaitable[object]], requests: list[dict[str, np.ndarray]]) -> Call:
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


def torch_bounds(
    plan: Plan, plan_uri: str, samples_per_request: int, stage_threads: int, repeats: int = 10
) -> list[dict[str, object]]:
    """Rows of the in-process bounds: the whole model (eager, and exported as the stages are when they run
    another engine, on that engine: ``torch-onnxruntime``, ...) and the stages back to back on their
    engines, at the plan's batch size with all cores (``mode: bound``), and the stages at
    ``samples_per_request`` with ``stage_threads`` threads (``mode: bound-latency``). Throughput in
    samples/s, latency (median) in ms."""
    cores = os.cpu_count() or 1
    source = plan_model(plan)
    device = pick_device()
    source.module.to(device)
    runners = load_pipeline(plan_uri, str(device), threads=cores)
    latency_runners = load_pipeline(plan_uri, str(device), threads=stage_threads)  # ONNX Runtime's pools are fixed
    inputs = {k: v.to(device) for k, v in source.example_inputs.items()}
    batch = {k: to_numpy(v) for k, v in inputs.items()}
    one = random_inputs(plan.inputs, samples_per_request, 0, plan.input_ranges)
    rows: list[dict[str, object]] = []

    def row(setup: str, mode: str, level: int, threads: int, fn: Callable[[], object]) -> None:
        torch.set_num_threads(threads)
        ms = measure_ms(fn, device, repeats=repeats, warmup=3)
        rows.append(
            {
                "setup": setup,
                "mode": mode,
                "level": level,
                "throughput_samples_per_s": level * 1e3 / ms,
                "p50_ms": ms,
                "cfg_torch_threads": threads,
                "cfg_max_batch_size": level,
            }
        )

    try:
        row("torch", "bound", plan.batch_size, cores, lambda: source.forward(inputs))
        engine = stages_engine([r.engine for r in runners])
        if engine:  # the whole model on the stages' engine, on equal terms
            args, kwargs = source.call_args(inputs)
            whole = whole_model(source.module, args, kwargs, device, cores, engine)
            arrays = list(batch.values())
            row(f"torch-{engine}", "bound", plan.batch_size, cores, lambda: whole(arrays))
        row("torch-stages", "bound", plan.batch_size, cores, lambda: run_pipeline(runners, batch))
        latency = lambda: run_pipeline(latency_runners, one)
        row("torch-stages", "bound-latency", samples_per_request, stage_threads, latency)
    finally:
        torch.set_num_threads(cores)
    return rows


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


def setup_configs(plan: Plan, args: AppArgs, cores: int) -> dict[str, SetupConfig]:
    """The configuration of each Serve setup on equal terms with partserve's ``args`` on ``cores`` CPUs:

    * ``partserve``: as ``args`` builds it (stage threads: ``torch_threads``, else Ray's one per reserved CPU);
    * ``serve-whole``: partserve's batch size and wait in ``@serve.batch``; the replica reserves every core
      and runs that many torch threads, as ``num_cpus`` gives a Serve user's replica;
    * ``serve-replicas``: the same, one replica per core, each reserving one core and running one thread;
    * ``serve-chain``: partserve's stage deployments with partserve's stage batch, wait and threads,
      ``max_ongoing_requests`` 2x the batch, and partserve's transport between stages;
    and the access log as ``args`` has it (off by default) everywhere."""
    entrance, stage = entrance_config(plan, args), stage_config(plan, args, 0)
    batch, wait_s, stage_batch = entrance.max_batch_size, entrance.batch_wait_timeout_s, stage.max_batch_size
    stage_threads = stage.torch_threads or max(1, int(args.num_cpus))
    common = {"access_log": args.access_log}
    whole_engine = stages_engine([s.engine.name for s in plan.stages]) or EAGER
    whole = SetupConfig(
        setup="serve-whole",
        torch_threads=cores,
        replica_cpus=float(cores),
        max_batch_size=batch,
        batch_wait_s=wait_s,
        stage_max_batch_size=None,
        stage_batch_wait_s=None,
        max_ongoing_requests=64,
        in_flight_batches=None,
        engine=whole_engine,
        **common,
    )
    return {
        "serve-whole": whole,
        "serve-replicas": replace(whole, setup="serve-replicas", torch_threads=1, replica_cpus=1.0, replicas=cores),
        "serve-chain": SetupConfig(
            setup="serve-chain",
            torch_threads=stage_threads,
            replica_cpus=args.num_cpus,
            max_batch_size=stage_batch,
            batch_wait_s=stage.batch_wait_timeout_s,
            stage_max_batch_size=stage_batch,
            stage_batch_wait_s=stage.batch_wait_timeout_s,
            max_ongoing_requests=2 * batch,
            in_flight_batches=None,
            engine=plan.engine,
            by_value_max_bytes=entrance.by_value_max_bytes,
            **common,
        ),
        "partserve": SetupConfig(
            setup="partserve",
            torch_threads=stage_threads,
            replica_cpus=args.num_cpus,
            max_batch_size=batch,
            batch_wait_s=wait_s,
            stage_max_batch_size=stage_batch,
            stage_batch_wait_s=stage.batch_wait_timeout_s,
            max_ongoing_requests=args.max_ongoing_requests or STAGE_MAX_ONGOING,
            in_flight_batches=entrance.max_concurrent_batches,
            engine=plan.engine,
            by_value_max_bytes=entrance.by_value_max_bytes,
            **common,
        ),
    }


def serve_setups(
    plan: Plan, args: AppArgs, cores: int | None = None
) -> dict[str, tuple[SetupConfig, Callable[[], Application]]]:
    """The Serve setups (b)-(d) by name: their configuration and application builder."""
    configs = setup_configs(plan, args, cores or os.cpu_count() or 1)
    return {
        **{name: (configs[name], partial(whole_model_app, args.plan_uri, configs[name])) for name in WHOLE_SETUPS},
        "serve-chain": (configs["serve-chain"], lambda: plain_chain_app(args.plan_uri, configs["serve-chain"])),
        "partserve": (configs["partserve"], lambda: build_app(args)),
    }


def http_path(setup: str, plan: Plan, args: AppArgs) -> str:
    """Where a setup takes ``.npy`` bodies over HTTP: partserve's OIP route, the baselines' root."""
    return f"/v2/models/{args.model_name or default_model_name(plan)}/infer" if setup == "partserve" else "/"


async def http_run(url: str, requests: list[dict[str, np.ndarray]], load: Load) -> RunResult:
    """One closed-loop level (``load.http_level`` in flight) of ``.npy`` POSTs to ``url``."""
    bodies = []
    for payload in requests:
        buf = io.BytesIO()
        np.save(buf, next(iter(payload.values())), allow_pickle=False)
        bodies.append(buf.getvalue())
    limits = httpx.Limits(max_connections=max(load.http_level, 1))
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def send(body: bytes) -> None:
            r = await client.post(url, content=body, headers={"content-type": "application/x-npy"})
            r.raise_for_status()

        counter = iter(range(1 << 62))

        async def call() -> None:
            await send(bodies[next(counter) % len(bodies)])

        return await closed_loop(call, load.http_level, load.duration_s, load.samples_per_request, load.warmup_s)


@contextlib.contextmanager
def fresh_serve(port: int) -> Iterator[None]:
    """A local Ray with Serve's proxy on 127.0.0.1:``port``, shut down on exit (a SIGINT or SIGTERM while Ray
    starts is held until it is up, :func:`~serve_app.ray_internals.stop_signals_held`). Each setup gets its
    own: run one after another on one Ray, every setup measured slower than the one before it (the earlier
    setups' handles and routers kept working in this process and in Serve's controller)."""
    try:
        with stop_signals_held():
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield
    finally:
        with contextlib.redirect_stdout(sys.stderr):  # Ray's shutdown messages: stdout carries reports
            if ray.is_initialized():
                serve.shutdown()
            ray.shutdown()


async def measure_setup(name: str, plan_uri: str, load: Load, args: AppArgs) -> SetupFigures:
    """One Serve setup on a fresh local Ray (:func:`fresh_serve`): the closed-loop sweep through a handle,
    then one HTTP level; its rows and (for the pipelines) per-stage figures."""
    plan = read_plan(plan_uri)
    requests = payloads(plan, load.samples_per_request, seed=load.seed)
    config, make = serve_setups(plan, args)[name]
    rows: list[dict[str, object]] = []
    figures = None
    app_name = f"bench-{name}"
    port = free_port()
    with fresh_serve(port):
        handle = serve.run(make(), name=app_name, route_prefix="/")
        start = time.time()
        for result in await sweep(cycling(handle.infer.remote, requests), load):
            rows.append(
                {"setup": name, "path": "handle", **result.row(), **config.row(), "first_error": result.first_error}
            )
        if name not in WHOLE_SETUPS:
            figures = await stage_figures(app_name, plan, start, time.time())
        if load.http_level and len(plan.inputs) == 1:
            url = f"http://127.0.0.1:{port}{http_path(name, plan, args)}"
            result = await http_run(url, requests, load)
            rows.append(
                {"setup": name, "path": "http", **result.row(), **config.row(), "first_error": result.first_error}
            )
    return rows, figures


def _setup_process(name: str, plan_uri: str, load: Load, args: AppArgs, results: Connection) -> None:
    """A setup's own process: stdout joins stderr (the parent's stdout carries its report), SIGINT and SIGTERM
    unwind through :func:`fresh_serve`'s clean-up, and the figures or the error go back through ``results``."""
    os.dup2(2, 1)
    stop_on_signals()
    try:
        results.send(("figures", asyncio.run(measure_setup(name, plan_uri, load, args))))
    except BaseException as exc:
        traceback.print_exc()
        results.send(("error", f"{type(exc).__name__}: {exc}"))


def measure_setup_in_own_process(name: str, plan_uri: str, load: Load, args: AppArgs) -> SetupFigures:
    """:func:`measure_setup` in a fresh (spawned) Python process, stopped in ``finally``. Ray is started and
    shut down once per process: restarting it in one process, with Serve's router and long-poll threads of
    the last session still running, can crash that process (SIGSEGV, ray-project/ray#31145)."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_setup_process, args=(name, plan_uri, load, args, send), name=f"bench-{name}")
    proc.start()
    send.close()
    try:
        while not receive.poll(0.2):  # not a blocking recv: a signal taken by another thread runs its handler
            pass
        kind, value = receive.recv()
    except EOFError:
        proc.join(timeout=SETUP_EXIT_S)
        kind, value = "error", f"its process ended with code {proc.exitcode}"
    except BaseException:
        proc.terminate()  # interrupted: the setup's process shuts its Ray down
        raise
    finally:
        _stop(proc)
    if kind == "error":
        raise PartserveError(f"measuring {name}: {value}", "the setup's own output is above")
    return value


def _stop(proc: multiprocessing.process.BaseProcess) -> None:
    """Wait up to :data:`SETUP_EXIT_S` for ``proc`` to exit (shutting its Ray down), then SIGTERM, then SIGKILL."""
    for stop in (lambda: None, proc.terminate, proc.kill):
        stop()
        proc.join(timeout=SETUP_EXIT_S)
        if not proc.is_alive():
            return


async def compare(
    plan_uri: str, load: Load, args: AppArgs | None = None, progress: Callable[[str], None] = lambda step: None
) -> dict[str, object]:
    """Run (a)-(d) under the same closed-loop load, each Serve setup in its own process on its own local Ray
    (handles, then one HTTP level); returns rows per setup and level with each setup's configuration, plus
    stage figures."""
    plan = read_plan(plan_uri)
    args = args or AppArgs(plan_uri=plan_uri, num_cpus=0)
    rows: list[dict[str, object]] = []
    stages: dict[str, list[dict[str, float]]] = {}
    setups = serve_setups(plan, args)
    for name in setups:
        progress(name)
        setup_rows, figures = measure_setup_in_own_process(name, plan_uri, load, args)
        rows += setup_rows
        if figures is not None:
            stages[name] = figures
    # Last, in this process (it never runs Ray), with the machine to itself.
    progress("torch")
    stage_threads = setups["partserve"][0].torch_threads
    rows[:0] = [
        {**r, "path": "in-process"} for r in torch_bounds(plan, plan_uri, load.samples_per_request, stage_threads)
    ]
    return {
        "plan": plan_uri,
        "model": plan.model["spec"],
        "stages": len(plan.stages),
        "batch_size": args.max_batch_size or plan.serve_batch_size,
        "cores": os.cpu_count(),
        "configs": {name: asdict(config) for name, (config, _) in setups.items()},
        "rows": rows,
        "stage_figures": stages,
    }


def _f(row: dict[str, object], key: str) -> float:
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) else float("nan")


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN where ``b`` is 0 (a setup that completed no request in a level's window)."""
    return a / b if b else float("nan")


def summary(rows: list[dict[str, object]], slo_ms: float | None = None) -> dict[str, object]:
    """Best against best, at equal load, and under a latency bound, from the rows of :func:`compare`.

    * ``best``: per setup its best closed-loop throughput through handles (samples/s; the bounds: their
      figure), the level and p50/p99 there, and ratios to the torch bound and to each Serve baseline;
    * ``at_level``: per concurrency level, each Serve setup's throughput, p50 and p99, and partserve's
      throughput as a ratio to each baseline at that same level;
    * ``slo``: per setup, the highest throughput whose p99 stays under ``slo_ms`` (default: 4x the torch
      bound's batch time);
    * ``idle``: partserve's p50 at one request in flight against the stages back to back in one process
      at one request's size (serving's cost to an idle request) and against the whole-model deployment's;
    * ``http``: each setup's throughput and p99 through Serve's HTTP proxy beside its handle figure."""
    closed = [r for r in rows if r.get("mode") == "closed" and r.get("path") == "handle"]
    bounds = {str(r["setup"]): r for r in rows if r.get("mode") == "bound"}
    best: dict[str, dict[str, object]] = dict(bounds)
    for row in closed:
        s = str(row["setup"])
        if s not in best or _f(row, "throughput_samples_per_s") > _f(best[s], "throughput_samples_per_s"):
            best[s] = row

    def tput(setup: str, source: dict[str, dict[str, object]]) -> float:
        return _f(source[setup], "throughput_samples_per_s") if setup in source else float("nan")

    reference = {s: tput(s, best) for s in ("torch", *BASELINES)}
    best_rows = [
        {
            "setup": s,
            "throughput_samples_per_s": tput(s, best),
            "at_level": r.get("level"),
            "p50_ms": r.get("p50_ms"),
            "p99_ms": r.get("p99_ms"),
            **{f"vs_{summary_key(k)}": ratio(tput(s, best), v) for k, v in reference.items()},
        }
        for s, r in ((s, best[s]) for s in SETUPS if s in best)
    ]
    levels = sorted({int(_f(r, "level")) for r in closed})
    at_level = []
    for level in levels:
        here = {str(r["setup"]): r for r in closed if int(_f(r, "level")) == level}
        entry: dict[str, object] = {"level": level}
        for s, r in here.items():
            entry[s] = {k: r.get(k) for k in ("throughput_samples_per_s", "p50_ms", "p99_ms")}
        mine = tput("partserve", here)
        for base in BASELINES:
            entry[f"partserve_vs_{summary_key(base)}"] = ratio(mine, tput(base, here))
        at_level.append(entry)
    if slo_ms is None and "torch" in bounds:
        slo_ms = 4 * _f(bounds["torch"], "p50_ms")
    slo = {}
    for s in SERVE_SETUPS:
        within = [r for r in closed if r["setup"] == s and _f(r, "p99_ms") <= (slo_ms or float("inf"))]
        top = max(within, key=lambda r: _f(r, "throughput_samples_per_s"), default=None)
        slo[s] = {
            "throughput_samples_per_s": _f(top, "throughput_samples_per_s") if top else 0.0,
            "level": top.get("level") if top else None,
        }
    one = {str(r["setup"]): r for r in closed if int(_f(r, "level")) == 1}
    latency = [r for r in rows if r.get("mode") == "bound-latency"]
    idle = {
        "partserve_p50_ms": _f(one["partserve"], "p50_ms") if "partserve" in one else float("nan"),
        "stages_in_process_p50_ms": _f(latency[0], "p50_ms") if latency else float("nan"),
        "serve_whole_p50_ms": _f(one["serve-whole"], "p50_ms") if "serve-whole" in one else float("nan"),
    }
    idle["vs_stages_in_process"] = ratio(idle["partserve_p50_ms"], idle["stages_in_process_p50_ms"])
    idle["vs_serve_whole"] = ratio(idle["partserve_p50_ms"], idle["serve_whole_p50_ms"])
    http = {
        str(r["setup"]): {
            "level": r.get("level"),
            "http_samples_per_s": _f(r, "throughput_samples_per_s"),
            "http_p99_ms": _f(r, "p99_ms"),
            "handle_samples_per_s": next(
                (
                    _f(c, "throughput_samples_per_s")
                    for c in closed
                    if c["setup"] == r["setup"] and c.get("level") == r.get("level")
                ),
                float("nan"),
            ),
        }
        for r in rows
        if r.get("path") == "http"
    }
    return {"best": best_rows, "at_level": at_level, "slo_ms": slo_ms, "slo": slo, "idle": idle, "http": http}
