"""An open-loop HTTP/1.1 load generator for the web fault tests (asyncio, standard library).

Requests are sent at a fixed rate whatever the server answers, each on an idle keep-alive
connection or, when all are busy, on a new one: a slow server faces a growing number of
requests in flight, as it would from many independent clients (a closed-loop tool such as
``wrk`` would slow down with it and hide the queue). Latency is measured from the time a
request was due, not from when it was sent.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

IDLE_SECONDS = 3.0  # a pooled connection idle longer than this is closed, not reused


@dataclass
class Shot:
    """One request: when it was due and sent, what came back, how long it took."""

    index: int
    due: float  # time.monotonic()
    sent: float = 0.0
    latency: float = 0.0  # seconds from due to the whole answer (or the failure)
    status: int = 0  # 0: no HTTP answer
    retry_after: str | None = None
    body: bytes = b""
    error: str = ""  # why there was no answer: refused, closed, ...
    reused: bool = False  # sent on a connection that had served a request before


def post(path: str, body: bytes, content_type: str = "application/json") -> bytes:
    """The bytes of one keep-alive POST."""
    return (f"POST {path} HTTP/1.1\r\nHost: load\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _exchange(reader, writer, request: bytes, shot: Shot) -> bool:
    """Send ``request``, read one answer into ``shot``; whether the connection stays open."""
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    shot.status = int(lines[0].split()[1])
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
    shot.retry_after = headers.get("retry-after")
    shot.body = await reader.readexactly(int(headers.get("content-length", 0)))
    return headers.get("connection") != "close"


class OpenLoop:
    """Send ``request(i)`` to host:port at the rates of ``phases`` [(requests/s, seconds)]."""

    def __init__(self, host: str, port: int, request: Callable[[int], bytes],
                 phases: list[tuple[float, float]], timeout: float = 30.0,
                 max_connections: int = 2_000):
        self.host, self.port, self.request = host, port, request
        self.phases, self.timeout, self.max_connections = phases, timeout, max_connections
        self.shots: list[Shot] = []
        self.connections = 0
        self.peak_connections = 0
        self.t0 = 0.0
        self._stopped = False
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> OpenLoop:
        self.t0 = time.monotonic() + 0.2
        self._thread.start()
        return self

    def join(self) -> list[Shot]:
        self._thread.join(sum(s for _, s in self.phases) + self.timeout + 30)
        assert not self._thread.is_alive(), "load generator still running"
        return self.shots

    def stop(self) -> list[Shot]:
        """End the load now (the requests in flight finish) and wait for it; safe to call
        again, or before start."""
        self._stopped = True
        return self.join() if self.t0 else self.shots

    def sent(self) -> int:
        return len(self.shots)

    async def _run(self) -> None:
        idle: list = []
        tasks = set()
        due, index = self.t0, 0
        for rate, seconds in self.phases:
            end = due + seconds
            while due < end and not self._stopped:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                shot = Shot(index, due)
                self.shots.append(shot)
                task = asyncio.create_task(self._one(shot, idle))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                index += 1
                due += 1.0 / rate
        if tasks:
            await asyncio.wait(tasks)
        for (_, writer), _ in idle:
            writer.close()

    async def _one(self, shot: Shot, idle: list) -> None:
        conn = None
        while idle and conn is None:
            conn, last_used = idle.pop()
            # Like any pooled client, never reuse a connection the server may be closing:
            # uvicorn closes idle ones after 5 s (keep-alive timeout).
            if conn[0].at_eof() or time.monotonic() - last_used > IDLE_SECONDS:
                self._close(conn)
                conn = None
        shot.reused = conn is not None
        try:
            if conn is None:
                if self.connections >= self.max_connections:
                    raise ConnectionError("client: too many connections in flight")
                self.connections += 1
                self.peak_connections = max(self.peak_connections, self.connections)
                try:
                    conn = await asyncio.wait_for(
                        asyncio.open_connection(self.host, self.port), self.timeout)
                except BaseException:
                    self.connections -= 1
                    raise
            shot.sent = time.monotonic()
            keep = await asyncio.wait_for(_exchange(*conn, self.request(shot.index), shot),
                                          self.timeout)
            if keep:
                idle.append((conn, time.monotonic()))
            else:
                self._close(conn)
        except Exception as e:  # noqa: BLE001 - every failure is recorded on the shot
            shot.status = 0
            shot.error = type(e).__name__ if str(e) == "" else f"{type(e).__name__}: {e}"
            if conn is not None:
                self._close(conn)
        shot.latency = time.monotonic() - shot.due

    def _close(self, conn) -> None:
        conn[1].close()
        self.connections -= 1


@dataclass
class Summary:
    """Answers of a slice of shots: counts by status and latency percentiles of the 200s."""

    shots: list[Shot]
    by_status: dict[int, int] = field(init=False)

    def __post_init__(self):
        self.by_status = {}
        for s in self.shots:
            self.by_status[s.status] = self.by_status.get(s.status, 0) + 1

    def ok(self) -> list[Shot]:
        return [s for s in self.shots if s.status == 200]

    def p(self, q: float) -> float:
        """Latency percentile (s) of the 200 answers."""
        lat = [s.latency for s in self.ok()]
        return float(np.percentile(lat, q)) if lat else float("nan")

    def errors(self) -> dict[str, int]:
        """Requests without an HTTP answer, by error."""
        out: dict[str, int] = {}
        for s in self.shots:
            if s.status == 0:
                out[s.error] = out.get(s.error, 0) + 1
        return out

    def line(self, seconds: float) -> str:
        return (f"{len(self.shots)} requests, {self.by_status}, {len(self.ok()) / seconds:.0f} "
                f"answered 200/s, p50 {self.p(50) * 1e3:.0f} ms, p99 {self.p(99) * 1e3:.0f} ms, "
                f"max {max((s.latency for s in self.ok()), default=0) * 1e3:.0f} ms"
                + (f", no answer: {self.errors()}" if self.errors() else ""))


def closed_loop_rate(host: str, port: int, request: bytes, connections: int,
                     seconds: float) -> float:
    """Answers/s of ``connections`` keep-alive clients sending ``request`` back to back
    (the server's capacity for it, when the clients are not the bottleneck)."""

    async def client(deadline: float, counts: list) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        shot = Shot(0, 0.0)
        while time.monotonic() < deadline:
            await _exchange(reader, writer, request, shot)
            counts[0] += shot.status == 200
        writer.close()

    async def run() -> int:
        counts = [0]
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(client(deadline, counts) for _ in range(connections)))
        return counts[0]

    return asyncio.run(run()) / seconds
