"""Load generators for benchmarks: closed loop (fixed concurrency) and open loop (Poisson arrivals).

A *call* is an ``async () -> None`` that sends one request and waits for its answer. Every run is bounded
in time and requests and stops by itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

Call = Callable[[], Awaitable[object]]


@dataclass
class RunResult:
    mode: str
    """``closed`` (``level`` = concurrency) or ``open`` (``level`` = offered rate, requests/s)."""
    level: float
    samples_per_request: int
    wall_s: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def throughput_samples_per_s(self) -> float:
        return self.requests * self.samples_per_request / self.wall_s if self.wall_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def row(self) -> dict[str, float | int | str]:
        return {
            "mode": self.mode,
            "level": self.level,
            "samples_per_request": self.samples_per_request,
            "requests": self.requests,
            "errors": self.errors,
            "wall_s": self.wall_s,
            "throughput_samples_per_s": self.throughput_samples_per_s,
            "p50_ms": self.percentile_ms(50),
            "p90_ms": self.percentile_ms(90),
            "p99_ms": self.percentile_ms(99),
        }


async def _timed(call: Call, result: RunResult) -> None:
    start = time.perf_counter()
    try:
        await call()
    except Exception as exc:  # counted and reported, never raised: a benchmark measures failures too
        result.errors += 1
        result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"[:300]
        return
    result.latencies_ms.append((time.perf_counter() - start) * 1e3)


async def closed_loop(
    call: Call, concurrency: int, duration_s: float, samples_per_request: int = 1, warmup_s: float = 1.0
) -> RunResult:
    """``concurrency`` workers each send a request as soon as the last one returns, for ``duration_s``
    seconds after ``warmup_s`` seconds of unmeasured load."""
    result = RunResult("closed", concurrency, samples_per_request, duration_s)
    scratch = RunResult("closed", concurrency, samples_per_request, warmup_s)
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s

    async def worker() -> None:
        while (now := time.perf_counter()) < stop_at:
            await _timed(call, result if now >= measure_from else scratch)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - measure_from
    return result


async def open_loop(
    call: Call,
    rate_per_s: float,
    duration_s: float,
    samples_per_request: int = 1,
    seed: int = 0,
    max_in_flight: int = 4096,
) -> RunResult:
    """Requests at Poisson arrivals of ``rate_per_s`` for ``duration_s`` seconds, whatever the answers'
    latency (at most ``max_in_flight`` outstanding; beyond that arrivals count as errors)."""
    rng = np.random.default_rng(seed)
    result = RunResult("open", rate_per_s, samples_per_request, duration_s)
    tasks: set[asyncio.Task] = set()
    start = time.perf_counter()
    next_at = start
    while next_at < start + duration_s:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        if len(tasks) >= max_in_flight:
            result.errors += 1
            result.first_error = result.first_error or f"over {max_in_flight} requests in flight"
        else:
            task = asyncio.ensure_future(_timed(call, result))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        next_at += rng.exponential(1.0 / rate_per_s)
    if tasks:
        await asyncio.wait(tasks, timeout=60)
    result.wall_s = time.perf_counter() - start
    return result
