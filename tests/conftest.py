"""Session fixtures: the real parts the tests run against.

* ``tracking_server``: a real ``mlflow server`` process (sqlite + local artifacts,
  ``--serve-artifacts``) on a free port; sets ``MLFLOW_TRACKING_URI``.
* ``months``: small synthetic TLC months (train, val, held-out test).
* ``registered_model``: the default model trained on ``months`` and registered as
  ``duration`` (version 1, alias ``production``). Tests that move aliases must use
  their own registered model name, so they do not disturb the others.
* ``moto``: a ``moto_server`` process, the S3 and Kinesis endpoint.
* ``postgres``: the machine's PostgreSQL (started if stopped) with a test role and
  database; yields a SQLAlchemy URL.
* ``model_cache`` (autouse): the session's own version cache (``MODEL_CACHE_DIR``), never
  the user's ``~/.cache/duration/models``.

Everything is polled for readiness with a bound; nothing sleeps a fixed time.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ops.moto import start_moto
from ops.procs import free_port, http_ok, spawn, stop
from ops.stackctl.pg import (
    drop_database_and_role,
    ensure_postgres_running,
    ensure_role_and_database,
)
from ops.stackctl.server import embedded_server_cmd, server_env
from ops.synth import write_month

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
# Subprocesses (mlflow models serve execs `uvicorn`) must find the venv's commands.
os.environ["PATH"] = VENV_BIN + os.pathsep + os.environ.get("PATH", "")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """Model versions loaded by the session (and the servers it starts) are cached here."""
    path = tmp_path_factory.mktemp("model-cache")
    os.environ["MODEL_CACHE_DIR"] = str(path)
    return path


@dataclass(frozen=True)
class Months:
    """Paths of the synthetic months used by the tests."""

    train: Path
    val: Path
    test: Path


@pytest.fixture(scope="session")
def months(tmp_path_factory) -> Months:
    d = tmp_path_factory.mktemp("data")
    return Months(
        train=write_month("green", "2021-01", 60_000, d / "green_tripdata_2021-01.parquet", 0),
        val=write_month("green", "2021-02", 40_000, d / "green_tripdata_2021-02.parquet", 1),
        test=write_month("green", "2021-03", 40_000, d / "green_tripdata_2021-03.parquet", 2),
    )


@dataclass
class TrackingServer:
    """A running ``mlflow server``: its URI, home folder and process."""

    uri: str
    home: Path
    proc: subprocess.Popen
    port: int

    def log_text(self) -> str:
        return (self.home / "server.log").read_text(errors="replace")


def start_tracking_server(home: Path, port: int | None = None) -> TrackingServer:
    """Start an embedded-mode tracking server in ``home`` and wait until it is healthy."""
    port = port or free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = spawn(embedded_server_cmd(home, "127.0.0.1", port), home / "server.log",
                 http_ok(f"{uri}/health"), "mlflow server", timeout=120, env=server_env())
    return TrackingServer(uri=uri, home=home, proc=proc, port=port)


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory):
    import mlflow

    server = start_tracking_server(tmp_path_factory.mktemp("mlflow"))
    os.environ["MLFLOW_TRACKING_URI"] = server.uri
    mlflow.set_tracking_uri(server.uri)
    yield server
    stop(server.proc.pid)


@pytest.fixture(scope="session")
def registered_model(tracking_server, months) -> dict:
    """Version 1 of ``duration``, production, trained in-process on ``months``."""
    from train import run_training

    summary = run_training(str(months.train), str(months.val))
    assert summary["promoted"], summary
    return summary


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    """A moto_server (ops.moto.Moto: endpoint, env with its fake credentials, client())."""
    server = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def aws(moto):
    """The moto endpoint's fake credentials in this process's environment (per module)."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in moto.env.items():
            mp.setenv(k, v)
        yield moto


@pytest.fixture(scope="module")
def kinesis(aws):
    return aws.client("kinesis")


@pytest.fixture(scope="session")
def postgres() -> str:
    """SQLAlchemy URL of a fresh test database owned by a fresh role (both per session, so
    that concurrent test sessions on one machine never change each other's passwords)."""
    ensure_postgres_running()
    suffix = secrets.token_hex(4)
    user, password, db = f"duration_test_{suffix}", secrets.token_hex(12), f"duration_test_{suffix}"
    ensure_role_and_database(user, password, db)
    yield f"postgresql+psycopg2://{user}:{password}@127.0.0.1:5432/{db}"
    drop_database_and_role(user, db)


def _container_items(session) -> list:
    return [i for i in session.items if i.nodeid.startswith("tests/test_containers.py")
            and "images" in i.fixturenames]


@pytest.fixture(scope="session")
def container_images(request, tmp_path_factory):
    """The images the selected tests of tests/test_containers.py name
    (``@pytest.mark.image(key)``), built in parallel in the background, then reported (size,
    build time) and removed with everything the session ran."""
    from docker_helpers import Images, start_session_builds

    t0 = time.monotonic()
    keys = {m.args[0] for i in _container_items(request.session) for m in i.iter_markers("image")}
    tracking_uri = None
    if "model" in keys:  # MLflow's image bakes the production model in
        tracking_uri = request.getfixturevalue("tracking_server").uri
        request.getfixturevalue("registered_model")
    images = Images(tmp_path_factory.mktemp("docker"))
    start_session_builds(images, keys, tracking_uri)
    yield images
    lines = images.cleanup()
    text = "\n".join([f"container images (built in parallel, {time.monotonic() - t0:.0f} s "
                      "from the first build to their removal):", *("  " + x for x in lines)])
    if hasattr(request.config, "workeroutput"):  # an xdist worker: the controller prints it
        request.config.workeroutput["container_images"] = text
        return
    report = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if report is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            report.write_line("\n" + text)


@pytest.fixture(scope="session", autouse=True)
def _container_builds_from_the_start(request):
    """In one process (no xdist), start the container tests' builds with the session, so
    they overlap the other test files; under xdist, their worker starts them with the file
    (the other workers run the other files meanwhile)."""
    if not hasattr(request.config, "workerinput") and _container_items(request.session):
        request.getfixturevalue("container_images")


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist: print the container images' report of the worker that built them."""
    text = getattr(node, "workeroutput", {}).get("container_images")
    report = node.config.pluginmanager.get_plugin("terminalreporter")
    if text and report is not None:
        report.write_line("\n" + text)


@pytest.fixture(scope="session")
def tiny_model():
    """A tiny real RideDurationModel (duration = 5 + 4 * distance), fitted in milliseconds: for
    tests of the code around a model, not of the model."""
    import pandas as pd
    from sklearn.linear_model import LinearRegression

    from train import fit_model

    rows = [(130, 205, 1.0), (130, 205, 3.0), (43, 151, 2.0), (43, 151, 5.0), (1, 2, 0.5)]
    df = pd.DataFrame(rows, columns=["PULocationID", "DOLocationID", "trip_distance"])
    df["duration"] = 5 + 4 * df["trip_distance"]
    return fit_model(df, LinearRegression())


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tmp_path_factory) -> Path:
    """``tiny_model`` saved as an MLflow model folder, as train.py logs models."""
    import mlflow

    from train import model_files

    d = tmp_path_factory.mktemp("tiny-model")
    example = [{"PULocationID": 43, "DOLocationID": 151, "trip_distance": 2.0}]
    mlflow.pyfunc.save_model(d / "model", **model_files(tiny_model, d / "files", example))
    return d / "model"
