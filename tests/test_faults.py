"""Faults (issue 13), each with real processes: the tracking server SIGKILLed during a model
upload registers no incomplete version; a production version whose artifacts are gone is
reported by ``status``/``up`` and loses the promotion gate instead of crashing training; a
new version that cannot be loaded back is never promoted.

One production stack for the module (tests/stack_helpers.py), driven through ``ops/stack``;
clients hold no S3 credentials. Each test prints what it measured (``pytest -s``).
PostgreSQL restarts are in test_pg_restart.py.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stack_helpers import Stack, client_of, months, ok, production_stack, random_file, sha256

from ops.procs import wait_for
from ops.stackctl.integrity import artifact_problem

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("faults")
    # TMPDIR: where the tracking server spools an upload before it goes to S3 (the SIGKILL
    # test watches it to kill the server mid-upload).
    (home / "servertmp").mkdir()
    with production_stack(home, TMPDIR=str(home / "servertmp")) as s:
        yield s


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return months(tmp_path_factory.mktemp("faults-data"))


@pytest.fixture
def client(stack, monkeypatch):
    with client_of(stack, monkeypatch) as c:
        yield c


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
    uploader = subprocess.Popen([sys.executable, str(script), str(blob), name],
                                env={**stack.client_env(), **client_env}, cwd=blob.parent,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: any(spool.rglob(blob.name)), f"{blob.name} to reach the server",
             timeout=180, interval=0.005, proc=uploader)
    os.killpg(os.getpgid(stack.pid("mlflow")), signal.SIGKILL)
    return uploader, time.monotonic()


def test_tracking_server_killed_during_a_model_upload(stack, client, tmp_path):
    """SIGKILL mid-upload: a client that gives up registers nothing; a client still
    retrying when the server is back completes the upload (the file is sent again whole)
    and its version loads with every byte. No version points at incomplete artifacts."""
    script = tmp_path / "upload.py"
    script.write_text(UPLOADER)
    blob = tmp_path / "blob.bin"
    digest = random_file(blob, 100)
    port = stack.env["TEST_PORT"]

    # 1. A client without retries: the upload fails, no version is registered.
    uploader, _ = _kill_server_mid_upload(stack, script, blob, "killed-gave-up",
                                          MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    out = uploader.communicate(timeout=120)[0]
    assert uploader.returncode != 0 and "registered version" not in out, out[-2000:]
    t0 = time.monotonic()
    ok(stack.cli("up", "--port", port))  # as it was (production), the port it had
    restart_s = time.monotonic() - t0
    assert client.search_model_versions("name='killed-gave-up'") == []

    # 2. A client that keeps retrying (backoff 1 s, MLflow's default is 2 s): it completes.
    uploader, killed_at = _kill_server_mid_upload(stack, script, blob, "killed-retried",
                                                  MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    ok(stack.cli("up", "--port", port))
    server_back_s = time.monotonic() - killed_at
    out = uploader.communicate(timeout=300)[0]
    client_done_s = time.monotonic() - killed_at
    assert uploader.returncode == 0 and "registered version 1" in out, out[-2000:]
    versions = client.search_model_versions("name LIKE 'killed-%'")
    assert [v.name for v in versions] == ["killed-retried"]
    assert artifact_problem(client, "killed-retried", "1") is None
    import mlflow

    model = mlflow.pyfunc.load_model("models:/killed-retried/1")
    assert sha256(_blob_of(model)) == digest  # every byte, sent again whole
    print(f"\nserver restart {restart_s:.1f} s; killed mid-upload -> server back "
          f"{server_back_s:.1f} s -> client's upload complete and registered "
          f"{client_done_s:.1f} s")


def _blob_of(model) -> Path:
    """The local copy of the ``blob`` artifact a loaded pyfunc model was given."""
    return Path(model._model_impl.context.artifacts["blob"])


def _lose_model_file(stack: Stack, client, name: str, version: str) -> tuple[str, str]:
    """Delete, from the bucket, the file a version's pyfunc flavor loads its model from (what
    a lost or half-copied store leaves); returns the version's location and that file."""
    import yaml

    location = client.get_model_version_download_uri(name, version)
    prefix = "mlartifacts/" + location.split("mlflow-artifacts:/", 1)[1].strip("/") + "/"
    mlmodel = yaml.safe_load(stack.s3().get_object(Bucket=stack.bucket, Key=prefix + "MLmodel")
                             ["Body"].read())
    flavor = mlmodel["flavors"]["python_function"]
    lost = (next(iter(flavor["artifacts"].values()))["path"] if flavor.get("artifacts")
            else flavor["python_model"])  # a model from code keeps its state as artifacts
    stack.s3().head_object(Bucket=stack.bucket, Key=prefix + lost)  # it is there...
    stack.s3().delete_object(Bucket=stack.bucket, Key=prefix + lost)  # ...and now it is not
    return location, lost


