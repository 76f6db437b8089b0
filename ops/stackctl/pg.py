"""PostgreSQL for the tracking stack: start the machine's server, create role and database
idempotently, check a login. Errors are one line naming ``postgresql``; no password is ever
put on a command line or in a message."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

from ops.procs import port_open, wait_for
from ops.stackctl.config import (
    StackSettings,
    is_placeholder,
    keep_secret,
    read_secrets,
    secret_value,
    user_secrets_file,
)
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


def role_exists(user: str, port: int = 5432) -> bool:
    """Whether the login role ``user`` exists on the local server."""
    return psql_as_superuser(f"SELECT 1 FROM pg_roles WHERE rolname='{_ident(user)}'",
                             port).strip() == "1"


def _role_sql(sql: str, port: int) -> None:
    """Run SQL that carries a password: on psql's stdin, never on its command line."""
    subprocess.run(_superuser_psql(port, "-q"), check=True, capture_output=True, text=True,
                   input=sql)


def _literal(password: str) -> str:
    return "'" + password.replace("'", "''") + "'"


def set_role_password(user: str, password: str, port: int = 5432) -> None:
    """Give the existing role ``user`` the password ``password`` (as the superuser)."""
    try:
        _role_sql(f"ALTER ROLE {_ident(user)} PASSWORD {_literal(password)};", port)
    except subprocess.CalledProcessError as e:
        raise PostgresError(f"postgresql: cannot reset the password of role {user}: "
                            f"{_last_line(e)}") from None


def _last_line(e: subprocess.CalledProcessError) -> str:
    return ((e.stderr or "").strip().splitlines()[-1:] or [f"exit {e.returncode}"])[0]


def ensure_role_and_database(user: str, password: str, db: str, port: int = 5432) -> bool:
    """Create the login role (with ``password``) and its database unless they exist.

    An existing role keeps its password: a mismatch is then reported by ``check_login``
    rather than silently reset. Returns whether the role was created. The password goes to
    psql on stdin, never on its command line.
    """
    user, db = _ident(user), _ident(db)
    try:
        exists = role_exists(user, port)
        if not exists:
            _role_sql(f"CREATE ROLE {user} LOGIN PASSWORD {_literal(password)};", port)
        if psql_as_superuser(f"SELECT 1 FROM pg_database WHERE datname='{db}'",
                             port).strip() != "1":
            psql_as_superuser(f"CREATE DATABASE {db} OWNER {user}", port)
    except subprocess.CalledProcessError as e:
        raise PostgresError(f"postgresql: cannot create role/database {user}/{db}: "
                            f"{_last_line(e)}") from None
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


def _password_name(user: str, host: str, port: int) -> str:
    return f"postgres_password:{user}@{host}:{port}"


def known_password(paths: StackPaths, user: str, host: str, port: int) -> str | None:
    """The generated password of the local role ``user``, kept in the user's secrets file
    (or, from before it was kept there, in ``$STACK_HOME/secrets.json``)."""
    kept = read_secrets(user_secrets_file()).get(_password_name(user, host, port))
    legacy = read_secrets(paths.home / "secrets.json").get(f"postgres_password_{user}")
    return kept or legacy


RESET_FLAG = "--reset-postgres-password"


def _what_to_do(user: str, host: str, port: int) -> str:
    return (f"set POSTGRES_PASSWORD to the role's password (environment or .env), or give the "
            f"role a new password with `ops/stack up --mode production {RESET_FLAG}` (POSTGRES_"
            f"PASSWORD if set, else generated and kept in {user_secrets_file()}; anything else "
            f"that logs in as {user} then needs it; by hand: `sudo -u postgres psql -p {port} "
            f"-c '\\password {user}'`)")


