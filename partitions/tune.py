"""Tune a planned pipeline as it is served: each stage's intra-op threads and the batch the entrance forms.

Every trial runs all the stages at once, each on its engine in a process of its own (as each replica is), on
the batch the stage receives when the pipeline runs that batch size, for a fixed time: measured alone, every
stage would take every core; together they compete for them, as served. Threads start at what serving runs
now (:func:`current_threads`) and grow one at a time on the slowest stage while their sum stays within the
cores and the pipeline gains. A trial's figure is the pipeline's throughput with one replica per stage,
``batch / slowest stage's time per call``, each stage's time per call being the wall time of its run over
the calls it made: under contention a short call often runs within one time slice of the scheduler and
the waits fall between calls, so a median per call would miss them. After each call a trial spends
:data:`CALL_OVERHEAD_MS` of CPU, what serving itself costs per stage call, so that a small batch pays for
its many calls as it would when served. The kept setting is the fastest; of settings within
:data:`NEAR` of it, the smallest batch (less latency), then the fewest threads.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from partitions.inputs import random_inputs
from partitions.plan import Plan
from partitions.runtime import StageRunner, load_pipeline, stage_payload
from partitions.storage import read_plan, write_plan
from partitions.types import Payload

CALL_OVERHEAD_MS = 3.0
"""CPU milliseconds a served stage spends per call around its program (Serve's request path, the payload's
conversion, the busy-interval record), measured on a 2-core machine (BENCHMARKS.md, "Where the CPU goes").
Every trial spends it per call, as CPU beside the stages, so that small batches pay for their many calls."""
NEAR = 0.03
"""Throughputs within 3% of the best count as equal (about the spread of repeated trials on a busy machine)."""
START_DELAY_S = 0.3
"""Trials start this long after they are sent, so that every stage's process starts at the same time."""


@dataclass
class Trial:
    batch_size: int
    threads: list[int]
    stage_ms: list[float]
    """Wall ms per call of each stage (its run's time over its calls) while all stages ran at once."""

    @property
    def samples_per_s(self) -> float:
        return self.batch_size * 1e3 / max(self.stage_ms)


@dataclass
class Tuning:
    cores: int
    before: Trial
    """The plan's serving batch at the current threads: what serving ran before tuning."""
    best: Trial
    trials: list[Trial]
    call_overhead_ms: float = CALL_OVERHEAD_MS
    """CPU ms spent after every call in the trials (serving's own work per call)."""

    @property
    def gain(self) -> float:
        return self.best.samples_per_s / self.before.samples_per_s

    def to_json(self) -> dict[str, Any]:
        row = lambda t: {**asdict(t), "samples_per_s": t.samples_per_s}
        return {
            "cores": self.cores,
            "call_overhead_ms": self.call_overhead_ms,
            "before": row(self.before),
            "best": row(self.best),
            "gain": self.gain,
            "trials": [row(t) for t in self.trials],
        }


def current_threads(plan: Plan) -> list[int]:
    """The threads each stage's replica runs by default: the tuned figure, else one (Ray's one thread per
    reserved CPU at serving's default of one CPU per replica)."""
    return [s.engine.threads or 1 for s in plan.stages]


def next_threads(threads: Sequence[int], stage_ms: Sequence[float], cores: int) -> list[int] | None:
    """One more thread for the slowest stage, or None when the sum would pass ``cores``."""
    if sum(threads) + 1 > cores:
        return None
    slowest = max(range(len(stage_ms)), key=stage_ms.__getitem__)
    return [t + (i == slowest) for i, t in enumerate(threads)]


def best_trial(trials: Sequence[Trial], near: float = NEAR) -> Trial:
    """The fastest trial; of those within ``near`` of it, the smallest batch, then the fewest threads."""
    top = max(t.samples_per_s for t in trials)
    close = [t for t in trials if t.samples_per_s >= (1 - near) * top]
    return min(close, key=lambda t: (t.batch_size, sum(t.threads), -t.samples_per_s))


