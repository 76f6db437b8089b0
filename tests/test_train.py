"""Training, registry and promotion against a real tracking server; MLflow-native serving."""

from __future__ import annotations

import functools
import http.server
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

import train
from ops.procs import free_port, http_ok, start, stop, wait_for
from serve.features import RIDE_COLUMNS, validate_rides
from serve.registry import experiment_id, load_model
from serve.tlc import read_training_frame

ROOT = Path(__file__).resolve().parents[1]
RIDES = [{"PULocationID": 43, "DOLocationID": 151, "trip_distance": 1.8},
         {"PULocationID": 74, "DOLocationID": 75, "trip_distance": 0.9},
         {"PULocationID": 7, "DOLocationID": 260, "trip_distance": 11.5}]
# A version logged by train.py before models from code (cloudpickled RideDurationModel), with
# the predictions it made then: see tests/fixtures/cloudpickled_model/README.md.
LEGACY = ROOT / "tests" / "fixtures" / "cloudpickled_model"
# What a user reads as a warning: logging's "WARNING" and Python's "<Category>Warning: ...".
WARNING_LINE = re.compile(r"\bWARNING\b|\w*Warning: ")

pytestmark = pytest.mark.integration


def client_env(**extra: str) -> dict[str, str]:
    """This process's environment minus the experiment in-process runs selected."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")}
    return {**env, **extra}


def warning_lines(output: str) -> list[str]:
    """The lines of a command's output that a user would read as a warning."""
    return [line for line in output.splitlines() if WARNING_LINE.search(line)]


def predict_in_fresh_process(uri: str, tracking_uri: str, folder: Path,
                             rides: list[dict] = RIDES) -> list[float]:
    """Predictions for ``rides`` from a new interpreter in ``folder`` (outside the repository,
    so the model's own code is what gets imported), with nothing but PATH, HOME and the URI."""
    code = ("import mlflow, pandas as pd, json, sys; "
            f"m = mlflow.pyfunc.load_model({uri!r}); "
            f"print(json.dumps(m.predict(pd.DataFrame({rides!r})).tolist()))")
    env = {"PATH": os.environ["PATH"], "HOME": str(folder), "MLFLOW_TRACKING_URI": tracking_uri}
    out = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, check=True,
                         capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_production_loads_by_alias_and_by_stage(registered_model, months):
    by_alias = mlflow.pyfunc.load_model("models:/duration@production")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        by_stage = mlflow.pyfunc.load_model("models:/duration/Production")
    df = pd.DataFrame(RIDES)
    np.testing.assert_array_equal(by_alias.predict(df), by_stage.predict(df))
    assert by_alias.metadata.get_input_schema().input_names() == list(RIDE_COLUMNS)
    # Logged from code: the model file plus its state as artifacts, nothing pickled.
    flavor = by_alias.metadata.flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert set(flavor["artifacts"]) == {"vectorizer", "estimator"}
    assert by_alias.metadata.saved_input_example_info["type"] == "dataframe"
    model = by_alias.unwrap_python_model()
    assert model.estimator.n_jobs == 1  # the served estimator never starts threads
    np.testing.assert_array_equal(model.predict_rides(validate_rides(df)), by_alias.predict(df))
    run = MlflowClient().get_run(registered_model["run_id"])
    for key in ("train_rmse", "train_mae", "val_rmse", "val_mae", "train_rows", "val_rows"):
        assert key in run.data.metrics, key
    assert run.data.params["model"] == "lr"
    assert run.data.metrics["val_rmse"] == pytest.approx(registered_model["val_rmse"])


