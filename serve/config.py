"""One settings object per process, read from the environment and a ``.env`` file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

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
