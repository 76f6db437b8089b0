"""A production stack started through ``ops/stack`` exactly as a user would, for the stack,
durability and fault tests: its own STACK_HOME, XDG_CONFIG_HOME (where the generated
PostgreSQL password is kept), free ports, PostgreSQL role and database, and bucket.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ops.stackctl.pg import drop_database_and_role
from ops.synth import write_month

ROOT = Path(__file__).resolve().parents[1]
STACK = str(ROOT / "ops" / "stack")
RIDE = {"PULocationID": 43, "DOLocationID": 151, "trip_distance": 1.8}


def without_s3_credentials(env: dict[str, str]) -> dict[str, str]:
    """``env`` minus every ``AWS_*`` variable and ``MLFLOW_S3_ENDPOINT_URL``."""
    return {k: v for k, v in env.items()
            if not k.startswith("AWS_") and k != "MLFLOW_S3_ENDPOINT_URL"}


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr[-3000:]}"
    return res


@dataclass
class Stack:
    """A stack driven by ``ops/stack`` in its own STACK_HOME."""

    home: Path
    env: dict[str, str]
    up_output: str = ""
    cleanups: list = field(default_factory=list)

    def cli(self, *args: str, timeout: float = 300, cwd: Path | None = None,
            **extra: str) -> subprocess.CompletedProcess:
        """Run ``ops/stack`` (cwd = STACK_HOME unless given, so no developer .env is read)."""
        return subprocess.run([STACK, *args], env={**self.env, **extra}, cwd=cwd or self.home,
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
    def bucket(self) -> str:
        return self.env["STACK_S3_BUCKET"]

    @property
    def password(self) -> str:
        kept = json.loads((Path(self.env["XDG_CONFIG_HOME"]) / "duration" /
                           "secrets.json").read_text())
        return kept[f"postgres_password:{self.user}@127.0.0.1:5432"]

    def pid(self, component: str) -> int:
        return int((self.home / "run" / f"{component}.pid").read_text().split()[0])

    def s3(self):
        """boto3 S3 client with the tracking server's credentials (the local S3 server's)."""
        import boto3

        key = json.loads((self.home / "secrets.json").read_text())["s3_secret_key"]
        return boto3.client("s3", endpoint_url=self.state["s3"]["endpoint"],
                            region_name="us-east-1", aws_access_key_id="duration",
                            aws_secret_access_key=key)

    def keys(self) -> list[str]:
        return [o["Key"] for page in self.s3().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket) for o in page.get("Contents", [])]

    def client_env(self) -> dict[str, str]:
        """A training/serving client's environment: the tracking URI, no S3 credentials."""
        return {**without_s3_credentials(dict(os.environ)), "MLFLOW_TRACKING_URI": self.uri}

    def drop(self) -> None:
        """Stop everything and drop the role and database (the test's own)."""
        self.cli("down")
        if "PGHOST" not in self.env:  # else a private cluster, thrown away whole
            drop_database_and_role(self.user, self.env["POSTGRES_DB"])


def stack_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a stack of its own in ``home`` (role, database, bucket named by a
    fresh token), without any S3 credentials, password or tracking URI of the caller."""
    token = secrets.token_hex(4)
    env = {**without_s3_credentials(dict(os.environ)),
           "STACK_HOME": str(home / "stack"), "XDG_CONFIG_HOME": str(home / "xdg"),
           "STACK_ARTIFACTS_PORT": str(_free_port()),
           "POSTGRES_USER": f"stack_test_{token}", "POSTGRES_DB": f"stack_test_{token}",
           "STACK_S3_BUCKET": f"stack-test-{token}", **extra}
    for key in ("POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_URI",
                "STACK_PORT", "STACK_HOST", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        if key not in extra:
            env.pop(key, None)
    (home / "stack").mkdir(parents=True, exist_ok=True)
    return env


def _free_port() -> int:
    from ops.procs import free_port

    return free_port()


def months(folder: Path, rows: int = 20_000) -> tuple[Path, Path]:
    """A small synthetic training and validation month."""
    return (write_month("green", "2021-01", rows, folder / "green_tripdata_2021-01.parquet", 0),
            write_month("green", "2021-02", rows, folder / "green_tripdata_2021-02.parquet", 1))


def mlflow_run(stack: Stack, train: Path, val: Path) -> dict[str, str]:
    """``mlflow run .`` against the stack by a client without S3 credentials; returns the
    run id, version and whether it was promoted, from train.py's summary line."""
    res = ok(subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local",
         "--experiment-name", "duration", "-P", f"train={train}", "-P", f"val={val}"],
        env=stack.client_env(), cwd=ROOT, capture_output=True, text=True, timeout=420))
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("run "))
    return {"run_id": line.split()[1].rstrip(":"), "version": line.split()[3],
            "promoted": "not promoted" not in line, "line": line, "stderr": res.stderr}


MB = 1 << 20


@contextmanager
def production_stack(home: Path, **extra: str) -> Iterator[Stack]:
    """``ops/stack up --mode production`` in ``home`` on a free port (kept in
    ``stack.env["TEST_PORT"]`` to restart on it); stopped and dropped afterwards."""
    s = Stack(home / "stack", stack_env(home, **extra))
    s.env["TEST_PORT"] = str(_free_port())
    try:
        ok(s.cli("up", "--mode", "production", "--port", s.env["TEST_PORT"]))
        yield s
    finally:
        s.drop()


@contextmanager
def client_of(stack: Stack, monkeypatch) -> Iterator:
    """This process as a client of ``stack``: its tracking URI, no S3 credentials; yields an
    MlflowClient."""
    import mlflow

    for key in list(os.environ):
        if key.startswith("AWS_") or key == "MLFLOW_S3_ENDPOINT_URL":
            monkeypatch.delenv(key)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(stack.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.uri)
    try:
        yield mlflow.MlflowClient(stack.uri)
    finally:
        mlflow.set_tracking_uri(previous)


def predict(version_uri: str) -> float:
    """The prediction of a registered version for RIDE (loaded through the tracking server)."""
    import mlflow
    import pandas as pd

    return float(mlflow.pyfunc.load_model(version_uri).predict(pd.DataFrame([RIDE]))[0])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MB):
            digest.update(chunk)
    return digest.hexdigest()


def random_file(path: Path, size_mb: int) -> str:
    """Write ``size_mb`` MiB of random bytes to ``path``; returns their sha256."""
    with open(path, "wb") as f:
        for _ in range(size_mb):
            f.write(os.urandom(MB))
    return sha256(path)
