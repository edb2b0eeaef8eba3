"""``partserve batch`` against the torch bound, measured in the same run, and the equality of their outputs.

Writes ROWS rows of random tokens in FILES Parquet files, runs ``partserve batch`` on them (a fresh local Ray,
all cores, ``--json``), then, with no Ray running, the torch bound: the whole model in this process with all
cores as torch threads, at the job's batch size, over the same rows (also measured for 30 s before the job, as
a check on a machine whose load changes). Reports both in rows/s, the job's per
stage figures, the relative error of the outputs (max abs error over max |reference|), and where the CPU
time of the job went (sampled per process while it runs: stage actors, read tasks, the driver, Ray itself, and
anything else running on the machine)::

    PYTHONPATH=. python3 benchmarks/batch.py                         # demo-transformer, 4 stages, 20,000 rows
    PYTHONPATH=. python3 benchmarks/batch.py --rows 4000 --batch-size 128
    PYTHONPATH=. python3 benchmarks/batch.py --kill-at 4             # killed after 4 files, then restarted
    PYTHONPATH=. python3 benchmarks/batch.py --pool-per-stage        # one actor pool per stage, 4 on 2 cores

With ``--kill-at N`` the job is killed (SIGKILL) once N output files are complete and run again; the report
then says how many files the second run skipped and checks that each input row is in the output once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from partitions.inputs import random_inputs
from partitions.source import load_model
from partitions.storage import read_plan

REPO = Path(__file__).resolve().parents[1]


def ensure_plan(path: Path, stages: int) -> None:
    if (path / "plan.json").exists():
        return
    cmd = ["partserve", "plan", "demo-transformer", "--stages", str(stages), "-o", str(path), "--json"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def write_inputs(plan_dir: Path, folder: Path, rows: int, files: int) -> tuple[str, np.ndarray]:
    plan = read_plan(str(plan_dir))
    spec = plan.inputs[0]
    x = random_inputs(plan.inputs, rows, 0, plan.input_ranges)[spec.name]
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, rows, files + 1).astype(int)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        column = pa.FixedSizeListArray.from_arrays(pa.array(x[lo:hi].reshape(-1)), int(np.prod(spec.shape[1:])))
        pq.write_table(pa.table({"id": np.arange(lo, hi), "tokens": column}), folder / f"part-{i:03d}.parquet")
    return spec.name, x


class CpuSampler(threading.Thread):
    """CPU seconds of every process on the machine, sampled each second while the job runs, by kind: the job's
    own processes (the driver and its descendants: its local Ray) by role, the rest as other processes."""

    def __init__(self, driver_pid: int) -> None:
        super().__init__(daemon=True)
        self.driver = driver_pid
        self.first: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self.stop = threading.Event()
        self.me = os.getpid()
        self.start_pids: set[int] = set()
        self.job: set[int] = set()

    def kind(self, pid: int, cmd: str) -> str:
        if pid == self.me:
            return "this benchmark"
        if pid not in self.job:
            return "other processes on the machine"
        if pid == self.driver:
            return "driver (partserve batch)"
        if "StageStep" in cmd:
            return "stage actors"
        if "ray::" in cmd:
            return "read tasks and other Ray workers"
        return "Ray (raylet, gcs, agents)"

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):  # the job: the driver, its local Ray and the workers under it
            self.job |= {self.driver, *(c.pid for c in psutil.Process(self.driver).children(recursive=True))}
        for p in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
            try:
                t = p.info["cpu_times"].user + p.info["cpu_times"].system
                cmd = " ".join(p.info["cmdline"] or [])[:200]
            except (psutil.Error, TypeError, AttributeError):
                continue
            self.first.setdefault(p.info["pid"], t)
            # A process that has exited (a zombie until reaped) shows an empty command line: keep its name.
            self.last[p.info["pid"]] = (cmd or self.last.get(p.info["pid"], ("", 0.0))[0], t)

    def run(self) -> None:
        self.sample()
        self.start_pids = set(self.first)
        while not self.stop.wait(1.0):
            self.sample()

    def split(self, by_process: bool = False) -> dict[str, float]:
        """CPU seconds by kind; ``by_process``: the job's processes under the driver by name (``raylet``,
        ``gcs_server``, ``ray::MapWorker(...)``, ...) instead."""
        out: dict[str, float] = {}
        for pid, (cmd, t) in self.last.items():
            if by_process and (pid not in self.job or pid == self.driver):
                continue
            spent = t - self.first[pid] if pid in self.start_pids else t
            k = process_name(cmd) if by_process else self.kind(pid, cmd)
            out[k] = out.get(k, 0.0) + spent
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def process_name(cmd: str) -> str:
    """``ray::Title`` for a Ray worker, else the program (the module for ``python -m``/a script path)."""
    words = cmd.split()
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0].rstrip(":")
    program = [w for w in words if not w.startswith("-")]
    name = os.path.basename(program[1] if len(program) > 1 and "python" in program[0] else program[0])
    return name.removesuffix(".py")


def run_job(
    plan_dir: Path, inputs: Path, out: Path, batch: int, kill_at: int | None, pool_per_stage: bool = False
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "partserve", "batch", str(plan_dir), "--input", str(inputs), "--output", str(out),
           "--batch-size", str(batch), "--json", *(["--pool-per-stage"] if pool_per_stage else [])]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result: dict[str, Any] = {}
    if kill_at:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        while proc.poll() is None and len(list(out.glob("*.parquet"))) < kill_at:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
        result["killed_after_s"] = time.perf_counter() - start
        result["complete_at_kill"] = len(done)
        time.sleep(2.0)  # the killed job's Ray goes down with it
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = CpuSampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.stop.set()
    sampler.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"partserve batch failed ({proc.returncode}):\n{stderr[-4000:]}")
    result["report"] = json.loads(stdout)
    result["wall_s"] = wall
    result["cpu_split_s"] = sampler.split()
    result["cpu_by_process_s"] = {k: v for k, v in sampler.split(by_process=True).items() if v >= 0.5}
    if kill_at:
        now = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
        result["rewritten"] = sorted(n for n in done if now.get(n) != done[n])
    return result


def torch_bound(
    plan_dir: Path, name: str, x: np.ndarray, batch: int, limit_s: float | None = None
) -> tuple[float, np.ndarray]:
    """Rows/s of the whole model in this process (all cores as torch threads, at ``batch``) and its outputs;
    with ``limit_s``, over the first batches only, until that many seconds have passed."""
    plan = read_plan(str(plan_dir))
    torch.set_num_threads(os.cpu_count() or 1)
    source = load_model(plan.model["spec"], plan.model["options"], batch_size=batch)
    chunks = [torch.from_numpy(x[i : i + batch]) for i in range(0, len(x), batch)]
    source.forward_flat({name: chunks[0]})  # warm-up
    outs = []
    start = time.perf_counter()
    rows = 0
    for c in chunks:
        outs.append(source.forward_flat({name: c})[0].numpy())
        rows += len(c)
        if limit_s is not None and time.perf_counter() - start > limit_s:
            break
    seconds = time.perf_counter() - start
    return rows / seconds, np.concatenate(outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", type=Path, help="plan directory (default: demo-transformer, --stages, planned once)")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--kill-at", type=int, help="kill the job after this many complete files, then restart")
    parser.add_argument(
        "--pool-per-stage", action="store_true", help="one actor pool per stage (partserve batch's flag)"
    )
    parser.add_argument("--workdir", type=Path, help="where the inputs and outputs go (default: a temp dir)")
    parser.add_argument("--json", dest="json_out", type=Path, help="also write the results here")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="psbatch-"))
    plan_dir = args.plan or Path.home() / ".cache" / "partserve" / "plans" / f"bench-batch-t{args.stages}"
    ensure_plan(plan_dir, args.stages)
    inputs, out = work / "in", work / "out"
    if out.exists():
        for p in sorted(out.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
    name, x = write_inputs(plan_dir, inputs, args.rows, args.files)
    load = os.getloadavg()[0]

    before, _ = torch_bound(plan_dir, name, x, args.batch_size, limit_s=30.0)
    job = run_job(plan_dir, inputs, out, args.batch_size, args.kill_at, args.pool_per_stage)
    bound, want = torch_bound(plan_dir, name, x, args.batch_size)  # all rows: also the reference outputs

    table = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))])
    ids = table.column("id").to_numpy()
    got = np.stack(table.column("output").to_numpy(zero_copy_only=False))
    order = np.argsort(ids)
    once = bool(np.array_equal(ids[order], np.arange(args.rows)))
    rel = float(np.abs(got[order] - want).max() / np.abs(want).max()) if once else float("nan")
    r = job["report"]
    results = {
        "plan": str(plan_dir),
        "rows": args.rows,
        "files": args.files,
        "batch_size": args.batch_size,
        "pool_per_stage": args.pool_per_stage,
        "cores": os.cpu_count(),
        "load_average_at_start": load,
        "torch_bound_rows_per_s": bound,
        "torch_bound_before_rows_per_s": before,
        "job_rows_per_s": r["rows_per_s"],
        "job_streaming_rows_per_s": r["streaming_rows_per_s"],
        "job_vs_bound": r["rows_per_s"] / bound,
        "job_vs_bound_before": r["rows_per_s"] / before,
        "job_vs_bound_mean": r["rows_per_s"] / ((bound + before) / 2),
        "streaming_vs_bound": r["streaming_rows_per_s"] / bound,
        "max_rel_error": rel,
        "each_row_once": once,
        **{k: v for k, v in job.items() if k != "report"},
        "report": r,
    }
    stages = len(read_plan(str(plan_dir)).stages)
    print(f"plan {plan_dir} ({stages} stages in {len(r['steps']) - 1} pools), {args.rows:,} rows in {args.files} "
          f"files, batch {args.batch_size}, {os.cpu_count()} cores, load average {load:.1f} at start")  # fmt: skip
    print(f"torch bound (whole model, {os.cpu_count()} threads): {bound:,.1f} rows/s over all rows after the "
          f"job; {before:,.1f} rows/s over 30 s before it")  # fmt: skip
    print(f"partserve batch: {r['rows_per_s']:,.1f} rows/s over {r['seconds']:.1f} s "
          f"({results['job_vs_bound']:.2f}x the bound after, {results['job_vs_bound_before']:.2f}x the bound before, "
          f"{results['job_vs_bound_mean']:.2f}x their mean); {r['streaming_rows_per_s']:,.1f} rows/s from the "
          f"first batch on ({results['streaming_vs_bound']:.2f}x the bound after); {job['wall_s']:.1f} s with Ray's "
          "start")  # fmt: skip
    for s in r["steps"]:
        print(f"  {s['step']:<10} actors {s['actors'] or 'tasks'}, {s['num_cpus']:.3g} CPUs each: busy "
              f"{s['busy_s']:.1f} s, {s['rows_per_s']:,.0f} rows/s it can do, {s['utilisation']:.0%} busy")  # fmt: skip
    print(f"  bottleneck {r['bottleneck']}; rejected {r['rejected']}")
    print(f"outputs vs whole model: max abs error / max |reference| = {rel:.3g}; each row once: {once}")
    print("CPU seconds while the job ran: " + ", ".join(f"{k} {v:.1f}" for k, v in job["cpu_split_s"].items()))
    print("  the job's processes: " + ", ".join(f"{k} {v:.1f}" for k, v in job["cpu_by_process_s"].items()))
    if args.kill_at:
        print(f"killed after {job['killed_after_s']:.1f} s with {job['complete_at_kill']} files complete; the "
              f"restart skipped {r['skipped_files']} and rewrote {job['rewritten'] or 'none'} of them")  # fmt: skip
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
