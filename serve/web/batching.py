"""Adaptive batching: concurrent requests coalesced into one ``predict_rides`` call.

Each request is parsed and validated on its own first (a bad request is answered
400 and never joins a batch), then its rides wait in a bounded queue. A batch is
cut when the rides waiting reach ``max_batch_size`` or when the oldest has waited
``max_delay`` seconds, whichever comes first; it is predicted in one worker
thread (the event loop keeps reading requests meanwhile), and each caller gets
exactly its own slice back. While a batch is being predicted the next one fills
up, so under load the batch size follows the model's cost and the delay is only
paid when the server is idle.

Batches hold whole requests (a request is never split); a request larger than
``max_batch_size`` is predicted alone. If a batched call raises, each request of
the batch is retried alone, so a failure stays with the request that caused it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from serve.errors import QueueFull
from serve.features import Rides
from serve.web.holder import Active, ModelHolder
from serve.web.metrics import Metrics

log = logging.getLogger(__name__)


def concat(parts: list[Rides]) -> Rides:
    """One Rides of several, in order."""
    if len(parts) == 1:
        return parts[0]
    return Rides(np.concatenate([r.pu for r in parts]), np.concatenate([r.do for r in parts]),
                 np.concatenate([r.distance for r in parts]))


class Batcher:
    """Coalesces concurrent ``predict`` calls of one event loop into batched model calls."""

    def __init__(self, holder: ModelHolder, metrics: Metrics, max_batch_size: int,
                 max_delay: float, max_queue: int):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.holder = holder
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay
        self.max_queue = max_queue
        self._pending: deque[tuple[Rides, asyncio.Future, float]] = deque()
        self._rows = 0  # rides waiting
        self._arrived: asyncio.Future | None = None  # set when the queue stops being empty
        self._full: asyncio.Future | None = None  # set when the rides waiting reach the size
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    def start(self) -> None:
        """Start the collector on the running loop (the ASGI lifespan calls this)."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="batch-predict")
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def close(self, timeout: float = 10.0) -> None:
        """Answer what is queued (for up to ``timeout`` seconds), then stop."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._pending and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def predict(self, rides: Rides) -> tuple[Active, np.ndarray]:
        """The model that answered and the minutes of ``rides``, predicted with company."""
        if len(self._pending) >= self.max_queue:
            self.metrics.batch_queue_full.inc()
            raise QueueFull(f"{len(self._pending)} requests are waiting to be batched; the bound "
                            f"is {self.max_queue}: retry later", retry_after=1)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((rides, future, loop.time()))
        self._rows += len(rides)
        self.metrics.batch_queue_depth.set(len(self._pending))
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)
        if self._full is not None and self._rows >= self.max_batch_size and not self._full.done():
            self._full.set_result(None)
        return await future

    def _take(self) -> list[tuple[Rides, asyncio.Future, float]]:
        """Whole requests from the head of the queue, up to the batch size (at least one)."""
        batch, rows = [], 0
        while self._pending and (not batch or rows + len(self._pending[0][0])
                                 <= self.max_batch_size):
            item = self._pending.popleft()
            rows += len(item[0])
            batch.append(item)
        self._rows -= rows
        self.metrics.batch_queue_depth.set(len(self._pending))
        return batch

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._arrived = loop.create_future()
                await self._arrived
                self._arrived = None
            wait = self._pending[0][2] + self.max_delay - loop.time()
            if self._rows < self.max_batch_size and wait > 0:
                self._full = loop.create_future()
                timer = loop.call_later(wait, lambda f=self._full: f.done() or f.set_result(None))
                await self._full
                timer.cancel()
                self._full = None
            await self._run(self._take())

    async def _run(self, batch: list[tuple[Rides, asyncio.Future, float]]) -> None:
        """Predict a batch in the worker thread and hand each caller its slice."""
        loop = asyncio.get_running_loop()
        futures = [f for _, f, _ in batch]
        try:
            rides = concat([r for r, _, _ in batch])
            self.metrics.batch_rows.observe(len(rides))
            self.metrics.batch_requests.observe(len(batch))
            active = self.holder.require()
            minutes = await loop.run_in_executor(self._executor, active.model.predict_rides,
                                                 rides)
        except Exception as e:  # noqa: BLE001 - settled per request below
            if len(batch) == 1:
                _settle(futures[0], error=e)
                return
            log.warning("a batch of %d requests failed (%r); predicting them one by one",
                        len(batch), e)
            for item in batch:
                await self._run([item])
            return
        start = 0
        for (part, future, _) in batch:
            end = start + len(part)
            _settle(future, (active, minutes[start:end]))
            start = end


def _settle(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if future.done():  # the caller went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
