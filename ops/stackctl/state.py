"""Where the stack keeps its state (``$STACK_HOME``): logs, pid files, ``run/stack.json``;
starting a component with its pid recorded, and stopping recorded components."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import click

from ops.procs import spawn, stop
from serve.atomic import write_atomic
from serve.config import stack_home

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
    """Paths under ``$STACK_HOME`` (default ``.stack`` at the project root)."""
    return StackPaths(stack_home())


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (to tell it from a later process given the same pid)."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else None


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
    if _stat(pid)[:1] == ["Z"]:
        return None  # killed, not yet reaped by its parent: dead all the same
    return pid


def start_component(paths: StackPaths, component: str, cmd: list[str], env: dict,
                    ready, timeout: float, cwd: Path | None = None) -> int:
    """Start one component, record its pid, wait until ``ready()`` holds (bounded); on any
    failure, Ctrl-C included, it is stopped (by :func:`ops.procs.spawn`) and its pid file
    removed."""
    started: list[subprocess.Popen] = []

    def record(proc: subprocess.Popen) -> None:
        started.append(proc)
        write_pid(paths, component, proc.pid)

    try:
        proc = spawn(cmd, paths.logfile(component), ready, component, timeout=timeout, env=env,
                     cwd=cwd, on_start=record)
    except (TimeoutError, RuntimeError) as e:
        # wait_for raises RuntimeError when the process exited, TimeoutError when it is late.
        why = (f"exited with code {started[0].returncode} while starting"
               if isinstance(e, RuntimeError) and started else f"not ready after {timeout:.0f} s")
        paths.pidfile(component).unlink(missing_ok=True)
        tail = paths.logfile(component).read_text(errors="replace").strip().splitlines()[-2:]
        raise click.ClickException(f"{component}: {why}; log {paths.logfile(component)}: "
                                   f"{' | '.join(ln.strip() for ln in tail)}") from e
    except BaseException:
        paths.pidfile(component).unlink(missing_ok=True)
        raise
    log.info("%s ready (pid %d)", component, proc.pid)
    return proc.pid


def load_state(paths: StackPaths) -> dict:
    """What ``up`` recorded in ``run/stack.json`` (no secrets), or {}."""
    path = paths.run / "stack.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_state(paths: StackPaths, **entries: dict) -> None:
    """Merge ``entries`` into ``run/stack.json``."""
    state = {**load_state(paths), **entries}
    write_atomic(paths.run / "stack.json", json.dumps(state, indent=1))


def recorded_components(paths: StackPaths) -> list[str]:
    """The components with a pid file, alive or not (sorted by name)."""
    return sorted(p.stem for p in paths.run.glob("*.pid")) if paths.run.exists() else []


def forget_state(paths: StackPaths) -> None:
    """Drop ``run/stack.json`` (a fresh ``up`` records the stack it starts, nothing older)."""
    (paths.run / "stack.json").unlink(missing_ok=True)


def stop_components(paths: StackPaths, components: list[str]) -> None:
    """Stop the recorded ``components`` (last started first) and remove their pid files."""
    for component in reversed(components):
        if (pid := read_pid(paths, component)) is not None:
            stop(pid)
        paths.pidfile(component).unlink(missing_ok=True)
