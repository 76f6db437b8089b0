"""The uvicorn server of ``python -m serve.web``: one process, a drain on SIGTERM, exit 0.

uvicorn's graceful shutdown closes the listening socket and, at once, every connection that
has no request in progress, including one accepted a moment ago whose request is still on
the wire: that client gets a reset (3 times in 13 ``docker stop`` under 50 req/s). Here the
listening socket closes first, then requests already sent get ``DRAIN_SECONDS`` to arrive
and are answered like any other (0 resets in 12). Requests in flight get the drain timeout
(``WEB_DRAIN_TIMEOUT``) to finish; one still running then gets 503 ``SHUTTING_DOWN`` (the app
answers it). uvicorn re-raises the signal it stopped on; a stop that was asked for exits 0, as
PID 1 of a container or under an init process alike, and at once: everything is flushed and
closed by then (lifespan shutdown), and the interpreter's own teardown (3.5 s measured on a
busy 2-core machine, freeing what MLflow and pandas imported) would eat into ``docker stop``'s
10 s.

The HTTP layer is :class:`serve.web.protocol.DurationHttpProtocol` (JSON errors for requests
the parser refuses, the request read timeout, queue stamps); no WebSocket protocol (``ws``
"none"), so an upgrade request is an ordinary request the app answers in JSON (uvicorn
answered it with a text/plain 500 and an ERROR log line).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys

import uvicorn

from serve.web.protocol import DurationHttpProtocol

DRAIN_SECONDS = 0.5


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` with a drain between "stop listening" and "close idle connections"."""

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:
            server.close()  # closing again in uvicorn's shutdown is a no-op
        for sock in sockets or []:
            sock.close()
        await asyncio.sleep(DRAIN_SECONDS)
        await super().shutdown(sockets)


def _exit_cleanly(signum, frame) -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more to say
            pass
    os._exit(0)


def serve(app, host: str, port: int, log_level: str, drain_timeout: float = 8.0,
          sock: socket.socket | None = None) -> None:
    """Serve ``app`` until SIGTERM/SIGINT (then drain for up to ``drain_timeout`` seconds and
    exit 0); exit 3 if it cannot start.

    ``sock``: an already listening socket to serve on (a ``--workers`` process's own
    ``SO_REUSEPORT`` socket) instead of binding ``host:port``."""
    config = uvicorn.Config(app, host=host, port=port, loop="uvloop", http=DurationHttpProtocol,
                            ws="none", lifespan="on", access_log=False, log_level=log_level,
                            timeout_graceful_shutdown=drain_timeout)
    signal.signal(signal.SIGTERM, _exit_cleanly)  # also before uvicorn installs its handler
    server = DrainingServer(config)
    try:
        server.run(sockets=[sock] if sock is not None else None)
    except KeyboardInterrupt:  # Ctrl-C, re-raised by uvicorn after its graceful shutdown
        pass
    if not server.started:
        sys.exit(3)  # uvicorn's code for a failed start (port in use, ...)
