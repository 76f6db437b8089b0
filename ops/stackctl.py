"""``ops/stack up|down|status``: the MLflow tracking stack on this machine.

Embedded mode (the default, used by ``make demo``): one ``mlflow server`` with
a sqlite backend and a local artifact folder, serving artifacts itself
(``--serve-artifacts``), bound to 127.0.0.1.

Production mode: PostgreSQL (the machine's server, started if stopped; role and
database created idempotently) for runs and the registry, an S3 bucket for the
artifacts (a local ``moto_server`` unless ``MLFLOW_S3_ENDPOINT_URL`` names an
endpoint), and ``mlflow server`` proxying the artifacts, so clients never hold S3
credentials. The store URI reaches the server through ``MLFLOW_BACKEND_STORE_URI``:
the password is never on a command line nor in a log.

``--artifacts-only`` starts a second server that only serves artifacts (for deployment
clients; tracking APIs answer 503); ``--auth`` runs MLflow's basic-auth app with the admin
password from the environment (placeholders refused).

State lives in ``$STACK_HOME`` (default ``.stack/``): ``logs/`` has one log per
component, ``run/`` the pid files ``down`` uses to stop exactly what ``up``
started (and ``stack.json``, what ``status`` checks), ``secrets.json`` (0600) the
secrets the stack generated itself.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from ops.basic_auth import check_admin_password, write_auth_ini
from ops.pg import (
    PostgresError,
    check_login,
    ensure_postgres_running,
    ensure_role_and_database,
    is_local,
    masked,
    pg_ready,
    store_uri,
)
from ops.procs import free_port, http_ok, port_open, start, stop, wait_for
from ops.s3 import MOTO_CREDENTIALS, S3Error, bucket_ok, ensure_bucket
from ops.stackconfig import StackSettings, is_placeholder, kept_secret

log = logging.getLogger("stack")


@dataclass(frozen=True)
class StackPaths:
    """Where the stack keeps its state, logs and pid files."""

    home: Path

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def run(self) -> Path:
        return self.home / "run"

    def pidfile(self, component: str) -> Path:
        return self.run / f"{component}.pid"

    def logfile(self, component: str) -> Path:
        return self.logs / f"{component}.log"


def stack_paths() -> StackPaths:
    """Paths under ``$STACK_HOME`` (default ``.stack`` in the current folder)."""
    return StackPaths(Path(os.getenv("STACK_HOME", ".stack")).resolve())


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (to tell it from a later process given the same pid)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def write_pid(paths: StackPaths, component: str, pid: int) -> None:
    """Record ``pid`` (and its start time) as ``component``'s."""
    paths.run.mkdir(parents=True, exist_ok=True)
    paths.pidfile(component).write_text(f"{pid} {_start_time(pid) or ''}".strip() + "\n")


def read_pid(paths: StackPaths, component: str) -> int | None:
    """The pid recorded for ``component`` if that very process is still alive."""
    try:
        pid_text, _, started = paths.pidfile(component).read_text().strip().partition(" ")
        pid = int(pid_text)
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None  # PermissionError: the pid now belongs to another user's process
    if started and _start_time(pid) not in (None, started):
        return None  # the pid was reused by another process: not ours to stop
    return pid


def start_component(paths: StackPaths, component: str, cmd: list[str], env: dict,
                    ready, timeout: float) -> int:
    """Start one component, record its pid, wait until ``ready()`` holds (bounded); on any
    failure, Ctrl-C included, stop it and remove its pid file."""
    proc = start(cmd, paths.logfile(component), env=env)
    try:
        write_pid(paths, component, proc.pid)
        wait_for(ready, component, timeout=timeout, proc=proc)
    except (TimeoutError, RuntimeError) as e:
        why = (f"exited with code {proc.returncode} while starting" if proc.poll() is not None
               else f"not ready after {timeout:.0f} s")
        stop(proc.pid)
        paths.pidfile(component).unlink(missing_ok=True)
        tail = paths.logfile(component).read_text(errors="replace").strip().splitlines()[-2:]
        raise click.ClickException(f"{component}: {why}; log {paths.logfile(component)}: "
                                   f"{' | '.join(ln.strip() for ln in tail)}") from e
    except BaseException:
        stop(proc.pid)
        paths.pidfile(component).unlink(missing_ok=True)
        raise
    log.info("%s ready (pid %d)", component, proc.pid)
    return proc.pid


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


