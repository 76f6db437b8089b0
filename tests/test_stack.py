"""``ops/stack`` production mode against the real parts: the machine's PostgreSQL, a
moto_server as S3, ``mlflow server`` processes, and clients that hold no S3 credentials.

One production stack per module (own STACK_HOME, free ports, own role, database and bucket),
started and stopped through the CLI exactly as a user would.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from ops.moto import MOTO_CREDENTIALS, Moto
from ops.procs import free_port, http_ok, spawn, stop, wait_for
from ops.stackctl.config import is_placeholder, write_private
from ops.stackctl.pg import drop_database_and_role, masked, store_uri
from ops.stackctl.server import default_allowed_hosts, server_cmd
from ops.stackctl.state import StackPaths, read_pid, write_pid
from ops.synth import write_month

ROOT = Path(__file__).resolve().parents[1]
STACK = str(ROOT / "ops" / "stack")
RIDE = {"PULocationID": 43, "DOLocationID": 151, "trip_distance": 1.8}


def without_s3_credentials(env: dict[str, str]) -> dict[str, str]:
    """``env`` minus every ``AWS_*`` variable and ``MLFLOW_S3_ENDPOINT_URL``."""
    return {k: v for k, v in env.items()
            if not k.startswith("AWS_") and k != "MLFLOW_S3_ENDPOINT_URL"}


# -- pure logic ---------------------------------------------------------------------------
@pytest.mark.parametrize("value", [None, "", "  ", "changeme", "Password", "<strong-password>",
                                   "admin"])
def test_placeholders_are_refused(value):
    assert is_placeholder(value)


def test_real_password_is_not_a_placeholder():
    assert not is_placeholder(secrets.token_urlsafe(16))


def test_store_uri_quotes_and_masks_the_password():
    uri = store_uri("mlflow", "p@ss:w/rd%", "db.internal", 5432, "mlflow")
    assert uri == "postgresql+psycopg2://mlflow:p%40ss%3Aw%2Frd%25@db.internal:5432/mlflow"
    assert masked(uri) == "postgresql+psycopg2://mlflow:***@db.internal:5432/mlflow"


def test_server_command_carries_no_store_uri_and_allows_loopback_hosts():
    cmd = server_cmd("127.0.0.1", 5000, "s3://b/mlartifacts", allowed_hosts="h,h:*")
    assert "--backend-store-uri" not in cmd and "--serve-artifacts" in cmd
    assert cmd[cmd.index("--allowed-hosts") + 1] == "h,h:*"
    assert default_allowed_hosts("10.0.0.5").split(",") == [
        "localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*", "10.0.0.5", "10.0.0.5:*"]


def test_a_reused_pid_is_not_ours(tmp_path):
    paths = StackPaths(tmp_path)
    write_pid(paths, "mlflow", os.getpid())
    assert read_pid(paths, "mlflow") == os.getpid()
    pid, started = paths.pidfile("mlflow").read_text().split()
    paths.pidfile("mlflow").write_text(f"{pid} {int(started) + 1}")  # same pid, other process
    assert read_pid(paths, "mlflow") is None


def test_a_pid_of_another_user_is_not_ours(tmp_path, monkeypatch):
    paths = StackPaths(tmp_path)
    write_pid(paths, "mlflow", os.getpid())

    def kill(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", kill)  # as for a pid reused by another user's process
    assert read_pid(paths, "mlflow") is None


def test_private_files_are_owner_only(tmp_path):
    path = tmp_path / "secret.ini"
    write_private(path, "x")
    assert path.stat().st_mode & 0o777 == 0o600


def test_ctrl_c_while_the_server_starts_leaves_nothing_running(tmp_path):
    env = {**os.environ, "STACK_HOME": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    pidfile = tmp_path / "run" / "mlflow.pid"
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        # SIGINT at its default (a runner may ignore it), so Python turns it into
        # KeyboardInterrupt as in a terminal; own session: the test can always clean up.
        proc = subprocess.Popen([STACK, "up", "--mode", "embedded", "--port", "0"], env=env,
                                cwd=tmp_path, stdout=out, stderr=err, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    server = None
    try:
        server = int(wait_for(lambda: pidfile.read_text().split(), "mlflow pid file",
                              timeout=60, interval=0.02, proc=proc)[0])
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        assert "Aborted!" in (tmp_path / "err").read_text()  # click's KeyboardInterrupt
        assert "MLFLOW_TRACKING_URI=" not in (tmp_path / "out").read_text()  # still starting
        wait_for(lambda: not any(_pgid(p) == server and _running(p) for p in _all_pids()),
                 "the server's process group to be gone", timeout=30)
        assert not pidfile.exists()
    finally:
        if proc.poll() is None:
            stop(proc.pid)
        if server is not None and _pgid(server) == server:
            stop(server)


# -- the production stack -----------------------------------------------------------------
@dataclass
class Stack:
    """A production stack started by ``ops/stack up`` in its own STACK_HOME."""

    home: Path
    env: dict[str, str]
    up_output: str = ""

    def cli(self, *args: str, timeout: float = 240, **extra: str) -> subprocess.CompletedProcess:
        """Run ``ops/stack`` (cwd = STACK_HOME, so no developer .env is read)."""
        return subprocess.run([STACK, *args], env={**self.env, **extra}, cwd=self.home,
                              capture_output=True, text=True, timeout=timeout)

    @property
    def state(self) -> dict:
        return json.loads((self.home / "run" / "stack.json").read_text())

    @property
    def uri(self) -> str:
        return self.state["mlflow"]["uri"]

    @property
    def user(self) -> str:
        return self.env["POSTGRES_USER"]

    @property
    def password(self) -> str:
        kept = json.loads((self.home / "secrets.json").read_text())
        return kept[f"postgres_password_{self.user}"]

    def pid(self, component: str) -> int:
        return int((self.home / "run" / f"{component}.pid").read_text().split()[0])

    def s3(self):
        """boto3 S3 client with the server's credentials (the moto ones)."""
        return Moto(self.state["s3"]["endpoint"]).client("s3")

    def client_env(self) -> dict[str, str]:
        """A training/serving client's environment: the tracking URI, no S3 credentials."""
        return {**without_s3_credentials(dict(os.environ)), "MLFLOW_TRACKING_URI": self.uri}


