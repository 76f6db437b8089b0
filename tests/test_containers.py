"""Every image we ship, built and run as a user would (issue 9; the tracking image's auth path
of issue 12).

* web (``serve/Dockerfile``) against the session's tracking server: answers byte-equal to the
  in-process service, non-root, no credentials, HEALTHCHECK healthy, and ``docker stop``
  under ~50 req/s ends it with exit 0 and no failed request (defined in
  ``test_web_image_stops_cleanly_under_load``);
* tracking (``ops/Dockerfile``) on the host's PostgreSQL and moto_server's S3: a client with
  no AWS variables runs ``mlflow run``, the model loads back; ``--artifacts-only``; ``--auth``;
* MLflow's own image (``mlflow models generate-dockerfile`` / ``build-docker``): the five
  request forms of the scoring protocol equal the local model to 1e-9;
* Lambda (``serve/lambda.Dockerfile``): the image's own entry point (awslambdaric) fed a literal
  Kinesis event by a stand-in Runtime API, the prediction events read back from moto's
  Kinesis; the baked-model variant;
* compose (``ops/docker-compose.yml``): validated, and its mlflow service run on host services.

Images build once per session, in parallel (``docker_helpers.Images``, started by
``conftest.container_images``): with the session in one process, with this file under
xdist; either way they overlap the other test files.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pytest
import requests
from docker_helpers import ROOT, SESSION, RuntimeAPI, credential_findings, docker, mlflow_cli

from ops.procs import free_port, http_ok, start, stop, wait_for
from tests.test_web import SHEDDING_OFF

# The first test of an image waits for its build, which has its own bound (Images.get):
# on a loaded 2-core machine a cold build alone can pass the suite's 600 s per test.
pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]

RIDE = {"PULocationID": 43, "DOLocationID": 151, "trip_distance": 1.8}
RIDE_COLUMNS = ["PULocationID", "DOLocationID", "trip_distance"]
RIDES = [RIDE, {"PULocationID": 1, "DOLocationID": 2, "trip_distance": 3},
         {"PULocationID": 265, "DOLocationID": 74, "trip_distance": 0.0},
         {"PULocationID": 7, "DOLocationID": 7, "trip_distance": 25.5}]
JSON_CT = "application/json"


# -- the session's images (conftest.container_images) --------------------------------------
@pytest.fixture(scope="module")
def images(container_images):
    reason = container_images.engine_ready()
    if reason:
        pytest.skip(reason)
    return container_images


def local_model():
    import mlflow

    return mlflow.pyfunc.load_model("models:/duration@production")


# -- web image ----------------------------------------------------------------------------
def in_process(requests_: list[tuple[str, str, bytes, str | None]],
               tracking_uri: str) -> list[tuple[int, bytes]]:
    """The same requests through ``serve.web``'s ASGI app in this process (lifespan included)."""
    from serve.web.app import create_app
    from serve.web.settings import WebSettings

    app = create_app(WebSettings(model_uri="models:/duration@production",
                                 mlflow_tracking_uri=tracking_uri))

    async def one(method, path, body=b"", content_type=None):
        headers = [(b"content-type", content_type.encode())] if content_type else []
        headers.append((b"content-length", str(len(body)).encode()))
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": headers, "scheme": "http", "server": ("127.0.0.1", 9696)}
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        sent = []

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await app(scope, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    async def main():
        inbox, outbox = asyncio.Queue(), asyncio.Queue()
        lifespan = asyncio.create_task(app({"type": "lifespan"}, inbox.get, outbox.put))
        await inbox.put({"type": "lifespan.startup"})
        await outbox.get()
        deadline = time.monotonic() + 120
        while (await one("GET", "/ready"))[0] != 200:
            assert time.monotonic() < deadline, "in-process service not ready in 120 s"
            await asyncio.sleep(0.2)
        answers = [await one(*r) for r in requests_]
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await lifespan
        return answers

    return asyncio.run(main())


@dataclass
class WebContainer:
    container: object
    url: str
    port: int


@pytest.fixture(scope="module")
def web_container(images, tracking_server, registered_model):
    image = images.get("web")
    port = free_port()
    c = images.run(image.tag, name="duration-web", env={
        "MLFLOW_TRACKING_URI": tracking_server.uri, "MODEL_URI": "models:/duration@production",
        "WEB_HOST": "127.0.0.1", "WEB_PORT": str(port),
        "WEB_MAX_QUEUE_WAIT": str(SHEDDING_OFF)})  # a busy CI machine: see tests/test_web.py
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(http_ok(url + "/ready"), "web container /ready", timeout=180)
    except Exception as e:
        raise AssertionError(f"web container not ready; logs:\n{c.logs()}") from e
    yield WebContainer(c, url, port)
    c.remove()


WEB_REQUESTS = [
    ("POST", "/predict", json.dumps(RIDE).encode(), JSON_CT),
    ("POST", "/predict", json.dumps({"rides": RIDES}).encode(), JSON_CT),
    ("POST", "/invocations", json.dumps({"dataframe_records": RIDES}).encode(), JSON_CT),
    ("POST", "/invocations", pd.DataFrame(RIDES).to_csv(index=False).encode(), "text/csv"),
    ("POST", "/predict", json.dumps({**RIDE, "PULocationID": 0}).encode(), JSON_CT),
]


@pytest.mark.image("web")
def test_web_image_answers_like_the_in_process_service(web_container, tracking_server,
                                                       registered_model):
    url = web_container.url
    assert requests.get(url + "/health", timeout=10).status_code == 200
    assert requests.get(url + "/ready", timeout=10).status_code == 200
    pinned = re.search(r"^mlflow-skinny==(\S+)", (ROOT / "serve/requirements-model.txt")
                       .read_text(), re.M).group(1)  # the image has mlflow-skinny, not mlflow
    assert requests.get(url + "/version", timeout=10).json()["mlflow_version"] == pinned
    expected = in_process(WEB_REQUESTS, tracking_server.uri)
    got = []
    for method, path, body, ctype in WEB_REQUESTS:
        r = requests.request(method, url + path, data=body, headers={"Content-Type": ctype},
                             timeout=30)
        got.append((r.status_code, r.content))
    assert got == expected
    assert [s for s, _ in got] == [200, 200, 200, 200, 400]
    one = json.loads(got[0][1])
    assert one["model_version"] == registered_model["version"]
    model = local_model()
    assert one["duration"] == pytest.approx(float(model.predict(pd.DataFrame([RIDE]))[0]),
                                            abs=1e-9)


@pytest.mark.image("web")
def test_web_image_runs_as_non_root_without_credentials(images, web_container):
    image = images.get("web")
    config = image.config()
    assert config["User"] == "10001"
    status = web_container.container.exec("cat", "/proc/1/status")
    uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, re.M).groups()
    assert uids == ("10001", "10001"), status
    assert credential_findings(config["Env"], image.history()) == []
    # The context is serve/ only: no .env, .git or venv can have slipped into the image.
    listing = web_container.container.exec("ls", "-a", "/app")
    assert set(listing.split()) <= {".", "..", "serve", "requirements-model.txt",
                                    "requirements-web.txt", "requirements-web-postgres.txt"}
    # Cut what does not serve: no database drivers, no MLflow server, no test suites.
    extra = web_container.container.exec("python", "-c", (
        "import importlib.util as u, os, pandas;"
        "print([m for m in ('sqlalchemy', 'psycopg2', 'flask', 'alembic') if u.find_spec(m)],"
        " os.path.isdir(os.path.join(os.path.dirname(pandas.__file__), 'tests')))"))
    assert extra.strip() == "[] False"


