"""Pure pieces of serving: batching, the result cache, the load generators (no Ray needed)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serve_app.batching import PipelineBatcher, concat, run_together, samples, should_send, split, total_samples
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


class Pipeline:
    """A stand-in pipeline for :class:`PipelineBatcher`: records each batch's request sizes and the most
    batches in it at once; a batch finishes when the test releases it."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.running = 0
        self.most_running = 0
        self.release = asyncio.Event()

    async def __call__(self, payloads, deadline_s=None):
        self.batches.append([samples(p) for p in payloads])
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        await self.release.wait()
        self.running -= 1
        return [ValueError("negative") if (p["x"] < 0).any() else {"y": 2 * p["x"]} for p in payloads]


def request(n: int, sign: float = 1.0) -> dict[str, np.ndarray]:
    return {"x": sign * np.ones((n, 1), np.float32)}


@pytest.mark.parametrize(
    ("queued", "in_flight", "waited_s", "send"),
    [(8, 3, 0.0, True), (1, 0, 0.0, True), (1, 1, 0.0, False), (7, 2, 0.009, False), (1, 1, 0.01, True)],
)
def test_should_send_full_idle_or_waited(queued: int, in_flight: int, waited_s: float, send: bool) -> None:
    assert should_send(queued, 8, in_flight, waited_s, wait_s=0.01) is send


def test_batcher_sends_a_lone_request_at_once_on_an_idle_pipeline() -> None:
    async def main() -> None:
        pipeline = Pipeline()
        pipeline.release.set()
        batcher = PipelineBatcher(pipeline, max_batch_size=8, wait_s=60.0, max_in_flight=2)
        out = await asyncio.wait_for(batcher(request(1)), timeout=10)  # not the 60 s wait
        assert np.array_equal(out["y"], 2 * request(1)["x"]) and pipeline.batches == [[1]]

    asyncio.run(main())


def test_batcher_gathers_requests_while_the_pipeline_is_busy() -> None:
    async def main() -> None:
        pipeline = Pipeline()
        batcher = PipelineBatcher(pipeline, max_batch_size=8, wait_s=60.0, max_in_flight=1)
        first = asyncio.create_task(batcher(request(1)))
        while not pipeline.batches:
            await asyncio.sleep(0)
        # The pipeline is full: these wait, and go as batches of at most 8 samples in arrival order.
        rest = [asyncio.create_task(batcher(request(n))) for n in (3, 3, 3, 1)]
        cancelled = asyncio.create_task(batcher(request(2)))
        failing = asyncio.create_task(batcher(request(1, sign=-1.0)))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        pipeline.release.set()
        results = await asyncio.wait_for(asyncio.gather(first, *rest), timeout=10)
        assert [samples(r) for r in results] == [1, 3, 3, 3, 1]
        with pytest.raises(ValueError, match="negative"):
            await failing
        assert pipeline.batches == [[1], [3, 3], [3, 1, 1]]  # the cancelled request was never sent
        assert pipeline.most_running == 1

    asyncio.run(main())


def test_batcher_waits_at_most_wait_s_and_keeps_max_in_flight() -> None:
    async def main() -> None:
        pipeline = Pipeline()
        batcher = PipelineBatcher(pipeline, max_batch_size=8, wait_s=0.05, max_in_flight=2)
        tasks = [asyncio.create_task(batcher(request(1)))]
        while not pipeline.batches:
            await asyncio.sleep(0)
        tasks += [asyncio.create_task(batcher(request(1))) for _ in range(3)]
        # The pipeline stays busy: the second batch goes once its oldest request has waited 50 ms, and
        # the third waits for a free slot, not for the clock.
        while len(pipeline.batches) < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert pipeline.batches == [[1], [1, 1, 1]] and pipeline.most_running == 2
        tasks.append(asyncio.create_task(batcher(request(1))))
        await asyncio.sleep(0.2)
        assert len(pipeline.batches) == 2  # both slots taken
        pipeline.release.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
        assert pipeline.batches == [[1], [1, 1, 1], [1]]

    asyncio.run(main())


def test_batcher_fails_every_request_of_a_batch_that_raises() -> None:
    async def boom(payloads, deadline_s):
        raise RuntimeError("pipeline down")

    async def main() -> None:
        batcher = PipelineBatcher(boom, max_batch_size=8, wait_s=0.0, max_in_flight=1)
        for outcome in await asyncio.gather(batcher(request(1)), batcher(request(2)), return_exceptions=True):
            assert isinstance(outcome, RuntimeError)

    asyncio.run(main())


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


def test_busy_union_counts_overlapping_batches_once() -> None:
    from serve_app.metrics import union_s

    # Three requests that waited for one device: [0, 1), [0, 2), [0, 3) run back to back: 3 s, not 6 s.
    assert union_s([(0.0, 1.0), (0.0, 2.0), (0.0, 3.0)]) == pytest.approx(3.0)
    assert union_s([(5.0, 6.0), (0.0, 1.0), (0.5, 2.0)]) == pytest.approx(3.0)  # [0, 2) and [5, 6)
    assert union_s([]) == 0.0