def test_model_loads_in_a_fresh_process_outside_the_repo(registered_model, tracking_server,
                                                         tmp_path):
    preds = predict_in_fresh_process("models:/duration@production", tracking_server.uri,
                                     tmp_path)
    local = mlflow.pyfunc.load_model("models:/duration@production").predict(pd.DataFrame(RIDES))
    np.testing.assert_allclose(preds, local, rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def legacy_version(tracking_server) -> dict:
    """The committed cloudpickled version, registered as version 1 of ``duration-legacy``."""
    expected = json.loads((LEGACY / "expected.json").read_text())
    with mlflow.start_run(experiment_id=experiment_id("duration-legacy")) as run:
        mlflow.log_artifacts(str(LEGACY / "model"), "model")
    mv = mlflow.register_model(f"runs:/{run.info.run_id}/model", "duration-legacy")
    return {"uri": f"models:/duration-legacy/{mv.version}", **expected}


def test_a_version_logged_before_models_from_code_loads_and_predicts_the_same(legacy_version):
    loaded = load_model(legacy_version["uri"])  # what web, batch and stream do
    flavor = loaded.pyfunc.metadata.flavors["python_function"]
    assert flavor["python_model"] == "python_model.pkl" and "artifacts" not in flavor
    rides = pd.DataFrame(legacy_version["rides"])
    expected = legacy_version["predictions"]
    np.testing.assert_allclose(loaded.pyfunc.predict(rides), expected, rtol=0, atol=1e-12)
    fast = loaded.python_model.predict_rides(validate_rides(rides))  # the pandas-free path
    np.testing.assert_allclose(fast, expected, rtol=0, atol=1e-12)
    assert loaded.python_model.estimator.n_jobs == 1


def test_a_version_logged_before_models_from_code_loads_in_a_fresh_process(
        legacy_version, tracking_server, tmp_path):
    preds = predict_in_fresh_process(legacy_version["uri"], tracking_server.uri, tmp_path,
                                     legacy_version["rides"])
    np.testing.assert_allclose(preds, legacy_version["predictions"], rtol=0, atol=1e-12)


def test_training_emits_no_warning(tracking_server, months, tmp_path):
    """Two normal runs (the second loads the champion to compare): every Python warning is an
    error and nothing reaches MLflow's loggers at WARNING."""
    records: list[logging.LogRecord] = []
    watcher = logging.Handler(logging.WARNING)
    watcher.emit = records.append
    mlflow_logger = logging.getLogger("mlflow")
    mlflow_logger.addHandler(watcher)
    try:
        # The watcher sees the warning the code path before models from code caused.
        small = read_training_frame(str(months.val)).head(500)
        fitted = train.fit_model(small, train.build_estimator("lr", 0, 0, 0))
        mlflow.pyfunc.save_model(tmp_path / "pickled", python_model=fitted)
        assert any("CloudPickle" in r.getMessage() for r in records)
        records.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            first = train.run_training(str(months.train), str(months.val), train_rows=2000,
                                       registered_model="duration-quiet")
            second = train.run_training(str(months.train), str(months.val),
                                        registered_model="duration-quiet")
    finally:
        mlflow_logger.removeHandler(watcher)
    assert [f"{r.name}: {r.getMessage()}" for r in records] == []
    assert first["promoted"] and second["promoted"] and second["version"] == "2"


def test_promotion_gate(tracking_server, months):
    name = "duration-gate"
    client = MlflowClient()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # promotion must not emit stage warnings
        first = train.run_training(str(months.train), str(months.val), train_rows=300,
                                   registered_model=name)
        better = train.run_training(str(months.train), str(months.val), registered_model=name)
        worse = train.run_training(str(months.train), str(months.val), train_rows=300, seed=1,
                                   registered_model=name)
    assert first["promoted"] and first["reason"] == "first production version"
    assert better["promoted"] and better["val_rmse"] < first["val_rmse"]
    assert not worse["promoted"] and "does not beat version" in worse["reason"]
    assert client.get_model_version_by_alias(name, "production").version == better["version"]
    versions = {v.version: v for v in client.search_model_versions(f"name='{name}'")}
    assert versions[better["version"]].current_stage == "Production"
    assert versions[first["version"]].current_stage == "Archived"
    assert versions[worse["version"]].current_stage == "None"
    assert versions[worse["version"]].tags["promotion"] == "rejected"
    assert versions[worse["version"]].tags["promotion_reason"] == worse["reason"]
    assert versions[better["version"]].tags["promotion"] == "promoted"


@pytest.fixture(scope="module")
def mlflow_run_model(tracking_server, months):
    """`mlflow run . --env-manager local` as a user runs it, registering `duration-cli`."""
    name = "duration-cli"
    res = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local",
         "--experiment-name", "duration-cli", "-P", f"train={months.train}",
         "-P", f"val={months.val}", "-P", f"test={months.test}", "-P", f"registered_model={name}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=client_env(MLFLOW_TRACKING_URI=tracking_server.uri))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "promoted (first production version)" in res.stdout
    assert warning_lines(res.stdout + res.stderr) == []
    return name


def test_mlflow_run_logs_into_the_run_it_was_given(mlflow_run_model):
    client = MlflowClient()
    exp = client.get_experiment_by_name("duration-cli")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1  # train.py used the run `mlflow run` created, no second experiment
    assert runs[0].data.tags["mlflow.project.entryPoint"] == "main"
    assert {"val_rmse", "test_rmse", "test_rows"} <= set(runs[0].data.metrics)


@pytest.fixture(scope="module")
def served(mlflow_run_model, tracking_server, tmp_path_factory):
    """`mlflow models serve` on the alias and on the stage, started side by side."""
    logs = tmp_path_factory.mktemp("serve")
    procs, urls = [], {}
    for uri in (f"models:/{mlflow_run_model}@production", f"models:/{mlflow_run_model}/Production"):
        port = free_port()
        procs.append(start([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri,
                            "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                           logs / f"{port}.log", env=dict(os.environ)))
        urls[uri] = f"http://127.0.0.1:{port}"
    try:
        for proc, url in zip(procs, urls.values(), strict=True):
            wait_for(http_ok(f"{url}/ping"), f"mlflow models serve {url}", timeout=180, proc=proc)
        yield urls
    finally:
        for proc in procs:
            stop(proc.pid)


def _bodies() -> list[tuple[str, str | dict]]:
    cols = list(RIDE_COLUMNS)
    return [
        ("dataframe_records", {"dataframe_records": RIDES}),
        ("dataframe_split", {"dataframe_split": {"columns": cols,
                                                 "data": [[r[c] for c in cols] for r in RIDES]}}),
        ("instances", {"instances": RIDES}),
        ("inputs", {"inputs": RIDES}),
        ("csv", "PULocationID,DOLocationID,trip_distance\n"
                + "".join(f"{r['PULocationID']},{r['DOLocationID']},{r['trip_distance']}\n"
                          for r in RIDES)),
    ]


@pytest.fixture(params=["local", "built"])
def scoring_servers(request) -> dict[str, str]:
    """model URI -> URL of `mlflow models serve` processes: with `--env-manager local` (the
    model of `mlflow run`), or in environments MLflow built (`models:/duration/Production`)."""
    if request.param == "local":
        return request.getfixturevalue("served")
    urls = request.getfixturevalue("served_in_envs")["urls"]
    return {f"models:/duration/Production ({manager})": url for manager, url in urls.items()}


@pytest.mark.parametrize(("form", "body"), _bodies(), ids=[b[0] for b in _bodies()])
def test_mlflow_models_serve_answers_every_form(scoring_servers, form, body):
    uri = next(iter(scoring_servers)).split(" ")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # stage URIs
        local = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame(RIDES)).tolist()
    for url in scoring_servers.values():
        if form == "csv":
            resp = requests.post(f"{url}/invocations", data=body,
                                 headers={"Content-Type": "text/csv"}, timeout=30)
        else:
            resp = requests.post(f"{url}/invocations", json=body, timeout=30)
        assert resp.status_code == 200, resp.text
        np.testing.assert_allclose(resp.json()["predictions"], local, rtol=0, atol=1e-12)


def test_mlflow_models_serve_rejects_a_ride_without_a_field(scoring_servers):
    for url in scoring_servers.values():
        ride = {"PULocationID": 43, "trip_distance": 1.8}
        resp = requests.post(f"{url}/invocations", json={"dataframe_records": [ride]}, timeout=30)
        assert 400 <= resp.status_code < 500
        assert "DOLocationID" in resp.json()["message"]


@pytest.fixture(scope="module")
def mlflow_run_uv(tracking_server, months, tmp_path_factory):
    """`mlflow run . --env-manager uv` on a machine without conda: MLflow builds the project's
    environment from conda.yaml's pip list with uv (packages from uv's cache) in a fresh env
    root, and train.py runs in it."""
    name = "duration-uv"
    env_root = tmp_path_factory.mktemp("uv-run-envs")
    res = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "uv",
         "--experiment-name", name, "-P", f"train={months.train}", "-P", f"val={months.val}",
         "-P", f"registered_model={name}"],
        cwd=ROOT, capture_output=True, text=True, timeout=500,
        env=client_env(MLFLOW_TRACKING_URI=tracking_server.uri, MLFLOW_ENV_ROOT=str(env_root)))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return {"name": name, "env_root": env_root, "output": res.stdout + res.stderr,
            "stdout": res.stdout}


def test_mlflow_run_with_uv_trains_in_its_own_environment(mlflow_run_uv, mlflow_run_model):
    out = mlflow_run_uv["output"]
    assert "promoted (first production version)" in mlflow_run_uv["stdout"]
    assert warning_lines(out) == []
    envs = [p for p in mlflow_run_uv["env_root"].iterdir() if (p / "bin" / "python").exists()]
    assert len(envs) == 1 and f"source {envs[0]}/bin/activate && python train.py" in out
    client = MlflowClient()
    exp = client.get_experiment_by_name(mlflow_run_uv["name"])
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["mlflow.project.env"] == "uv"
    # Same data, same estimator as the --env-manager local run: the same model.
    local = client.search_runs([client.get_experiment_by_name("duration-cli").experiment_id])[0]
    assert run.data.metrics["val_rmse"] == pytest.approx(local.data.metrics["val_rmse"],
                                                         rel=1e-9)
    assert client.get_model_version_by_alias(mlflow_run_uv["name"], "production").version == "1"


@pytest.fixture(scope="module")
def served_in_envs(registered_model, tracking_server, tmp_path_factory):
    """`mlflow models serve -m models:/duration/Production` with MLflow's default env manager
    (virtualenv: pyenv for the model's Python, then pip) and with `--env-manager uv`, each
    building the model's environment in its own fresh root; started side by side."""
    if shutil.which("pyenv") is None:  # the default env manager cannot work without it
        pytest.skip("MLflow's default env manager (virtualenv) needs pyenv on PATH")
    work = tmp_path_factory.mktemp("serve-envs")
    managers = {"default": [], "uv": ["--env-manager", "uv"]}
    urls, procs = {}, []
    for manager, option in managers.items():
        port = free_port()
        cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m",
               "models:/duration/Production", "-h", "127.0.0.1", "-p", str(port), *option]
        env = client_env(MLFLOW_ENV_ROOT=str(work / f"{manager}-envs"))
        procs.append(start(cmd, work / f"{manager}.log", env=env))
        urls[manager] = f"http://127.0.0.1:{port}"
    try:
        # One bound for both (building the environment with pip took 92 s here).
        deadline = time.monotonic() + 480
        for proc, (manager, url) in zip(procs, urls.items(), strict=True):
            wait_for(http_ok(f"{url}/ping"), f"mlflow models serve ({manager})",
                     timeout=max(1.0, deadline - time.monotonic()), proc=proc)
        yield {"urls": urls, "work": work}
    finally:
        for proc in procs:
            stop(proc.pid)