@pytest.mark.image("web")
def test_web_image_healthcheck_reaches_healthy(images, web_container):
    health = images.get("web").config()["Healthcheck"]
    assert "/health" in " ".join(health["Test"])

    def healthy():
        state = web_container.container.state()
        assert state["Status"] == "running", state
        return state["Health"]["Status"] == "healthy"

    # The image's own schedule: a check every 10 s, so this bound is generous.
    wait_for(healthy, "web container healthy", timeout=120, interval=0.5)


@dataclass
class Outcome:
    """One load request: when it started, whether it connected, how it ended."""

    started: float
    connected: bool
    status: int | None = None
    body: bytes = b""
    error: str | None = None


def one_request(port: int, body: bytes) -> Outcome:
    """POST /predict on a new connection (Connection: close), recording where it failed."""
    t = time.monotonic()
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    except ConnectionRefusedError:
        return Outcome(t, False, error="refused")
    except OSError as e:
        return Outcome(t, False, error=f"connect: {type(e).__name__}: {e}")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.sock = sock
    try:
        conn.request("POST", "/predict", body, {"Content-Type": JSON_CT, "Connection": "close"})
        response = conn.getresponse()
    except (OSError, http.client.HTTPException) as e:  # not a byte of answer
        return Outcome(t, True, error=f"{type(e).__name__}: {e}")
    try:
        return Outcome(t, True, response.status, response.read())
    except (OSError, http.client.HTTPException) as e:
        return Outcome(t, True, response.status, error=f"partial answer: {e!r}")
    finally:
        conn.close()


