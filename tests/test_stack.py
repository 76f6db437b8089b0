"""``ops/stack`` production mode against the real parts: the machine's PostgreSQL, the local
S3 server (objects on disk), ``mlflow server`` processes, and clients that hold no S3
credentials.

One production stack per module (own STACK_HOME, XDG_CONFIG_HOME, free ports, own role,
database and bucket: tests/stack_helpers.py), started and stopped through the CLI exactly as
a user would. The durability and fault tests are in test_durability.py and
test_pg_restart.py.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import requests
from stack_helpers import (
    RIDE,
    STACK,
    Stack,
    mlflow_run,
    months,
    ok,
    stack_env,
)

from ops.moto import MOTO_CREDENTIALS
from ops.procs import free_port, http_ok, spawn, stop, wait_for
from ops.stackctl.config import StackSettings, is_placeholder, write_private
from ops.stackctl.lifecycle import check_exposure, is_loopback
from ops.stackctl.pg import (
    drop_database_and_role,
    ensure_role_and_database,
    prepare_postgres,
    store_uri,
)
from ops.stackctl.server import default_allowed_hosts, server_cmd
from ops.stackctl.state import StackPaths, read_pid, write_pid
from serve.urls import masked

_ok = ok


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
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("stack")
    s = Stack(home / "stack", stack_env(home))
    port = str(free_port())
    try:  # --port, not STACK_PORT: `down -c mlflow && up` must remember it
        res = _ok(s.cli("up", "--mode", "production", "--port", port))
        s.up_output = res.stdout + res.stderr
        yield s
    finally:
        s.drop()


@pytest.fixture(scope="module")
def trained(stack, tmp_path_factory) -> dict[str, str]:
    """``mlflow run .`` against the stack by a client without S3 credentials."""
    run = mlflow_run(stack, *months(tmp_path_factory.mktemp("stack-data")))
    assert run["promoted"], run["line"]
    return run


def test_up_production_starts_each_component(stack):
    status = _ok(stack.cli("status")).stdout
    for line in ("mlflow: running", "s3: running", "postgresql: 127.0.0.1:5432/",
                 "accepting connections", f"bucket {stack.env['STACK_S3_BUCKET']} ok",
                 f"data {stack.home / 's3'} healthy"):
        assert line in status, status
    assert (stack.home / "secrets.json").stat().st_mode & 0o777 == 0o600
    kept = Path(stack.env["XDG_CONFIG_HOME"]) / "duration" / "secrets.json"
    assert kept.stat().st_mode & 0o777 == 0o600 and stack.password
    # Waiting is not failure: no retry line in a log (stderr is not a terminal here).
    assert "waiting for" not in stack.up_output, stack.up_output
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
    keys = stack.keys()
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

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    up = _ok(stack.cli("up", "--mode", "production", "--artifacts-only", cwd=elsewhere))
    assert not list(elsewhere.iterdir())  # its store is under STACK_HOME, not ./mlflow.db
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

    old, uri = stack.pid("mlflow"), stack.uri
    assert "stopped: mlflow" in _ok(stack.cli("down", "-c", "mlflow")).stdout
    _ok(stack.cli("up"))  # as it was started: production, the --port given then
    assert stack.pid("mlflow") != old
    assert stack.uri == uri and stack.state["mlflow"]["mode"] == "production"
    client = MlflowClient(stack.uri)
    assert client.get_run(trained["run_id"]).info.status == "FINISHED"
    assert client.get_model_version("duration", trained["version"]).status == "READY"
    assert client.get_model_version_by_alias("duration", "production").version == \
        trained["version"]


def test_auth_refuses_placeholders_then_requires_credentials(stack, trained):
    _ok(stack.cli("down", "-c", "mlflow"))
    refused = stack.cli("up", "--auth",
                        MLFLOW_AUTH_ADMIN_PASSWORD="changeme")
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines()[-1].startswith("Error: auth: ")
    assert not (stack.home / "run" / "mlflow.pid").exists()

    password = secrets.token_urlsafe(16)
    up = _ok(stack.cli("up", "--auth", MLFLOW_AUTH_ADMIN_PASSWORD=password))
    assert "all readable" in up.stderr, up.stderr  # the integrity check logs in as admin
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
    if case == "port in use":
        env["STACK_PORT"] = str(stack.state["mlflow"]["port"])
    expected = {
        "wrong password": ("postgresql: ", "password authentication failed"),  # + what to do
        "unreachable s3": ("s3: ", "unreachable"),
        "port in use": ("mlflow: ", "already in use"),
    }[case]
    if case == "wrong password":
        env["POSTGRES_PASSWORD"] = secrets.token_urlsafe(16)
    elif case == "unreachable s3":
        env.update(POSTGRES_PASSWORD=stack.password, **MOTO_CREDENTIALS,
                   MLFLOW_S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    res = stack.cli("up", "--mode", "production", **env)
    elapsed = time.monotonic() - t0
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: {expected[0]}") and expected[1] in last, res.stderr[-2000:]
    if case == "wrong password":
        assert "set POSTGRES_PASSWORD" in last and "--reset-postgres-password" in last, last
    assert elapsed < 30, f"{case}: {elapsed:.1f} s"
    assert not list((tmp_path / "run").glob("*.pid")) if (tmp_path / "run").exists() else True


def test_down_stops_exactly_what_up_started(stack):
    started = {p.stem: stack.pid(p.stem) for p in (stack.home / "run").glob("*.pid")}
    assert {"mlflow", "s3"} <= set(started)
    groups = {os.getpgid(pid) for pid in started.values()}
    members = {p for p in _all_pids() if _pgid(p) in groups}
    assert len(members) > len(started)  # the servers' children are in their groups
    res = _ok(stack.cli("down"))
    assert set(res.stdout.split(":", 1)[1].replace(",", " ").split()) == set(started)
    alive = [p for p in members if _running(p)]
    assert not alive, alive
    assert "stack: not running" in _ok(stack.cli("status")).stdout
    assert _ok(stack.cli("down")).stdout.strip() == "stopped: nothing was running"


def test_embedded_up_after_production_forgets_its_stores(stack):
    """Issue 15: after a production up/down, an embedded up's status listed the old S3
    endpoint and PostgreSQL."""
    _ok(stack.cli("down"))
    _ok(stack.cli("up", "--port", str(free_port())))  # `down` forgot the mode: embedded
    try:
        status = _ok(stack.cli("status")).stdout
        assert stack.state["mlflow"]["mode"] == "embedded"
        assert "mlflow: running" in status and "registry: " in status, status
        assert "postgresql" not in status and "s3" not in status, status
    finally:
        _ok(stack.cli("down"))


# -- no open registry (issue 12) ------------------------------------------------------------
@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("tracking.internal", False)])
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_the_override_of_the_open_network_refusal_is_explicit_and_loud(caplog):
    with pytest.raises(click.ClickException) as refused:
        check_exposure("0.0.0.0", auth=False, artifacts_only=True, insecure=False)
    assert "--insecure-no-auth" in refused.value.message
    check_exposure("0.0.0.0", auth=True, artifacts_only=False, insecure=False)  # auth: fine
    with caplog.at_level("WARNING", logger="stack"):
        check_exposure("10.0.0.5", auth=False, artifacts_only=False, insecure=True)
    assert "WITHOUT authentication on 10.0.0.5" in caplog.text


def test_up_refuses_a_non_loopback_host_without_auth(tmp_path):
    env = stack_env(tmp_path, STACK_HOST="0.0.0.0")
    try:
        res = subprocess.run([STACK, "up", "--port", str(free_port())], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode != 0, res.stdout
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: mlflow: refusing to serve the tracking server without "
                               "authentication on 0.0.0.0"), last
        assert "add --auth" in last and "--insecure-no-auth" in last, last
        assert not list((tmp_path / "stack").rglob("*.pid"))
    finally:
        subprocess.run([STACK, "down"], env=env, cwd=tmp_path, capture_output=True, timeout=60)


# -- a role that exists already (issue 15) --------------------------------------------------
def test_a_role_with_an_unknown_password_gets_one_line_saying_what_to_do(tmp_path, monkeypatch):
    token = secrets.token_hex(4)
    user = db = f"stack_role_{token}"
    ensure_role_and_database(user, secrets.token_urlsafe(16), db)  # made elsewhere, by hand
    try:
        env = stack_env(tmp_path, POSTGRES_USER=user, POSTGRES_DB=db)
        t0 = time.monotonic()
        res = subprocess.run([STACK, "up", "--mode", "production", "--port", str(free_port())],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert res.returncode != 0 and time.monotonic() - t0 < 30
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith(f"Error: postgresql: role {user} already exists on "
                               "127.0.0.1:5432 with a password this stack does not know"), last
        assert "set POSTGRES_PASSWORD" in last and "--reset-postgres-password" in last, last
        assert not list((tmp_path / "stack").rglob("*.pid"))
        assert "Traceback" not in res.stderr

        # The way out it names; then what used to fail: a wiped and a second STACK_HOME.
        monkeypatch.setenv("XDG_CONFIG_HOME", env["XDG_CONFIG_HOME"])
        cfg = StackSettings(postgres_user=user, postgres_db=db, _env_file=None)
        uri = prepare_postgres(StackPaths(tmp_path / "first"), cfg, reset_password=True)
        for home in ("first", "second"):
            wiped = tmp_path / home
            if wiped.exists():
                subprocess.run(["rm", "-rf", str(wiped)], check=True)
            assert prepare_postgres(StackPaths(wiped), cfg) == uri
    finally:
        drop_database_and_role(user, db)


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
