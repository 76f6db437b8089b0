"""Settings of ``ops/stack`` (environment, then ``.env``), and the secrets it keeps itself.

Secrets that a local stack can invent (the local PostgreSQL role's password, the auth app's
CSRF key) are generated once and kept in ``$STACK_HOME/secrets.json`` (mode 0600); secrets
that only a person can choose (the auth admin password, a remote database's password) are
required, and placeholders are refused.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from pydantic import Field, SecretStr

# Re-exported: the secrets checks live in ops.basic_auth, which the tracking image runs too.
from ops.basic_auth import PLACEHOLDERS, example_values, is_placeholder, write_private  # noqa: F401
from serve.config import Settings


class StackSettings(Settings):
    """Configuration of the tracking stack (see README, section stack)."""

    stack_host: str = Field("127.0.0.1", description="Interface the tracking servers bind.")
    stack_port: int = Field(5000, description="Tracking server port.")
    stack_artifacts_port: int = Field(5001, description="Artifacts-only server port.")
    stack_allowed_hosts: str | None = Field(
        None, description="Host headers the servers accept (comma-separated; default loopback).")
    stack_wait_seconds: float = Field(15.0, description="Bound on waiting for PostgreSQL or S3.")
    stack_server_timeout: float = Field(180.0, description="Bound on a tracking server start.")
    stack_moto_port: int = Field(0, description="Port of the local moto_server (0 = any free).")
    stack_s3_bucket: str = Field("duration-mlflow", description="Bucket of the artifacts.")
    stack_s3_prefix: str = Field("mlartifacts", description="Key prefix of the artifacts.")
    mlflow_s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint (MinIO, AWS); unset = start a local moto_server.")
    aws_access_key_id: str | None = Field(None, description="S3 key id of the server only.")
    aws_secret_access_key: SecretStr | None = Field(None, description="S3 secret, server only.")
    aws_session_token: SecretStr | None = Field(None, description="S3 session token, optional.")
    aws_default_region: str = Field("us-east-1", description="Region of the bucket.")
    postgres_host: str = Field("127.0.0.1", description="PostgreSQL host (local = set up).")
    postgres_port: int = Field(5432, description="PostgreSQL port.")
    postgres_user: str = Field("mlflow", description="Role owning the MLflow database.")
    postgres_password: SecretStr | None = Field(
        None, description="Role password; unset + local host = generated once, kept 0600.")
    postgres_db: str = Field("mlflow", description="Database of runs and the registry.")
    mlflow_auth_admin_username: str = Field("admin", description="Basic-auth admin user.")
    mlflow_auth_admin_password: SecretStr | None = Field(
        None, description="Basic-auth admin password (--auth); placeholders are refused.")


def _secrets_file(home: Path) -> Path:
    return home / "secrets.json"


def kept_secret(home: Path, name: str) -> str:
    """A random secret generated on first use and kept in ``$STACK_HOME/secrets.json`` (0600)."""
    path = _secrets_file(home)
    data = json.loads(path.read_text()) if path.exists() else {}
    if name not in data:
        data[name] = secrets.token_urlsafe(24)
        write_private(path, json.dumps(data, indent=1))
    return data[name]


def secret_value(value: SecretStr | None) -> str | None:
    """The plain text of an optional secret setting (None when unset or empty)."""
    return (value.get_secret_value() or None) if value is not None else None
