"""What ``ops/stack up|down|status`` do: start the stores and the server, stop what ``up``
started, report each component's health and the registry's integrity."""

from __future__ import annotations

import ipaddress
import logging
import os

import click

from ops.procs import http_ok, port_open, stop
from ops.stackctl.config import StackSettings, secret_value
from ops.stackctl.integrity import check_registry
from ops.stackctl.pg import PostgresError, pg_ready, prepare_postgres
from ops.stackctl.s3 import LOCAL_S3, S3Error, bucket_ok, prepare_s3, recorded_s3_env, s3_client
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
    forget_state,
    load_state,
    read_pid,
    recorded_components,
    save_state,
    start_component,
    stop_components,
)
from serve.urls import masked

log = logging.getLogger("stack")

INSECURE_FLAG = "--insecure-no-auth"
STORES = {"embedded": set(), "production": {"postgresql", "s3"}}


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name may resolve to any interface


def check_exposure(host: str, auth: bool, artifacts_only: bool, insecure: bool) -> None:
    """Refuse to serve the registry (or its artifacts) unauthenticated beyond loopback: every
    serving mode unpickles what the alias points to, so the registry is a code-execution trust
    root. ``insecure`` (``--insecure-no-auth``) overrides it, loudly, for a private network."""
    if auth or is_loopback(host):
        return
    what = "the artifacts-only server" if artifacts_only else "the tracking server"
    if insecure:
        log.warning("%s serves WITHOUT authentication on %s (%s): anyone who reaches it can "
                    "register or replace a model that every serving mode will run",
                    what, host, INSECURE_FLAG)
        return
    fix = ("bind 127.0.0.1 and put an authenticating proxy in front" if artifacts_only
           else "add --auth (admin password in MLFLOW_AUTH_ADMIN_PASSWORD) or bind 127.0.0.1")
    raise click.ClickException(
        f"{'mlflow-artifacts' if artifacts_only else 'mlflow'}: refusing to serve {what} "
        f"without authentication on {host}, which is not loopback (the registry decides what "
        f"code every serving mode runs): {fix}; on a private network you trust, "
        f"{INSECURE_FLAG}")


def previous_launch(paths: StackPaths, component: str) -> dict:
    """How ``component`` was last started (mode, host, port, workers, auth), as ``up``
    recorded it; ``down`` of the whole stack forgets it, ``down -c`` keeps it."""
    return load_state(paths).get(component, {})


