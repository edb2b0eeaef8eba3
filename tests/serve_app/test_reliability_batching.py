"""The request path's hardening without Ray running: bisection of failing batches, deadlines, cancellation,
the in-flight byte bound, error ids and the settings that carry them into Serve."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import pickle
import time

import numpy as np
import pytest

from cluster.deploy import serve_config
from serve_app import codecs
from serve_app.app import AppArgs, deployment_options, proxy_timeout_s, stage_config
from serve_app.batching import PipelineBatcher, run_together
from serve_app.entrance import Deadline, InflightBytes, _client_timeout_s, _internal, _unavailable
from serve_app.retry import DeadlineExceeded, RetryPolicy, Unavailable, call_with_retry
from serve_app.tensors import BadRequest
from tests.serve_fixtures import PlannedModel

POISON = -1.0


def requests(n: int, poison: set[int] = frozenset()) -> list[dict[str, np.ndarray]]:
    return [{"x": np.full((1, 1), POISON if i in poison else float(i), np.float32)} for i in range(n)]


class Model:
    """Doubles its input; raises on a batch holding :data:`POISON`; counts its runs and their sizes."""

    def __init__(self) -> None:
        self.runs: list[int] = []

    async def __call__(self, payload: dict[str, np.ndarray], _requests: int) -> dict[str, np.ndarray]:
        self.runs.append(len(payload["x"]))
        if (payload["x"] == POISON).any():
            raise ValueError("poison")
        return {"y": 2 * payload["x"]}


@pytest.mark.parametrize(("n", "poison"), [(8, {0}), (8, {5}), (8, {7}), (5, {2}), (16, {9}), (2, {1}), (1, {0})])
def test_one_bad_request_costs_log_n_runs_and_the_others_answer(n: int, poison: set[int]) -> None:
    model = Model()
    results = asyncio.run(run_together(requests(n, poison), model))
    assert len(model.runs) <= 1 + 2 * math.ceil(math.log2(n)), model.runs
    for i, result in enumerate(results):
        if i in poison:
            assert isinstance(result, ValueError)
        else:
            assert isinstance(result, dict) and result["y"][0, 0] == 2 * i
    if n == 8:
        assert len(model.runs) == 7 and model.runs[0] == 8  # the acceptance bound, met exactly


def test_bisection_with_no_failure_or_an_overload_runs_once() -> None:
    model = Model()
    assert all(isinstance(r, dict) for r in asyncio.run(run_together(requests(8), model)))
    assert model.runs == [8]

    runs: list[int] = []

    async def overloaded(payload: dict[str, np.ndarray], _requests: int) -> dict[str, np.ndarray]:
        runs.append(len(payload["x"]))
        raise Unavailable("overloaded", 1.0)

    results = asyncio.run(run_together(requests(8), overloaded, alone_on=lambda e: not isinstance(e, Unavailable)))
    assert runs == [8] and all(isinstance(r, Unavailable) for r in results)


def test_two_bad_requests_stay_within_their_bound() -> None:
    model = Model()
    results = asyncio.run(run_together(requests(16, {3, 12}), model))
    assert [i for i, r in enumerate(results) if isinstance(r, Exception)] == [3, 12]
    assert len(model.runs) <= 1 + 2 * 2 * math.ceil(math.log2(16))


class Hung:
    """A pipeline that never answers until released; records how its runs ended."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0
        self.release = asyncio.Event()

    async def __call__(self, payloads, deadline_s):
        self.started += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return [{"y": p["x"]} for p in payloads]


def test_a_deadline_frees_the_callers_and_the_pipeline_slot() -> None:
    async def main() -> None:
        pipeline = Hung()
        batcher = PipelineBatcher(pipeline, max_batch_size=8, wait_s=0.0, max_in_flight=1)
        start = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await batcher(requests(1)[0], deadline_s=time.time() + 0.2)
        assert 0.15 < time.monotonic() - start < 2.0
        # The batch's only request left: the batch was cancelled and its slot freed.
        await asyncio.sleep(0.05)
        assert pipeline.cancelled == 1 and batcher.in_flight == 0
        pipeline.release.set()
        out = await asyncio.wait_for(batcher(requests(1)[0], deadline_s=time.time() + 5), 5)
        assert out["y"][0, 0] == 0

    asyncio.run(main())


