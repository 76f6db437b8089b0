"""AWS Lambda entry point (``serve.lambda_function.lambda_handler``), Kinesis-triggered.

Environment, read once per container (cold start): ``MODEL_URI`` +
``MLFLOW_TRACKING_URI`` or ``MODEL_LOCATION`` (+ ``MODEL_VERSION``),
``PREDICTIONS_STREAM_NAME``, ``KINESIS_ENDPOINT_URL``, ``DEAD_LETTER_DESTINATION``
(stream name or ``s3://bucket/prefix``), ``TEST_RUN``. Configure the event source
mapping with ``FunctionResponseTypes: [ReportBatchItemFailures]``.
"""

from __future__ import annotations

from functools import cache

from serve.logs import setup_logging
from serve.stream.app import Handler, StreamSettings, build_handler


@cache
def _handler() -> Handler:
    # First invocation of the container = cold start: model and clients load once.
    setup_logging("INFO")  # the runtime has its handler: this sets the level
    return build_handler(StreamSettings())


def lambda_handler(event: dict, context=None) -> dict:
    """Predict a Kinesis batch; returns ``{"batchItemFailures": [...]}``."""
    return _handler()(event, context)
