"""One settings object per process, read from the environment and a ``.env`` file."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlparse

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from serve.errors import TrackingServerUnavailable
from serve.urls import masked

DEFAULT_TRACKING_URI = "http://127.0.0.1:5000"
DEFAULT_MODEL_URI = "models:/duration@production"
REGISTERED_MODEL_NAME = "duration"
PRODUCTION_ALIAS = "production"
PRODUCTION_STAGE = "Production"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class Settings(BaseSettings):
    """Configuration shared by training and every serving mode (contract: ARCHITECTURE.md)."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    mlflow_tracking_uri: str = Field(DEFAULT_TRACKING_URI,
                                     description="MLflow tracking server the model comes from.")
    model_uri: str = Field(DEFAULT_MODEL_URI, description="Model served by every mode.")
    predictions_stream_name: str = Field("ride_predictions",
                                         description="Kinesis stream prediction events go to.")
    kinesis_endpoint_url: str | None = Field(None,
                                             description="Kinesis endpoint; unset = real AWS.")


def get_settings() -> Settings:
    """Settings read now from the environment (and ``.env``), not at import time."""
    return Settings()


def use_tracking_server(settings: Settings | None = None) -> str:
    """Point MLflow at the tracking server the settings name (environment, then ``.env``, then
    the default) for this process and the subprocesses it starts; returns the URI.

    The one place the tracking URI is resolved: every entry point (train, web, batch, stream,
    the Lambda, the Prefect flow) calls it once at start-up. It exports
    ``MLFLOW_TRACKING_URI``, which MLflow reads when it is first used, so that a serving
    process whose model comes from the version cache never imports MLflow at all.
    """
    uri = (settings or get_settings()).mlflow_tracking_uri
    os.environ["MLFLOW_TRACKING_URI"] = uri
    if "mlflow" in sys.modules:  # imported already: its fluent API may hold another URI
        import mlflow

        mlflow.set_tracking_uri(uri)
    return uri


def require_tracking_server(uri: str | None = None, timeout: float = 5.0) -> str:
    """Check that a tracking server answers at ``uri`` (default: the one MLflow uses) within
    ``timeout`` seconds; returns ``uri``. Raises TrackingServerUnavailable with one line that
    says what to do, instead of MLflow's minutes of retries ending in a traceback.

    The one check every entry point makes right after :func:`use_tracking_server`:
    ``require_tracking_server(use_tracking_server(settings))``. Only ``http(s)`` URIs are
    checked (a local store needs no server); any answer but a 5xx counts as a server.
    """
    import requests

    if uri is None:
        import mlflow

        uri = mlflow.get_tracking_uri()
    if urlparse(uri).scheme not in ("http", "https"):
        return uri
    fix = "start it with `ops/stack up` or set MLFLOW_TRACKING_URI"
    shown = masked(uri)
    try:
        status = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout).status_code
    except requests.Timeout as e:
        raise TrackingServerUnavailable(
            f"no tracking server at {shown} (no answer within {timeout:g} s): {fix}") from e
    except requests.RequestException as e:
        raise TrackingServerUnavailable(
            f"no tracking server at {shown} (cannot connect): {fix}") from e
    if status >= 500:
        raise TrackingServerUnavailable(
            f"the tracking server at {shown} is not healthy (HTTP {status} on /health): "
            f"see its log (`ops/stack status`), or set MLFLOW_TRACKING_URI to another one")
    return uri


def stack_home() -> Path:
    """Where local state lives: ``$STACK_HOME`` (environment only), else ``.stack`` at the
    project root, so every command finds the same state whatever folder it runs from."""
    return Path(os.environ.get("STACK_HOME") or PROJECT_ROOT / ".stack").resolve()


def cache_home() -> Path:
    """Where downloads are kept between runs: ``$DURATION_CACHE`` (environment only), else
    ``~/.cache/duration`` (TLC months, model versions under ``models/``, MLServer's venv), or
    the temporary folder's ``duration-cache`` for a user without a home (a Lambda)."""
    if os.environ.get("DURATION_CACHE"):
        return Path(os.environ["DURATION_CACHE"])
    try:
        return Path.home() / ".cache" / "duration"
    except RuntimeError:  # no HOME and no passwd entry
        import tempfile

        return Path(tempfile.gettempdir()) / "duration-cache"