@pytest.mark.image("web")
def test_web_image_stops_cleanly_under_load(web_container):
    """``docker stop`` while ~50 req/s run, each on a new connection, plus one request whose
    body is still arriving when SIGTERM lands.

    "No failed request", precisely: a request is accepted once the service has read it, and
    every accepted request is answered, in full: the service logs how many requests it was
    handed and answered when it stops, and the two must be equal; no request gets a non-200,
    a partial answer or a timeout. Every connection opened before ``docker stop`` was
    issued gets a 200 with the right body. A connection opened after it may instead be
    refused (the service no longer listens) or reset before any byte of answer (it completed
    its handshake as the listening socket closed, so the kernel resets it): the service never
    read it, and a load balancer retries it elsewhere. Those are counted, not failed.
    """
    c, port = web_container.container, web_container.port
    body = json.dumps(RIDE).encode()
    expected = requests.post(web_container.url + "/predict", data=body,
                             headers={"Content-Type": JSON_CT}, timeout=30).content
    outcomes: list[Outcome] = []
    offered: dict = {}
    stop_load = threading.Event()

    def load():  # paced at 50 req/s, whatever the answers take
        with ThreadPoolExecutor(64) as pool:
            futures, t_next = [], time.monotonic()
            offered["start"] = t_next
            while not stop_load.is_set():
                futures.append(pool.submit(one_request, port, body))
                t_next += 0.02
                time.sleep(max(0.0, t_next - time.monotonic()))
            offered["end"] = time.monotonic()
            outcomes.extend(f.result() for f in futures)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        time.sleep(3)  # load before the stop (a duration of load, not a readiness wait)
        # A request in flight: headers and half of the body sent before SIGTERM.
        slow = socket.create_connection(("127.0.0.1", port), timeout=30)
        slow.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nConnection: close\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body[:10])
        # A round trip on another connection: the server has read the headers by then.
        assert requests.get(web_container.url + "/health", timeout=30).ok
        stopped: dict = {}
        t_stop = time.monotonic()
        stopper = threading.Thread(target=lambda: stopped.update(seconds=c.stop(timeout=30)))
        stopper.start()

        def not_listening():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) != 0

        wait_for(not_listening, "service to stop listening after SIGTERM", timeout=30,
                 interval=0.02)
        slow.sendall(body[10:])
        slow_answer = b""
        while chunk := slow.recv(65536):
            slow_answer += chunk
        slow.close()
        stopper.join(timeout=90)
        time.sleep(1)  # load keeps coming after the exit (refused connections)
    finally:
        stop_load.set()
        loader.join(timeout=120)

    state = c.state()
    logs = c.logs()
    assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, logs)
    assert stopped["seconds"] < 30, f"docker stop needed {stopped['seconds']:.1f} s (SIGKILL)"
    assert slow_answer.startswith(b"HTTP/1.1 200"), slow_answer[:300]
    assert slow_answer.endswith(expected), slow_answer[-300:]
    counts = re.findall(r"stopped: (\d+) requests received, (\d+) answered", logs)
    assert len(counts) == 1 and counts[0][0] == counts[0][1], logs

    rate = len(outcomes) / (offered["end"] - offered["start"])
    assert 45 <= rate <= 55, rate
    before = [o for o in outcomes if o.started < t_stop]
    after = [o for o in outcomes if o.started >= t_stop]
    assert len(before) >= 100
    not_read = [o for o in after if o.error == "refused" or (
        o.status is None and (o.error or "").startswith("ConnectionResetError"))]
    failed = [(round(o.started - t_stop, 3), o) for o in outcomes
              if not (o.status == 200 and o.body == expected) and o not in not_read]
    assert failed == [], failed[:5]
    assert any(o.error == "refused" for o in after), "the load never saw the service stop"
    served_after = [o for o in after if o.status == 200]
    resets = [round(o.started - t_stop, 3) for o in not_read if o.error != "refused"]
    print(f"load {rate:.0f} req/s: {len(before)} requests before docker stop, all 200; "
          f"after: {len(served_after)} answered 200, {len(not_read) - len(resets)} refused, "
          f"{len(resets)} reset unread {resets}; service: {counts[0][0]} received, "
          f"{counts[0][1]} answered; stop {stopped['seconds']:.1f} s, exit code 0")