def _ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("stack")
    token = secrets.token_hex(4)
    env = {**without_s3_credentials(dict(os.environ)),
           "STACK_HOME": str(home), "STACK_PORT": str(free_port()),
           "STACK_ARTIFACTS_PORT": str(free_port()),
           "POSTGRES_USER": f"stack_test_{token}", "POSTGRES_DB": f"stack_test_{token}",
           "STACK_S3_BUCKET": f"stack-test-{token}"}
    for key in ("POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    s = Stack(home, env)
    try:
        res = _ok(s.cli("up", "--mode", "production"))
        s.up_output = res.stdout + res.stderr
        yield s
    finally:
        s.cli("down")
        drop_database_and_role(env["POSTGRES_USER"], env["POSTGRES_DB"])


@pytest.fixture(scope="module")
def trained(stack, tmp_path_factory) -> dict[str, str]:
    """``mlflow run .`` against the stack by a client without S3 credentials."""
    data = tmp_path_factory.mktemp("stack-data")
    train = write_month("green", "2021-01", 20_000, data / "green_tripdata_2021-01.parquet", 0)
    val = write_month("green", "2021-02", 20_000, data / "green_tripdata_2021-02.parquet", 1)
    res = _ok(subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local",
         "--experiment-name", "duration", "-P", f"train={train}", "-P", f"val={val}"],
        env=stack.client_env(), cwd=ROOT, capture_output=True, text=True, timeout=300))
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("run "))
    run_id, version = line.split()[1].rstrip(":"), line.split()[3]
    assert "promoted" in line and "not promoted" not in line, line
    return {"run_id": run_id, "version": version}


