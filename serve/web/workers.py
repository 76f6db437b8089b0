"""Running the app: one uvicorn server, or ``--workers N`` processes with a socket each.

``uvicorn --workers N`` shares one listening socket among its children; on this
machine's kernel every keep-alive response then stalls ~40 ms (22 req/s instead of
thousands). Here each worker opens its own socket on the same port with
``SO_REUSEPORT`` and the kernel spreads new connections over them; the parent only
starts the workers, restarts one that dies, and stops them all on SIGTERM/SIGINT.
Each worker loads the model, polls the registry and serves ``/metrics`` on its own.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import threading
import time

from serve.web.settings import WebSettings

log = logging.getLogger(__name__)

MAX_RESTARTS_PER_MINUTE = 5


def reuseport_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket that other processes may bind to the same port as well."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def run_server(settings: WebSettings, log_level: str, reuse_port: bool = False) -> None:
    """Serve the app (:func:`serve.web.server.serve`: uvicorn, drain on SIGTERM, exit 0).

    ``reuse_port``: load the model first, then open an own ``SO_REUSEPORT`` socket, so the
    kernel sends this worker connections only once it can answer them.
    """
    from serve.web.app import create_app
    from serve.web.server import serve

    app = create_app(settings)
    sock = None
    if reuse_port:
        app.service.holder.poll()  # a failure is retried by the poller once serving
        sock = reuseport_socket(settings.web_host, settings.web_port)
    serve(app, settings.web_host, settings.web_port, log_level, settings.web_drain_timeout,
          sock=sock)


def _worker(settings_json: str, log_level: str, prepare) -> None:
    """Entry point of one worker process (spawned: it starts from a fresh interpreter)."""
    settings = WebSettings.model_validate_json(settings_json)
    prepare(settings, log_level)
    run_server(settings, log_level, reuse_port=True)


def serve_workers(settings: WebSettings, workers: int, log_level: str, prepare) -> int:
    """Run ``workers`` processes on one port until SIGTERM/SIGINT; the exit code.

    ``prepare(settings, log_level)`` runs first in every worker (logging, tracking URI).
    """
    if not hasattr(socket, "SO_REUSEPORT"):
        raise RuntimeError("--workers > 1 needs SO_REUSEPORT (Linux, BSD, macOS)")
    reuseport_socket(settings.web_host, settings.web_port).close()  # fail now if it is taken
    ctx = multiprocessing.get_context("spawn")
    stopping = threading.Event()

    def start(i: int):
        proc = ctx.Process(target=_worker, name=f"serve.web-worker-{i}", daemon=False,
                           args=(settings.model_dump_json(), log_level, prepare))
        proc.start()
        log.info("worker %d started (pid %d)", i, proc.pid)
        return proc

    def on_signal(signum, _frame):
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    procs = [start(i) for i in range(workers)]
    restarts: list[float] = []
    code = 0
    while not stopping.wait(0.5):
        for i, proc in enumerate(procs):
            if proc.is_alive():
                continue
            restarts = [t for t in restarts if t > time.monotonic() - 60] + [time.monotonic()]
            if len(restarts) > MAX_RESTARTS_PER_MINUTE:
                log.error("workers keep dying (%d restarts in a minute); stopping",
                          len(restarts) - 1)
                stopping.set()
                code = 1
                break
            log.warning("worker %d (pid %d) exited with code %s; restarting it", i, proc.pid,
                        proc.exitcode)
            procs[i] = start(i)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()  # SIGTERM: uvicorn finishes requests in flight
    for proc in procs:
        proc.join(15)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return code