def test_web_process_exits_0_on_sigterm_outside_a_container(tracking_server, registered_model,
                                                            tmp_path):
    """Not PID 1 (where the kernel drops a re-raised SIGTERM): ``docker run --init``, a pod
    sharing its PID namespace, systemd. The stop is still a clean exit."""
    port = free_port()
    proc = start([sys.executable, "-m", "serve.web", "--port", str(port)], tmp_path / "web.log",
                 env=dict(os.environ, MLFLOW_TRACKING_URI=tracking_server.uri), cwd=ROOT)
    try:
        wait_for(http_ok(f"http://127.0.0.1:{port}/ready"), "serve.web", timeout=120, proc=proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp_path / "web.log").read_text()[-3000:]
    finally:
        stop(proc.pid)


# -- tracking image -----------------------------------------------------------------------
def client_env(tracking_uri: str, tmp_path: Path) -> dict[str, str]:
    """A client's environment with no AWS variable and no AWS credentials file."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_S3_", "MLFLOW_TRACKING_"))}
    env.update(MLFLOW_TRACKING_URI=tracking_uri,
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-credentials"),
               AWS_CONFIG_FILE=str(tmp_path / "no-config"))
    return env


@pytest.fixture(scope="module")
def tracking_bucket(moto):
    bucket = f"duration-ctr-{SESSION}"
    moto.client("s3").create_bucket(Bucket=bucket)
    return bucket


def s3_server_env(moto, bucket: str, port: int) -> dict[str, str]:
    return {**moto.env, "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{bucket}/mlartifacts",
            "MLFLOW_S3_ENDPOINT_URL": moto.endpoint,
            "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port)}


def start_tracking(images, *args: str, env: dict[str, str], name: str = "duration-mlflow"):
    c = images.run(images.get("mlflow").tag, *args, env=env, name=name)
    uri = f"http://127.0.0.1:{env['MLFLOW_PORT']}"
    try:
        wait_for(http_ok(uri + "/health"), f"{name} /health", timeout=240)
    except Exception as e:
        raise AssertionError(f"{name} did not start; logs:\n{c.logs()}") from e
    return c, uri


@pytest.mark.image("mlflow")
def test_tracking_image_postgres_s3_credential_less_client(images, postgres, moto,
                                                           tracking_bucket, months, tmp_path):
    port = free_port()
    env = {"MLFLOW_BACKEND_STORE_URI": postgres, **s3_server_env(moto, tracking_bucket, port)}
    c, uri = start_tracking(images, env=env)
    try:
        password = urlparse(postgres).password
        info = c.inspect()
        on_command_lines = json.dumps([info["Path"], info["Args"], info["Config"]["Cmd"],
                                       info["Config"]["Entrypoint"]])
        assert password not in on_command_lines
        assert password not in c.cmdlines()
        assert c.exec("id", "-u").strip() == "10001"

        cenv = client_env(uri, tmp_path)
        name = f"duration_ctr_{SESSION}"
        run = mlflow_cli("run", str(ROOT), "--env-manager", "local", "--experiment-name",
                         "duration-container", "-P", f"train={months.train}",
                         "-P", f"val={months.val}", "-P", f"registered_model={name}",
                         env=cenv, cwd=tmp_path, timeout=900)
        assert "promoted" in run.stdout + run.stderr

        # The served model loads back through the server, in a process without AWS variables.
        script = ("import json, sys, mlflow, pandas as pd;"
                  f"m = mlflow.pyfunc.load_model('models:/{name}@production');"
                  "print(json.dumps(m.predict(pd.DataFrame(json.loads(sys.argv[1]))).tolist()))")
        out = subprocess.run([sys.executable, "-c", script, json.dumps(RIDES)], env=cenv,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        minutes = json.loads(out.stdout.strip().splitlines()[-1])
        assert len(minutes) == len(RIDES) and all(np.isfinite(minutes))

        # Runs in PostgreSQL, artifacts in the bucket.
        import sqlalchemy as sa
        from mlflow.tracking import MlflowClient

        run_id = MlflowClient(uri).get_model_version_by_alias(name, "production").run_id
        engine = sa.create_engine(postgres)
        with engine.connect() as conn:
            status = conn.execute(sa.text("SELECT status FROM runs WHERE run_uuid = :r"),
                                  {"r": run_id}).scalar()
        engine.dispose()
        assert status == "FINISHED"
        keys = [o["Key"] for o in moto.client("s3").list_objects_v2(
            Bucket=tracking_bucket, Prefix="mlartifacts/")["Contents"]]
        assert any(k.endswith("/MLmodel") for k in keys), keys
    finally:
        c.remove()


@pytest.mark.image("mlflow")
def test_tracking_image_artifacts_only(images, moto, tracking_bucket):
    port = free_port()
    c, uri = start_tracking(images, "--artifacts-only",
                            env=s3_server_env(moto, tracking_bucket, port),
                            name="duration-artifacts")
    try:
        path = f"/api/2.0/mlflow-artifacts/artifacts/ctr-{SESSION}/hello.txt"
        assert requests.put(uri + path, data=b"hello", timeout=30).status_code == 200
        assert requests.get(uri + path, timeout=30).content == b"hello"
        obj = moto.client("s3").get_object(Bucket=tracking_bucket,
                                           Key=f"mlartifacts/ctr-{SESSION}/hello.txt")
        assert obj["Body"].read() == b"hello"
        # Tracking APIs are not served by an artifacts-only server.
        r = requests.get(uri + "/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
        assert r.status_code == 503, r.text
    finally:
        c.remove()


@pytest.mark.image("mlflow")
def test_tracking_image_auth(images, tmp_path):
    password = "Ct-" + os.urandom(12).hex()
    port = free_port()
    c, uri = start_tracking(images, "--auth", name="duration-auth", env={
        "MLFLOW_BACKEND_STORE_URI": "sqlite:////tmp/mlflow.db",
        "MLFLOW_ARTIFACTS_DESTINATION": "/tmp/mlartifacts",
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port)})
    try:
        api = uri + "/api/2.0/mlflow/experiments/search?max_results=1"
        assert requests.get(api, timeout=30).status_code == 401
        assert requests.get(api, auth=("admin", password + "x"), timeout=30).status_code == 401
        assert requests.get(api, auth=("admin", password), timeout=30).status_code == 200
        assert password not in c.cmdlines()
        # MLflow's ini is private to the server's user.
        ini = c.exec("sh", "-c", "stat -c '%a %u' /tmp/mlflow-auth-*/basic_auth.ini").split()
        assert ini == ["600", "10001"]
    finally:
        c.remove()


@pytest.mark.image("mlflow")
@pytest.mark.parametrize(("password", "message"), [
    ("changeme", "placeholder"),      # .env.example's value
    ("password", "placeholder"),
    ("", "placeholder"),
    ("Sh0rt-pw", "12+ characters"),
])
def test_tracking_image_auth_refuses_placeholders(images, password, message):
    tag = images.get("mlflow").tag
    env = dict(os.environ, MLFLOW_AUTH_ADMIN_PASSWORD=password,
               MLFLOW_BACKEND_STORE_URI="sqlite:////tmp/mlflow.db")
    name = f"duration-refuse-{SESSION}-{os.urandom(2).hex()}"
    images.containers.append(name)
    proc = docker("run", "--rm", f"--name={name}", "-e", "MLFLOW_AUTH_ADMIN_PASSWORD", "-e",
                  "MLFLOW_BACKEND_STORE_URI", tag, "--auth", env=env, check=False, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr and "MLFLOW_AUTH_ADMIN_PASSWORD" in proc.stderr, proc.stderr
    assert "Uvicorn running" not in proc.stdout + proc.stderr


@pytest.mark.image("mlflow")
def test_tracking_image_has_no_credentials(images):
    image = images.get("mlflow")
    assert credential_findings(image.config()["Env"], image.history()) == []
    assert image.config()["User"] == "10001"


def test_entrypoint_auth_environment(tmp_path, monkeypatch):
    """The image's entry point without Docker: argv carries no secret, the ini is 0600."""
    from ops.mlflow_entrypoint import server_argv

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    env = {"MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg2://u:Pg-s3cret-value@db/m",
           "MLFLOW_AUTH_ADMIN_PASSWORD": "An-admin-pass-1234"}
    argv, new_env = server_argv(["--auth", "--port", "5005"], env)
    assert argv == ["mlflow", "server", "--app-name", "basic-auth", "--port", "5005"]
    assert "Pg-s3cret-value" not in " ".join(argv)
    ini = Path(new_env["MLFLOW_AUTH_CONFIG_PATH"])
    assert oct(ini.stat().st_mode & 0o777) == "0o600"
    assert "database_uri = postgresql+psycopg2://u:Pg-s3cret-value@db/m" in ini.read_text()
    assert "An-admin-pass" not in ini.read_text()  # MLflow reads it from the environment
    assert new_env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    assert server_argv(["--artifacts-only"], env) == (
        ["mlflow", "server", "--artifacts-only"], env)
    with pytest.raises(ValueError, match="placeholder"):
        server_argv(["--auth"], {**env, "MLFLOW_AUTH_ADMIN_PASSWORD": "changeme"})
    with pytest.raises(ValueError, match="artifacts-only"):
        server_argv(["--auth", "--artifacts-only"], env)