def test_up_production_starts_each_component(stack):
    status = _ok(stack.cli("status")).stdout
    for line in ("mlflow: running", "moto: running", "postgresql: 127.0.0.1:5432/",
                 "accepting connections", f"bucket {stack.env['STACK_S3_BUCKET']} ok"):
        assert line in status, status
    assert (stack.home / "secrets.json").stat().st_mode & 0o777 == 0o600
    api = f"{stack.uri}/api/2.0/mlflow/experiments/search"
    assert requests.get(api, params={"max_results": 1}, timeout=10).status_code == 200
    foreign = requests.get(api, params={"max_results": 1}, headers={"Host": "evil.example"},
                           timeout=10)
    assert foreign.status_code == 403  # --allowed-hosts: loopback names only


def test_client_run_lands_in_postgres_and_the_bucket(stack, trained):
    import psycopg2

    with psycopg2.connect(user=stack.user, password=stack.password, host="127.0.0.1",
                          port=5432, dbname=stack.env["POSTGRES_DB"]) as conn, \
            conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (trained["run_id"],))
        assert cur.fetchall() == [("FINISHED",)]
        cur.execute("SELECT mv.version FROM model_versions mv JOIN registered_model_aliases a "
                    "ON a.name = mv.name AND a.version = mv.version "
                    "WHERE a.name = 'duration' AND a.alias = 'production'")
        assert cur.fetchall() == [(int(trained["version"]),)]
    keys = [o["Key"] for page in stack.s3().get_paginator("list_objects_v2").paginate(
        Bucket=stack.env["STACK_S3_BUCKET"]) for o in page.get("Contents", [])]
    assert keys and all(k.startswith("mlartifacts/") for k in keys), keys[:5]
    assert any(k.endswith("/MLmodel") for k in keys), keys


def test_client_serves_production_model_without_s3_credentials(stack, trained, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = spawn([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                  "models:/duration@production", "--env-manager", "local",
                  "-h", "127.0.0.1", "-p", str(port)], tmp_path / "serve.log",
                 http_ok(f"{url}/ping"), "mlflow models serve", timeout=180,
                 env=stack.client_env())
    try:
        resp = requests.post(f"{url}/invocations", json={"dataframe_records": [RIDE]},
                             timeout=30)
        assert resp.status_code == 200, resp.text
        assert 1 <= resp.json()["predictions"][0] <= 60
    finally:
        stop(proc.pid)


def test_no_password_on_command_lines_or_in_logs(stack, trained):
    password = stack.password
    pgid = os.getpgid(stack.pid("mlflow"))
    cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes() for p in os.listdir("/proc")
                if p.isdigit() and _pgid(int(p)) == pgid]
    assert len(cmdlines) >= 2  # mlflow server and its uvicorn
    assert all(password.encode() not in c for c in cmdlines)
    for log in (stack.home / "logs").glob("*.log"):
        assert password not in log.read_text(errors="replace"), log
    assert "postgresql+psycopg2://" in stack.up_output and password not in stack.up_output


def test_second_up_refuses_to_start_a_twin(stack):
    pid = stack.pid("mlflow")
    res = stack.cli("up", "--mode", "production")
    assert res.returncode != 0
    assert "mlflow: already running" in res.stderr.strip().splitlines()[-1]
    assert stack.pid("mlflow") == pid


def test_artifacts_only_server_serves_the_model_without_credentials(stack, trained,
                                                                    tmp_path, monkeypatch):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    up = _ok(stack.cli("up", "--mode", "production", "--artifacts-only"))
    artifacts_uri = up.stdout.strip().split("=", 1)[1]
    client = MlflowClient(stack.uri)
    version = client.get_model_version_by_alias("duration", "production").version
    location = client.get_model_version_download_uri("duration", version)
    assert location.startswith("mlflow-artifacts:/"), location
    # A deployment client: its tracking URI is the artifacts-only server; no AWS_* at all.
    for key in list(os.environ):
        if key.startswith("AWS_") or key == "MLFLOW_S3_ENDPOINT_URL":
            monkeypatch.delenv(key)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(artifacts_uri)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(tmp_path))
    finally:
        mlflow.set_tracking_uri(previous)
    prediction = mlflow.pyfunc.load_model(local).predict(pd.DataFrame([RIDE]))
    assert 1 <= float(prediction[0]) <= 60
    resp = requests.get(f"{artifacts_uri}/api/2.0/mlflow/experiments/search",
                        params={"max_results": 1}, timeout=10)
    assert resp.status_code == 503, resp.text


