"""``ops/stack up|down|status|backup|restore``: click options -> :mod:`~ops.stackctl.lifecycle`
and :mod:`~ops.stackctl.backup`."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from ops.procs import free_port
from ops.stackctl.backup import backup, restore
from ops.stackctl.config import StackSettings
from ops.stackctl.lifecycle import (
    INSECURE_FLAG,
    check_exposure,
    down,
    health,
    previous_launch,
    registry_lines,
    up_stack,
)
from ops.stackctl.pg import RESET_FLAG
from ops.stackctl.state import stack_paths
from serve.cli import Group
from serve.logs import setup_logging

log = logging.getLogger("stack")
MODES = click.Choice(["embedded", "production"])


@click.group(cls=Group)
def cli() -> None:
    """Start, stop, inspect, back up and restore the MLflow tracking stack."""
    setup_logging("INFO")


def _setting(cfg: StackSettings, name: str, recorded):
    """A setting given in the environment or .env wins over the recorded one, which wins over
    the default."""
    return getattr(cfg, name) if name in cfg.model_fields_set or recorded is None else recorded


@cli.command()
@click.option("--mode", type=MODES, default=None,
              help="embedded: sqlite + local artifact folder; production: PostgreSQL + S3 "
                   "[default: as last started while its stores still run, else embedded].")
@click.option("--host", default=None,
              help="Interface to bind [default: STACK_HOST, else as last started, else "
                   "127.0.0.1]; not loopback needs --auth.")
@click.option("--port", type=int, default=None,
              help="Server port, 0 = any free one [default: STACK_PORT (STACK_ARTIFACTS_PORT "
                   "with --artifacts-only), else as last started, else 5000 (5001)].")
@click.option("--workers", type=int, default=None,
              help="uvicorn workers [default: as last started, else 1; more than 1 stalls "
                   "keep-alive responses ~40 ms here].")
@click.option("--artifacts-only", is_flag=True,
              help="Start the artifacts-only server (for deployment clients) instead of the "
                   "tracking server; tracking APIs answer 503 there.")
@click.option("--auth/--no-auth", default=None,
              help="Run MLflow's basic-auth app; admin password from "
                   "MLFLOW_AUTH_ADMIN_PASSWORD (placeholders refused) [default: as last "
                   "started, else off].")
@click.option(INSECURE_FLAG, "insecure", is_flag=True,
              help="Serve WITHOUT authentication on a non-loopback host (a private network "
                   "you trust): anyone who reaches it can register a model every mode runs.")
@click.option(RESET_FLAG, "reset_pg_password", is_flag=True,
              help="Local PostgreSQL: give the existing role POSTGRES_PASSWORD, or a new "
                   "generated password kept in ~/.config/duration/secrets.json.")
def up(mode: str | None, host: str | None, port: int | None, workers: int | None,
       artifacts_only: bool, auth: bool | None, insecure: bool,
       reset_pg_password: bool) -> None:
    """Start the stack and wait until every component is ready; then check that every version
    an alias points to can be read back."""
    cfg = StackSettings()
    paths = stack_paths()
    last = previous_launch(paths, "mlflow-artifacts" if artifacts_only else "mlflow")
    mode = mode or last.get("mode") or "embedded"
    host = host or _setting(cfg, "stack_host", last.get("host"))
    if port is None:
        port = _setting(cfg, "stack_artifacts_port" if artifacts_only else "stack_port",
                        last.get("port"))
    workers = workers or last.get("workers") or 1
    auth = bool(last.get("auth")) if auth is None else auth
    if auth and artifacts_only:
        raise click.UsageError("--auth applies to the tracking server, not --artifacts-only")
    check_exposure(host, auth, artifacts_only, insecure)
    port = port or free_port(host)  # 0 = any free port
    uri = up_stack(paths, cfg, mode, host, port, workers, artifacts_only, auth,
                   reset_pg_password)
    click.echo(f"{'MLFLOW_ARTIFACTS_URI' if artifacts_only else 'MLFLOW_TRACKING_URI'}={uri}")
    if not artifacts_only:
        for line, ok in registry_lines(uri, cfg, auth):
            (log.info if ok else log.warning)("registry: %s", line)


@cli.command("down")
@click.option("--component", "-c", "components", multiple=True,
              type=click.Choice(["mlflow", "mlflow-artifacts", "s3"]),
              help="Stop only this component (repeatable), e.g. to restart the server alone "
                   "(`up` then starts it as it was).")
def down_cmd(components: tuple[str, ...]) -> None:
    """Stop exactly what `up` started (PostgreSQL, the machine's service, is left running).
    Data stays: the registry and artifacts are in $STACK_HOME or the production stores."""
    stopped = down(stack_paths(), list(components))
    click.echo(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@cli.command()
def status() -> None:
    """Show each component's pid and health, and every version behind an alias whose
    artifacts cannot be read back (one line each). Exit 1 when anything is unhealthy."""
    lines = health(stack_paths(), StackSettings())
    if not lines:
        click.echo("stack: not running")
    for component, text, _ in lines:
        click.echo(f"{component}: {text}")
    if not all(ok for _, _, ok in lines):
        raise SystemExit(1)


@cli.command("backup")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--mode", type=MODES, default=None,
              help="Which stack [default: the one running or last started, else embedded].")
def backup_cmd(dest: Path, mode: str | None) -> None:
    """Back up the registry, runs and artifacts into the new folder DEST (a consistent
    PostgreSQL dump + the bucket's objects, or the embedded sqlite + artifact folder)."""
    paths = stack_paths()
    mode = mode or previous_launch(paths, "mlflow").get("mode") or "embedded"
    m = backup(paths, StackSettings(), mode, dest)
    click.echo(f"backup: {mode} stack -> {dest}: {m['versions']} model versions, aliases "
               f"{_aliases(m['aliases'])}, {m['objects']} artifact files "
               f"({m['bytes'] / 1e6:.1f} MB)")


@cli.command("restore")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--replace", is_flag=True,
              help="Overwrite a store that is not empty (its database and prefix, or the "
                   "embedded registry) instead of refusing.")
def restore_cmd(src: Path, replace: bool) -> None:
    """Restore a backup made by `ops/stack backup` into this machine's stack (the server must
    be stopped); then `ops/stack up` serves it, every version and alias as they were."""
    r = restore(stack_paths(), StackSettings(), src, replace)
    then = "ops/stack up" + (" --mode production" if r["mode"] == "production" else "")
    click.echo(f"restored: {r['mode']} stack from {src}: {r['versions']} model versions, "
               f"aliases {_aliases(r['aliases'])}, {r['objects']} artifact files; "
               f"start it with `{then}`")


def _aliases(rows) -> str:
    return ", ".join(f"{name}@{alias}={version}" for name, alias, version in rows) or "none"