# -- MLflow's own image -------------------------------------------------------------------
def scoring_forms(df: pd.DataFrame) -> dict[str, tuple[bytes, str]]:
    records = df.to_dict(orient="records")
    split = df.to_dict(orient="split")
    split.pop("index")
    return {
        "dataframe_split": (json.dumps({"dataframe_split": split}).encode(), JSON_CT),
        "dataframe_records": (json.dumps({"dataframe_records": records}).encode(), JSON_CT),
        "instances": (json.dumps({"instances": records}).encode(), JSON_CT),
        "inputs": (json.dumps({"inputs": df.to_dict(orient="list")}).encode(), JSON_CT),
        "csv": (df.to_csv(index=False).encode(), "text/csv"),
    }


@pytest.mark.image("model")
def test_mlflow_build_docker_image_five_request_forms(images, months):
    image = images.get("model")
    gen = images.logs / "mlflow-image"
    dockerfile = (gen / "Dockerfile").read_text()
    assert "COPY model_dir /opt/ml/model" in dockerfile, dockerfile
    requirements = (gen / "model_dir" / "requirements.txt").read_text()
    assert "mlflow==3.17.2" in requirements and "scikit-learn==" in requirements

    port = free_port()
    c = images.run(image.tag, network="bridge", options=("-p", f"127.0.0.1:{port}:8080"),
                   name="duration-model")
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for(http_ok(url + "/ping"), "MLflow scoring container", timeout=180)
        except Exception as e:
            raise AssertionError(f"MLflow image did not start; logs:\n{c.logs()}") from e
        df = pd.read_parquet(months.val).head(50)[RIDE_COLUMNS].reset_index(drop=True)
        expected = np.asarray(local_model().predict(df), dtype=np.float64)
        for form, (body, ctype) in scoring_forms(df).items():
            r = requests.post(url + "/invocations", data=body,
                              headers={"Content-Type": ctype}, timeout=60)
            assert r.status_code == 200, (form, r.text[:500])
            got = np.asarray(r.json()["predictions"], dtype=np.float64)
            assert got.shape == expected.shape, form
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9, err_msg=form)
    finally:
        c.remove()