def test_restarting_the_server_keeps_runs_versions_and_alias(stack, trained):
    from mlflow import MlflowClient

    old = stack.pid("mlflow")
    assert "stopped: mlflow" in _ok(stack.cli("down", "-c", "mlflow")).stdout
    _ok(stack.cli("up", "--mode", "production"))
    assert stack.pid("mlflow") != old
    client = MlflowClient(stack.uri)
    assert client.get_run(trained["run_id"]).info.status == "FINISHED"
    assert client.get_model_version("duration", trained["version"]).status == "READY"
    assert client.get_model_version_by_alias("duration", "production").version == \
        trained["version"]


def test_auth_refuses_placeholders_then_requires_credentials(stack, trained):
    _ok(stack.cli("down", "-c", "mlflow"))
    refused = stack.cli("up", "--mode", "production", "--auth",
                        MLFLOW_AUTH_ADMIN_PASSWORD="changeme")
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines()[-1].startswith("Error: auth: ")
    assert not (stack.home / "run" / "mlflow.pid").exists()

    password = secrets.token_urlsafe(16)
    _ok(stack.cli("up", "--mode", "production", "--auth", MLFLOW_AUTH_ADMIN_PASSWORD=password))
    ini = stack.home / "auth" / "basic_auth.ini"
    assert ini.stat().st_mode & 0o777 == 0o600
    api = f"{stack.uri}/api/2.0/mlflow/registered-models/alias"
    params = {"name": "duration", "alias": "production"}
    assert requests.get(api, params=params, timeout=10).status_code == 401
    resp = requests.get(api, params=params, auth=("admin", password), timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.json()["model_version"]["version"] == trained["version"]
    for log in (stack.home / "logs").glob("*.log"):
        assert password not in log.read_text(errors="replace"), log


@pytest.mark.parametrize("case", ["wrong password", "unreachable s3", "port in use"])
def test_bad_configuration_fails_fast_with_one_line(stack, case, tmp_path):
    env = {"STACK_HOME": str(tmp_path), "STACK_PORT": str(free_port()),
           "STACK_S3_BUCKET": f"bad-{secrets.token_hex(4)}"}
    expected = {
        "wrong password": ("postgresql: ", "password authentication failed"),
        "unreachable s3": ("s3: ", "unreachable"),
        "port in use": ("mlflow: ", "already in use"),
    }[case]
    if case == "wrong password":
        env["POSTGRES_PASSWORD"] = secrets.token_urlsafe(16)
    elif case == "unreachable s3":
        env.update(POSTGRES_PASSWORD=stack.password, **MOTO_CREDENTIALS,
                   MLFLOW_S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    else:
        env["STACK_PORT"] = stack.env["STACK_PORT"]
    t0 = time.monotonic()
    res = stack.cli("up", "--mode", "production", **env)
    elapsed = time.monotonic() - t0
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: {expected[0]}") and expected[1] in last, res.stderr[-2000:]
    assert elapsed < 30, f"{case}: {elapsed:.1f} s"
    assert not list((tmp_path / "run").glob("*.pid")) if (tmp_path / "run").exists() else True


def test_down_stops_exactly_what_up_started(stack):
    started = {p.stem: stack.pid(p.stem) for p in (stack.home / "run").glob("*.pid")}
    assert {"mlflow", "moto"} <= set(started)
    groups = {os.getpgid(pid) for pid in started.values()}
    members = {p for p in _all_pids() if _pgid(p) in groups}
    assert len(members) > len(started)  # the servers' children are in their groups
    res = _ok(stack.cli("down"))
    assert set(res.stdout.split(":", 1)[1].replace(",", " ").split()) == set(started)
    alive = [p for p in members if _running(p)]
    assert not alive, alive
    assert "stack: not running" in _ok(stack.cli("status")).stdout
    assert _ok(stack.cli("down")).stdout.strip() == "stopped: nothing was running"


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited process not yet reaped by its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