def prepare_postgres(paths: StackPaths, cfg: StackSettings, reset_password: bool = False) -> str:
    """Start/reuse PostgreSQL, create role and database if needed, check the login;
    returns the backend store URI (with its password: pass it through the environment).

    A local role that exists with a password this stack does not know is an error that says
    what to do, unless ``reset_password`` (then the role gets POSTGRES_PASSWORD or a new
    generated password)."""
    host, port, user, db = cfg.postgres_host, cfg.postgres_port, cfg.postgres_user, cfg.postgres_db
    password = secret_value(cfg.postgres_password)
    if password is not None and is_placeholder(password):
        raise PostgresError("postgresql: POSTGRES_PASSWORD is a placeholder; set a real one "
                            "(or leave it unset for a generated one with a local server)")
    local = is_local(host)
    if reset_password and not local:
        raise PostgresError(f"postgresql: {RESET_FLAG} works on a local server only, not "
                            f"{host}:{port}")
    generated = password is None
    if local:
        ensure_postgres_running(host, port, timeout=cfg.stack_wait_seconds)
        password = password or known_password(paths, user, host, port)
        try:
            exists = role_exists(user, port)
        except subprocess.CalledProcessError as e:
            raise PostgresError(f"postgresql: cannot query roles on port {port} as the "
                                f"postgres superuser: {_last_line(e)}") from None
        if exists and password is None and not reset_password:
            raise PostgresError(f"postgresql: role {user} already exists on {host}:{port} with "
                                f"a password this stack does not know: "
                                f"{_what_to_do(user, host, port)}")
        password = password or secrets.token_urlsafe(24)
        if exists and reset_password:
            set_role_password(user, password, port)
            log.info("postgresql: role %s has a new password", user)
        if ensure_role_and_database(user, password, db, port=port):
            log.info("postgresql: created role %s", user)
        if generated:
            keep_secret(user_secrets_file(), _password_name(user, host, port), password)
    elif password is None:
        raise PostgresError(f"postgresql: POSTGRES_PASSWORD is required for the remote "
                            f"server {host}:{port}")
    try:
        check_login(user, password, host, port, db, timeout=cfg.stack_wait_seconds)
    except PostgresError as e:
        if local and "password authentication failed" in str(e):
            raise PostgresError(f"{str(e).split(' (POSTGRES_PASSWORD')[0]}: "
                                f"{_what_to_do(user, host, port)}") from None
        raise
    uri = store_uri(user, password, host, port, db)
    log.info("postgresql ready: %s", masked(uri))
    save_state(paths, postgresql={"host": host, "port": port, "user": user, "db": db})
    return uri


def login_of(uri: str) -> dict[str, str]:
    """libpq's environment (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE) for a store URI:
    how pg_dump and pg_restore get the password without a command line showing it."""
    from sqlalchemy.engine import make_url

    url = make_url(uri)
    return {"PGHOST": url.host or "127.0.0.1", "PGPORT": str(url.port or 5432),
            "PGUSER": url.username or "", "PGPASSWORD": url.password or "",
            "PGDATABASE": url.database or ""}


def _pg_tool(args: list[str], uri: str, what: str) -> None:
    env = {**os.environ, **login_of(uri)}
    try:
        subprocess.run(args, env=env, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise PostgresError(f"postgresql: {args[0]} is not installed (postgresql-client)") from None
    except subprocess.CalledProcessError as e:
        raise PostgresError(f"postgresql: {what} failed: {_last_line(e)}") from None


def dump_database(uri: str, dest: Path) -> None:
    """A consistent dump of the store (``pg_dump`` reads one snapshot), custom format, without
    owners or grants so that any role can restore it."""
    _pg_tool(["pg_dump", "--format=custom", "--no-owner", "--no-acl", "--file", str(dest)],
             uri, "pg_dump")


def restore_database(uri: str, dump: Path, replace: bool = False) -> None:
    """Restore ``dump`` into the store's database (objects owned by the store's role);
    ``replace`` drops what the dump re-creates first."""
    args = ["pg_restore", "--no-owner", "--no-acl", "--exit-on-error", "--single-transaction"]
    if replace:
        args += ["--clean", "--if-exists"]
    _pg_tool([*args, "--dbname", login_of(uri)["PGDATABASE"], str(dump)], uri, "pg_restore")


def query(uri: str, sql: str) -> list[tuple]:
    """Rows of ``sql`` in the store's database (for checks around backup and restore)."""
    import psycopg2

    login = login_of(uri)
    conn = psycopg2.connect(host=login["PGHOST"], port=login["PGPORT"], user=login["PGUSER"],
                            password=login["PGPASSWORD"], dbname=login["PGDATABASE"],
                            connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()
