"""Entry point of the tracking-server image (``ops/Dockerfile``): ``mlflow server`` configured
from the environment, behind MLflow's basic-auth app when the first argument is ``--auth``.

    docker run ... duration-mlflow                    # mlflow server (+ any mlflow server option)
    docker run ... duration-mlflow --artifacts-only   # the artifacts-only server
    docker run ... -e MLFLOW_AUTH_ADMIN_PASSWORD duration-mlflow --auth

``--auth`` refuses to start, as ``ops/stack up --auth`` does, unless
``MLFLOW_AUTH_ADMIN_PASSWORD`` is a real password (12+ characters, no placeholder, none of
``.env.example``'s values). Users and permissions live in ``MLFLOW_AUTH_DATABASE_URI``
(default: ``MLFLOW_BACKEND_STORE_URI``). The ini MLflow reads is written 0600 into a private
temporary folder; no secret is ever put on a command line.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from pathlib import Path

from ops.basic_auth import check_admin_password, write_auth_ini


def auth_environment(env: dict[str, str]) -> dict[str, str]:
    """What ``mlflow server --app-name basic-auth`` needs beyond ``env``; ValueError if unsafe."""
    check_admin_password(env.get("MLFLOW_AUTH_ADMIN_PASSWORD"))
    database = env.get("MLFLOW_AUTH_DATABASE_URI") or env.get("MLFLOW_BACKEND_STORE_URI")
    if not database:
        raise ValueError("auth: set MLFLOW_AUTH_DATABASE_URI (or MLFLOW_BACKEND_STORE_URI): "
                         "where users and permissions are kept")
    ini = Path(tempfile.mkdtemp(prefix="mlflow-auth-")) / "basic_auth.ini"  # folder is 0700
    write_auth_ini(ini, database, env.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin")
    extra = {"MLFLOW_AUTH_CONFIG_PATH": str(ini)}
    if not env.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        # Signs the UI's CSRF tokens: one per container is fine for one replica; replicas
        # behind one name must share MLFLOW_FLASK_SERVER_SECRET_KEY.
        extra["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_urlsafe(32)
    return extra


def server_argv(args: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The ``mlflow server`` command line and environment for this container's arguments."""
    args = list(args)
    if "--auth" not in args:
        return ["mlflow", "server", *args], env
    args.remove("--auth")
    if "--artifacts-only" in args or env.get("MLFLOW_ARTIFACTS_ONLY", "").lower() == "true":
        raise ValueError("--auth applies to the tracking server, not --artifacts-only")
    return ["mlflow", "server", "--app-name", "basic-auth", *args], {**env,
                                                                    **auth_environment(env)}


def main(args: list[str]) -> None:
    """Replace this process with ``mlflow server`` (it forwards SIGTERM to its workers)."""
    try:
        argv, env = server_argv(args, dict(os.environ))
    except ValueError as e:
        sys.exit(f"duration-mlflow: {e}")
    os.execvpe(argv[0], argv, env)


if __name__ == "__main__":
    main(sys.argv[1:])
