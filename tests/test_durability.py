"""Nothing lost (issue 13): the local production stack keeps models across ``down``/``up``, a
200 MB artifact goes up and down through the proxy into the local S3, backups restore onto a
fresh machine, a tracking server killed mid-upload registers no incomplete version, and a
production version whose artifacts are gone is reported and loses the promotion gate instead
of crashing training.

One production stack for the module (tests/stack_helpers.py: own STACK_HOME, role, database,
bucket, ports), driven through ``ops/stack`` as a user would; clients hold no S3 credentials.
The PostgreSQL restart fault is in test_pg_restart.py (it needs a private cluster).
Each test prints what it measured (``pytest -s`` shows it).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stack_helpers import RIDE, Stack, mlflow_run, months, ok, stack_env

from ops.procs import free_port, wait_for
from ops.stackctl.integrity import artifact_problem

pytestmark = pytest.mark.integration
MB = 1 << 20


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("durable")
    # TMPDIR: where the tracking server spools an upload before it goes to S3 (the SIGKILL
    # test watches it to kill the server mid-upload).
    s = Stack(home / "stack", stack_env(home, TMPDIR=str(home / "servertmp")))
    (home / "servertmp").mkdir()
    s.env["DURABLE_PORT"] = str(free_port())
    try:
        ok(s.cli("up", "--mode", "production", "--port", s.env["DURABLE_PORT"]))
        yield s
    finally:
        s.drop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return months(tmp_path_factory.mktemp("durable-data"))


@pytest.fixture
def client_only(stack, monkeypatch):
    """This process as a client of the stack: its tracking URI, no S3 credentials."""
    import mlflow

    for key in list(os.environ):
        if key.startswith("AWS_") or key == "MLFLOW_S3_ENDPOINT_URL":
            monkeypatch.delenv(key)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(stack.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.uri)
    yield mlflow.MlflowClient(stack.uri)
    mlflow.set_tracking_uri(previous)


def _predict(version_uri: str) -> float:
    import mlflow
    import pandas as pd

    return float(mlflow.pyfunc.load_model(version_uri).predict(pd.DataFrame([RIDE]))[0])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MB):
            digest.update(chunk)
    return digest.hexdigest()


def _random_file(path: Path, size_mb: int) -> str:
    with open(path, "wb") as f:
        for _ in range(size_mb):
            f.write(os.urandom(MB))
    return _sha256(path)


def test_up_train_down_up_train_and_both_versions_load(stack, data, client_only):
    """Issue 13's transcript: with moto_server as S3, the second training crashed in the
    promotion gate (no MLmodel: `down` had thrown every artifact away)."""
    first = mlflow_run(stack, *data)
    assert first["promoted"], first["line"]
    assert "stopped: mlflow, s3" in ok(stack.cli("down")).stdout
    on_disk = [p for p in (stack.home / "s3" / stack.bucket).rglob("MLmodel")]
    assert len(on_disk) == 1, on_disk  # the objects are files while nothing runs
    ok(stack.cli("up", "--mode", "production", "--port", stack.env["DURABLE_PORT"]))
    second = mlflow_run(stack, *data)
    assert second["version"] == str(int(first["version"]) + 1), second["line"]
    for version in (first["version"], second["version"]):
        assert 1 <= _predict(f"models:/duration/{version}") <= 60
    alias = client_only.get_model_version_by_alias("duration", "production").version
    assert alias == (second if second["promoted"] else first)["version"]
    status = ok(stack.cli("status")).stdout
    assert "registry: 1 version(s) behind aliases or stage Production, all readable" in status


def test_backup_and_restore_onto_a_fresh_machine(stack, client_only, tmp_path):
    """``ops/stack backup`` then ``restore`` into another STACK_HOME, role, database and
    bucket (what a fresh machine has): every version loads and the alias is where it was."""
    import mlflow

    t0 = time.monotonic()
    res = ok(stack.cli("backup", str(tmp_path / "backup")))
    backup_s = time.monotonic() - t0
    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    versions = client_only.search_model_versions("name='duration'")
    assert manifest["mode"] == "production" and manifest["versions"] == len(versions) >= 2
    production = client_only.get_model_version_by_alias("duration", "production").version
    assert ["duration", "production", int(production)] in manifest["aliases"]
    assert f"duration@production={production}" in res.stdout
    expected = {v.version: _predict(f"models:/duration/{v.version}") for v in versions}

    fresh = Stack(tmp_path / "fresh" / "stack", stack_env(tmp_path / "fresh"))
    try:
        t0 = time.monotonic()
        restored = ok(fresh.cli("restore", str(tmp_path / "backup")))
        restore_s = time.monotonic() - t0
        assert f"duration@production={production}" in restored.stdout, restored.stdout
        ok(fresh.cli("up", "--mode", "production", "--port", str(free_port())))
        mlflow.set_tracking_uri(fresh.uri)
        client = mlflow.MlflowClient(fresh.uri)
        assert client.get_model_version_by_alias("duration", "production").version == production
        for version, prediction in expected.items():
            assert _predict(f"models:/duration/{version}") == prediction
        assert "all readable" in ok(fresh.cli("status")).stdout
        again = fresh.cli("restore", str(tmp_path / "backup"))  # never over a live server
        assert again.returncode != 0 and "mlflow is running" in again.stderr
        print(f"\nbackup {backup_s:.1f} s ({manifest['objects']} objects, "
              f"{manifest['bytes'] / 1e6:.2f} MB), restore {restore_s:.1f} s, "
              f"{len(expected)} versions load, alias production={production}")
    finally:
        mlflow.set_tracking_uri(stack.uri)
        fresh.drop()


def test_a_200_mb_artifact_goes_up_and_down_through_the_proxy(stack, client_only, tmp_path,
                                                              monkeypatch):
    """Through the tracking server (the client holds no S3 credentials) into the local S3
    server, which stores it with multipart upload; then again with MLflow's presigned
    multipart upload (MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD: parts go straight to the S3
    endpoint on presigned URLs)."""
    import mlflow

    blob = tmp_path / "blob.bin"
    digest = _random_file(blob, 200)
    experiment = client_only.create_experiment(f"big-{os.getpid()}-{time.time_ns()}")
    with mlflow.start_run(experiment_id=experiment) as run:
        t0 = time.monotonic()
        mlflow.log_artifact(str(blob), "proxied")
        up_s = time.monotonic() - t0
        monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "true")
        monkeypatch.setenv("MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE", str(MB))
        t0 = time.monotonic()
        mlflow.log_artifact(str(blob), "presigned")
        presigned_s = time.monotonic() - t0
    blob.unlink()
    stored = {o["Key"]: o["Size"] for o in stack.s3().list_objects_v2(
        Bucket=stack.bucket, Prefix=f"mlartifacts/{experiment}/")["Contents"]}
    assert sorted(stored.values()) == [200 * MB, 200 * MB], stored
    for path in ("proxied", "presigned"):
        t0 = time.monotonic()
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                    artifact_path=f"{path}/blob.bin",
                                                    dst_path=str(tmp_path / path))
        down_s = time.monotonic() - t0
        assert _sha256(Path(local)) == digest
        Path(local).unlink()
        print(f"\n200 MB {path}: up {up_s if path == 'proxied' else presigned_s:.1f} s, "
              f"down {down_s:.1f} s, sha256 equal")
    for key in stored:  # keep later backups small
        stack.s3().delete_object(Bucket=stack.bucket, Key=key)


UPLOADER = """
import sys, mlflow

