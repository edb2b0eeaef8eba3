"""CPU per row of a plan's stages when they share the cores as separate processes or as one.

Each layout runs the stage programs single-threaded in a loop at one batch size, every group of consecutive
stages in a process of its own, all groups at once, and reports each group's CPU ms per row and rows/s and
their sum: what taking turns on the cores costs (caches refilled at every switch) before any serving::

    PYTHONPATH=. python3 benchmarks/stage_processes.py                        # the batch benchmark's plan
    PYTHONPATH=. python3 benchmarks/stage_processes.py PLAN_DIR --seconds 20 --batch-size 64
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path


def _work(plan_dir: str, stages: list[int], batch: int, seconds: float, out: mp.Queue) -> None:
    import torch

    from partitions.inputs import random_inputs
    from partitions.runtime import StageRunner
    from partitions.storage import read_plan

    torch.set_num_threads(1)
    plan = read_plan(plan_dir)
    payload = random_inputs(plan.inputs, batch, 0, plan.input_ranges)
    runners = [StageRunner(plan_dir, i, "cpu", plan, threads=1) for i in range(len(plan.stages))]
    inputs = {}
    for i, runner in enumerate(runners):  # each stage's own inputs, once
        inputs[i] = payload
        payload = runner(payload)
    for i in stages:  # warm-up
        runners[i](inputs[i])
    out.put("ready")
    time.sleep(2.0)  # until every process is ready
    cpu, wall, rounds = time.process_time(), time.perf_counter(), 0
    while time.perf_counter() - wall < seconds:
        for i in stages:
            runners[i](inputs[i])
        rounds += 1
    rows = rounds * batch
    out.put((stages, (time.process_time() - cpu) * 1e3 / rows, rows / (time.perf_counter() - wall)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path.home() / ".cache" / "partserve" / "plans" / "bench-batch-t4"
    parser.add_argument("plan", nargs="?", type=Path, default=default, help="plan directory (a chain of stages)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per layout")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    from partitions.storage import read_plan

    n = len(read_plan(str(args.plan)).stages)
    layouts = [[[i] for i in range(n)], [list(range(n // 2)), list(range(n // 2, n))], [list(range(n))]]
    ctx = mp.get_context("spawn")
    for groups in layouts:
        queue: mp.Queue = ctx.Queue()
        procs = [
            ctx.Process(target=_work, args=(str(args.plan), g, args.batch_size, args.seconds, queue)) for g in groups
        ]
        try:
            for p in procs:
                p.start()
            for _ in procs:
                queue.get(timeout=300)
            results = sorted(queue.get(timeout=300 + args.seconds) for _ in procs)
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.terminate()
        per_group = ", ".join(f"stages {g}: {ms:.2f} ms/row, {rate:.0f} rows/s" for g, ms, rate in results)
        print(f"{len(groups)} processes: {sum(ms for _, ms, _ in results):.2f} CPU ms per row in all ({per_group})")


if __name__ == "__main__":
    main()
