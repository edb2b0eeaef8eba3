"""Latency of a branch plan against the sequential plan of the same model, served on one local Ray.

Acceptance: on a 2-core machine, for a model whose two equal branches dominate its cost, the branch plan's
latency at concurrency 1 is at most 0.65x the sequential plan's.

The model is ``demo-two-tower`` (two equal MLP towers over ``query`` and ``item``, a small scoring head),
by default width 2048, depth 8, 64 samples per request: each tower is ~50 ms of compute on one core, so the
towers are ~80% of the sequential plan's latency. It is planned twice into 3 stages with
``objective="latency"``: the *branch* plan (both towers as parallel root stages, joined by the head stage:
``after = [[], [], [0, 1]]``) and the *sequential* plan (``branches=False``: a chain of 3 stages). Each plan
is served alone with the default options (stage replicas ``num_cpus=0``; a lone request never waits for a
batch to fill), so the other plan's replicas do not load the machine while it is timed, in rounds whose
order flips so drift in machine load hits both alike; requests go one at a time, alternating HTTP (Arrow
bodies over a keep-alive connection) and the Python handle (``serve.get_app_handle(app).infer.remote(x)``).

    PYTHONPATH=. python3 benchmarks/branches.py --out branches.json   # prints a table, writes JSON

Threads. Ray sets ``OMP_NUM_THREADS=1`` in actors that reserve less than one CPU, so every stage replica
runs torch on one intra-op thread (the script reports ``torch.get_num_threads()`` from each stage replica
and the CPU time of their busiest threads from ``/proc``). The sequential plan therefore uses one core at a
time; the branch plan runs its two towers on the two cores at once.

Analysis (Amdahl). Let a request's work be a sequential part ``S`` (the head, the fork and the join: the
entrance, decoding and the hand-offs) and a branch part ``B`` split into ``k`` equal branches, run on ``k``
devices (here: cores). With ``h`` the cost of one hand-off between stages and ``L`` the number of stage
levels on the critical path (3 for the 3-stage chain, 2 for towers + head):

    T_seq = S + B + L_seq h          T_k = S + B / k + L_k h

    T_k / T_seq = (1 - p) + p / k + (L_k - L_seq) h / T_seq,     p = B / T_seq

so with ``k`` growing the ratio tends to ``(S + L_k h) / T_seq``: the hops of the fork and the join and the
sequential parts bound it, however many GPUs carry the branches. With ``k`` towers the branch part shrinks
to ``1/k`` of itself but never below one tower's time plus its two hops. On 2 cores the two towers also
slow each other a little (shared memory bandwidth and clock, Ray's own processes): each took 58-71 ms run
together against 54-62 ms run alone in the sequential plan's stage.

Measured on the 2-core development machine (BENCHMARKS.md has the steps): branch / sequential median
0.630 over HTTP and 0.605 through the handle (4 rounds), p = 0.76 / 0.78, Amdahl with k = 2: 0.62 / 0.61.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import numpy as np
import ray
import torch
from ray import serve

from partitions.inputs import random_inputs
from partitions.partition import PlanOptions, build_plan
from partitions.plan import Plan
from partitions.source import ModelSource, load_model
from serve_app import codecs
from serve_app.app import AppArgs, build_app, default_model_name
from serve_app.names import stage_name
from serve_app.ports import free_port
from tests.serve_fixtures import rel_err

SPEC = "demo-two-tower"
APPS = ("branch", "sequential")
PATHS = ("http", "handle")
TIMEOUT_S = 60.0
"""Bound on every request and readiness wait."""


@dataclass
class Figures:
    """Latency percentiles (ms) of one plan through one path."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    samples: int


@dataclass
class Measured:
    latency: dict[str, dict[str, Figures]]
    """By plan, then path (``http``, ``handle``)."""
    stage_ms: dict[str, list[float]]
    """By plan: each stage's median time per batch inside its replica during the timed requests."""
    torch_threads: dict[str, list[int]]
    """By plan: ``torch.get_num_threads()`` in each stage replica."""
    busiest_threads_cpu_s: dict[str, dict[str, list[float]]]
    """By plan, then stage: CPU seconds of the replica's three busiest threads during its last timed round.
    One torch thread: one thread (the one running the stage) far ahead of the others."""
    load_at_start: float
    """1-minute load average when the first timed requests began."""


def percentiles(samples: list[float]) -> Figures:
    q = statistics.quantiles(samples, n=10)
    return Figures(statistics.median(samples), q[8], statistics.fmean(samples), len(samples))


