"""Settings of the online service (env vars: the field names in upper case, or ``.env``)."""

from __future__ import annotations

from pydantic import Field

from serve.config import Settings


class WebSettings(Settings):
    """Settings of the online service (env vars: the field names in upper case)."""

    web_host: str = Field("127.0.0.1", description="Interface the service binds.")
    web_port: int = Field(9696, description="Port the service listens on.")
    web_poll_interval: float = Field(
        30.0, description="Seconds between registry polls for a new production version.")
    web_max_body_bytes: int = Field(1 << 20, description="Largest request body accepted (413).")
    web_max_rows: int = Field(10_000, description="Most rides per request (413).")
    web_request_timeout: float = Field(
        30.0, description="Seconds a client has to send a whole request from its first byte (408).")
    web_max_queue_wait: float = Field(
        0.5, description="Most seconds a prediction may wait for the event loop or a worker "
                         "thread before work starts on it (503 + Retry-After past it).")
    web_max_queue: int = Field(
        32, description="Most heavy requests (CSV, parquet, JSON over 16 KiB or for MLflow's "
                        "parser) running or waiting for a worker thread (503 + Retry-After "
                        "past it).")
    web_drain_timeout: float = Field(
        8.0, description="Seconds requests in flight get to finish after SIGTERM (docker stop "
                         "waits 10 s before SIGKILL).")
    web_log_predictions: str | None = Field(
        None, description="Prediction log: .jsonl file, parquet folder or SQLAlchemy URL.")
    web_max_batch_size: int = Field(
        0, ge=0, description="Adaptive batching: most rides per coalesced predict call (0 = off).")
    web_max_batch_delay_ms: float = Field(
        2.0, ge=0, description="Adaptive batching: longest a request waits for company (ms).")
    web_max_batch_queue: int = Field(
        1024, ge=1, description="Adaptive batching: requests waiting at most (503 QUEUE_FULL).")
    web_workers: int = Field(1, ge=1, description="Server processes (SO_REUSEPORT sockets).")