# -- state ------------------------------------------------------------------------------
def load_state(paths: StackPaths) -> dict:
    """What ``up`` recorded in ``run/stack.json`` (no secrets), or {}."""
    path = paths.run / "stack.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_state(paths: StackPaths, **entries: dict) -> None:
    """Merge ``entries`` into ``run/stack.json``."""
    state = {**load_state(paths), **entries}
    paths.run.mkdir(parents=True, exist_ok=True)
    (paths.run / "stack.json").write_text(json.dumps(state, indent=1))


# -- stores -------------------------------------------------------------------------------
def _secret(value) -> str | None:
    return (value.get_secret_value() or None) if value is not None else None


def prepare_postgres(paths: StackPaths, cfg: StackSettings) -> str:
    """Start/reuse PostgreSQL, create role and database if needed, check the login;
    returns the backend store URI (with its password: pass it through the environment)."""
    host, port, user, db = cfg.postgres_host, cfg.postgres_port, cfg.postgres_user, cfg.postgres_db
    password = _secret(cfg.postgres_password)
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


def moto_server_bin() -> str:
    """The venv's ``moto_server`` (next to this interpreter), else the one on PATH."""
    local = Path(sys.executable).parent / "moto_server"
    found = str(local) if local.exists() else shutil.which("moto_server")
    if not found:
        raise S3Error("s3: moto_server is not installed (pip install 'moto[server]', the test "
                      "extra) and MLFLOW_S3_ENDPOINT_URL is unset")
    return found


def start_or_reuse_moto(paths: StackPaths, cfg: StackSettings, started: list[str]) -> str:
    """Endpoint of the stack's moto_server, started on 127.0.0.1 unless already running."""
    previous = load_state(paths).get("s3", {})
    if read_pid(paths, "moto") is not None and previous.get("moto"):
        log.info("moto: reusing %s", previous["endpoint"])
        return previous["endpoint"]
    port = cfg.stack_moto_port or free_port()
    if port_open("127.0.0.1", port):
        raise S3Error(f"s3: moto_server port {port} on 127.0.0.1 is already in use "
                      "(STACK_MOTO_PORT)")
    endpoint = f"http://127.0.0.1:{port}"
    started.append("moto")  # before it runs: a failure from here on stops it
    start_component(paths, "moto", [moto_server_bin(), "-H", "127.0.0.1", "-p", str(port)],
                    dict(os.environ), http_ok(f"{endpoint}/moto-api/"),
                    timeout=max(cfg.stack_wait_seconds, 30))
    return endpoint


def s3_env(cfg: StackSettings, endpoint: str | None, moto: bool) -> dict[str, str]:
    """The S3 part of the tracking server's environment (and only of its environment)."""
    env = {"AWS_ACCESS_KEY_ID": cfg.aws_access_key_id,
           "AWS_SECRET_ACCESS_KEY": _secret(cfg.aws_secret_access_key),
           "AWS_SESSION_TOKEN": _secret(cfg.aws_session_token),
           "AWS_DEFAULT_REGION": cfg.aws_default_region,
           "MLFLOW_S3_ENDPOINT_URL": endpoint}
    if moto:
        env.update(MOTO_CREDENTIALS)
    return {k: v for k, v in env.items() if v}


def prepare_s3(paths: StackPaths, cfg: StackSettings, started: list[str]) -> dict[str, str]:
    """Reach the S3 endpoint (a local moto_server unless configured) and create the bucket;
    returns the server's S3 environment."""
    endpoint = cfg.mlflow_s3_endpoint_url or None
    moto = endpoint is None
    if moto:
        endpoint = start_or_reuse_moto(paths, cfg, started)
    env = s3_env(cfg, endpoint, moto)
    created = ensure_bucket(endpoint, cfg.stack_s3_bucket, {**os.environ, **env},
                            timeout=cfg.stack_wait_seconds)
    log.info("s3 ready: %s bucket %s%s", endpoint, cfg.stack_s3_bucket,
             " (created)" if created else "")
    save_state(paths, s3={"endpoint": endpoint, "bucket": cfg.stack_s3_bucket,
                          "prefix": cfg.stack_s3_prefix, "moto": moto})
    return env


