"""``ops/stack up|down|status``: the MLflow tracking stack on this machine.

Embedded mode (the default, used by ``make demo``): one ``mlflow server`` with
a sqlite backend and a local artifact folder, serving artifacts itself
(``--serve-artifacts``), bound to 127.0.0.1. State lives in ``$STACK_HOME``
(default ``.stack/``): ``logs/`` has one log per component, ``run/`` the pid
files ``down`` uses to stop exactly what ``up`` started.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from ops.procs import http_ok, port_open, start, stop, wait_for

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


def read_pid(paths: StackPaths, component: str) -> int | None:
    """The pid recorded for ``component`` if that process is still alive."""
    try:
        pid = int(paths.pidfile(component).read_text().strip())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None


def start_component(paths: StackPaths, component: str, cmd: list[str], env: dict,
                    ready, timeout: float) -> int:
    """Start one component, record its pid, wait until ``ready()`` holds (bounded)."""
    proc = start(cmd, paths.logfile(component), env=env)
    paths.run.mkdir(parents=True, exist_ok=True)
    paths.pidfile(component).write_text(str(proc.pid))
    try:
        wait_for(ready, component, timeout=timeout, proc=proc)
    except (TimeoutError, RuntimeError) as e:
        stop(proc.pid)
        paths.pidfile(component).unlink(missing_ok=True)
        tail = paths.logfile(component).read_text(errors="replace").strip().splitlines()[-3:]
        raise click.ClickException(f"{component}: failed to start: {e}; log "
                                   f"{paths.logfile(component)}: {' | '.join(tail)}") from e
    log.info("%s ready (pid %d)", component, proc.pid)
    return proc.pid


def server_env(**extra: str) -> dict[str, str]:
    """Environment for an ``mlflow server`` we start: our environment, with MLflow's GenAI job
    runner off (it forks 8 processes of ~280 MB that this project never uses)."""
    return dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **extra)


def embedded_server_cmd(state: Path, host: str, port: int, workers: int = 1) -> list[str]:
    """``mlflow server`` with a sqlite backend and a proxied local artifact folder in ``state``."""
    (state / "mlartifacts").mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
            "--artifacts-destination", str(state / "mlartifacts"), "--serve-artifacts",
            "--host", host, "--port", str(port), "--workers", str(workers)]


def up_embedded(paths: StackPaths, host: str, port: int, workers: int) -> str:
    """Start the embedded tracking server; returns its URI."""
    if (pid := read_pid(paths, "mlflow")) is not None:
        raise click.ClickException(f"mlflow: already running (pid {pid}); `ops/stack down` first")
    if port_open(host, port):
        raise click.ClickException(f"mlflow: port {port} on {host} is already in use")
    cmd = embedded_server_cmd(paths.home / "embedded", host, port, workers)
    uri = f"http://{host}:{port}"
    start_component(paths, "mlflow", cmd, server_env(), http_ok(f"{uri}/health"), timeout=60)
    return uri


def down(paths: StackPaths) -> list[str]:
    """Stop every component this stack started (by pid file); returns their names."""
    stopped = []
    for pidfile in sorted(paths.run.glob("*.pid")) if paths.run.exists() else []:
        component = pidfile.stem
        pid = read_pid(paths, component)
        if pid is not None and stop(pid):
            stopped.append(component)
        pidfile.unlink(missing_ok=True)
    return stopped


@click.group()
def cli() -> None:
    """Start, stop and inspect the MLflow tracking stack."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s stack %(message)s")


@cli.command()
@click.option("--mode", type=click.Choice(["embedded"]), default="embedded", show_default=True,
              help="embedded: sqlite + local artifact folder.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", type=int, default=5000, show_default=True, help="Tracking server port.")
@click.option("--workers", type=int, default=1, show_default=True,
              help="uvicorn workers (more than 1 stalls keep-alive responses ~40 ms here).")
def up(mode: str, host: str, port: int, workers: int) -> None:
    """Start the stack and wait until every component is ready."""
    uri = up_embedded(stack_paths(), host, port, workers)
    click.echo(f"MLFLOW_TRACKING_URI={uri}")


@cli.command("down")
def down_cmd() -> None:
    """Stop exactly what `up` started."""
    stopped = down(stack_paths())
    click.echo(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@cli.command()
def status() -> None:
    """Show each component's pid and health."""
    paths = stack_paths()
    components = sorted(p.stem for p in paths.run.glob("*.pid")) if paths.run.exists() else []
    if not components:
        click.echo("stack: not running")
        return
    for component in components:
        pid = read_pid(paths, component)
        click.echo(f"{component}: {'running, pid ' + str(pid) if pid else 'dead (stale pid file)'}")


if __name__ == "__main__":
    cli()