def test_a_production_version_whose_artifacts_are_gone_is_reported_and_loses(stack, data,
                                                                             client):
    """What moto_server's lost objects did: ``status`` and ``up`` name the version in one
    line; training promotes the new version, tags the old one, and finishes."""
    from train import run_training

    production = run_training(str(data[0]), str(data[1]))["version"]  # a production version
    assert client.get_model_version_by_alias("duration", "production").version == production
    location, lost = _lose_model_file(stack, client, "duration", production)

    status = stack.cli("status")
    assert status.returncode == 1
    bad = [ln for ln in status.stdout.splitlines() if "artifacts NOT readable" in ln]
    assert bad == [f"registry: duration version {production} (@production, stage Production): "
                   f"artifacts NOT readable: missing {lost} at {location}"], status.stdout
    ok(stack.cli("down", "-c", "mlflow"))
    up = ok(stack.cli("up"))
    assert bad[0].split("registry: ", 1)[1] in up.stderr, up.stderr

    run = run_training(str(data[0]), str(data[1]))  # the gate used to crash here
    assert run["promoted"], run
    assert run["reason"].startswith(f"production version {production} cannot be loaded"), run
    old = client.get_model_version("duration", production).tags
    assert old["integrity"] == "unreadable"
    assert f"replaced by version {run['version']}" in old["demotion_reason"]
    assert client.get_run(run["run_id"]).info.status == "FINISHED"
    assert client.get_model_version_by_alias("duration", "production").version == \
        run["version"]
    assert ok(stack.cli("status")).returncode == 0


def test_a_new_version_that_cannot_be_loaded_back_is_never_promoted(stack, data, client):
    """The gate loads the candidate through the registry before promoting it: a version
    whose artifacts are incomplete is rejected and tagged, and the alias stays. (Last: the
    two versions of this model share the files it breaks.)"""
    from serve.tlc import read_training_frame
    from train import promote_if_better, run_training

    name = f"gate-{secrets.token_hex(4)}"
    first = run_training(str(data[0]), str(data[1]), registered_model=name)
    assert first["promoted"]
    v1 = client.get_model_version(name, first["version"])
    model_id = v1.source.rsplit("/", 1)[-1]  # models:/m-...: MLflow 3's logged model
    v2 = client.create_model_version(name, source=v1.source, run_id=v1.run_id,
                                     model_id=model_id)  # the same files as version 1
    _lose_model_file(stack, client, name, v2.version)

    val_df = read_training_frame(str(data[1]))
    decision = promote_if_better(client, name, v2.version, first["val_rmse"], val_df)
    assert not decision.promoted
    assert decision.reason.startswith(f"version {v2.version} cannot be loaded back"), decision
    tags = client.get_model_version(name, v2.version).tags
    assert tags["promotion"] == "rejected" and tags["integrity"] == "unreadable"
    assert client.get_model_version_by_alias(name, "production").version == \
        first["version"]
