"""Payload batching shared by the entrance and the stages: sizes in samples, concat, split, run together,
and the entrance's :class:`PipelineBatcher`.

A payload is a dict (name -> array) whose arrays share dimension 0, the batch; a request may carry many
samples, so batches are sized in samples, not requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import numpy as np

from partitions.types import Payload
from serve_app.retry import Unavailable

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
    ``alone_on(exc)``), bisect: each half is run together the same way, one after the other, so the failing
    requests get their own errors and the others their answers. One failing request among ``n`` costs at
    most ``2 * ceil(log2(n))`` runs beyond the first (each failing half is split again; a half that answers
    is done); the old way, each request alone, cost ``n``."""
    merged, sizes = concat(payloads)
    try:
        together: list[R | Exception] = list(split(await run(merged, len(payloads)), sizes))
        return together
    except Exception as exc:
        if len(payloads) == 1 or not alone_on(exc):
            return [exc] * len(payloads)
    half = len(payloads) // 2
    # One half after the other: halves sent at once could be merged again by a stage replica.
    first = await run_together(payloads[:half], run, alone_on)
    return first + await run_together(payloads[half:], run, alone_on)


def should_send(queued_samples: int, max_batch_size: int, in_flight: int, waited_s: float, wait_s: float) -> bool:
    """Whether the entrance sends the requests waiting now as a batch (given a free pipeline slot): when they
    fill a batch, when the pipeline is idle (``in_flight == 0``: nobody gains from waiting), or when the
    oldest has waited ``wait_s`` seconds. While the pipeline is busy, requests gather into larger batches,
    so per-hop costs are paid once per batch (Nagle's rule, with a bound on the delay)."""
    return queued_samples >= max_batch_size or in_flight == 0 or waited_s >= wait_s


Run = Callable[[list[Payload], float | None], Awaitable[list[R | Exception]]]
"""A pipeline run for :class:`PipelineBatcher`: ``run(payloads, deadline_s)``."""
Taken = tuple[Payload, asyncio.Future[R], float | None]
"""A request taken into a batch: its payload, its caller's future and its deadline."""


