"""What one request may cost the service: body size and read time, queue wait, worker threads.

* :func:`read_body` reads a request body under the size limit; a client that hangs up is a
  :class:`ClientDisconnected` (counted as 499, never as a 4xx it was not sent), one that is
  too slow a :class:`~serve.errors.RequestTimeout` (the deadline is kept by
  :mod:`serve.web.protocol`);
* :func:`check_queue_wait` sheds a request that waited too long for the event loop;
* :class:`WorkQueue` runs heavy requests (JSON over 16 KiB or for MLflow's parser, CSV,
  parquet) in a few worker threads with a bounded queue and a bounded wait.

Shedding is an :class:`~serve.errors.Overloaded` error: 503 with ``Retry-After``, raised
before any work is done on the request, so the latency of the requests that are served stays
bounded under any load instead of growing with the queue.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from serve.errors import DurationError, Overloaded, PayloadTooLarge, RequestTimeout
from serve.web.protocol import QUEUED_AT, TIMED_OUT

# Two: pandas and pyarrow release the GIL while they parse; JSON decoding holds it, so more
# threads would only take it from the event loop.
WORKER_THREADS = 2


class ClientDisconnected(Exception):
    """The client hung up before sending its whole request: nobody is left to answer."""


class ShuttingDown(DurationError):
    """The drain timeout after SIGTERM passed with this request still in progress."""

    error_code = "SHUTTING_DOWN"
    status_code = 503
    retry_after = 1  # another replica (or this one, restarted) takes it


async def read_body(scope, receive, limit: int) -> tuple[str | None, bytes]:
    """Content type and body, refusing bodies over ``limit`` before reading them whole."""
    content_type = None
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_type = value.decode("latin-1")
        elif name == b"content-length" and value.isdigit() and int(value) > limit:
            raise PayloadTooLarge(f"request body of {int(value)} bytes; the limit is {limit}")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected(f"client hung up after {size} bytes of the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return content_type, chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if TIMED_OUT in scope:
            raise RequestTimeout(f"the request body did not arrive in time ({size} bytes "
                                 f"received)")


def check_queue_wait(scope, now: float, max_wait: float) -> None:
    """Overloaded when the request waited more than ``max_wait`` seconds between its headers
    arriving and the app starting on it (the event loop was busy with others)."""
    queued = scope.get(QUEUED_AT)
    if queued is not None and now - queued > max_wait:
        raise Overloaded(_waited(now - queued, max_wait))


def _waited(seconds: float, limit: float) -> str:
    return (f"the service is overloaded: the request waited {seconds:.2f} s before work could "
            f"start on it (limit {limit:g} s); retry later")


class WorkQueue:
    """Worker threads for heavy requests: at most ``max_pending`` running or waiting (503 past
    it), and a request that waited more than ``max_wait`` seconds in all (for the event loop,
    then for a thread) is shed when a thread takes it."""

    def __init__(self, max_pending: int, max_wait: float, threads: int = WORKER_THREADS):
        self.max_pending = max_pending
        self.max_wait = max_wait
        self.pending = 0  # only touched on the event loop
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="score")

    async def run(self, queued: float, fn, *args):
        """``fn(*args)`` in a worker thread, for a request queued at ``queued``
        (``time.perf_counter()``); Overloaded if the queue is full or the wait too long."""
        if self.pending >= self.max_pending:
            raise Overloaded(f"the service is overloaded: {self.pending} heavy requests are "
                             f"queued (limit {self.max_pending}); retry later")
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, self._call, queued, fn, args)
        finally:
            self.pending -= 1

    def _call(self, queued: float, fn, args):
        waited = time.perf_counter() - queued
        if waited > self.max_wait:
            raise Overloaded(_waited(waited, self.max_wait))
        return fn(*args)

    def close(self) -> None:
        """Stop the threads once the work in hand is done (queued work is dropped)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