def admin_password(cfg: StackSettings) -> str:
    """The basic-auth admin password; empty, short or placeholder values are refused."""
    try:
        return check_admin_password(_secret(cfg.mlflow_auth_admin_password))
    except ValueError as e:
        raise click.ClickException(str(e)) from None


def auth_env(paths: StackPaths, cfg: StackSettings, database_uri: str) -> dict[str, str]:
    """Environment for MLflow's basic-auth app: its ini (0600, in STACK_HOME) and CSRF key."""
    ini = paths.home / "auth" / "basic_auth.ini"
    write_auth_ini(ini, database_uri, cfg.mlflow_auth_admin_username, admin_password(cfg))
    return {"MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": kept_secret(paths.home, "flask_secret_key")}


# -- up / down ----------------------------------------------------------------------------
def _stop_components(paths: StackPaths, components: list[str]) -> None:
    for component in reversed(components):
        if (pid := read_pid(paths, component)) is not None:
            stop(pid)
        paths.pidfile(component).unlink(missing_ok=True)


def up_stack(paths: StackPaths, cfg: StackSettings, mode: str, host: str, port: int,
             workers: int = 1, artifacts_only: bool = False, auth: bool = False) -> str:
    """Start (or reuse) the stores, then a tracking server (or the artifacts-only server);
    returns its URI. On any failure, stop what this call started and raise one line."""
    component = "mlflow-artifacts" if artifacts_only else "mlflow"
    if (pid := read_pid(paths, component)) is not None:
        uri = load_state(paths).get(component, {}).get("uri", "")
        raise click.ClickException(f"{component}: already running (pid {pid}) {uri}; "
                                   "`ops/stack down` first")
    if port_open(host, port):
        raise click.ClickException(f"{component}: port {port} on {host} is already in use "
                                   "(choose another with --port)")
    if auth:
        admin_password(cfg)  # refuse a placeholder before touching anything
    started: list[str] = []
    try:
        env = server_env()
        for key in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_CONFIG_PATH"):
            env.pop(key, None)  # only what we set below
        if mode == "embedded":
            state = paths.home / "embedded"
            destination, store = embedded_store(state)
            auth_db = f"sqlite:///{state / 'basic_auth.db'}"
        else:
            store = None if artifacts_only else prepare_postgres(paths, cfg)
            env.update(prepare_s3(paths, cfg, started))
            destination = f"s3://{cfg.stack_s3_bucket}/{cfg.stack_s3_prefix}"
            auth_db = store
        if not artifacts_only:
            env["MLFLOW_BACKEND_STORE_URI"] = store
        if auth:
            env.update(auth_env(paths, cfg, auth_db))
        cmd = server_cmd(host, port, destination, workers, artifacts_only,
                         cfg.stack_allowed_hosts or default_allowed_hosts(host),
                         "basic-auth" if auth else None)
        uri = f"http://{host}:{port}"
        started.append(component)
        start_component(paths, component, cmd, env, http_ok(f"{uri}/health"),
                        timeout=cfg.stack_server_timeout)
        save_state(paths, **{component: {"uri": uri, "mode": mode, "auth": auth,
                                         "destination": destination}})
    except (PostgresError, S3Error) as e:
        _stop_components(paths, started)
        raise click.ClickException(str(e)) from None
    except BaseException:  # Ctrl-C included: nothing this call started is left running
        _stop_components(paths, started)
        raise
    return uri


def down(paths: StackPaths, components: list[str] | None = None) -> list[str]:
    """Stop the components this stack started (by pid file; all unless ``components``
    names some); returns the names of those that were running."""
    stopped = []
    for pidfile in sorted(paths.run.glob("*.pid")) if paths.run.exists() else []:
        component = pidfile.stem
        if components and component not in components:
            continue
        pid = read_pid(paths, component)
        if pid is not None and stop(pid):
            stopped.append(component)
        pidfile.unlink(missing_ok=True)
    return stopped


