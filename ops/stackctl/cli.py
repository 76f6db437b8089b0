"""``ops/stack up|down|status``: start the stores and the server, stop what ``up`` started,
report each component's health."""

from __future__ import annotations

import logging
import os

import click

from ops.procs import free_port, http_ok, port_open, stop
from ops.stackctl.config import StackSettings
from ops.stackctl.pg import PostgresError, pg_ready, prepare_postgres
from ops.stackctl.s3 import S3Error, bucket_ok, prepare_s3, s3_env
from ops.stackctl.server import (
    admin_password,
    auth_env,
    default_allowed_hosts,
    embedded_store,
    server_cmd,
    server_env,
)
from ops.stackctl.state import (
    StackPaths,
    load_state,
    read_pid,
    save_state,
    stack_paths,
    start_component,
    stop_components,
)
from serve.cli import Group
from serve.logs import setup_logging
from serve.urls import masked

log = logging.getLogger("stack")


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
        stop_components(paths, started)
        raise click.ClickException(str(e)) from None
    except BaseException:  # Ctrl-C included: nothing this call started is left running
        stop_components(paths, started)
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
        health = "healthy" if ok else "NOT answering"
        lines[component] = f"running, pid {pid}, {masked(url)} {health}"
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


@click.group(cls=Group)
def cli() -> None:
    """Start, stop and inspect the MLflow tracking stack."""
    setup_logging("INFO")
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
