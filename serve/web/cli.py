"""``python -m serve.web``: settings from options, environment and ``.env``, then uvicorn."""

from __future__ import annotations

import logging
import os

import click

from serve.cli import Command
from serve.config import use_tracking_server
from serve.logs import setup_logging
from serve.urls import masked
from serve.web.app import create_app
from serve.web.server import serve
from serve.web.settings import WebSettings

log = logging.getLogger(__name__)


def _bounded_registry_calls() -> None:
    """Fail a registry call in seconds, not minutes: the next poll is the retry."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # Progress bars of artifact downloads are noise in a service log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # A failed poll is logged once by the holder; urllib3's per-retry warnings only repeat it.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)



@click.command(cls=Command)
@click.option("--model-uri", default=None,
              help="Model to serve [env MODEL_URI, default models:/duration@production].")
@click.option("--host", default=None, help="Interface to bind [env WEB_HOST, default 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port [env WEB_PORT, default 9696].")
@click.option("--poll-interval", type=float, default=None,
              help="Seconds between registry polls for a new version [env WEB_POLL_INTERVAL, "
                   "default 30].")
@click.option("--max-body-bytes", type=int, default=None,
              help="Largest request body accepted [env WEB_MAX_BODY_BYTES, default 1 MiB].")
@click.option("--max-rows", type=int, default=None,
              help="Most rides per request [env WEB_MAX_ROWS, default 10000].")
@click.option("--log-predictions", default=None,
              help="Log every prediction to a .jsonl file, a parquet folder or a "
                   "postgresql+psycopg2:// URL [env WEB_LOG_PREDICTIONS, default off].")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]), help="Log verbosity.")
def main(model_uri, host, port, poll_interval, max_body_bytes, max_rows, log_predictions,
         log_level) -> None:
    """Serve the ride-duration model: /predict, /invocations, /health, /ready, /version,
    /metrics."""
    setup_logging(log_level)
    overrides = {k: v for k, v in {
        "model_uri": model_uri, "web_host": host, "web_port": port,
        "web_poll_interval": poll_interval, "web_max_body_bytes": max_body_bytes,
        "web_max_rows": max_rows, "web_log_predictions": log_predictions}.items()
        if v is not None}
    settings = WebSettings(**overrides)
    tracking_uri = use_tracking_server(settings)
    _bounded_registry_calls()
    # The *_created series double the /metrics page and no dashboard here uses them.
    import prometheus_client

    prometheus_client.disable_created_metrics()
    log.info("serving %s on http://%s:%d (registry %s, poll every %.0f s)", settings.model_uri,
             settings.web_host, settings.web_port, masked(tracking_uri),
             settings.web_poll_interval)
    serve(create_app(settings), settings.web_host, settings.web_port, log_level)