def test_mlflow_models_serve_builds_the_model_environment(served_in_envs):
    work = served_in_envs["work"]
    logs = {m: (work / f"{m}.log").read_text(errors="replace") for m in served_in_envs["urls"]}
    for manager, log in logs.items():
        root = work / f"{manager}-envs"
        assert f"Creating a new environment in {root}/" in log, log[-3000:]
        (env,) = root.iterdir()
        assert (env / "bin" / "python").exists()
    # virtualenv: the model's Python from pyenv, then pip; uv: uv for both.
    assert "Installing python 3." in logs["default"] and "using uv" not in logs["default"]
    assert "using uv" in logs["uv"]


@pytest.fixture
def http_file_server(months):
    """A local HTTP server for the data folder: stands in for the public TLC URLs."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(months.train.parent))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_training_months_read_from_local_s3_and_https_alike(months, moto, http_file_server,
                                                            monkeypatch, tmp_path):
    for key, value in moto.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DURATION_CACHE", str(tmp_path / "cache"))
    s3 = moto.client("s3")
    s3.create_bucket(Bucket="tlc-months")
    s3.upload_file(str(months.val), "tlc-months", f"trip-data/{months.val.name}")
    local = read_training_frame(str(months.val))
    via_s3 = read_training_frame(f"s3://tlc-months/trip-data/{months.val.name}")
    via_https = read_training_frame(f"{http_file_server}/{months.val.name}")
    pd.testing.assert_frame_equal(local, via_s3)
    pd.testing.assert_frame_equal(local, via_https)


def test_train_cli_reads_urls_and_reports_the_gate(tracking_server, months, http_file_server,
                                                    monkeypatch, tmp_path):
    monkeypatch.setenv("DURATION_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(train.main, [
        "--train", f"{http_file_server}/{months.train.name}", "--val", str(months.val),
        "--train-rows", "2000", "--registered-model", "duration-cli-url"])
    assert res.exit_code == 0, res.output
    assert "version 1 val_rmse=" in res.output
    assert "promoted (first production version)" in res.output


def test_two_tracking_servers_in_one_process(tracking_server, months, tmp_path, monkeypatch):
    """Training leaves no experiment id in the environment (subprocesses inherit it), and a
    second tracking server in the same process gets its own experiment."""
    from tests.conftest import start_tracking_server

    train.run_training(str(months.val), str(months.val), train_rows=500,
                       registered_model="duration-two-servers")
    other = start_tracking_server(tmp_path / "other")
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", other.uri)
        summary = train.run_training(str(months.val), str(months.val), train_rows=500,
                                     registered_model="duration-two-servers")
        assert summary["version"] == "1" and summary["promoted"]
        assert "MLFLOW_EXPERIMENT_ID" not in os.environ
    finally:
        mlflow.set_tracking_uri(tracking_server.uri)
        stop(other.proc.pid)


@pytest.fixture
def broken_http_server():
    """Serves ``/cut.parquet`` announcing 1 MB and closing after 1 kB; 404 for the rest."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server name)
            if self.path != "/cut.parquet":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 20))
            self.end_headers()
            self.wfile.write(b"PAR1" + b"x" * 1020)
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_failed_downloads_leave_nothing_in_the_cache(broken_http_server, months,
                                                     http_file_server, tmp_path):
    from serve.errors import InvalidInput
    from serve.tlc import download

    cache = tmp_path / "cache"
    with pytest.raises(requests.exceptions.RequestException):
        download(f"{broken_http_server}/cut.parquet", cache)  # connection closed mid-body
    assert list(cache.iterdir()) == []
    with pytest.raises(InvalidInput, match="HTTP 404"):
        download(f"{broken_http_server}/missing.parquet", cache)
    assert list(cache.iterdir()) == []
    # A complete download is the only file left, readable like any cached month.
    done = download(f"{http_file_server}/{months.val.name}", cache)
    assert list(cache.iterdir()) == [done]
    assert done.read_bytes() == months.val.read_bytes()
    assert done.stat().st_mode & 0o777 == 0o644


def test_latest_resolves_to_the_highest_version(registered_model, tracking_server):
    """Three versions of a model of its own (no other test moves them): the highest is
    neither the one in a stage nor the one an alias points at, nor the first."""
    from serve.registry import resolve_model

    client = MlflowClient()
    source = client.get_model_version("duration", registered_model["version"])
    name = "duration-latest-test"
    for _ in range(3):  # the same logged model, registered three times
        mlflow.register_model(source.source, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        client.transition_model_version_stage(name, "2", "Production")
    client.set_registered_model_alias(name, "production", "1")
    for uri in (f"models:/{name}/latest", f"models:/{name}/Latest"):
        ref = resolve_model(uri)
        assert ref.version == "3"
        assert ref.pinned_uri == f"models:/{name}/3"
        assert ref.run_id == source.run_id
    assert resolve_model(f"models:/{name}/Production").version == "2"
    assert resolve_model(f"models:/{name}@production").version == "1"