def up_stack(paths: StackPaths, cfg: StackSettings, mode: str, host: str, port: int,
             workers: int = 1, artifacts_only: bool = False, auth: bool = False,
             reset_pg_password: bool = False) -> str:
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
    if not artifacts_only:  # what an earlier stack of another mode recorded is not ours
        state = load_state(paths)
        stale = [k for k in ("postgresql", "s3") if k in state and k not in STORES[mode]
                 and not (k == "s3" and read_pid(paths, LOCAL_S3))]
        if stale:
            forget_state(paths)
            save_state(paths, **{k: v for k, v in state.items() if k not in stale})
    started: list[str] = []
    try:
        env = server_env()
        for key in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_CONFIG_PATH"):
            env.pop(key, None)  # only what we set below
        if mode == "embedded":
            state_dir = paths.home / "embedded"
            destination, store = embedded_store(state_dir)
            auth_db = f"sqlite:///{state_dir / 'basic_auth.db'}"
        else:
            store = None if artifacts_only else prepare_postgres(paths, cfg, reset_pg_password)
            env.update(prepare_s3(paths, cfg, started))
            destination = f"s3://{cfg.stack_s3_bucket}/{cfg.stack_s3_prefix}"
            auth_db = store
        cwd = None
        if artifacts_only:  # it refuses a store, yet creates MLflow's default ./mlflow.db
            cwd = paths.home / "artifacts-only"
            cwd.mkdir(parents=True, exist_ok=True)
        else:
            env["MLFLOW_BACKEND_STORE_URI"] = store
        if auth:
            env.update(auth_env(paths, cfg, auth_db))
        cmd = server_cmd(host, port, destination, workers, artifacts_only,
                         cfg.stack_allowed_hosts or default_allowed_hosts(host),
                         "basic-auth" if auth else None)
        uri = f"http://{host}:{port}"
        started.append(component)
        start_component(paths, component, cmd, env, http_ok(f"{uri}/health"),
                        timeout=cfg.stack_server_timeout, cwd=cwd)
        save_state(paths, **{component: {"uri": uri, "mode": mode, "host": host, "port": port,
                                         "workers": workers, "auth": auth,
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
    names some); returns the names of those that were running. Stopping the whole stack
    also forgets what it recorded, so the next ``up`` starts from nothing."""
    stopped = []
    for component in recorded_components(paths):
        if components and component not in components:
            continue
        pid = read_pid(paths, component)
        if pid is not None and stop(pid):
            stopped.append(component)
        paths.pidfile(component).unlink(missing_ok=True)
    if not components:
        forget_state(paths)
    return stopped


def _quiet(check) -> bool:
    try:
        return bool(check())
    except Exception:  # noqa: BLE001 - unreachable is a status, not an error
        return False


def registry_lines(uri: str, cfg: StackSettings, auth: bool) -> list[tuple[str, bool]]:
    """(line, healthy): one per version behind an alias (or stage Production) whose
    artifacts cannot be read, then a summary."""
    if auth and not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        if password := secret_value(cfg.mlflow_auth_admin_password):
            os.environ["MLFLOW_TRACKING_USERNAME"] = cfg.mlflow_auth_admin_username
            os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    try:
        checks = check_registry(uri)
    except Exception as e:  # noqa: BLE001 - reported as a status line
        return [(f"cannot check the registry at {uri}: {' '.join(str(e).split())[:200]}",
                 False)]
    bad = [c for c in checks if not c.ok]
    summary = (f"{len(checks)} version(s) behind aliases or stage Production, "
               + (f"{len(bad)} NOT readable" if bad else "all readable"))
    return [(c.line(), False) for c in bad] + [(summary, not bad)]


def health(paths: StackPaths, cfg: StackSettings) -> list[tuple[str, str, bool]]:
    """Status lines (component, text, healthy): processes by pid file, stores by a live check,
    then the registry's integrity (see :mod:`ops.stackctl.integrity`)."""
    state = load_state(paths)
    lines: list[tuple[str, str, bool]] = []
    pids = recorded_components(paths)
    for component in pids:
        pid = read_pid(paths, component)
        if pid is None:
            lines.append((component, "dead (stale pid file)", False))
            continue
        if component == LOCAL_S3:
            url = state.get("s3", {}).get("endpoint")
            client = s3_client(url, recorded_s3_env(paths, cfg, state["s3"])) if url else None
            ok = client is not None and _quiet(client.list_buckets)
            where = f"{masked(url) if url else url} data {paths.home / 's3'}"
        else:
            url = state.get(component, {}).get("uri")
            where = masked(url) if url else url
            ok = bool(url) and _quiet(http_ok(f"{url}/health"))
        lines.append((component, f"running, pid {pid}, {where} "
                                 f"{'healthy' if ok else 'NOT answering'}", ok))
    if not pids:
        return lines
    if pg := state.get("postgresql"):
        ok = pg_ready(pg["host"], pg["port"])
        lines.append(("postgresql", f"{pg['host']}:{pg['port']}/{pg['db']} "
                      f"{'accepting connections' if ok else 'NOT accepting connections'}", ok))
    if s3 := state.get("s3"):
        env = {**os.environ, **recorded_s3_env(paths, cfg, s3)}
        ok = bucket_ok(s3["endpoint"], s3["bucket"], env)
        lines.append(("s3", f"{s3['endpoint']} bucket {s3['bucket']} "
                            f"{'ok' if ok else 'NOT reachable'}", ok))
    server = state.get("mlflow", {})
    if read_pid(paths, "mlflow") is not None and server.get("uri"):
        lines += [("registry", line, ok) for line, ok in
                  registry_lines(server["uri"], cfg, server.get("auth", False))]
    return lines
