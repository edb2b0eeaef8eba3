"""Payload batching shared by the entrance and the stages: sizes in samples, concat, split, run together,
and the entrance's :class:`PipelineBatcher`.

A payload is a dict (name -> array) whose arrays share dimension 0, the batch; a request may carry many
samples, so batches are sized in samples, not requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import numpy as np

from serve_app.tensors import Payload

R = TypeVar("R", bound=Payload)


def samples(payload: Payload) -> int:
    """Samples in a payload: the length of its batch dimension."""
    return len(next(iter(payload.values())))


def total_samples(payloads: list[Payload]) -> int:
    """Samples in a list of payloads: the size ``@serve.batch`` gives a batch (its ``batch_size_fn``)."""
    return sum(map(samples, payloads))


def concat(payloads: list[Payload]) -> tuple[Payload, list[int]]:
    """One payload holding every request's samples, and each request's batch length."""
    sizes = [samples(p) for p in payloads]
    if len(payloads) == 1:
        return payloads[0], sizes
    return {k: np.concatenate([p[k] for p in payloads]) for k in payloads[0]}, sizes


def split(payload: R, sizes: list[int]) -> list[R]:
    """Undo :func:`concat` on a result."""
    if len(sizes) == 1:
        return [payload]
    cuts = np.cumsum(sizes)[:-1]
    parts = {k: np.split(v, cuts) for k, v in payload.items()}
    return [{k: parts[k][i] for k in payload} for i in range(len(sizes))]  # type: ignore[misc]


async def run_together(
    payloads: list[Payload],
    run: Callable[[Payload, int], Awaitable[R]],
    alone_on: Callable[[Exception], bool] = lambda exc: True,
) -> list[R | Exception]:
    """``run(merged, requests)`` once for all ``payloads`` and split the result back. If that fails (and
    ``alone_on(exc)``), run each payload alone so only the failing ones fail."""
    merged, sizes = concat(payloads)
    try:
        return split(await run(merged, len(payloads)), sizes)
    except Exception as exc:
        if len(payloads) == 1 or not alone_on(exc):
            return [exc] * len(payloads)
    results: list[R | Exception] = []
    for payload in payloads:
        try:
            results.append(await run(payload, 1))
        except Exception as exc:
            results.append(exc)
    return results


def should_send(queued_samples: int, max_batch_size: int, in_flight: int, waited_s: float, wait_s: float) -> bool:
    """Whether the entrance sends the requests waiting now as a batch (given a free pipeline slot): when they
    fill a batch, when the pipeline is idle (``in_flight == 0``: nobody gains from waiting), or when the
    oldest has waited ``wait_s`` seconds. While the pipeline is busy, requests gather into larger batches,
    so per-hop costs are paid once per batch (Nagle's rule, with a bound on the delay)."""
    return queued_samples >= max_batch_size or in_flight == 0 or waited_s >= wait_s


class PipelineBatcher(Generic[R]):
    """Forms batches of requests for a pipeline and keeps at most ``max_in_flight`` of them in it.

    ``await batcher(payload)`` resolves to that request's result. ``run(payloads)`` runs one batch and returns
    one result (or exception) per payload, in order. A batch takes whole requests in arrival order up to
    ``max_batch_size`` samples (a larger request goes alone); when to send is :func:`should_send`. A slot is
    taken before the batch is formed, so while the pipeline is full, requests wait here and the next batch
    takes all of them.
    """

    def __init__(
        self,
        run: Callable[[list[Payload]], Awaitable[list[R | Exception]]],
        max_batch_size: int,
        wait_s: float,
        max_in_flight: int,
    ) -> None:
        """``max_batch_size``: samples per batch; ``wait_s``: seconds a request waits for others to fill its
        batch (under load); ``max_in_flight``: batches in the pipeline at once."""
        self.run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.queue: deque[tuple[Payload, asyncio.Future[R], float]] = deque()
        self.queued_samples = 0
        """Samples in ``queue`` (a request cancelled behind the first still counts until it is taken)."""
        self.changed = asyncio.Event()
        self.sender: asyncio.Task[None] | None = None
        self.batches: set[asyncio.Task[None]] = set()

    async def __call__(self, payload: Payload) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self.queue.append((payload, future, time.monotonic()))
        self.queued_samples += samples(payload)
        self.changed.set()
        if self.sender is None or self.sender.done():
            self.sender = asyncio.create_task(self._send_forever())
        return await future

    async def _send_forever(self) -> None:
        while True:
            while not self._drop_cancelled() or self.in_flight >= self.max_in_flight:
                await self._changed(None)
            waited_s = time.monotonic() - self.queue[0][2]
            if not should_send(self.queued_samples, self.max_batch_size, self.in_flight, waited_s, self.wait_s):
                await self._changed(self.wait_s - waited_s)
                continue
            batch = self._take()
            self.in_flight += 1
            task = asyncio.create_task(self._send(batch))
            self.batches.add(task)
            task.add_done_callback(self.batches.discard)

    async def _changed(self, timeout_s: float | None) -> None:
        """Wait for an arrival or a finished batch (at most ``timeout_s`` seconds)."""
        self.changed.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.changed.wait(), timeout_s)

    def _drop_cancelled(self) -> bool:
        """Forget requests whose callers gave up; whether any request is left."""
        while self.queue and self.queue[0][1].done():
            self.queued_samples -= samples(self.queue.popleft()[0])
        return bool(self.queue)

    def _take(self) -> list[tuple[Payload, asyncio.Future[R]]]:
        """The oldest requests up to ``max_batch_size`` samples (at least one)."""
        batch: list[tuple[Payload, asyncio.Future[R]]] = []
        size = 0
        while self.queue:
            payload, future, _ = self.queue[0]
            n = samples(payload)
            if batch and size + n > self.max_batch_size:
                break
            self.queue.popleft()
            self.queued_samples -= n
            if not future.done():
                batch.append((payload, future))
                size += n
        return batch

    async def _send(self, batch: list[tuple[Payload, asyncio.Future[R]]]) -> None:
        try:
            results: list[R | Exception] = await self.run([p for p, _ in batch])
        except Exception as exc:
            results = [exc] * len(batch)
        finally:
            self.in_flight -= 1
            self.changed.set()
        for (_, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
