"""``ops/stack backup DIR`` and ``ops/stack restore DIR``: the registry, runs and artifacts of
a stack, restorable onto a fresh machine.

Production: a ``pg_dump`` of the store (one snapshot, so runs, versions and aliases are
consistent with each other) taken *first*, then every object under the artifact prefix.
Artifacts are written before the rows that point to them (MLflow uploads a model before it
registers it), so every version in the dump has its objects in the bucket when they are
copied afterwards; objects written in between are extras, never holes. Embedded: sqlite's
online backup of ``mlflow.db`` (consistent while the server runs), then the artifact folder.

``manifest.json`` is written last: a folder without it is an interrupted backup, which
``restore`` refuses. Artifact locations in the store are ``mlflow-artifacts:/...`` (proxied),
so a restore may use another bucket, prefix, database, role or ``STACK_HOME``.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import click

from ops.stackctl.config import StackSettings
from ops.stackctl.pg import PostgresError, dump_database, prepare_postgres, query, restore_database
from ops.stackctl.s3 import (
    S3Error,
    download_prefix,
    iter_objects,
    prepare_s3,
    s3_client,
    upload_tree,
)
from ops.stackctl.state import StackPaths, read_pid, stop_components

log = logging.getLogger("stack")

MANIFEST = "manifest.json"
ALIASES_SQL = "SELECT name, alias, version FROM registered_model_aliases ORDER BY name, alias"
VERSIONS_SQL = "SELECT count(*) FROM model_versions"
TABLES_SQL = ("SELECT count(*) FROM information_schema.tables WHERE table_schema = "
              "current_schema()")


def _sqlite_rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return [tuple(r) for r in conn.execute(sql).fetchall()]


def _new_folder(dest: Path) -> None:
    if dest.exists() and any(dest.iterdir()):
        raise click.ClickException(f"backup: {dest} is not empty; give a new folder")
    dest.mkdir(parents=True, exist_ok=True)


def _write_manifest(dest: Path, **facts) -> dict:
    import mlflow

    manifest = {"format": 1, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "mlflow_version": mlflow.__version__, **facts}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _stores(paths: StackPaths, cfg: StackSettings) -> tuple[str, object, list[str]]:
    """Reach the production stores (starting the local S3 server if it is not running):
    the store URI, an S3 client, and what this call started (to stop afterwards)."""
    started: list[str] = []
    try:
        uri = prepare_postgres(paths, cfg)
        env = prepare_s3(paths, cfg, started)
    except (PostgresError, S3Error) as e:
        stop_components(paths, started)
        raise click.ClickException(str(e)) from None
    return uri, s3_client(env.get("MLFLOW_S3_ENDPOINT_URL"), env, retries=5), started


def backup(paths: StackPaths, cfg: StackSettings, mode: str, dest: Path) -> dict:
    """Back up the ``mode`` stack of ``paths`` into the new folder ``dest``; returns the
    manifest."""
    _new_folder(dest)
    if mode == "embedded":
        src = paths.home / "embedded"
        if not (src / "mlflow.db").exists():
            raise click.ClickException(f"backup: no embedded store in {src} (the production "
                                       "stack: --mode production)")
        for name in ("mlflow.db", "basic_auth.db"):
            if (src / name).exists():
                with sqlite3.connect(src / name) as live, sqlite3.connect(dest / name) as copy:
                    live.backup(copy)
        shutil.copytree(src / "mlartifacts", dest / "artifacts")
        files = [p for p in (dest / "artifacts").rglob("*") if p.is_file()]
        aliases = _sqlite_rows(dest / "mlflow.db", ALIASES_SQL)
        versions = _sqlite_rows(dest / "mlflow.db", VERSIONS_SQL)[0][0]
        return _write_manifest(dest, mode=mode, database="mlflow.db", aliases=aliases,
                               versions=versions, objects=len(files),
                               bytes=sum(p.stat().st_size for p in files))
    uri, client, started = _stores(paths, cfg)
    try:
        dump_database(uri, dest / "postgres.dump")  # first: see the module doc
        aliases, versions = query(uri, ALIASES_SQL), query(uri, VERSIONS_SQL)[0][0]
        copied = download_prefix(client, cfg.stack_s3_bucket, cfg.stack_s3_prefix,
                                 dest / "artifacts")
    except PostgresError as e:
        raise click.ClickException(str(e)) from None
    finally:
        stop_components(paths, started)
    return _write_manifest(dest, mode=mode, database="postgres.dump",
                           aliases=[list(a) for a in aliases], versions=versions,
                           objects=len(copied), bytes=sum(size for _, size in copied))


def read_manifest(src: Path) -> dict:
    """The manifest of a complete backup in ``src``."""
    if not (src / MANIFEST).exists():
        raise click.ClickException(f"restore: {src} has no {MANIFEST}: not a backup, or an "
                                   "interrupted one")
    return json.loads((src / MANIFEST).read_text())


def restore(paths: StackPaths, cfg: StackSettings, src: Path, replace: bool = False) -> dict:
    """Restore the backup in ``src`` into this machine's stack (its mode is the backup's);
    refuses to overwrite a non-empty store unless ``replace``. Returns what the restored
    registry holds: ``aliases`` and ``versions``, checked against the manifest."""
    import mlflow

    manifest = read_manifest(src)
    if manifest["mlflow_version"] != mlflow.__version__:
        log.warning("restore: the backup was taken with MLflow %s, this is %s: run `mlflow db "
                    "upgrade` on the store if the server refuses its schema",
                    manifest["mlflow_version"], mlflow.__version__)
    for component in ("mlflow", "mlflow-artifacts"):
        if read_pid(paths, component) is not None:
            raise click.ClickException(f"restore: {component} is running; `ops/stack down -c "
                                       f"{component}` first")
    if manifest["mode"] == "embedded":
        dest = paths.home / "embedded"
        if (dest / "mlflow.db").exists() and not replace:
            raise click.ClickException(f"restore: {dest} already holds a registry; restore "
                                       "into a new STACK_HOME, or --replace it")
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for name in ("mlflow.db", "basic_auth.db"):
            if (src / name).exists():
                shutil.copy2(src / name, dest / name)
        shutil.copytree(src / "artifacts", dest / "mlartifacts")
        restored = {"aliases": _sqlite_rows(dest / "mlflow.db", ALIASES_SQL),
                    "versions": _sqlite_rows(dest / "mlflow.db", VERSIONS_SQL)[0][0]}
    else:
        uri, client, started = _stores(paths, cfg)
        try:
            bucket, prefix = cfg.stack_s3_bucket, cfg.stack_s3_prefix
            if not replace:
                if query(uri, TABLES_SQL)[0][0]:
                    raise click.ClickException(
                        f"restore: database {cfg.postgres_db} already has tables; restore onto "
                        "an empty database (POSTGRES_DB), or --replace it")
                if next(iter_objects(client, bucket, prefix.rstrip("/") + "/"), None):
                    raise click.ClickException(
                        f"restore: s3://{bucket}/{prefix} is not empty; restore into an empty "
                        "prefix (STACK_S3_BUCKET, STACK_S3_PREFIX), or --replace")
            restore_database(uri, src / manifest["database"], replace=replace)
            upload_tree(client, src / "artifacts", bucket, prefix)
            restored = {"aliases": query(uri, ALIASES_SQL),
                        "versions": query(uri, VERSIONS_SQL)[0][0]}
        except PostgresError as e:
            raise click.ClickException(str(e)) from None
        finally:
            stop_components(paths, started)
    restored["aliases"] = [list(a) for a in restored["aliases"]]
    if restored["aliases"] != manifest["aliases"] or restored["versions"] != manifest["versions"]:
        raise click.ClickException(f"restore: the restored registry does not match the backup "
                                   f"(aliases {restored['aliases']}, {restored['versions']} "
                                   f"versions; the manifest says {manifest['aliases']}, "
                                   f"{manifest['versions']})")
    return {**restored, "mode": manifest["mode"], "objects": manifest["objects"]}
