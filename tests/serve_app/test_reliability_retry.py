"""The retry policy of the entrance (:mod:`serve_app.retry`), without Ray running."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError, RayServeException

from serve_app.retry import RetryPolicy, Unavailable, call_with_retry, causes, is_overload, is_replica_failure


def upstream_died() -> RayServeException:
    """What Serve raises at stage N when stage N-1's replica died under the request."""
    wrapped = RayServeException("Request to deployment 'stage-1' failed because an upstream actor died")
    wrapped.__cause__ = ActorDiedError()
    return wrapped


def test_delays_grow_bounded_with_jitter() -> None:
    policy = RetryPolicy(attempts=6, first_delay_s=0.1, multiplier=2, max_delay_s=0.5, jitter=0.5)
    assert [policy.delay_s(n) for n in range(1, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert policy.delay_s(1, 0.0) == pytest.approx(0.05) and policy.delay_s(1, 1.0) == pytest.approx(0.15)
    assert policy.max_total_delay_s() == pytest.approx(1.5 * (0.1 + 0.2 + 0.4 + 0.5 + 0.5))
    assert RetryPolicy(attempts=1).max_total_delay_s() == 0
    for bad in ({"attempts": 0}, {"jitter": 2.0}, {"multiplier": 0.5}, {"first_delay_s": -1.0}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


def test_classification_follows_wrapped_causes() -> None:
    task_error = RayTaskError("f", "traceback", ActorDiedError())
    for exc in (ActorDiedError(), ActorUnavailableError("gone", None), upstream_died(), task_error):
        assert is_replica_failure(exc) and not is_overload(exc), exc
    assert is_overload(BackPressureError(num_queued_requests=3, max_queued_requests=2))
    for exc in (ValueError("bad input"), RuntimeError("model failed"), RayTaskError("f", "tb", ValueError("x"))):
        assert not is_replica_failure(exc) and not is_overload(exc)
    loop = ValueError("a")
    loop.__cause__ = ValueError("b")
    loop.__cause__.__cause__ = loop
    assert len(causes(loop)) == 2


def scripted(outcomes: list[BaseException | str]) -> tuple[Callable[[], Awaitable[str]], list[int]]:
    """A call that fails or answers as scripted, and the list of its call numbers."""
    calls: list[int] = []

    async def call() -> str:
        calls.append(len(calls))
        outcome = outcomes[len(calls) - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return call, calls


def run(call: Callable[[], Awaitable[str]], policy: RetryPolicy, slept: list[float]) -> str:
    async def sleep(s: float) -> None:
        slept.append(s)

    return asyncio.run(call_with_retry(call, policy, sleep=sleep, unit=lambda: 0.5))


def test_retries_replica_failures_then_answers() -> None:
    call, calls = scripted([ActorDiedError(), upstream_died(), "ok"])
    slept: list[float] = []
    retried: list[BaseException] = []
    policy = RetryPolicy(attempts=4, first_delay_s=0.1)

    async def sleep(s: float) -> None:
        slept.append(s)

    got = asyncio.run(call_with_retry(call, policy, on_retry=retried.append, sleep=sleep, unit=lambda: 0.5))
    assert got == "ok" and len(calls) == 3 and len(retried) == 2
    assert slept == pytest.approx([0.1, 0.2])


def test_gives_up_with_unavailable_after_the_last_attempt() -> None:
    call, calls = scripted([ActorDiedError()] * 3)
    slept: list[float] = []
    with pytest.raises(Unavailable, match="failed 3 times") as info:
        run(call, RetryPolicy(attempts=3, retry_after_s=2.5), slept)
    assert len(calls) == 3 and len(slept) == 2 and info.value.retry_after_s == 2.5
    assert isinstance(info.value.__cause__, ActorDiedError)


def test_overload_and_other_errors_are_not_retried() -> None:
    call, calls = scripted([BackPressureError(num_queued_requests=9, max_queued_requests=8)])
    with pytest.raises(Unavailable, match="overloaded"):
        run(call, RetryPolicy(), [])
    assert len(calls) == 1
    call, calls = scripted([RuntimeError("model failed")])
    with pytest.raises(RuntimeError, match="model failed"):
        run(call, RetryPolicy(), [])
    assert len(calls) == 1


def test_unavailable_survives_pickling() -> None:
    import pickle

    exc = pickle.loads(pickle.dumps(Unavailable("try later", 3.0)))
    assert isinstance(exc, Unavailable) and str(exc) == "try later" and exc.retry_after_s == 3.0