def make_plans(root: str, options: dict[str, int], stages: int, batch: int) -> tuple[ModelSource, dict[str, Plan]]:
    source = load_model(SPEC, options, batch)
    plans = {
        app: build_plan(source, f"{root}/{app}", PlanOptions(stages=stages, objective="latency", branches=branches))
        for app, branches in zip(APPS, (True, False))
    }
    return source, plans


def replica_pids(app: str) -> dict[str, int]:
    """Process id of each stage replica of ``app`` (Ray titles them ``ray::ServeReplica:{app}:{deployment}``)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        prefix = f"ray::ServeReplica:{app}:"
        if cmd.startswith(prefix):
            out[cmd[len(prefix) :].split("\0")[0].split()[0]] = int(pid)
    return out


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of process ``pid``, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def busiest_threads(before: dict[int, float], after: dict[int, float], top: int = 3) -> list[float]:
    """The ``top`` largest per-thread CPU times (s) spent between ``before`` and ``after``."""
    return sorted((cpu - before.get(tid, 0.0) for tid, cpu in after.items()), reverse=True)[:top]


def timed(call: Callable[..., dict[str, np.ndarray]], *args: Any) -> tuple[float, dict[str, np.ndarray]]:
    start = time.perf_counter()
    out = call(*args)
    return (time.perf_counter() - start) * 1e3, out


def stage_ms(app: str, stages: int, since: float) -> list[list[float]]:
    """Times (ms) each stage of ``app`` spent running the batches that started after ``since`` (epoch s)."""
    out = []
    for i in range(stages):
        busy = serve.get_deployment_handle(stage_name(i), app).busy_intervals.remote().result(timeout_s=TIMEOUT_S)
        out.append([(end - start) * 1e3 for start, end, *_ in busy if start >= since])
    return out


def measure(
    plans: dict[str, Plan], root: str, source: ModelSource, url: str, warmup: int, requests: int, rounds: int
) -> Measured:
    """``rounds`` rounds; in each, every plan is served alone (so neither plan's replicas load the machine
    while the other is timed), in an order that flips each round so drift in machine load hits both alike;
    ``warmup`` requests are checked against the whole model, then ``requests`` are timed one at a time,
    alternating HTTP and the handle."""
    rng = np.random.default_rng(0)
    batch = plans[APPS[0]].batch_size
    samples: dict[str, dict[str, list[float]]] = {app: {"http": [], "handle": []} for app in plans}
    stage_times: dict[str, list[list[float]]] = {app: [[] for _ in plan.stages] for app, plan in plans.items()}
    threads: dict[str, list[int]] = {}
    busiest: dict[str, dict[str, list[float]]] = {}
    load = os.getloadavg()[0]
    with httpx.Client(timeout=TIMEOUT_S) as client:
        for round_ in range(rounds):
            for app in APPS if round_ % 2 == 0 else APPS[::-1]:
                serve.run(build_app(AppArgs(plan_uri=f"{root}/{app}", num_cpus=0)), name=app, route_prefix=f"/{app}")
                wait_ready(url, app)
                handle = serve.get_app_handle(app)
                endpoint = f"{url}/{app}/v2/models/{default_model_name(plans[app])}/infer"

                def post(x: dict[str, np.ndarray], endpoint: str = endpoint) -> dict[str, np.ndarray]:
                    r = client.post(endpoint, content=codecs.encode_arrow(x), headers={"content-type": codecs.ARROW})
                    r.raise_for_status()
                    return codecs.read_arrow(r.content)

                paths: dict[str, Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]] = {
                    "http": post,
                    "handle": lambda x, handle=handle: handle.infer.remote(x).result(timeout_s=TIMEOUT_S),
                }
                pids = replica_pids(app)
                for i in range(warmup + requests):
                    if i == warmup:
                        since = time.time()
                        cpu_before = {name: thread_cpu_s(pid) for name, pid in pids.items()}
                    x = random_inputs(plans[app].inputs, batch, rng, plans[app].input_ranges)
                    for path in PATHS if i % 2 else PATHS[::-1]:
                        ms, out = timed(paths[path], x)
                        if i >= warmup:
                            samples[app][path].append(ms)
                            continue
                        want = source.forward_flat({k: torch.from_numpy(v) for k, v in x.items()})[0].numpy()
                        err = rel_err(out["output"], want)
                        assert err <= 1e-6, f"{app} via {path}: relative error {err:.2e}"
                busiest[app] = {
                    name: [round(t, 2) for t in busiest_threads(cpu_before[name], thread_cpu_s(pid))]
                    for name, pid in pids.items()
                }
                for i, times in enumerate(stage_ms(app, len(plans[app].stages), since)):
                    stage_times[app][i].extend(times)
                threads[app] = [
                    serve.get_deployment_handle(stage_name(i), app).placement.remote().result()["torch_threads"]
                    for i in range(len(plans[app].stages))
                ]
                serve.delete(app)
    return Measured(
        latency={app: {p: percentiles(s) for p, s in by.items()} for app, by in samples.items()},
        stage_ms={app: [statistics.median(t) for t in by] for app, by in stage_times.items()},
        torch_threads=threads,
        busiest_threads_cpu_s=busiest,
        load_at_start=load,
    )


def amdahl(branch: Plan, stage_ms: dict[str, list[float]], sequential_ms: float) -> dict[str, float]:
    """The docstring's model with measured figures. ``B``, the branch part on one core: the sequential plan's
    stage times less the branch plan's non-root stages (the head); ``rest = T_seq - B``; on ``k`` devices
    ``T_k = rest + B / k``. ``branch_run_ms``: the slowest root stage of the branch plan as served."""
    roots = [ms for s, ms in zip(branch.stages, stage_ms["branch"]) if not s.after]
    b = sum(stage_ms["sequential"]) - (sum(stage_ms["branch"]) - sum(roots))
    rest = sequential_ms - b
    return {
        "branches": len(roots),
        "branch_part_ms": b,
        "branch_run_ms": max(roots),
        "rest_ms": rest,
        "p": b / sequential_ms,
        "predicted_ratio": (rest + b / len(roots)) / sequential_ms,
        "limit_ratio": rest / sequential_ms,
    }


def wait_ready(url: str, app: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/{app}/v2/health/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {TIMEOUT_S:.0f} s")


def report(plans: dict[str, Plan], m: Measured) -> dict:
    seq = {path: m.latency["sequential"][path].median_ms for path in PATHS}
    return {
        "model": {"spec": SPEC, "options": plans["branch"].model["options"], "batch_size": plans["branch"].batch_size},
        "plans": {
            app: {
                "after": [s.after for s in plan.stages],
                "profiled_stage_ms": [round(s.measured_ms, 3) for s in plan.stages],
                "served_stage_ms": [round(ms, 3) for ms in m.stage_ms[app]],
                "predicted_latency_ms": plan.summary["latency_ms"],
                "profiled_critical_path_ms": plan.summary["measured_latency_ms"],
            }
            for app, plan in plans.items()
        },
        "latency": {app: {path: asdict(f) for path, f in by.items()} for app, by in m.latency.items()},
        "ratio_branch_over_sequential": {path: m.latency["branch"][path].median_ms / seq[path] for path in PATHS},
        "amdahl": {path: amdahl(plans["branch"], m.stage_ms, seq[path]) for path in PATHS},
        "torch_threads": m.torch_threads,
        "busiest_threads_cpu_s": m.busiest_threads_cpu_s,
        "load_at_start": m.load_at_start,
    }


def print_table(result: dict) -> None:
    print(f"{'plan':<11} {'shape':<18} {'predicted':>9} {'served stages ms':<22} {'path':<6} {'median':>7} {'p90':>7}")
    for app, plan in result["plans"].items():
        for path in PATHS:
            f = result["latency"][app][path]
            print(
                f"{app:<11} {json.dumps(plan['after']):<18} {plan['predicted_latency_ms']:>9.1f} "
                f"{json.dumps([round(ms, 1) for ms in plan['served_stage_ms']]):<22} {path:<6} "
                f"{f['median_ms']:>7.1f} {f['p90_ms']:>7.1f}"
            )
    for path, ratio in result["ratio_branch_over_sequential"].items():
        a = result["amdahl"][path]
        print(
            f"{path}: branch / sequential median {ratio:.3f} (Amdahl with k={a['branches']}: "
            f"{a['predicted_ratio']:.3f}, limit {a['limit_ratio']:.3f}; p = {a['p']:.2f})"
        )
    print(
        f"load average at start {result['load_at_start']:.2f}; torch threads per stage replica "
        f"{result['torch_threads']}; busiest threads (cpu s): {result['busiest_threads_cpu_s']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="samples per request")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--requests", type=int, default=30, help="timed requests per plan, path and round")
    parser.add_argument("--rounds", type=int, default=4, help="times each plan is served and timed")
    parser.add_argument("--out", default="branches.json", help="JSON result file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        source, plans = make_plans(root, {"width": args.width, "depth": args.depth}, args.stages, args.batch)
        port = free_port()
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            url = f"http://127.0.0.1:{port}"
            measured = measure(plans, root, source, url, args.warmup, args.requests, args.rounds)
        finally:
            serve.shutdown()
            ray.shutdown()
    result = report(plans, measured)
    print_table(result)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
