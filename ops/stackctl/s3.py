"""The S3 endpoint of the tracking stack: reach it with a bounded retry, create the bucket;
start (or reuse) the local S3 server when no endpoint is configured; copy a prefix's objects
to a folder and back (backup and restore).

The local S3 server is nanio (PyPI): objects are plain files under ``$STACK_HOME/s3``, written
with fsync and an atomic rename, so they survive ``down``/``up`` and a machine restart; it
checks SigV4 signatures (its key is generated once and kept in ``$STACK_HOME/secrets.json``)
and speaks what MLflow's S3 artifact repository uses (ListObjectsV2 with continuation tokens,
multipart upload and abort, DeleteObjects, presigned URLs). Works unchanged against MinIO or
AWS S3: only the endpoint URL and the credentials differ.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ops.procs import find_command, free_port, port_open, wait_for
from ops.stackctl.config import StackSettings, kept_secret, secret_value
from ops.stackctl.state import StackPaths, load_state, read_pid, save_state, start_component
from serve.urls import masked

log = logging.getLogger("stack")


# Errors that no retry fixes: report them at once instead of waiting out the bound.
FATAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
               "InvalidBucketName", "AllAccessDisabled"}


class S3Error(RuntimeError):
    """The S3 endpoint is unreachable or refuses us."""


def s3_client(endpoint: str | None, env: dict[str, str], retries: int = 1):
    """A boto3 S3 client for ``endpoint`` with the credentials in ``env`` (or boto3's chain),
    short timeouts and by default no hidden retries, so that our bounded retry decides."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=endpoint or None,
        region_name=env.get("AWS_DEFAULT_REGION") or "us-east-1",
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
        aws_session_token=env.get("AWS_SESSION_TOKEN") or None,
        config=Config(connect_timeout=2, read_timeout=5 if retries == 1 else 60,
                      retries={"max_attempts": retries}))