# -- Lambda image -------------------------------------------------------------------------
# A Kinesis event as Lambda delivers it: two rides and one record that is not JSON.
KINESIS_EVENT = {"Records": [
    {"kinesis": {"kinesisSchemaVersion": "1.0", "partitionKey": "256",
                 "sequenceNumber": "49630081666084879290581185630324770398608704880802529282",
                 "data": "eyJyaWRlIjogeyJQVUxvY2F0aW9uSUQiOiAxMzAsICJET0xvY2F0aW9uSUQiOiAyMDUs"
                         "ICJ0cmlwX2Rpc3RhbmNlIjogMy42Nn0sICJyaWRlX2lkIjogMjU2fQ==",
                 "approximateArrivalTimestamp": 1654161514.132},
     "eventSource": "aws:kinesis", "eventVersion": "1.0",
     "eventID": "shardId-000000000000:49630081666084879290581185630324770398608704880802529282",
     "eventName": "aws:kinesis:record",
     "invokeIdentityArn": "arn:aws:iam::123456789012:role/lambda-kinesis-role",
     "awsRegion": "us-east-1",
     "eventSourceARN": "arn:aws:kinesis:us-east-1:123456789012:stream/ride_events"},
    {"kinesis": {"kinesisSchemaVersion": "1.0", "partitionKey": "257",
                 "sequenceNumber": "49630081666084879290581185630324770398608704880802529283",
                 "data": "eyJyaWRlIjogeyJQVUxvY2F0aW9uSUQiOiA0MywgIkRPTG9jYXRpb25JRCI6IDE1MSwg"
                         "InRyaXBfZGlzdGFuY2UiOiAxLjh9LCAicmlkZV9pZCI6IDI1N30=",
                 "approximateArrivalTimestamp": 1654161514.212},
     "eventSource": "aws:kinesis", "eventVersion": "1.0",
     "eventID": "shardId-000000000000:49630081666084879290581185630324770398608704880802529283",
     "eventName": "aws:kinesis:record",
     "invokeIdentityArn": "arn:aws:iam::123456789012:role/lambda-kinesis-role",
     "awsRegion": "us-east-1",
     "eventSourceARN": "arn:aws:kinesis:us-east-1:123456789012:stream/ride_events"},
    {"kinesis": {"kinesisSchemaVersion": "1.0", "partitionKey": "258",
                 "sequenceNumber": "49630081666084879290581185630324770398608704880802529284",
                 "data": "bm90IGpzb24=", "approximateArrivalTimestamp": 1654161514.301},
     "eventSource": "aws:kinesis", "eventVersion": "1.0",
     "eventID": "shardId-000000000000:49630081666084879290581185630324770398608704880802529284",
     "eventName": "aws:kinesis:record",
     "invokeIdentityArn": "arn:aws:iam::123456789012:role/lambda-kinesis-role",
     "awsRegion": "us-east-1",
     "eventSourceARN": "arn:aws:kinesis:us-east-1:123456789012:stream/ride_events"},
]}
EVENT_RIDES = {256: {"PULocationID": 130, "DOLocationID": 205, "trip_distance": 3.66},
               257: {"PULocationID": 43, "DOLocationID": 151, "trip_distance": 1.8}}


