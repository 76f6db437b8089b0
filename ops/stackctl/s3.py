"""The S3 endpoint of the tracking stack: reach it with a bounded retry, create the bucket;
start (or reuse) a local moto_server when no endpoint is configured.

Works unchanged against moto_server, MinIO or AWS S3: only the endpoint URL differs.
"""

from __future__ import annotations

import logging
import os

from ops.moto import MOTO_CREDENTIALS, moto_cmd, moto_ready
from ops.procs import free_port, port_open, wait_for
from ops.stackctl.config import StackSettings, secret_value
from ops.stackctl.state import StackPaths, load_state, read_pid, save_state, start_component
from serve.urls import masked

log = logging.getLogger("stack")


# Errors that no retry fixes: report them at once instead of waiting out the bound.
FATAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
               "InvalidBucketName", "AllAccessDisabled"}


class S3Error(RuntimeError):
    """The S3 endpoint is unreachable or refuses us."""


def s3_client(endpoint: str | None, env: dict[str, str]):
    """A boto3 S3 client for ``endpoint`` with the credentials in ``env`` (or boto3's chain),
    short timeouts and no hidden retries, so that our bounded retry decides."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=endpoint or None,
        region_name=env.get("AWS_DEFAULT_REGION") or "us-east-1",
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
        aws_session_token=env.get("AWS_SESSION_TOKEN") or None,
        config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))


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
    try:
        cmd = moto_cmd(port)
    except FileNotFoundError as e:
        raise S3Error(f"s3: {e} and MLFLOW_S3_ENDPOINT_URL is unset") from None
    started.append("moto")  # before it runs: a failure from here on stops it
    start_component(paths, "moto", cmd, dict(os.environ), moto_ready(endpoint),
                    timeout=max(cfg.stack_wait_seconds, 30))
    return endpoint


def s3_env(cfg: StackSettings, endpoint: str | None, moto: bool) -> dict[str, str]:
    """The S3 part of the tracking server's environment (and only of its environment)."""
    env = {"AWS_ACCESS_KEY_ID": cfg.aws_access_key_id,
           "AWS_SECRET_ACCESS_KEY": secret_value(cfg.aws_secret_access_key),
           "AWS_SESSION_TOKEN": secret_value(cfg.aws_session_token),
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
    log.info("s3 ready: %s bucket %s%s", masked(endpoint), cfg.stack_s3_bucket,
             " (created)" if created else "")
    save_state(paths, s3={"endpoint": endpoint, "bucket": cfg.stack_s3_bucket,
                          "prefix": cfg.stack_s3_prefix, "moto": moto})
    return env