def test_a_batch_stays_while_one_of_its_requests_waits() -> None:
    async def main() -> None:
        pipeline = Hung()
        batcher = PipelineBatcher(pipeline, max_batch_size=8, wait_s=0.0, max_in_flight=1)
        first = asyncio.create_task(batcher(requests(1)[0], deadline_s=time.time() + 60))
        while not pipeline.started:
            await asyncio.sleep(0.01)
        # Queued behind the full pipeline, then gone at its deadline: the running batch is not touched.
        with pytest.raises(asyncio.TimeoutError):
            await batcher(requests(1)[0], deadline_s=time.time() + 0.1)
        assert pipeline.cancelled == 0 and not first.done()
        pipeline.release.set()
        assert (await asyncio.wait_for(first, 5))["y"][0, 0] == 0
        assert pipeline.started == 1  # the late request was never sent

    asyncio.run(main())


def test_cancelling_batches_or_the_sender_resolves_every_caller() -> None:
    async def main() -> None:
        pipeline = Hung()
        batcher = PipelineBatcher(pipeline, max_batch_size=1, wait_s=0.0, max_in_flight=1, retry_after_s=3.0)
        callers = [asyncio.create_task(batcher(r)) for r in requests(3)]
        while not pipeline.started:
            await asyncio.sleep(0.01)
        for task in list(batcher.batches):  # the replica stopping: its tasks are cancelled
            task.cancel()
        assert batcher.sender is not None
        batcher.sender.cancel()
        done, pending = await asyncio.wait(callers, timeout=5)
        assert not pending
        for task in done:
            assert isinstance(task.exception(), Unavailable) and task.exception().retry_after_s == 3.0
        assert batcher.in_flight == 0 and not batcher.queue

    asyncio.run(main())


def test_a_pipeline_answering_the_wrong_count_fails_its_callers() -> None:
    async def short(payloads, deadline_s):
        return []

    async def main() -> None:
        batcher = PipelineBatcher(short, max_batch_size=8, wait_s=0.0, max_in_flight=1)
        with pytest.raises(RuntimeError, match="0 results for 1"):
            await asyncio.wait_for(batcher(requests(1)[0]), 5)

    asyncio.run(main())


def test_deadline_errors_pickle_unwrap_and_answer_503_or_504() -> None:
    exc = pickle.loads(pickle.dumps(DeadlineExceeded("late", 2.0, True)))
    assert isinstance(exc, Unavailable) and exc.from_client and exc.retry_after_s == 2.0 and str(exc) == "late"

    calls = 0

    async def wrapped() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("stage failed") from DeadlineExceeded("late at a stage", 0.0)

    with pytest.raises(DeadlineExceeded, match="late at a stage"):
        asyncio.run(call_with_retry(wrapped, RetryPolicy()))
    assert calls == 1  # not retried

    server = _unavailable(DeadlineExceeded("late", 1.2))
    assert server.status_code == 503 and server.headers["retry-after"] == "2"
    client = _unavailable(DeadlineExceeded("late", 1.2, from_client=True))
    assert client.status_code == 504 and "retry-after" not in client.headers


def test_client_deadlines_only_shorten_the_servers() -> None:
    assert _client_timeout_s(None, None) is None
    assert _client_timeout_s("250", None) == 0.25 and _client_timeout_s("250", 100) == 0.1
    for bad in ("0", "-5", "1.5", "abc", "٣"):
        with pytest.raises(BadRequest):
            _client_timeout_s(bad, None)
    assert Deadline.of(100.0, 60.0, None) == Deadline(160.0, False)
    assert Deadline.of(100.0, 60.0, 2.0) == Deadline(102.0, True)
    assert Deadline.of(100.0, 60.0, 90.0) == Deadline(160.0, False)


def test_oip_timeout_parameter_is_read_and_checked() -> None:
    from partitions.types import TensorSpec

    specs = [TensorSpec("x", (-1, 2), "float32")]
    doc = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
    assert codecs.decode(json.dumps(doc).encode(), None, None, specs).timeout_ms is None
    doc["parameters"] = {"timeout_ms": 1500}
    assert codecs.decode(json.dumps(doc).encode(), None, None, specs).timeout_ms == 1500
    for bad in (0, -1, 1.5, "100", True):
        doc["parameters"] = {"timeout_ms": bad}
        with pytest.raises(BadRequest, match="timeout_ms"):
            codecs.decode(json.dumps(doc).encode(), None, None, specs)


def test_large_bodies_decode_in_a_thread_as_views_of_the_body() -> None:
    from partitions.types import TensorSpec

    specs = [TensorSpec("x", (-1, 1 << 17), "float32")]
    for order in ("C", "F"):
        x = np.asarray(np.random.default_rng(0).random((2, 1 << 17), np.float32), order=order)
        buf = io.BytesIO()
        np.save(buf, x)
        body = buf.getvalue()
        assert len(body) >= codecs.OFFLOAD_BYTES
        got = asyncio.run(codecs.decode_async(body, codecs.NPY, None, specs)).arrays["x"]
        assert np.array_equal(got, x)
        if order == "C":
            assert np.shares_memory(got, np.frombuffer(body, np.uint8))  # no copy of a large body
        out = asyncio.run(codecs.encode_async(codecs.InferRequest({}, "npy"), {"y": x}, "m"))
        assert np.array_equal(np.load(io.BytesIO(out.body)), x)


