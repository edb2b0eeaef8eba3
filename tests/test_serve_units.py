"""Pure pieces of serving: batching, the result cache, the load generators (no Ray needed)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serve_app.batching import concat, run_together, samples, split, total_samples
from serve_app.cache import ResultCache, input_key
from serve_app.loadgen import closed_loop, open_loop


def test_concat_split_round_trip() -> None:
    a = {"x": np.arange(6).reshape(3, 2), "m": np.ones((3, 4))}
    b = {"x": np.arange(2).reshape(1, 2), "m": np.zeros((1, 4))}
    merged, sizes = concat([a, b])
    assert sizes == [3, 1] and samples(merged) == 4 == total_samples([a, b])
    back = split(merged, sizes)
    assert all(np.array_equal(back[0][k], a[k]) and np.array_equal(back[1][k], b[k]) for k in a)


def test_run_together_isolates_a_failing_request() -> None:
    good, bad = {"x": np.ones((2, 1))}, {"x": -np.ones((1, 1))}

    async def run(payload, requests):
        if (payload["x"] < 0).any():
            raise ValueError("negative")
        return {"y": payload["x"] * 2}

    results = asyncio.run(run_together([good, bad, good], run))
    assert isinstance(results[1], ValueError)
    assert np.array_equal(results[0]["y"], 2 * good["x"]) and np.array_equal(results[2]["y"], 2 * good["x"])


def test_cache_is_bounded_in_bytes_and_keyed_by_plan_version() -> None:
    x = {"x": np.arange(4, dtype=np.float32)}
    assert input_key("v1", x) != input_key("v2", x)  # a new plan never answers from an old one's results
    assert input_key("v1", x) != input_key("v1", {"x": x["x"].astype(np.float64)})
    cache = ResultCache(max_bytes=100)
    out = {"y": np.zeros(10, dtype=np.float32)}  # 40 bytes
    for key in "abc":
        cache.put(key, out)
    # 3 x 40 = 120 > 100: the least recently used ("a") goes.
    assert cache.get("a") is None and cache.get("c") is not None
    assert cache.stats() == {"hits": 1, "misses": 1, "entries": 2, "bytes": 80}


def test_closed_and_open_loop_count_requests_and_errors() -> None:
    calls = 0

    async def call() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        if calls % 10 == 0:
            raise RuntimeError("every tenth")

    closed = asyncio.run(closed_loop(call, concurrency=4, duration_s=0.3, warmup_s=0.05))
    # 4 workers x ~10 ms per call for 0.3 s: on the order of 120 answers, a tenth of calls failing.
    assert 40 <= closed.requests + closed.errors <= 140
    assert closed.errors >= 1 and "every tenth" in closed.first_error
    assert closed.throughput_samples_per_s == pytest.approx(closed.requests / closed.wall_s)
    opened = asyncio.run(open_loop(call, rate_per_s=200, duration_s=0.3, seed=1))
    assert 30 <= opened.requests + opened.errors <= 90  # Poisson(60) arrivals
