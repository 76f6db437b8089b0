"""PostgreSQL restarted under a tracking server in use (issue 13): the server's next requests
succeed without restarting it, and nothing is lost.

The machine's PostgreSQL service is shared (other test sessions use it), so this test never
restarts it: it runs a private cluster (``initdb`` + ``pg_ctl`` in a temporary folder, on a
free port, as the ``postgres`` OS user when run as root) and restarts that. ``ops/stack up
--mode production`` is pointed at it with ``POSTGRES_PORT`` and ``PGHOST`` (the cluster's
socket folder, where psql finds it to set up the role). MLflow's engine checks pooled
connections before use (``pool_pre_ping``), which is what this test holds it to.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from stack_helpers import Stack, ok, stack_env

from ops.procs import free_port, wait_for
from ops.stackctl.pg import pg_ready

pytestmark = pytest.mark.integration


@dataclass
class Cluster:
    """A private PostgreSQL cluster: its port, socket folder and pg_ctl."""

    port: int
    sockets: Path
    data: Path
    bindir: str
    as_owner: list[str]

    def pg_ctl(self, action: str, *args: str) -> None:
        """``pg_ctl action`` waiting for it; the server's output goes to its log file (a pipe
        would stay open as long as the server runs)."""
        subprocess.run([*self.as_owner, f"{self.bindir}/pg_ctl", "-D", str(self.data), "-w",
                        "-t", "60", "-l", str(self.data.parent / "postgres.log"), *args, action],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)


@pytest.fixture(scope="module")
def cluster():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found and not shutil.which("initdb"):
        pytest.fail("initdb not found: PostgreSQL's server package is needed")
    bindir = os.path.dirname(found[-1] if found else shutil.which("initdb"))
    root = Path(tempfile.mkdtemp(prefix="duration-pg-"))
    as_owner, superuser = [], []
    if os.geteuid() == 0:  # initdb refuses root: the cluster belongs to the postgres OS user
        as_owner, superuser = ["runuser", "-u", "postgres", "--"], ["-U", "postgres"]
        pg = pwd.getpwnam("postgres")
        os.chown(root, pg.pw_uid, pg.pw_gid)
    sockets, data, port = root / "sockets", root / "data", free_port()
    subprocess.run([*as_owner, "mkdir", str(sockets)], check=True)
    subprocess.run([*as_owner, f"{bindir}/initdb", "-D", str(data), *superuser, "-E", "UTF8",
                    "--auth-local=peer", "--auth-host=scram-sha-256"],
                   check=True, capture_output=True)
    c = Cluster(port, sockets, data, bindir, as_owner)
    c.pg_ctl("start", "-o", f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1")
    try:
        yield c
    finally:
        c.pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(root, ignore_errors=True)


def test_postgres_restart_under_a_busy_tracking_server(cluster, tmp_path):
    from mlflow import MlflowClient

    stack = Stack(tmp_path / "stack", stack_env(tmp_path, POSTGRES_PORT=str(cluster.port),
                                                 PGHOST=str(cluster.sockets)))
    try:
        ok(stack.cli("up", "--mode", "production", "--port", str(free_port())))
        server_pid = stack.pid("mlflow")
        client = MlflowClient(stack.uri)
        experiment = client.create_experiment("pg-restart")
        runs = [client.create_run(experiment).info.run_id for _ in range(3)]

        # A client logging a metric every 50 ms throughout, with MLflow's own retries (as
        # train.py has them): every step must land, none may fail.
        done, logged, errors = threading.Event(), [], []

        def writer() -> None:
            step = 0
            while not done.is_set():
                try:
                    client.log_metric(runs[0], "step", step, step=step)
                    logged.append(step)
                except Exception as e:  # noqa: BLE001 - collected, asserted below
                    errors.append(e)
                step += 1
                time.sleep(0.05)

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        wait_for(lambda: len(logged) >= 5, "metrics before the restart", timeout=60)
        t0 = time.monotonic()
        cluster.pg_ctl("restart", "-m", "fast")  # fast: every connection is cut
        restart_s = time.monotonic() - t0
        assert pg_ready("127.0.0.1", cluster.port)

        # The server's next requests, raw (no client retries): each must succeed.
        api = f"{stack.uri}/api/2.0/mlflow"
        first = requests.get(f"{api}/experiments/get", params={"experiment_id": experiment},
                             timeout=30)
        first_s = time.monotonic() - t0
        assert first.status_code == 200, first.text
        for run_id in runs:
            resp = requests.get(f"{api}/runs/get", params={"run_id": run_id}, timeout=30)
            assert resp.status_code == 200, resp.text
        resp = requests.post(f"{api}/runs/create", json={"experiment_id": experiment},
                             timeout=30)
        assert resp.status_code == 200, resp.text

        after = len(logged)
        wait_for(lambda: len(logged) >= after + 10, "metrics after the restart", timeout=120)
        done.set()
        thread.join(timeout=60)
        assert not errors, errors[:3]
        history = sorted({m.step for m in client.get_metric_history(runs[0], "step")})
        assert history == sorted(set(logged)), (len(history), len(logged))
        for run_id in runs:
            client.set_terminated(run_id)
            assert client.get_run(run_id).info.status == "FINISHED"
        assert stack.pid("mlflow") == server_pid  # never restarted
        print(f"\npg_ctl restart -m fast took {restart_s:.1f} s; first raw request after it "
              f"answered 200 at {first_s:.2f} s; {len(logged)} metrics logged across it, "
              f"0 lost, 0 client errors; server pid unchanged")
    finally:
        stack.drop()