class PipelineBatcher(Generic[R]):
    """Forms batches of requests for a pipeline and keeps at most ``max_in_flight`` of them in it.

    ``await batcher(payload, deadline_s)`` resolves to that request's result. ``run(payloads, deadline_s)``
    runs one batch and returns one result (or exception) per payload, in order; ``deadline_s`` is the latest
    of its requests' deadlines (``time.time()`` seconds; None when one of them has none). A batch takes whole
    requests in arrival order up to ``max_batch_size`` samples (a larger request goes alone); when to send is
    :func:`should_send`. A slot is taken before the batch is formed, so while the pipeline is full,
    requests wait here and the next batch takes all of them.

    Every request is resolved whatever happens: a request whose deadline passes raises ``TimeoutError`` and
    leaves its batch; a batch all of whose requests have left is cancelled, which frees its slot; a batch
    or the sender cancelled (the replica stopping) fails its waiting requests with
    :class:`~serve_app.retry.Unavailable`.
    """

    def __init__(
        self,
        run: Run[R],
        max_batch_size: int,
        wait_s: float,
        max_in_flight: int,
        retry_after_s: float = 1.0,
    ) -> None:
        """``max_batch_size``: samples per batch; ``wait_s``: seconds a request waits for others to fill its
        batch (under load); ``max_in_flight``: batches in the pipeline at once; ``retry_after_s``: what the
        :class:`~serve_app.retry.Unavailable` of a cancelled batch tells callers to wait."""
        self.run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.max_in_flight = max_in_flight
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.queue: deque[tuple[Payload, asyncio.Future[R], float, float | None]] = deque()
        """``(payload, future, arrival on the monotonic clock, deadline_s)`` per waiting request."""
        self.queued_samples = 0
        """Samples in ``queue`` (a request cancelled behind the first still counts until it is taken)."""
        self.changed = asyncio.Event()
        self.sender: asyncio.Task[None] | None = None
        self.batches: set[asyncio.Task[None]] = set()

    async def __call__(self, payload: Payload, deadline_s: float | None = None) -> R:
        """The request's result; ``TimeoutError`` once ``deadline_s`` (``time.time()`` seconds) has passed."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self.queue.append((payload, future, time.monotonic(), deadline_s))
        self.queued_samples += samples(payload)
        self.changed.set()
        if self.sender is None or self.sender.done():
            self.sender = asyncio.create_task(self._send_forever())
        if deadline_s is None:
            return await future
        # On time-out wait_for cancels the future: the request leaves the queue, or its batch.
        return await asyncio.wait_for(future, max(deadline_s - time.time(), 0.0))

    async def _send_forever(self) -> None:
        try:
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
                for _, future, _ in batch:
                    future.add_done_callback(functools.partial(self._left, task, batch))
        except BaseException:
            self._resolve([(p, f, d) for p, f, _, d in self.queue], self._stopped())
            self.queue.clear()
            self.queued_samples = 0
            raise

    def _stopped(self) -> Exception:
        return Unavailable("the entrance stopped before answering, try again", self.retry_after_s)

    @staticmethod
    def _left(task: asyncio.Task[None], batch: list[Taken[R]], _: object) -> None:
        """A request of ``batch`` was resolved or left it: cancel the batch once all of them have left."""
        if not task.done() and all(future.done() for _, future, _ in batch):
            task.cancel()

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

    def _take(self) -> list[Taken[R]]:
        """The oldest requests up to ``max_batch_size`` samples (at least one)."""
        batch: list[Taken[R]] = []
        size = 0
        while self.queue:
            payload, future, _, deadline_s = self.queue[0]
            n = samples(payload)
            if batch and size + n > self.max_batch_size:
                break
            self.queue.popleft()
            self.queued_samples -= n
            if not future.done():
                batch.append((payload, future, deadline_s))
                size += n
        return batch

    async def _send(self, batch: list[Taken[R]]) -> None:
        deadlines = [d for _, _, d in batch]
        deadline_s = None if None in deadlines else max(d for d in deadlines if d is not None)
        try:
            results = await self.run([p for p, _, _ in batch], deadline_s)
            if len(results) != len(batch):
                raise RuntimeError(f"the pipeline answered {len(results)} results for {len(batch)} requests")
        except Exception as exc:
            self._resolve(batch, exc)
        except BaseException:  # cancelled (every caller left, or the replica is stopping), or exiting
            self._resolve(batch, self._stopped())
            raise
        else:
            self._resolve(batch, results)
        finally:
            self.in_flight -= 1
            self.changed.set()

    @staticmethod
    def _resolve(batch: list[Taken[R]], results: list[R | Exception] | Exception) -> None:
        """Give each request of ``batch`` still waiting its result (one per request) or the one error."""
        for i, (_, future, _) in enumerate(batch):
            if future.done():
                continue
            result = results if isinstance(results, Exception) else results[i]
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


class Coalescer:
    """Runs ``fn`` (blocking, in a thread) on the items of many callers at once: items that arrive while a
    call runs wait and go together in the next one, so a burst of small requests costs a few large calls
    (a tokenizer's batch call). ``fn`` takes a list of items and returns a payload with one row per item."""

    def __init__(self, fn: Callable[[list], Payload]) -> None:
        self.fn = fn
        self.pending: list[tuple[list, asyncio.Future[Payload]]] = []
        self.draining: asyncio.Task[None] | None = None

    async def __call__(self, items: list) -> Payload:
        """``fn``'s rows for ``items``."""
        future: asyncio.Future[Payload] = asyncio.get_running_loop().create_future()
        self.pending.append((items, future))
        if self.draining is None or self.draining.done():
            self.draining = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            sizes = [len(items) for items, _ in batch]
            try:
                rows = await asyncio.to_thread(self.fn, [x for items, _ in batch for x in items])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), part in zip(batch, split(rows, sizes)):
                if not future.done():
                    future.set_result(part)
