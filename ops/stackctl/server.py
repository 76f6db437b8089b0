"""The ``mlflow server`` the stack runs: its command line, environment and basic-auth set-up.

The backend store URI (with its password) reaches the server through the environment
(``MLFLOW_BACKEND_STORE_URI``), never through its command line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ops.basic_auth import check_admin_password, write_auth_ini
from ops.stackctl.config import StackSettings, kept_secret, secret_value
from ops.stackctl.state import StackPaths


def server_env(**extra: str) -> dict[str, str]:
    """Environment for an ``mlflow server`` we start: our environment, with MLflow's GenAI job
    runner off (it forks 8 processes of ~280 MB that this project never uses)."""
    return dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **extra)


def embedded_store(state: Path) -> tuple[str, str]:
    """Artifact folder and sqlite store URI of an embedded stack kept in ``state``."""
    (state / "mlartifacts").mkdir(parents=True, exist_ok=True)
    return str(state / "mlartifacts"), f"sqlite:///{state / 'mlflow.db'}"


def embedded_server_cmd(state: Path, host: str, port: int, workers: int = 1) -> list[str]:
    """``mlflow server`` with a sqlite backend and a proxied local artifact folder in ``state``
    (a sqlite path holds no secret, so it may go on the command line)."""
    destination, store = embedded_store(state)
    return [*server_cmd(host, port, destination, workers), "--backend-store-uri", store]


def server_cmd(host: str, port: int, destination: str, workers: int = 1,
               artifacts_only: bool = False, allowed_hosts: str | None = None,
               app_name: str | None = None) -> list[str]:
    """``mlflow server`` proxying artifacts in ``destination``; the backend store URI comes
    from the environment (``MLFLOW_BACKEND_STORE_URI``), never from the command line."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--artifacts-destination", destination,
           "--serve-artifacts", "--host", host, "--port", str(port), "--workers", str(workers)]
    if artifacts_only:
        cmd.append("--artifacts-only")
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    if app_name:
        cmd += ["--app-name", app_name]
    return cmd


def default_allowed_hosts(host: str) -> str:
    """Host headers accepted when ``STACK_ALLOWED_HOSTS`` is unset: loopback names (+ ``host``)."""
    names = ["localhost", "127.0.0.1"]
    if host not in names and host not in ("0.0.0.0", "::"):
        names.append(host)
    return ",".join(f"{n},{n}:*" for n in names)



def admin_password(cfg: StackSettings) -> str:
    """The basic-auth admin password; empty, short or placeholder values are refused."""
    try:
        return check_admin_password(secret_value(cfg.mlflow_auth_admin_password))
    except ValueError as e:
        raise click.ClickException(str(e)) from None


def auth_env(paths: StackPaths, cfg: StackSettings, database_uri: str) -> dict[str, str]:
    """Environment for MLflow's basic-auth app: its ini (0600, in STACK_HOME) and CSRF key."""
    ini = paths.home / "auth" / "basic_auth.ini"
    write_auth_ini(ini, database_uri, cfg.mlflow_auth_admin_username, admin_password(cfg))
    return {"MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": kept_secret(paths.home, "flask_secret_key")}