def read_stream(kinesis, stream: str) -> list[dict]:
    """Every record's data on every shard of ``stream`` (JSON decoded)."""
    out = []
    for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
        it = kinesis.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"],
                                        ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        out += [json.loads(r["Data"]) for r in kinesis.get_records(ShardIterator=it,
                                                                   Limit=1000)["Records"]]
    return out


def invoke_lambda_image(images, tag: str, env: dict[str, str]) -> dict:
    """Run the image as Lambda does: its own entry point (awslambdaric) polling a Runtime
    API, here ``RuntimeAPI`` serving the literal event; another uid, read-only root file
    system, writable /tmp only. Returns what the handler answered."""
    api = RuntimeAPI([KINESIS_EVENT])
    c = images.run(tag, env={**env, "AWS_LAMBDA_RUNTIME_API": api.address},
                   options=("--read-only", "--tmpfs", "/tmp", "--user", "993:990"),
                   name="duration-lambda")
    try:
        finished = api.finished.wait(240)
        assert finished and not api.errors, (api.errors, c.logs())
        return api.responses["request-1"]
    finally:
        api.close()
        c.remove()


def check_predictions(kinesis, stream: str, version: str) -> None:
    events = {e["prediction"]["ride_id"]: e for e in read_stream(kinesis, stream)}
    assert sorted(events) == [256, 257], events
    model = local_model()
    for ride_id, ride in EVENT_RIDES.items():
        event = events[ride_id]
        assert event["model"] == "ride_duration_prediction_model"
        assert event["version"] == version
        assert event["prediction"]["ride_duration"] == pytest.approx(
            float(model.predict(pd.DataFrame([ride]))[0]), abs=1e-9)


def new_stream(moto) -> tuple[object, str]:
    kinesis = moto.client("kinesis")
    stream = f"ride_predictions_{SESSION}_{os.urandom(2).hex()}"
    kinesis.create_stream(StreamName=stream, ShardCount=1)
    kinesis.get_waiter("stream_exists").wait(StreamName=stream,
                                             WaiterConfig={"Delay": 0.2, "MaxAttempts": 100})
    return kinesis, stream


def lambda_env(moto, stream: str) -> dict[str, str]:
    return {**moto.env, "PREDICTIONS_STREAM_NAME": stream,
            "KINESIS_ENDPOINT_URL": moto.endpoint}


@pytest.mark.image("lambda")
def test_lambda_image_kinesis_event_to_prediction_events(images, moto, tracking_server,
                                                         registered_model):
    image = images.get("lambda")
    config = image.config()
    assert config["Entrypoint"] == ["python", "-m", "awslambdaric"]
    assert config["Cmd"] == ["serve.lambda_function.lambda_handler"]
    assert credential_findings(config["Env"], image.history()) == []
    kinesis, stream = new_stream(moto)
    result = invoke_lambda_image(images, image.tag, {
        **lambda_env(moto, stream), "MLFLOW_TRACKING_URI": tracking_server.uri,
        "MODEL_URI": "models:/duration@production"})
    assert result == {"batchItemFailures": []}  # the non-JSON record is a logged dead letter
    check_predictions(kinesis, stream, registered_model["version"])


