"""Nothing lost (issue 13): the local production stack keeps models across ``down``/``up``
(issue 13's transcript), a 200 MB artifact goes up and down through the proxy into the local
S3, and a backup restores onto a fresh machine.

One production stack for the module (tests/stack_helpers.py: own STACK_HOME, role, database,
bucket, ports), driven through ``ops/stack`` as a user would; clients hold no S3 credentials.
The faults are in test_faults.py and test_pg_restart.py. Each test prints what it measured
(``pytest -s`` shows it).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from stack_helpers import (
    MB,
    Stack,
    client_of,
    mlflow_run,
    months,
    ok,
    predict,
    production_stack,
    random_file,
    sha256,
    stack_env,
)

from ops.procs import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with production_stack(tmp_path_factory.mktemp("durable")) as s:
        yield s


@pytest.fixture
def client(stack, monkeypatch):
    with client_of(stack, monkeypatch) as c:
        yield c


def test_up_train_down_up_train_and_both_versions_load(stack, client, tmp_path):
    """Issue 13's transcript: with moto_server as S3, the second training crashed in the
    promotion gate (no MLmodel: `down` had thrown every artifact away)."""
    data = months(tmp_path)
    first = mlflow_run(stack, *data)
    assert first["promoted"], first["line"]
    assert "stopped: mlflow, s3" in ok(stack.cli("down")).stdout
    on_disk = [p for p in (stack.home / "s3" / stack.bucket).rglob("MLmodel")]
    assert len(on_disk) == 1, on_disk  # the objects are files while nothing runs
    ok(stack.cli("up", "--mode", "production", "--port", stack.env["TEST_PORT"]))
    second = mlflow_run(stack, *data)
    assert second["version"] == str(int(first["version"]) + 1), second["line"]
    for version in (first["version"], second["version"]):
        assert 1 <= predict(f"models:/duration/{version}") <= 60
    alias = client.get_model_version_by_alias("duration", "production").version
    assert alias == (second if second["promoted"] else first)["version"]
    status = ok(stack.cli("status")).stdout
    assert "registry: 1 version(s) behind aliases or stage Production, all readable" in status


def test_backup_and_restore_onto_a_fresh_machine(stack, client, tmp_path):
    """``ops/stack backup`` then ``restore`` into another STACK_HOME, role, database and
    bucket (what a fresh machine has): every version loads and the alias is where it was."""
    import mlflow

    t0 = time.monotonic()
    res = ok(stack.cli("backup", str(tmp_path / "backup")))
    backup_s = time.monotonic() - t0
    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    versions = client.search_model_versions("name='duration'")
    assert manifest["mode"] == "production" and manifest["versions"] == len(versions) >= 2
    production = client.get_model_version_by_alias("duration", "production").version
    assert ["duration", "production", int(production)] in manifest["aliases"]
    assert f"duration@production={production}" in res.stdout
    expected = {v.version: predict(f"models:/duration/{v.version}") for v in versions}

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
            assert predict(f"models:/duration/{version}") == prediction
        assert "all readable" in ok(fresh.cli("status")).stdout
        again = fresh.cli("restore", str(tmp_path / "backup"))  # never over a live server
        assert again.returncode != 0 and "mlflow is running" in again.stderr
        print(f"\nbackup {backup_s:.1f} s ({manifest['objects']} objects, "
              f"{manifest['bytes'] / 1e6:.2f} MB), restore {restore_s:.1f} s, "
              f"{len(expected)} versions load, alias production={production}")
    finally:
        mlflow.set_tracking_uri(stack.uri)
        fresh.drop()


def test_a_200_mb_artifact_goes_up_and_down_through_the_proxy(stack, client, tmp_path,
                                                              monkeypatch):
    """Through the tracking server (the client holds no S3 credentials) into the local S3
    server, which stores it with multipart upload; then again with MLflow's presigned
    multipart upload (MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD: parts go straight to the S3
    endpoint on presigned URLs)."""
    import mlflow

    blob = tmp_path / "blob.bin"
    digest = random_file(blob, 200)
    experiment = client.create_experiment(f"big-{os.getpid()}-{time.time_ns()}")
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
        assert sha256(Path(local)) == digest
        Path(local).unlink()
        print(f"\n200 MB {path}: up {up_s if path == 'proxied' else presigned_s:.1f} s, "
              f"down {down_s:.1f} s, sha256 equal")
    for key in stored:  # keep later backups small
        stack.s3().delete_object(Bucket=stack.bucket, Key=key)