def test_inflight_bytes_are_bounded_and_given_back() -> None:
    budget = InflightBytes(100, retry_after_s=2.0)
    a, b = budget.hold(), budget.hold()
    a.grow(60)
    with pytest.raises(Unavailable, match="100-byte bound") as info:
        b.grow(50)
    assert info.value.retry_after_s == 2.0 and budget.used == 60 and b.bytes == 0
    b.grow(40)
    a.set(10)  # the body decoded and dropped: fewer bytes held
    assert budget.used == 50
    a.release()
    b.release()
    assert budget.used == 0 and a.bytes == b.bytes == 0


def test_internal_errors_answer_an_id_and_log_the_exception() -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("ray.serve")  # the entrance's logger (it does not propagate to the root)
    logger.addHandler(handler)
    try:
        answer = _internal(RuntimeError("secret internal detail"))
    finally:
        logger.removeHandler(handler)
    doc = json.loads(answer.body)
    assert answer.status_code == 500 and doc["error"] == "internal error" and len(doc["id"]) == 32
    assert "secret" not in answer.body.decode()
    (record,) = [r for r in records if doc["id"] in r.getMessage()]
    assert "secret internal detail" in record.getMessage() and record.exc_info is not None


def test_deadline_settings_reach_serve(mlp: PlannedModel) -> None:
    config = serve_config(mlp.uri, request_timeout_s=5.0, health_check_period_s=1.0, max_inflight_bytes=10**9)
    args = AppArgs.model_validate(config["applications"][0]["args"])
    assert config["http_options"]["request_timeout_s"] == proxy_timeout_s(args) > args.request_timeout_s == 5.0
    stages = [d for d in config["applications"][0]["deployments"] if d["name"].startswith("stage-")]
    assert stages and all(d["health_check_period_s"] == 1.0 for d in stages)
    assert stage_config(mlp.plan, args, 0).max_batch_s == 10.0  # default: twice the deadline
    defaults = AppArgs(plan_uri=mlp.uri)
    assert defaults.request_timeout_s == 60.0
    assert "health_check_period_s" not in deployment_options(mlp.plan, defaults)["stage-0"]
    with pytest.raises(ValueError, match="max_inflight_bytes"):
        from serve_app.app import entrance_config

        entrance_config(mlp.plan, AppArgs(plan_uri=mlp.uri, max_body_bytes=100, max_inflight_bytes=99))


@pytest.mark.slow  # starts a worker process
def test_large_json_parses_in_a_process_while_the_loop_turns() -> None:
    from partitions.types import TensorSpec

    width = 600_000
    specs = [TensorSpec("x", (-1, width), "float32")]
    x = np.random.default_rng(0).random((1, width), np.float32)
    doc = {"inputs": [{"name": "x", "shape": [1, width], "datatype": "FP32", "data": x.ravel().tolist()}]}
    body = json.dumps(doc).encode()
    assert len(body) >= codecs.JSON_PROCESS_BYTES

    async def decode_timed(data: bytes) -> tuple[codecs.InferRequest | Exception, float]:
        lags: list[float] = []

        async def tick() -> None:
            while True:
                start = time.perf_counter()
                await asyncio.sleep(0.005)
                lags.append(time.perf_counter() - start - 0.005)

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.02)
        try:
            result: codecs.InferRequest | Exception = await codecs.decode_async(data, codecs.JSON, None, specs)
        except BadRequest as exc:
            result = exc
        ticker.cancel()
        return result, max(lags)

    try:
        asyncio.run(decode_timed(body))  # the first use starts the worker
        start = time.perf_counter()
        inline = codecs.decode(body, codecs.JSON, None, specs)
        inline_s = time.perf_counter() - start
        result, lag_s = asyncio.run(decode_timed(body))
        assert isinstance(result, codecs.InferRequest) and np.array_equal(result.arrays["x"], inline.arrays["x"])
        # Parsed on the loop (or in a thread, holding the GIL) the loop would stall for the whole parse.
        assert lag_s < inline_s / 2, (lag_s, inline_s)
        bad, _ = asyncio.run(decode_timed(b"[" * 10 + b"0" * codecs.JSON_PROCESS_BYTES))
        assert isinstance(bad, BadRequest) and bad.status == 400
    finally:
        codecs.stop_json_workers()
