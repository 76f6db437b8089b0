"""Wiring for the streaming mode: settings -> loaded model + sinks -> a Lambda-style handler.

Both the AWS Lambda entry point (``serve/lambda_function.py``) and the local
runner (``python -m serve.stream``) build their handler here, so they run the
same code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pydantic import Field

from serve.config import Settings, require_tracking_server, use_tracking_server
from serve.stream.core import CollectingSink, LogSink, Sink, StreamService

log = logging.getLogger(__name__)

Handler = Callable[[dict, Any], dict]


class StreamSettings(Settings):
    """Streaming/Lambda configuration (env vars of the same names, upper case, or ``.env``)."""

    model_location: str | None = Field(
        None, description="Local MLflow model folder (baked into the image); wins over MODEL_URI.")
    model_version: str | None = Field(
        None, description="Registered version of MODEL_LOCATION, reported in the events.")
    dead_letter_destination: str | None = Field(
        None, description="Poison records go here: a Kinesis stream name or an s3://bucket/prefix;"
                          " unset = logged only.")
    test_run: bool = Field(False, description="Dry run: predict, write nothing, return events.")
    put_max_attempts: int = Field(5, ge=1, description="PutRecords attempts per chunk.")


def load_stream_model(settings: StreamSettings):
    """The model to serve: ``MODEL_LOCATION`` if set, else ``MODEL_URI`` via the registry
    (and the version cache: a cached linear version loads without importing MLflow)."""
    from serve.registry import LoadedModel, ModelRef, load_model

    if settings.model_location:
        import mlflow

        pyfunc = mlflow.pyfunc.load_model(settings.model_location)
        ref = ModelRef(uri=settings.model_location, pinned_uri=settings.model_location,
                       version=settings.model_version,
                       run_id=getattr(pyfunc.metadata, "run_id", None))
        return LoadedModel(pyfunc=pyfunc, ref=ref)
    require_tracking_server(use_tracking_server(settings))
    return load_model(settings.model_uri)


def kinesis_client(settings: StreamSettings):
    """A Kinesis client on ``KINESIS_ENDPOINT_URL`` (unset = real AWS).

    botocore retries each call once; the callers retry with their own bounds and logs (the
    sinks ``PUT_MAX_ATTEMPTS`` times, the runner's reads for ``--max-outage``), instead of
    botocore's default of 5 silent attempts with up to 15 s of sleep each call.
    """
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "max_attempts": 2}, connect_timeout=5,
                    read_timeout=30)
    return boto3.client("kinesis", endpoint_url=settings.kinesis_endpoint_url, config=config)


def dead_letter_sink(settings: StreamSettings, kinesis=None) -> Sink:
    """The dead-letter sink the destination names: S3 prefix, Kinesis stream, or the log."""
    from serve.stream.sinks import KinesisSink, S3Sink, parse_s3_uri

    dest = settings.dead_letter_destination
    if not dest:
        return LogSink()
    if dest.startswith("s3://"):
        import boto3

        # The S3 endpoint comes from AWS_ENDPOINT_URL(_S3) when not real AWS.
        return S3Sink(boto3.client("s3"), *parse_s3_uri(dest))
    return KinesisSink(kinesis or kinesis_client(settings), dest,
                       max_attempts=settings.put_max_attempts)


def build_service(settings: StreamSettings, loaded=None) -> StreamService:
    """Load the model (unless given) and connect the sinks the settings name."""
    from serve.stream.sinks import KinesisSink

    loaded = loaded or load_stream_model(settings)
    if settings.test_run:
        return StreamService(loaded.python_model, loaded.version, CollectingSink(),
                             CollectingSink())
    kinesis = kinesis_client(settings)
    sink = KinesisSink(kinesis, settings.predictions_stream_name,
                       max_attempts=settings.put_max_attempts)
    return StreamService(loaded.python_model, loaded.version, sink,
                         dead_letter_sink(settings, kinesis))


def build_handler(settings: StreamSettings, loaded=None) -> Handler:
    """A Lambda handler ``(event, context) -> {"batchItemFailures": [...]}``."""
    service = build_service(settings, loaded)
    log.info("stream handler ready: model version %s -> %s%s", service.version,
             settings.predictions_stream_name, " (TEST_RUN: nothing written)"
             if settings.test_run else "")

    def handler(event: dict, context: Any = None) -> dict:
        result = service.handle(event)
        response = result.response()
        if settings.test_run:
            response["predictions"] = result.events
            response["deadLetters"] = result.dead_letters
        return response

    return handler
