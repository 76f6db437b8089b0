"""``python -m serve.web``: settings from options, environment and ``.env``, then uvicorn."""

from __future__ import annotations

import logging
import os

import click

from serve.cli import Command
from serve.config import use_tracking_server
from serve.logs import setup_logging
from serve.urls import masked
from serve.web.settings import WebSettings
from serve.web.workers import run_server, serve_workers

log = logging.getLogger(__name__)


def _bounded_registry_calls() -> None:
    """Fail a registry call in seconds, not minutes: the next poll is the retry."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # Progress bars of artifact downloads are noise in a service log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # A failed poll is logged once by the holder; urllib3's per-retry warnings only repeat it.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def prepare_process(settings: WebSettings, log_level: str) -> str:
    """What every serving process does first: logging, tracking URI, bounded registry calls."""
    setup_logging(log_level)
    tracking_uri = use_tracking_server(settings)
    _bounded_registry_calls()
    # The *_created series double the /metrics page and no dashboard here uses them.
    import prometheus_client

    prometheus_client.disable_created_metrics()
    return tracking_uri


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
@click.option("--request-timeout", type=float, default=None,
              help="Seconds a client has to send a whole request from its first byte; 408 "
                   "past it [env WEB_REQUEST_TIMEOUT, default 30].")
@click.option("--max-queue-wait", type=float, default=None,
              help="Most seconds a prediction may wait for the event loop or a worker thread; "
                   "503 + Retry-After past it [env WEB_MAX_QUEUE_WAIT, default 0.5].")
@click.option("--max-queue", type=int, default=None,
              help="Most heavy requests (CSV, parquet, JSON over 16 KiB or for MLflow's parser) "
                   "running or queued for a worker thread; 503 + Retry-After past it "
                   "[env WEB_MAX_QUEUE, default 32].")
@click.option("--drain-timeout", type=float, default=None,
              help="Seconds requests in flight get to finish after SIGTERM, then exit 0 "
                   "[env WEB_DRAIN_TIMEOUT, default 8].")
@click.option("--log-predictions", default=None,
              help="Log every prediction to a .jsonl file, a parquet folder or a "
                   "postgresql+psycopg2:// URL [env WEB_LOG_PREDICTIONS, default off].")
@click.option("--max-batch-size", type=int, default=None,
              help="Adaptive batching: coalesce concurrent requests into predict calls of up to "
                   "this many rides [env WEB_MAX_BATCH_SIZE, default 0 = off].")
@click.option("--max-batch-delay-ms", type=float, default=None,
              help="Adaptive batching: the longest a request waits for others to join its "
                   "batch [env WEB_MAX_BATCH_DELAY_MS, default 2].")
@click.option("--max-batch-queue", type=int, default=None,
              help="Adaptive batching: requests allowed to wait; beyond, 503 QUEUE_FULL "
                   "[env WEB_MAX_BATCH_QUEUE, default 1024].")
@click.option("--workers", type=int, default=None,
              help="Server processes, each with its own SO_REUSEPORT socket on the port "
                   "[env WEB_WORKERS, default 1].")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]), help="Log verbosity.")
def main(model_uri, host, port, poll_interval, max_body_bytes, max_rows, request_timeout,
         max_queue_wait, max_queue, drain_timeout, log_predictions, max_batch_size,
         max_batch_delay_ms, max_batch_queue, workers, log_level) -> None:
    """Serve the ride-duration model: /predict, /invocations, the Open Inference Protocol
    (/v2/...), /health, /ready, /version, /metrics, /openapi.json."""
    overrides = {k: v for k, v in {
        "model_uri": model_uri, "web_host": host, "web_port": port,
        "web_poll_interval": poll_interval, "web_max_body_bytes": max_body_bytes,
        "web_max_rows": max_rows, "web_request_timeout": request_timeout,
        "web_max_queue_wait": max_queue_wait, "web_max_queue": max_queue,
        "web_drain_timeout": drain_timeout, "web_log_predictions": log_predictions,
        "web_max_batch_size": max_batch_size, "web_max_batch_delay_ms": max_batch_delay_ms,
        "web_max_batch_queue": max_batch_queue, "web_workers": workers}.items()
        if v is not None}
    settings = WebSettings(**overrides)
    tracking_uri = prepare_process(settings, log_level)
    batching = (f"adaptive batching up to {settings.web_max_batch_size} rides / "
                f"{settings.web_max_batch_delay_ms:g} ms" if settings.web_max_batch_size
                else "no batching")
    log.info("serving %s on http://%s:%d (registry %s, poll every %.0f s, %s, %d worker%s)",
             settings.model_uri, settings.web_host, settings.web_port, masked(tracking_uri),
             settings.web_poll_interval, batching, settings.web_workers,
             "s" if settings.web_workers > 1 else "")
    if settings.web_workers > 1:
        raise SystemExit(serve_workers(settings, settings.web_workers, log_level,
                                       prepare_process))
    run_server(settings, log_level)

