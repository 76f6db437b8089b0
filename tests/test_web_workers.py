"""``serve.web --workers 2``: one SO_REUSEPORT listening socket per worker process, the kernel
spreads connections over both, a killed worker is replaced, SIGTERM to the parent stops all."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import requests

from ops.procs import stop, wait_for
from tests.test_web import RIDE, start_web

pytestmark = pytest.mark.integration


def children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def listeners(parent: int, port: int) -> dict[int, int]:
    """Listening sockets on ``port`` held by children of ``parent``: {socket inode: pid}."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                inodes.add(int(fields[9]))
    owners = {}
    for pid in children(parent):
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and int(target[8:-1]) in inodes:
                    owners[int(target[8:-1])] = pid
        except (FileNotFoundError, ProcessLookupError):
            continue  # a worker that just exited
    return owners


def test_two_workers_two_sockets_restart_and_stop(registered_model, tracking_server, tmp_path):
    w = start_web(tmp_path, "models:/duration@production", tracking_server.uri,
                  "--workers", "2")
    port = int(w.url.rsplit(":", 1)[1])
    try:
        owners = wait_for(lambda: len(set(listeners(w.proc.pid, port).values())) == 2
                          and listeners(w.proc.pid, port), "two listening workers", timeout=120)
        first = set(owners.values())
        # Fresh connections are spread over both: each worker counts its own requests.
        body = json.dumps({"dataframe_records": [RIDE]})
        for _ in range(40):
            r = requests.post(w.url + "/invocations", data=body, timeout=30,
                              headers={"Content-Type": "application/json",
                                       "Connection": "close"})
            assert r.status_code == 200

        def counts() -> set[float]:
            seen = set()
            for _ in range(30):
                m = w.metrics()
                seen.add(m.get(("duration_http_requests_total",
                                (("endpoint", "/invocations"), ("status", "200"))), 0))
            return seen

        def both(seen: set[float]) -> bool:
            # Each worker's count, from /metrics scrapes that land on either; {20}: a tie
            # (both served 20, which happens in 1 run of 8), since one worker's 40 shows as 40.
            return (len(seen) == 2 and sum(seen) == 40 and 0 not in seen) or seen == {20}

        wait_for(lambda: both(counts()), "answers from both workers", timeout=60)

        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        replaced = wait_for(lambda: (now := set(listeners(w.proc.pid, port).values()))
                            and len(now) == 2 and victim not in now and now,
                            "a replacement worker", timeout=120)
        assert len(replaced - first) == 1
        assert requests.get(w.url + "/ready", timeout=10).status_code == 200

        os.kill(w.proc.pid, signal.SIGTERM)  # the parent alone: it stops its workers
        w.proc.wait(timeout=60)
        assert w.proc.returncode == 0
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in replaced),
                 "workers gone", timeout=30)
    finally:
        stop(w.proc.pid)
    assert "Traceback" not in w.log.read_text(), w.log.read_text()[-3000:]
