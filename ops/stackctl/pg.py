"""PostgreSQL for the tracking stack: start the machine's server, create role and database
idempotently, check a login. Errors are one line naming ``postgresql``; no password is ever
put on a command line or in a message."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from urllib.parse import quote

from ops.procs import port_open, wait_for
from ops.stackctl.config import StackSettings, is_placeholder, kept_secret, secret_value
from ops.stackctl.state import StackPaths, save_state
from serve.urls import masked

log = logging.getLogger("stack")

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class PostgresError(RuntimeError):
    """PostgreSQL is unreachable, refuses the login, or cannot be set up."""


def is_local(host: str) -> bool:
    """Whether ``host`` is this machine, whose PostgreSQL the stack may start and set up."""
    return host in LOCAL_HOSTS


def store_uri(user: str, password: str, host: str, port: int, db: str) -> str:
    """SQLAlchemy URL for MLflow's backend store (psycopg2 driver; the password URL-quoted)."""
    return (f"postgresql+psycopg2://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@{host}:{port}/{quote(db, safe='')}")


def pg_ready(host: str = "127.0.0.1", port: int = 5432) -> bool:
    """Whether PostgreSQL accepts connections on host:port (``pg_isready``)."""
    return port_open(host, port) and subprocess.run(
        ["pg_isready", "-h", host, "-p", str(port)], capture_output=True).returncode == 0


def ensure_postgres_running(host: str = "127.0.0.1", port: int = 5432,
                            timeout: float = 30.0) -> None:
    """Start the machine's PostgreSQL service if it is not accepting connections (bounded)."""
    if pg_ready(host, port):
        return
    if shutil.which("service"):
        subprocess.run(["service", "postgresql", "start"], capture_output=True)
    try:
        wait_for(lambda: pg_ready(host, port), "postgresql", timeout=timeout)
    except TimeoutError as e:
        raise PostgresError(f"postgresql: not accepting connections on {host}:{port} after "
                            f"{timeout:.0f} s (`service postgresql start` did not help)") from e


def _superuser_psql(port: int, *args: str) -> list[str]:
    cmd = ["psql", "-p", str(port), "-v", "ON_ERROR_STOP=1", *args]
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def psql_as_superuser(sql: str, port: int = 5432) -> str:
    """Run SQL as the postgres superuser (peer auth over the local socket)."""
    return subprocess.run(_superuser_psql(port, "-tAc", sql), check=True, capture_output=True,
                          text=True).stdout


def _ident(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise PostgresError(f"postgresql: name {name!r} must be letters, digits and _ only")
    return name


def ensure_role_and_database(user: str, password: str, db: str, port: int = 5432) -> bool:
    """Create the login role (with ``password``) and its database unless they exist.

    An existing role keeps its password: a mismatch is then reported by ``check_login``
    rather than silently reset. Returns whether the role was created. The password goes to
    psql on stdin, never on its command line.
    """
    user, db = _ident(user), _ident(db)
    try:
        exists = psql_as_superuser(f"SELECT 1 FROM pg_roles WHERE rolname='{user}'",
                                   port).strip() == "1"
        if not exists:
            literal = password.replace("'", "''")
            subprocess.run(_superuser_psql(port, "-q"), check=True, capture_output=True,
                           text=True, input=f"CREATE ROLE {user} LOGIN PASSWORD '{literal}';")
        if psql_as_superuser(f"SELECT 1 FROM pg_database WHERE datname='{db}'",
                             port).strip() != "1":
            psql_as_superuser(f"CREATE DATABASE {db} OWNER {user}", port)
    except subprocess.CalledProcessError as e:
        detail = (e.stderr or "").strip().splitlines()[-1:] or [f"exit {e.returncode}"]
        raise PostgresError(f"postgresql: cannot create role/database {user}/{db}: "
                            f"{detail[0]}") from None
    return not exists


def drop_database_and_role(user: str, db: str, port: int = 5432) -> None:
    """Drop ``db`` and ``user`` (tests and clean-ups of the local server)."""
    psql_as_superuser(f"DROP DATABASE IF EXISTS {_ident(db)} WITH (FORCE)", port)
    psql_as_superuser(f"DROP ROLE IF EXISTS {_ident(user)}", port)


def check_login(user: str, password: str, host: str, port: int, db: str,
                timeout: float = 20.0) -> None:
    """Log in as the stack will; retry while the server is unreachable, fail at once on a
    refused password or a missing database."""
    import psycopg2

    def attempt() -> bool | PostgresError:
        # A refused login is final: returned (truthy) so wait_for stops polling at once.
        try:
            psycopg2.connect(user=user, password=password, host=host, port=port, dbname=db,
                             connect_timeout=3).close()
        except psycopg2.OperationalError as e:
            text = str(e)
            fatal = [ln.strip() for ln in text.splitlines() if "FATAL" in ln]
            if fatal and ("password authentication failed" in text or "does not exist" in text):
                hint = (" (POSTGRES_PASSWORD does not match the role's password)"
                        if "password" in fatal[0] else "")
                reason = " ".join(fatal[0].split("FATAL:", 1)[1].split())
                return PostgresError(f"postgresql: login to {host}:{port}/{db} refused: "
                                     f"{reason}{hint}")
            raise
        return True

    try:
        result = wait_for(attempt, "postgresql login", timeout=timeout)
    except TimeoutError as e:
        raise PostgresError(f"postgresql: cannot log in to {host}:{port}/{db} within "
                            f"{timeout:.0f} s: {str(e).split('(', 1)[-1].rstrip(')')}") from None
    if isinstance(result, PostgresError):
        raise result


def prepare_postgres(paths: StackPaths, cfg: StackSettings) -> str:
    """Start/reuse PostgreSQL, create role and database if needed, check the login;
    returns the backend store URI (with its password: pass it through the environment)."""
    host, port, user, db = cfg.postgres_host, cfg.postgres_port, cfg.postgres_user, cfg.postgres_db
    password = secret_value(cfg.postgres_password)
    if password is not None and is_placeholder(password):
        raise PostgresError("postgresql: POSTGRES_PASSWORD is a placeholder; set a real one "
                            "(or leave it unset for a generated one with a local server)")
    if is_local(host):
        ensure_postgres_running(host, port, timeout=cfg.stack_wait_seconds)
        if password is None:
            password = kept_secret(paths.home, f"postgres_password_{user}")
        if ensure_role_and_database(user, password, db, port=port):
            log.info("postgresql: created role %s", user)
    elif password is None:
        raise PostgresError(f"postgresql: POSTGRES_PASSWORD is required for the remote "
                            f"server {host}:{port}")
    check_login(user, password, host, port, db, timeout=cfg.stack_wait_seconds)
    uri = store_uri(user, password, host, port, db)
    log.info("postgresql ready: %s", masked(uri))
    save_state(paths, postgresql={"host": host, "port": port, "user": user, "db": db})
    return uri
