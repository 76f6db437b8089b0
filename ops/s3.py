"""The S3 endpoint of the tracking stack: reach it with a bounded retry, create the bucket.

Works unchanged against moto_server, MinIO or AWS S3: only the endpoint URL differs.
"""

from __future__ import annotations

from ops.procs import wait_for

# moto accepts any credentials; these are only used against a moto_server the stack started.
MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
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
