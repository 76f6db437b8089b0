"""Process and readiness helpers shared by ``ops/stack``, ``make demo``, benchmarks and tests."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for(check: Callable[[], object], what: str, timeout: float = 30.0,
             interval: float = 0.2, proc: subprocess.Popen | None = None) -> object:
    """Poll ``check`` until it returns a truthy value, logging each failed attempt.

    ``check`` may raise; the last error is reported. If ``proc`` exits while we
    wait, fail at once instead of waiting out the timeout.
    """
    deadline = time.monotonic() + timeout
    attempt, last = 0, None
    while True:
        attempt += 1
        try:
            result = check()
            if result:
                return result
            last = "not ready"
        except Exception as e:  # noqa: BLE001 - any failure is "not ready yet"
            last = f"{type(e).__name__}: {e}"
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with code {proc.returncode} ({last})")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:.0f} s ({last})")
        log.debug("waiting for %s (attempt %d): %s", what, attempt, last)
        time.sleep(min(interval * (1.5 ** min(attempt, 6)), 2.0))


def http_ok(url: str, timeout: float = 2.0) -> Callable[[], bool]:
    """A readiness check: GET ``url`` answers 200."""
    import requests

    def check() -> bool:
        return requests.get(url, timeout=timeout).status_code == 200

    return check


def start(cmd: list[str], log_path: str | Path, env: dict | None = None,
          cwd: str | Path | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own session (so its children die with it), output to ``log_path``."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


def spawn(cmd: list[str], log_path: str | Path, ready: Callable[[], object], what: str,
          timeout: float = 60.0, env: dict | None = None, cwd: str | Path | None = None,
          on_start: Callable[[subprocess.Popen], object] | None = None) -> subprocess.Popen:
    """Start ``cmd`` (see :func:`start`) and wait until ``ready()`` holds (see :func:`wait_for`).

    ``on_start(proc)`` runs right after the start (to record the pid before the wait). If the
    process exits, is not ready within ``timeout``, or the wait is interrupted (Ctrl-C
    included), it is stopped before the error propagates: the caller gets a ready process
    or nothing left running.
    """
    proc = start(cmd, log_path, env=env, cwd=cwd)
    try:
        if on_start is not None:
            on_start(proc)
        wait_for(ready, what, timeout=timeout, proc=proc)
    except BaseException:
        stop(proc.pid)
        raise
    return proc


def stop(pid: int, timeout: float = 15.0) -> bool:
    """SIGTERM the process group of ``pid``, SIGKILL after ``timeout``; True if it was alive."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return False
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid, pgid):
                return True
            time.sleep(0.05)
    return True


def _alive(pid: int, pgid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap if it is our child
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
