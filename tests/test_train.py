"""Training, registry and promotion against a real tracking server; MLflow-native serving."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
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
from serve.features import RIDE_COLUMNS
from serve.tlc import read_training_frame

ROOT = Path(__file__).resolve().parents[1]
RIDES = [{"PULocationID": 43, "DOLocationID": 151, "trip_distance": 1.8},
         {"PULocationID": 74, "DOLocationID": 75, "trip_distance": 0.9},
         {"PULocationID": 7, "DOLocationID": 260, "trip_distance": 11.5}]

pytestmark = pytest.mark.integration


def client_env(**extra: str) -> dict[str, str]:
    """This process's environment minus the experiment in-process runs selected."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")}
    return {**env, **extra}


def test_production_loads_by_alias_and_by_stage(registered_model, months):
    by_alias = mlflow.pyfunc.load_model("models:/duration@production")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        by_stage = mlflow.pyfunc.load_model("models:/duration/Production")
    df = pd.DataFrame(RIDES)
    np.testing.assert_array_equal(by_alias.predict(df), by_stage.predict(df))
    assert by_alias.metadata.get_input_schema().input_names() == list(RIDE_COLUMNS)
    run = MlflowClient().get_run(registered_model["run_id"])
    for key in ("train_rmse", "train_mae", "val_rmse", "val_mae", "train_rows", "val_rows"):
        assert key in run.data.metrics, key
    assert run.data.params["model"] == "lr"
    assert run.data.metrics["val_rmse"] == pytest.approx(registered_model["val_rmse"])


def test_model_loads_in_a_fresh_process_outside_the_repo(registered_model, tracking_server,
                                                         tmp_path):
    code = ("import mlflow, pandas as pd, json, sys; "
            "m = mlflow.pyfunc.load_model('models:/duration@production'); "
            f"print(json.dumps(m.predict(pd.DataFrame({RIDES!r})).tolist()))")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path),
           "MLFLOW_TRACKING_URI": tracking_server.uri}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True, timeout=120)
    preds = [float(x) for x in out.stdout.strip().splitlines()[-1].strip("[]").split(",")]
    local = mlflow.pyfunc.load_model("models:/duration@production").predict(pd.DataFrame(RIDES))
    np.testing.assert_allclose(preds, local, rtol=0, atol=1e-12)


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


@pytest.mark.parametrize(("form", "body"), _bodies(), ids=[b[0] for b in _bodies()])
def test_mlflow_models_serve_answers_every_form(served, form, body):
    local = mlflow.pyfunc.load_model(next(iter(served))).predict(pd.DataFrame(RIDES)).tolist()
    for url in served.values():
        if form == "csv":
            resp = requests.post(f"{url}/invocations", data=body,
                                 headers={"Content-Type": "text/csv"}, timeout=30)
        else:
            resp = requests.post(f"{url}/invocations", json=body, timeout=30)
        assert resp.status_code == 200, resp.text
        np.testing.assert_allclose(resp.json()["predictions"], local, rtol=0, atol=1e-12)


def test_mlflow_models_serve_rejects_a_ride_without_a_field(served):
    for url in served.values():
        ride = {"PULocationID": 43, "trip_distance": 1.8}
        resp = requests.post(f"{url}/invocations", json={"dataframe_records": [ride]}, timeout=30)
        assert 400 <= resp.status_code < 500
        assert "DOLocationID" in resp.json()["message"]


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
