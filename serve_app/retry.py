"""Retrying idempotent inference when a stage replica dies, and the error that says "try again later".

Inference is a pure function of its inputs, so a request whose pipeline lost a replica mid-flight is sent
again, whole, after a short backoff (Serve routes it to a live replica). What is retried and what is not:

* replica or worker death (``ray.exceptions.RayActorError``: ``ActorDiedError``, ``ActorUnavailableError``;
  Serve's ``RayServeException`` for "an upstream actor died", which carries the ``ActorDiedError`` as its
  ``__cause__``; ``WorkerCrashedError``; ``ObjectLostError`` for an intermediate lost with its owner):
  retried up to ``RetryPolicy.attempts`` times in all, then :class:`Unavailable`;
* a full queue (``ray.serve.exceptions.BackPressureError``) or a deployment that failed to deploy
  (``DeploymentUnavailableError``): not retried (retrying under overload adds load), :class:`Unavailable`
  at once;
* a request whose deadline passed (:class:`DeadlineExceeded`, also when a stage raised it): not retried;
* anything else (a model error, a bad input): raised as it is.

HTTP answers :class:`Unavailable` with 503 and ``Retry-After`` (a :class:`DeadlineExceeded` the client set
itself: 504); handle callers get it as the exception.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from ray.exceptions import ObjectLostError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

T = TypeVar("T")

REPLICA_FAILURES: tuple[type[BaseException], ...] = (RayActorError, WorkerCrashedError, ObjectLostError)
"""Errors meaning a replica, its worker or an object it owned is gone: the request itself was fine."""
OVERLOAD: tuple[type[BaseException], ...] = (BackPressureError, DeploymentUnavailableError)
"""Errors meaning no replica can take the request now."""
CAUSE_DEPTH = 8
"""Links of ``__cause__`` / ``RayTaskError.cause`` followed when classifying an error."""


class Unavailable(Exception):
    """The service cannot answer now; the same request may succeed after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, retry_after_s)  # both in args: the error crosses processes pickled
        self.message = message
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return self.message


class DeadlineExceeded(Unavailable):
    """The request's deadline passed before it was answered. ``from_client``: the caller chose that deadline
    (HTTP 504); otherwise it was the server's own (HTTP 503 with ``Retry-After``: the same request may
    succeed later)."""

    def __init__(self, message: str, retry_after_s: float, from_client: bool = False) -> None:
        Exception.__init__(self, message, retry_after_s, from_client)  # all in args: pickled across processes
        self.message = message
        self.retry_after_s = retry_after_s
        self.from_client = from_client


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter.

    ``attempts``: tries in all (1: no retry); the wait before retry ``n`` (1-based) is
    ``min(first_delay_s * multiplier ** (n - 1), max_delay_s)`` seconds, scaled by a uniform factor in
    ``[1 - jitter, 1 + jitter]`` so that requests failed together do not come back together.
    ``retry_after_s``: what :class:`Unavailable` tells clients to wait, in seconds.
    """

    attempts: int = 4
    first_delay_s: float = 0.05
    multiplier: float = 2.0
    max_delay_s: float = 1.0
    jitter: float = 0.5
    retry_after_s: float = 1.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts ({self.attempts}) must be >= 1")
        if self.first_delay_s < 0 or self.max_delay_s < 0 or self.multiplier < 1 or not 0 <= self.jitter <= 1:
            raise ValueError(f"invalid backoff {self}: delays >= 0, multiplier >= 1, 0 <= jitter <= 1")

    def delay_s(self, retry: int, unit: float = 0.5) -> float:
        """Seconds to wait before retry ``retry`` (1-based); ``unit`` in [0, 1] picks the jitter (0.5: none)."""
        base = min(self.first_delay_s * self.multiplier ** (retry - 1), self.max_delay_s)
        return base * (1 + self.jitter * (2 * unit - 1))

    def max_total_delay_s(self) -> float:
        """The longest a request can spend waiting between its tries, in seconds."""
        return sum(self.delay_s(n, 1.0) for n in range(1, self.attempts))


def causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: ``RayTaskError.cause`` and ``__cause__`` links, at most ``CAUSE_DEPTH``."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < CAUSE_DEPTH and all(current is not c for c in chain):
        chain.append(current)
        wrapped = getattr(current, "cause", None)
        current = wrapped if isinstance(wrapped, BaseException) else current.__cause__
    return chain


def is_replica_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says a replica (or its worker) died under the request: worth retrying."""
    return any(isinstance(e, REPLICA_FAILURES) for e in causes(exc))


def is_deadline(exc: BaseException) -> bool:
    """Whether ``exc`` says a deadline passed (here or in a stage replica)."""
    return any(isinstance(e, DeadlineExceeded) for e in causes(exc))


def is_overload(exc: BaseException) -> bool:
    """Whether ``exc`` says no replica can take the request now (a full queue, nothing deployed)."""
    return any(isinstance(e, OVERLOAD) for e in causes(exc))


async def call_with_retry(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    on_retry: Callable[[BaseException], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    unit: Callable[[], float] = random.random,
) -> T:
    """``await call()``, again after a backoff while it fails with a replica failure (at most
    ``policy.attempts`` tries); raises :class:`Unavailable` once they are spent or on overload, and any
    other error as it is (a :class:`DeadlineExceeded` a stage raised, unwrapped). ``on_retry`` sees each error
    that is retried."""
    attempt = 1
    while True:
        try:
            return await call()
        except Exception as exc:
            if is_deadline(exc):
                inner = next(e for e in causes(exc) if isinstance(e, DeadlineExceeded))
                raise DeadlineExceeded(inner.message, inner.retry_after_s, inner.from_client) from exc
            if is_overload(exc):
                raise Unavailable(f"overloaded, try again later ({_first_line(exc)})", policy.retry_after_s) from exc
            if not is_replica_failure(exc):
                raise
            if attempt >= policy.attempts:
                raise Unavailable(
                    f"a replica failed {policy.attempts} times in a row, try again later ({_first_line(exc)})",
                    policy.retry_after_s,
                ) from exc
            if on_retry is not None:
                on_retry(exc)
            await sleep(policy.delay_s(attempt, unit()))
            attempt += 1


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]