@pytest.mark.image("lambda")
def test_lambda_image_with_a_baked_model(images, moto, tracking_server, registered_model):
    """``--target baked``: the model inside the image; no tracking server at cold start."""
    images.get("lambda")  # the function stage is cached: only the model layer is new
    model_dir = ROOT / "build" / "model"
    if model_dir.exists():
        pytest.skip(f"{model_dir} exists (a user's baked model): not overwriting it")
    version = registered_model["version"]
    try:
        mlflow_cli("artifacts", "download", "-u", f"models:/duration/{version}",
                   "-d", str(model_dir),
                   env=dict(os.environ, MLFLOW_TRACKING_URI=tracking_server.uri))
        image = images.build("lambda-baked", "serve/lambda.Dockerfile", target="baked",
                             MODEL_VERSION=version)
    finally:
        subprocess.run(["rm", "-rf", str(model_dir)], check=False)
        if not any((ROOT / "build").iterdir()):
            (ROOT / "build").rmdir()
    kinesis, stream = new_stream(moto)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: the registry is not used
    result = invoke_lambda_image(images, image.tag, {
        **lambda_env(moto, stream), "MLFLOW_TRACKING_URI": dead})
    assert result == {"batchItemFailures": []}
    check_predictions(kinesis, stream, version)


# -- compose ------------------------------------------------------------------------------
def compose_command() -> list[str]:
    """``docker compose`` (plugin) or ``docker-compose``, installing Debian's when neither."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if not shutil.which("docker-compose"):
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
        proc = subprocess.run(["apt-get", "install", "-y", "-qq", "docker-compose"],
                              capture_output=True, text=True, timeout=900,
                              env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        assert proc.returncode == 0, proc.stderr[-2000:]
    return ["docker-compose"]


COMPOSE_FILE = ROOT / "ops" / "docker-compose.yml"


def test_compose_file_validates_and_refuses_missing_secrets(images):
    compose = compose_command()
    secrets_env = dict(os.environ, POSTGRES_PASSWORD="Pg-" + os.urandom(8).hex(),
                       MINIO_ROOT_PASSWORD="Mn-" + os.urandom(8).hex())
    proc = subprocess.run([*compose, "-f", str(COMPOSE_FILE), "config"], capture_output=True,
                          text=True, env=secrets_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import yaml

    config = yaml.safe_load(proc.stdout)
    assert set(config["services"]) == {"postgres", "minio", "create-bucket", "mlflow"}
    mlflow_env = config["services"]["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://mlflow:Pg-")
    missing = {k: v for k, v in os.environ.items()
               if k not in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD")}
    proc = subprocess.run([*compose, "-f", str(COMPOSE_FILE), "config"], capture_output=True,
                          text=True, env=missing, timeout=120)
    assert proc.returncode != 0
    assert "set POSTGRES_PASSWORD" in proc.stderr or "set MINIO_ROOT_PASSWORD" in proc.stderr


@pytest.mark.image("mlflow")
def test_compose_mlflow_service_on_host_services(images, postgres, moto, tracking_bucket,
                                                 tmp_path):
    """The compose file's mlflow service (its image, command, healthcheck), with PostgreSQL
    and MinIO replaced by the host's PostgreSQL and moto_server through an override file:
    postgres and minio images cannot be pulled here, and are not faked."""
    compose = compose_command()
    port = free_port()
    override = tmp_path / "docker-compose.host.yml"
    override.write_text(json.dumps({"services": {"mlflow": {
        "image": images.get("mlflow").tag,
        "network_mode": "host",
        "environment": {"MLFLOW_BACKEND_STORE_URI": "${TEST_STORE_URI}",
                        "MLFLOW_S3_ENDPOINT_URL": moto.endpoint,
                        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{tracking_bucket}/compose",
                        **moto.env, "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port)}}}}))
    project = f"duration-test-{SESSION}"
    env = dict(os.environ, POSTGRES_PASSWORD="unused-" + os.urandom(6).hex(),
               MINIO_ROOT_PASSWORD="unused-" + os.urandom(6).hex(), TEST_STORE_URI=postgres)
    base = [*compose, "-p", project, "-f", str(COMPOSE_FILE), "-f", str(override)]
    name = f"duration-compose-{SESSION}"
    images.containers.append(name)
    try:
        # `run` (not `up`): the service's image, environment, command and healthcheck, without
        # its published ports, which host networking refuses.
        proc = subprocess.run([*base, "run", "-d", "--no-deps", "--name", name, "mlflow"],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        uri = f"http://127.0.0.1:{port}"
        wait_for(http_ok(uri + "/health"), "compose mlflow service", timeout=240)
        r = requests.post(uri + "/api/2.0/mlflow/experiments/create",
                          json={"name": f"compose-{SESSION}"}, timeout=30)
        assert r.status_code == 200, r.text

        def healthy():
            return docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip() \
                == "healthy"

        wait_for(healthy, "compose mlflow service healthy", timeout=120, interval=0.5)
    finally:
        docker("rm", "-f", "-v", name, check=False)
        subprocess.run([*base, "down", "-v", "--remove-orphans"], capture_output=True,
                       env=env, timeout=300)