def tune(
    uri: str,
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16),
    seconds: float = 2.0,
    cores: int | None = None,
    progress: Callable[[str], None] | None = None,
    call_overhead_ms: float = CALL_OVERHEAD_MS,
) -> Tuning:
    """Measure the plan at ``uri`` (trials of ``seconds`` each on ``cores`` cores, default all, every call
    followed by ``call_overhead_ms`` of CPU work), write the best setting into its plan.json
    (``Stage.engine.threads``, ``Plan.tuning``) and return the trials."""
    plan = read_plan(uri)
    cores = cores or os.cpu_count() or 1
    sizes = sorted({*batch_sizes, plan.serve_batch_size})
    say = progress or (lambda line: None)
    trials: list[Trial] = []
    runners = load_pipeline(uri)
    with _workers(uri, len(plan.stages)) as pipes:
        for batch in sizes:
            payloads = _stage_payloads(runners, plan, batch)
            threads: list[int] | None = current_threads(plan)
            previous: Trial | None = None
            while threads is not None:
                trial = Trial(batch, threads, _run_together(pipes, threads, payloads, seconds, call_overhead_ms))
                trials.append(trial)
                say(f"batch {batch}, threads {threads}: {trial.samples_per_s:.1f} samples/s")
                if previous is not None and trial.samples_per_s < (1 + NEAR) * previous.samples_per_s:
                    break
                previous = trial
                threads = next_threads(threads, trial.stage_ms, cores)
    before = next(t for t in trials if t.batch_size == plan.serve_batch_size)
    result = Tuning(cores, before, best_trial(trials), trials, call_overhead_ms)
    write_plan(uri, tuned(plan, result))
    return result


def tuned(plan: Plan, result: Tuning) -> Plan:
    """``plan`` with the best setting of ``result``: each stage's threads, the batch the entrance forms."""
    for stage, threads in zip(plan.stages, result.best.threads):
        stage.engine.threads = threads
    plan.tuning = {
        "batch_size": result.best.batch_size,
        "call_overhead_ms": result.call_overhead_ms,
        "cores": result.cores,
        "samples_per_s": result.best.samples_per_s,
        "before_samples_per_s": result.before.samples_per_s,
    }
    return plan


def _stage_payloads(runners: list[StageRunner], plan: Plan, batch: int) -> list[Payload]:
    """What each stage receives when the pipeline runs a random batch of ``batch`` samples."""
    inputs = random_inputs(plan.inputs, batch, 0, plan.input_ranges)
    sent: dict[int, Payload] = {}
    received = []
    for runner in runners:
        stage = runner.stage
        payload = stage_payload(stage.after, sent, inputs, stage.reads)
        received.append(payload)
        sent[stage.index] = runner(payload)
    return received


def _run_together(
    pipes: list[Connection], threads: list[int], payloads: list[Payload], seconds: float, overhead_ms: float
) -> list[float]:
    for pipe, n, payload in zip(pipes, threads, payloads):
        pipe.send(("prepare", n, payload))
    for pipe in pipes:
        pipe.recv()
    start = time.time() + START_DELAY_S
    for pipe in pipes:
        pipe.send(("run", start, seconds, overhead_ms))
    return [float(pipe.recv()) for pipe in pipes]


@contextmanager
def _workers(uri: str, stages: int) -> Iterator[list[Connection]]:
    """One process per stage, each answering ``prepare`` and ``run`` messages on its pipe."""
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    try:
        for index in range(stages):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(uri, index, child), daemon=True)
            proc.start()
            pipes.append(parent)
            procs.append(proc)
        yield pipes
    finally:
        for pipe in pipes:
            pipe.send(("stop",))
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def _worker(uri: str, index: int, pipe: Connection) -> None:
    """A stage's process: ``prepare`` loads the stage with its threads and warms it on the payload; ``run``
    calls it back to back from the agreed start for ``seconds``, each call followed by the run's CPU overhead
    per call, and answers the wall ms per call (the run's time over its calls: what the stage sustains beside
    the others)."""
    import torch

    runners: dict[int, StageRunner] = {}
    current: tuple[StageRunner, dict[str, np.ndarray]] | None = None
    while True:
        message = pipe.recv()
        if message[0] == "stop":
            return
        if message[0] == "prepare":
            _, threads, payload = message
            torch.set_num_threads(threads)
            runner = runners.get(threads) or runners.setdefault(threads, StageRunner(uri, index, threads=threads))
            for _ in range(2):
                runner(payload)
            current = (runner, payload)
            pipe.send("ready")
            continue
        _, start, seconds, overhead_ms = message
        assert current is not None
        runner, payload = current
        time.sleep(max(0.0, start - time.time()))
        calls, begin = 0, time.perf_counter()
        while time.time() < start + seconds or not calls:
            runner(payload)
            _spend_cpu(overhead_ms)
            calls += 1
        pipe.send((time.perf_counter() - begin) * 1e3 / calls)


def _spend_cpu(ms: float) -> None:
    """Busy this process's thread for ``ms`` of its own CPU time (it competes for the cores as served work does)."""
    end = time.thread_time() + ms / 1e3
    while time.thread_time() < end:
        pass