def ensure_bucket(endpoint: str | None, bucket: str, env: dict[str, str],
                  timeout: float = 15.0) -> bool:
    """Wait for the endpoint, create ``bucket`` unless it exists; True if it was created."""
    from botocore.exceptions import ClientError, NoCredentialsError

    client = s3_client(endpoint, env)
    where = endpoint or "AWS S3"

    def attempt() -> str | S3Error:
        # A final error is returned (truthy) so wait_for stops polling at once.
        try:
            client.head_bucket(Bucket=bucket)
            return "exists"
        except NoCredentialsError:
            return S3Error(f"s3: no credentials for {where}: set AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY for the tracking server")
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code not in ("404", "NoSuchBucket", "NotFound"):
                if code in FATAL_CODES:
                    return S3Error(f"s3: {where} refused access to bucket {bucket!r}: {code} "
                                   "(check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
                raise
        try:
            region = client.meta.region_name
            kwargs = ({} if region == "us-east-1"
                      else {"CreateBucketConfiguration": {"LocationConstraint": region}})
            client.create_bucket(Bucket=bucket, **kwargs)
            return "created"
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("BucketAlreadyOwnedByYou",):
                return "exists"
            return S3Error(f"s3: cannot create bucket {bucket!r} on {where}: {code}")

    try:
        result = wait_for(attempt, "s3", timeout=timeout)
    except TimeoutError as e:
        reason = str(e).split("(", 1)[-1].rstrip(")")
        raise S3Error(f"s3: endpoint {where} unreachable after {timeout:.0f} s: {reason}") from None
    if isinstance(result, S3Error):
        raise result
    return result == "created"


def bucket_ok(endpoint: str | None, bucket: str, env: dict[str, str]) -> bool:
    """Whether ``bucket`` answers a HEAD request (for ``ops/stack status``)."""
    try:
        s3_client(endpoint, env).head_bucket(Bucket=bucket)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not healthy"
        return False


LOCAL_S3 = "s3"  # the component name of the local S3 server
LOCAL_S3_KEY_ID = "duration"  # not a secret: the secret key is generated


def local_s3_dir(paths: StackPaths) -> Path:
    """Where the local S3 server keeps its buckets (one folder each, objects as files)."""
    return paths.home / "s3"


def local_s3_credentials(paths: StackPaths) -> dict[str, str]:
    """The local S3 server's key (generated once per ``STACK_HOME``), as AWS_* variables."""
    return {"AWS_ACCESS_KEY_ID": LOCAL_S3_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": kept_secret(paths.home, "s3_secret_key")}


def local_s3_cmd(data_dir: Path, port: int) -> list[str]:
    """The local S3 server on 127.0.0.1:``port`` keeping its objects in ``data_dir`` (its
    credentials come from the environment: NANIO_ACCESS_KEY / NANIO_SECRET_KEY)."""
    nanio = find_command("nanio", "it is a dependency of this project: make install")
    return [nanio, "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1",
            "--port", str(port), "--no-access-log", "--log-level", "warning"]


def start_or_reuse_local_s3(paths: StackPaths, cfg: StackSettings, started: list[str]) -> str:
    """Endpoint of the stack's local S3 server, started on 127.0.0.1 unless already running."""
    previous = load_state(paths).get("s3", {})
    if read_pid(paths, LOCAL_S3) is not None and previous.get("local"):
        log.info("s3: reusing the local S3 server %s", previous["endpoint"])
        return previous["endpoint"]
    port = cfg.stack_s3_port or free_port()
    if port_open("127.0.0.1", port):
        raise S3Error(f"s3: port {port} on 127.0.0.1 is already in use (STACK_S3_PORT)")
    endpoint = f"http://127.0.0.1:{port}"
    try:
        cmd = local_s3_cmd(local_s3_dir(paths), port)
    except FileNotFoundError as e:
        raise S3Error(f"s3: {e} and MLFLOW_S3_ENDPOINT_URL is unset") from None
    local_s3_dir(paths).mkdir(parents=True, exist_ok=True)
    creds = local_s3_credentials(paths)
    env = {**os.environ, "NANIO_ACCESS_KEY": creds["AWS_ACCESS_KEY_ID"],
           "NANIO_SECRET_KEY": creds["AWS_SECRET_ACCESS_KEY"]}
    client = s3_client(endpoint, creds)
    started.append(LOCAL_S3)  # before it runs: a failure from here on stops it
    start_component(paths, LOCAL_S3, cmd, env, lambda: client.list_buckets() is not None,
                    timeout=max(cfg.stack_wait_seconds, 30))
    return endpoint


def s3_env(cfg: StackSettings, endpoint: str | None,
           local_credentials: dict[str, str] | None = None) -> dict[str, str]:
    """The S3 part of the tracking server's environment (and only of its environment)."""
    env = {"AWS_ACCESS_KEY_ID": cfg.aws_access_key_id,
           "AWS_SECRET_ACCESS_KEY": secret_value(cfg.aws_secret_access_key),
           "AWS_SESSION_TOKEN": secret_value(cfg.aws_session_token),
           "AWS_DEFAULT_REGION": cfg.aws_default_region,
           "MLFLOW_S3_ENDPOINT_URL": endpoint}
    if local_credentials:
        env.update(local_credentials, AWS_SESSION_TOKEN=None)
    return {k: v for k, v in env.items() if v}


def recorded_s3_env(paths: StackPaths, cfg: StackSettings, recorded: dict) -> dict[str, str]:
    """The S3 environment of the endpoint ``up`` recorded (``stack.json``'s ``s3`` entry)."""
    local = local_s3_credentials(paths) if recorded.get("local") else None
    return s3_env(cfg, recorded["endpoint"], local)


def prepare_s3(paths: StackPaths, cfg: StackSettings, started: list[str]) -> dict[str, str]:
    """Reach the S3 endpoint (the local S3 server unless configured) and create the bucket;
    returns the server's S3 environment."""
    endpoint = cfg.mlflow_s3_endpoint_url or None
    local = endpoint is None
    if local:
        endpoint = start_or_reuse_local_s3(paths, cfg, started)
    env = s3_env(cfg, endpoint, local_s3_credentials(paths) if local else None)
    created = ensure_bucket(endpoint, cfg.stack_s3_bucket, {**os.environ, **env},
                            timeout=cfg.stack_wait_seconds)
    log.info("s3 ready: %s bucket %s%s", masked(endpoint), cfg.stack_s3_bucket,
             " (created)" if created else "")
    save_state(paths, s3={"endpoint": endpoint, "bucket": cfg.stack_s3_bucket,
                          "prefix": cfg.stack_s3_prefix, "local": local})
    return env


def iter_objects(client, bucket: str, prefix: str) -> Iterator[dict]:
    """Every object under ``prefix`` (ListObjectsV2 pages: ``Key``, ``Size``, ...)."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])


def download_prefix(client, bucket: str, prefix: str, dest: Path) -> list[tuple[str, int]]:
    """Copy every object under ``prefix/`` to ``dest`` (keys relative to the prefix become
    paths); returns (relative key, size) of each."""
    root = prefix.rstrip("/") + "/" if prefix else ""
    copied = []
    for obj in iter_objects(client, bucket, root):
        rel = obj["Key"][len(root):]
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, obj["Key"], str(target))
        copied.append((rel, obj["Size"]))
    return copied


def upload_tree(client, src: Path, bucket: str, prefix: str) -> int:
    """Upload every file under ``src`` to ``prefix/<relative path>``; returns the count."""
    root = prefix.rstrip("/") + "/" if prefix else ""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    for path in files:
        client.upload_file(str(path), bucket, root + path.relative_to(src).as_posix())
    return len(files)