class Blob(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return [len(model_input)]

mlflow.set_experiment("killed-upload")
with mlflow.start_run():
    info = mlflow.pyfunc.log_model(name="model", python_model=Blob(),
                                   artifacts={"blob": sys.argv[1]},
                                   registered_model_name=sys.argv[2])
print("registered version", info.registered_model_version)
"""


def _kill_server_mid_upload(stack: Stack, script: Path, blob: Path, name: str,
                            **client_env: str) -> tuple[subprocess.Popen, float]:
    """Start a client logging a model with ``blob`` inside; SIGKILL the tracking server (its
    whole process group) while it is receiving ``blob`` (its spool file exists, so the model's
    top-level files are uploaded and the rest are not); returns the client and the time."""
    spool = Path(stack.env["TMPDIR"])
    client = subprocess.Popen([sys.executable, str(script), str(blob), name],
                              env={**stack.client_env(), **client_env}, cwd=blob.parent,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: any(spool.rglob(blob.name)), f"{blob.name} to reach the server",
             timeout=180, interval=0.005, proc=client)
    os.killpg(os.getpgid(stack.pid("mlflow")), signal.SIGKILL)
    return client, time.monotonic()


def test_tracking_server_killed_during_a_model_upload(stack, client_only, tmp_path):
    """SIGKILL mid-upload: a client that gives up registers nothing; a client still
    retrying when the server is back completes the upload (the file is sent again whole)
    and its version loads with every byte. No version points at incomplete artifacts."""
    script = tmp_path / "upload.py"
    script.write_text(UPLOADER)
    blob = tmp_path / "blob.bin"
    digest = _random_file(blob, 100)
    port = stack.env["DURABLE_PORT"]

    # 1. A client without retries: the upload fails, no version is registered.
    client, _ = _kill_server_mid_upload(stack, script, blob, "killed-gave-up",
                                        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    out = client.communicate(timeout=120)[0]
    assert client.returncode != 0 and "registered version" not in out, out[-2000:]
    t0 = time.monotonic()
    ok(stack.cli("up", "--port", port))  # as it was (production), the port it had
    restart_s = time.monotonic() - t0
    assert client_only.search_model_versions("name='killed-gave-up'") == []

    # 2. A client that keeps retrying (backoff 1 s, MLflow's default is 2 s): it completes.
    client, killed_at = _kill_server_mid_upload(stack, script, blob, "killed-retried",
                                                MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    ok(stack.cli("up", "--port", port))
    server_back_s = time.monotonic() - killed_at
    out = client.communicate(timeout=300)[0]
    client_done_s = time.monotonic() - killed_at
    assert client.returncode == 0 and "registered version 1" in out, out[-2000:]
    versions = client_only.search_model_versions("name LIKE 'killed-%'")
    assert [v.name for v in versions] == ["killed-retried"]
    assert artifact_problem(client_only, "killed-retried", "1") is None
    import mlflow

    model = mlflow.pyfunc.load_model("models:/killed-retried/1")
    assert _sha256(_blob_of(model)) == digest  # every byte, sent again whole
    print(f"\nserver restart {restart_s:.1f} s; killed mid-upload -> server back "
          f"{server_back_s:.1f} s -> client's upload complete and registered {client_done_s:.1f} s")


def _blob_of(model) -> Path:
    """The local copy of the ``blob`` artifact a loaded pyfunc model was given."""
    return Path(model._model_impl.context.artifacts["blob"])


def test_a_production_version_whose_artifacts_are_gone_is_reported_and_loses(stack, data,
                                                                             client_only):
    """What moto_server's lost objects did: ``status`` and ``up`` name the version in one
    line; training promotes the new version, tags the old one, and finishes."""
    production = client_only.get_model_version_by_alias("duration", "production").version
    location = client_only.get_model_version_download_uri("duration", production)
    prefix = "mlartifacts/" + location.split("mlflow-artifacts:/", 1)[1].strip("/") + "/"
    stack.s3().delete_object(Bucket=stack.bucket, Key=prefix + "python_model.pkl")

    status = stack.cli("status")
    assert status.returncode == 1
    bad = [ln for ln in status.stdout.splitlines() if "artifacts NOT readable" in ln]
    assert bad == [f"registry: duration version {production} (@production, stage Production): "
                   f"artifacts NOT readable: missing python_model.pkl at {location}"], status.stdout
    ok(stack.cli("down", "-c", "mlflow"))
    up = ok(stack.cli("up"))
    assert bad[0].split("registry: ", 1)[1] in up.stderr, up.stderr

    from train import run_training

    run = run_training(str(data[0]), str(data[1]))  # in-process: the gate used to crash here
    assert run["promoted"], run
    assert run["reason"].startswith(f"production version {production} cannot be loaded"), run
    old = client_only.get_model_version("duration", production).tags
    assert old["integrity"] == "unreadable"
    assert f"replaced by version {run['version']}" in old["demotion_reason"]
    assert client_only.get_run(run["run_id"]).info.status == "FINISHED"
    assert client_only.get_model_version_by_alias("duration", "production").version == \
        run["version"]
    assert ok(stack.cli("status")).returncode == 0


def test_a_new_version_that_cannot_be_loaded_back_is_never_promoted(stack, data, client_only):
    """The gate loads the candidate through the registry before promoting it: a version
    whose artifacts are incomplete is rejected and tagged, and the alias stays. (Last: the
    two versions of this model share the files it breaks.)"""
    import secrets

    from serve.tlc import read_training_frame
    from train import promote_if_better, run_training

    name = f"gate-{secrets.token_hex(4)}"
    first = run_training(str(data[0]), str(data[1]), registered_model=name)
    assert first["promoted"]
    v1 = client_only.get_model_version(name, first["version"])
    model_id = v1.source.rsplit("/", 1)[-1]  # models:/m-...: MLflow 3's logged model
    v2 = client_only.create_model_version(name, source=v1.source, run_id=v1.run_id,
                                          model_id=model_id)  # the same files as version 1
    location = client_only.get_model_version_download_uri(name, v2.version)
    prefix = "mlartifacts/" + location.split("mlflow-artifacts:/", 1)[1].strip("/") + "/"
    stack.s3().delete_object(Bucket=stack.bucket, Key=prefix + "python_model.pkl")

    val_df = read_training_frame(str(data[1]))
    decision = promote_if_better(client_only, name, v2.version, first["val_rmse"], val_df)
    assert not decision.promoted
    assert decision.reason.startswith(f"version {v2.version} cannot be loaded back"), decision
    tags = client_only.get_model_version(name, v2.version).tags
    assert tags["promotion"] == "rejected" and tags["integrity"] == "unreadable"
    assert client_only.get_model_version_by_alias(name, "production").version == \
        first["version"]