def health(paths: StackPaths, cfg: StackSettings) -> dict[str, str]:
    """One status line per component: processes by pid file, stores by a live check."""
    state = load_state(paths)
    lines = {}
    pids = sorted(p.stem for p in paths.run.glob("*.pid")) if paths.run.exists() else []
    for component in pids:
        pid = read_pid(paths, component)
        if pid is None:
            lines[component] = "dead (stale pid file)"
            continue
        url = state.get(component, {}).get("uri") or state.get("s3", {}).get("endpoint")
        check = f"{url}/health" if component != "moto" else f"{url}/moto-api/"
        ok = bool(url) and _quiet(http_ok(check))
        lines[component] = f"running, pid {pid}, {url} {'healthy' if ok else 'NOT answering'}"
    if not pids:
        return lines
    if pg := state.get("postgresql"):
        ok = pg_ready(pg["host"], pg["port"])
        lines["postgresql"] = (f"{pg['host']}:{pg['port']}/{pg['db']} "
                               f"{'accepting connections' if ok else 'NOT accepting connections'}")
    if s3 := state.get("s3"):
        env = {**os.environ, **s3_env(cfg, s3["endpoint"], s3["moto"])}
        ok = bucket_ok(s3["endpoint"], s3["bucket"], env)
        lines["s3"] = f"{s3['endpoint']} bucket {s3['bucket']} {'ok' if ok else 'NOT reachable'}"
    return lines


def _quiet(check) -> bool:
    try:
        return bool(check())
    except Exception:  # noqa: BLE001 - unreachable is a status, not an error
        return False


@click.group()
def cli() -> None:
    """Start, stop and inspect the MLflow tracking stack."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s stack %(message)s")
    retries = logging.getLogger("ops.procs")
    retries.setLevel(logging.DEBUG)  # one line per bounded-retry attempt, kept short
    retries.addFilter(_shorten)


def _shorten(record: logging.LogRecord) -> bool:
    text = record.getMessage()
    if len(text) > 140:
        record.msg, record.args = text[:140] + "...", ()
    return True


@cli.command()
@click.option("--mode", type=click.Choice(["embedded", "production"]), default="embedded",
              show_default=True,
              help="embedded: sqlite + local artifact folder; production: PostgreSQL + S3.")
@click.option("--host", default=None, help="Interface to bind [default: STACK_HOST or 127.0.0.1].")
@click.option("--port", type=int, default=None,
              help="Server port, 0 = any free one [default: STACK_PORT or 5000; with "
                   "--artifacts-only STACK_ARTIFACTS_PORT or 5001].")
@click.option("--workers", type=int, default=1, show_default=True,
              help="uvicorn workers (more than 1 stalls keep-alive responses ~40 ms here).")
@click.option("--artifacts-only", is_flag=True,
              help="Start the artifacts-only server (for deployment clients) instead of the "
                   "tracking server; tracking APIs answer 503 there.")
@click.option("--auth", is_flag=True,
              help="Run MLflow's basic-auth app; admin password from "
                   "MLFLOW_AUTH_ADMIN_PASSWORD (placeholders refused).")
def up(mode: str, host: str | None, port: int | None, workers: int, artifacts_only: bool,
       auth: bool) -> None:
    """Start the stack and wait until every component is ready."""
    cfg = StackSettings()
    if auth and artifacts_only:
        raise click.UsageError("--auth applies to the tracking server, not --artifacts-only")
    host = host or cfg.stack_host
    port = port if port is not None else (
        cfg.stack_artifacts_port if artifacts_only else cfg.stack_port)
    port = port or free_port(host)  # 0 = any free port
    uri = up_stack(stack_paths(), cfg, mode, host, port, workers, artifacts_only, auth)
    click.echo(f"{'MLFLOW_ARTIFACTS_URI' if artifacts_only else 'MLFLOW_TRACKING_URI'}={uri}")


@cli.command("down")
@click.option("--component", "-c", "components", multiple=True,
              type=click.Choice(["mlflow", "mlflow-artifacts", "moto"]),
              help="Stop only this component (repeatable), e.g. to restart the server alone.")
def down_cmd(components: tuple[str, ...]) -> None:
    """Stop exactly what `up` started (PostgreSQL, the machine's service, is left running)."""
    stopped = down(stack_paths(), list(components))
    click.echo(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@cli.command()
def status() -> None:
    """Show each component's pid and health."""
    lines = health(stack_paths(), StackSettings())
    if not lines:
        click.echo("stack: not running")
    for component, line in lines.items():
        click.echo(f"{component}: {line}")


if __name__ == "__main__":
    cli()
