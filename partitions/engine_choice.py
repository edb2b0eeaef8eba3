"""Choose each stage's engine at plan time: convert, check against eager, time, keep the fastest that matches.

A candidate engine is converted from the stage's exported program, run on the stage's example inputs at
batch 1, 3 and the plan's batch, and kept only if its outputs match eager's within :data:`TOLERANCE`. The
passing engines and eager are then timed round-robin (one call each per round, so drift in machine load hits
them alike). ``auto`` keeps, per batch, what was faster: the engine with the lowest mean time relative to
eager among those faster than eager at every timed batch; failing that, the engine fastest at batch 1 for
the batches where it beat eager (``up_to``: small batches, where per-op overhead weighs most), eager above
them; eager where no engine beat it at batch 1. A named engine is kept whenever it passes. Every failure is
a one-line reason in the plan, never a traceback.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from partitions import engines
from partitions.engines import AUTO, EAGER, ENGINES, Runner

TOLERANCE = 1e-4
"""Largest relative error (max |engine - eager| / max |eager|) an engine may show on a stage, in fp32: engines
fuse and reorder float arithmetic, so they agree with eager to about 1e-6 relative, not bit for bit."""


@dataclass
class Choice:
    """The engine kept for one stage, its artifact's bytes (None: runs the shard), and the record of the rest."""

    name: str
    artifact: bytes | None
    reason: str
    batches: list[int]
    ms: dict[str, list[float]]
    """Median ms per engine that passed (eager included), one per batch of ``batches``."""
    up_to: int | None = None
    """Largest batch the engine runs (eager above it); None: every batch."""


def candidates(requested: str, device: torch.device) -> tuple[list[str], list[str]]:
    """The engines to try for ``requested`` (``auto``: every one available here) and the reasons for those
    skipped."""
    wanted = [e for e in ENGINES if e != EAGER] if requested == AUTO else [requested] if requested != EAGER else []
    tried, skipped = [], []
    for engine in wanted:
        why = engines.unavailable(engine, device, converting=True)
        if why:
            skipped.append(f"{engine} skipped: {why}")
        else:
            tried.append(engine)
    return tried, skipped


def time_round_robin(calls: Sequence[Callable[[], object]], repeats: int, warmup: int) -> list[float]:
    """Median wall time (ms) of each call, timed one call each per round (CPU: no device sync needed; a CUDA
    runner returns numpy, which syncs)."""
    rounds = []
    for _ in range(warmup + repeats):
        row = []
        for call in calls:
            start = time.perf_counter()
            call()
            row.append((time.perf_counter() - start) * 1e3)
        rounds.append(row)
    kept = rounds[warmup:]
    return [statistics.median(r[i] for r in kept) for i in range(len(calls))]


def choose(
    requested: str,
    program: torch.export.ExportedProgram | None,
    args: Sequence[torch.Tensor],
    device: torch.device,
    repeats: int = 5,
    warmup: int = 2,
) -> Choice:
    """The engine stage ``program`` runs on, for ``requested`` (an engine of :data:`ENGINES` or ``auto``).

    ``program``: the stage's exported program (None: the stage did not export, so it runs eager); ``args``:
    its example inputs at the plan's batch."""
    tried, notes = candidates(requested, device)
    if requested == EAGER:
        return Choice(EAGER, None, "", [], {})
    if program is None:
        if tried:
            notes.append(f"{'/'.join(tried)} skipped: the stage did not export (its shard holds module weights)")
        return Choice(EAGER, None, "; ".join(notes), [], {})
    plan_batch = args[0].shape[0]
    batches = sorted({1, plan_batch})
    # Checked also at a batch between them: a dynamic batch dimension, or a padded one, meets other sizes served.
    checked = sorted({*batches, min(3, plan_batch)})
    full = [a.detach().cpu().numpy() for a in args]
    inputs = {b: [a[:b] for a in full] for b in checked}
    threads = torch.get_num_threads()
    eager = engines.load(EAGER, program.module(), None, device, threads)
    reference = {b: eager(inputs[b]) for b in checked}
    runners: dict[str, Runner] = {EAGER: eager}
    artifacts: dict[str, bytes | None] = {}
    for engine in tried:
        try:
            artifacts[engine] = engines.convert(engine, program)
            runner = engines.load(engine, program.module(), artifacts[engine], device, threads)
            err = max(engines.rel_error(runner(inputs[b]), reference[b]) for b in checked)
        except Exception as exc:  # any failure to convert or run: the stage stays on another engine
            notes.append(f"{engine} failed: {engines.one_line(exc)}")
            continue
        if not err <= TOLERANCE:
            notes.append(f"{engine} differs from eager by {err:.2g} relative (> {TOLERANCE:g})")
            continue
        runners[engine] = runner
    names = list(runners)
    timed = {b: time_round_robin([partial(runners[n], inputs[b]) for n in names], repeats, warmup) for b in batches}
    ms = {n: [timed[b][i] for b in batches] for i, n in enumerate(names)}
    name, up_to = pick(requested, ms, notes, batches)
    return Choice(name, artifacts.get(name), "; ".join(notes), batches, ms, up_to)


def pick(
    requested: str, ms: dict[str, list[float]], notes: list[str], batches: Sequence[int] | None = None
) -> tuple[str, int | None]:
    """The engine to keep from the timings ``ms`` (eager's first, one per batch of ``batches``, ascending)
    and the largest batch it runs (None: every batch); appends why to ``notes``."""
    ratios = {n: [t / e for t, e in zip(times, ms[EAGER])] for n, times in ms.items() if n != EAGER}
    if requested != AUTO:
        for n, r in ratios.items():
            notes.append(f"{n}: {statistics.fmean(r):.2f}x eager's time")
        return next(iter(ratios), EAGER), None
    sizes = list(batches) if batches is not None else list(range(1, len(ms[EAGER]) + 1))
    # per engine: how many of the smallest batches it ran faster than eager, in a row
    wins = {n: next((k for k, x in enumerate(r) if x >= 1.0), len(r)) for n, r in ratios.items()}
    everywhere = [n for n, r in ratios.items() if wins[n] == len(r)]
    small = [n for n in ratios if wins[n] > 0]
    best, up_to = EAGER, None
    if everywhere:
        best = min(everywhere, key=lambda n: statistics.fmean(ratios[n]))
    elif small:
        best = min(small, key=lambda n: ratios[n][0])
        up_to = sizes[wins[best] - 1]
    for n, r in sorted(ratios.items(), key=lambda kv: statistics.fmean(kv[1])):
        times = ", ".join(f"{x:.2f}x at {b}" for x, b in zip(r, sizes))
        if n != best:
            notes.append(f"{n} not kept: {times}")
        elif up_to is None:
            notes.append(f"{n} kept: {times} eager's time")
        else:
            notes.append(f"{n} kept up to batch {up_to}: {times} eager's time; eager above")
    if best == EAGER and ratios:
        notes.append("eager kept: no engine was faster at batch 1")
    return best, up_to
