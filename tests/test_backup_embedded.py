"""``ops/stack backup`` / ``restore`` of the embedded stack (sqlite + artifact folder): onto
another STACK_HOME, every version loads and the alias is where it was. The production
backup is tested in test_durability.py."""

from __future__ import annotations

import json

import pytest
from stack_helpers import RIDE, Stack, months, ok, stack_env

from ops.procs import free_port

pytestmark = pytest.mark.integration


def test_embedded_backup_restores_onto_another_stack_home(tmp_path, monkeypatch):
    import mlflow
    import pandas as pd

    from train import run_training

    source = Stack(tmp_path / "a" / "stack", stack_env(tmp_path / "a"))
    fresh = Stack(tmp_path / "b" / "stack", stack_env(tmp_path / "b"))
    previous = mlflow.get_tracking_uri()
    try:
        ok(source.cli("up", "--port", str(free_port())))  # embedded, the default
        monkeypatch.setenv("MLFLOW_TRACKING_URI", source.uri)
        train, val = months(tmp_path, rows=5_000)
        first = run_training(str(train), str(val), registered_model="embedded-backup")
        backup = ok(source.cli("backup", str(tmp_path / "backup")))  # while it runs
        assert "embedded-backup@production=1" in backup.stdout, backup.stdout
        manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
        assert manifest["mode"] == "embedded" and manifest["versions"] == 1
        expected = mlflow.pyfunc.load_model("models:/embedded-backup/1").predict(
            pd.DataFrame([RIDE]))[0]
        ok(source.cli("down"))

        restored = ok(fresh.cli("restore", str(tmp_path / "backup")))
        assert "start it with `ops/stack up`" in restored.stdout, restored.stdout
        again = fresh.cli("restore", str(tmp_path / "backup"))
        assert again.returncode != 0 and "already holds a registry" in again.stderr
        ok(fresh.cli("up", "--port", str(free_port())))
        mlflow.set_tracking_uri(fresh.uri)
        client = mlflow.MlflowClient(fresh.uri)
        assert client.get_model_version_by_alias("embedded-backup", "production").version == \
            first["version"]
        assert mlflow.pyfunc.load_model("models:/embedded-backup/1").predict(
            pd.DataFrame([RIDE]))[0] == expected
    finally:
        mlflow.set_tracking_uri(previous)
        source.cli("down")
        fresh.cli("down")
