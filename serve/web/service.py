"""The endpoints as plain functions of (body, content type) -> Response: no ASGI in here."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as distribution_version

import numpy as np

from serve.errors import (
    DurationError,
    InvalidInput,
    ModelFailed,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from serve.features import RIDE_COLUMNS, Rides, parse_ride, rides_from_rows
from serve.predlog import LoggedBatch, PredictionLog
from serve.scoring import (
    CONTENT_TYPE_JSON,
    MODEL_FAILED,
    decode_json,
    encode_predictions,
    fast_rides,
    media_type,
    mlflow_predict,
    mlflow_rows,
)
from serve.web.holder import Active, ModelHolder
from serve.web.metrics import Metrics
from serve.web.settings import WebSettings

log = logging.getLogger(__name__)

JSON = b"application/json"


@dataclass(frozen=True)
class Response:
    """Status, body and content type of one answer."""

    status: int
    body: bytes
    content_type: bytes = JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()  # more response headers


def error_response(err: DurationError, close: bool = False) -> Response:
    """The JSON ``{"error_code", "message"}`` body of a typed error, with ``Retry-After`` when
    the error says when to retry, and ``Connection: close`` when the rest of the request will
    not be read (``close``)."""
    headers = ()
    retry_after = getattr(err, "retry_after", None)
    if retry_after is not None:
        headers += ((b"retry-after", str(retry_after).encode()),)
    if close:
        headers += ((b"connection", b"close"),)
    return Response(err.status_code, json.dumps(err.to_dict()).encode(), headers=headers)


@dataclass(frozen=True)
class Scoring:
    """A validated request waiting for its minutes: what the app predicts (inline, or coalesced
    with its neighbours by the batcher) and how to answer once it has them."""

    endpoint: str
    rides: Rides
    answer: Callable[[Active, np.ndarray], bytes]  # the 200 body; may raise a DurationError


@dataclass(frozen=True)
class Deferred:
    """The rest of a request that must never run on the event loop: MLflow's parser and
    pyfunc, which may still be loading behind a lock (seconds) when a version started from the
    version cache; the app runs ``run()`` in a worker thread."""

    run: Callable[[], Response]


def _one_duration(active: Active, minutes: np.ndarray) -> bytes:
    return json.dumps({"duration": float(minutes[0]), "model_version": active.version}).encode()


def _many_durations(active: Active, minutes: np.ndarray) -> bytes:
    return json.dumps({"predictions": [{"duration": m} for m in minutes.tolist()],
                       "model_version": active.version}).encode()


def _mlflow_predictions(active: Active, minutes: np.ndarray) -> bytes:
    return encode_predictions(minutes)


def parse_predict(payload, max_rows: int) -> tuple[Rides, bool]:
    """Rides of a ``/predict`` body and whether it was the ``{"rides": [...]}`` form."""
    if isinstance(payload, dict) and "rides" in payload:
        records = payload["rides"]
        if not isinstance(records, list):
            raise InvalidInput(f"'rides' must be a list of rides, got {type(records).__name__}",
                               field="rides")
        if not records:
            raise InvalidInput("'rides' is empty: send at least one ride", field="rides")
        if len(records) > max_rows:
            raise PayloadTooLarge(f"{len(records)} rides in one request; the limit is {max_rows}")
        rows = []
        for i, record in enumerate(records):
            try:
                rows.append(parse_ride(record))
            except InvalidInput as e:
                raise InvalidInput(f"rides[{i}]: {e.message}", field=e.field) from e
        return rides_from_rows(rows), True
    return rides_from_rows([parse_ride(payload)]), False


def check_finite(minutes: np.ndarray, rows) -> None:
    """InvalidInput for a ride the model answers with inf or NaN (a distance near the float
    limit): JSON has no such number, and no ride lasts that long. ``rows``: Rides or the
    decoded DataFrame, read only to word the message."""
    if (math.isfinite(minutes[0]) if len(minutes) == 1 else np.isfinite(minutes).all()):
        return
    row = int(np.argmin(np.isfinite(minutes)))
    try:
        distance = rows.distance if isinstance(rows, Rides) else rows["trip_distance"]
        shown = repr(float(np.asarray(distance)[row]))
    except Exception:  # noqa: BLE001 - an odd frame: the message goes without the value
        shown = "of that ride"
    raise InvalidInput(f"row {row}: trip_distance {shown} is beyond what the model can score "
                       f"(no finite duration)", field="trip_distance")


def _frame_rides(data) -> Rides | None:
    """Ride columns of a DataFrame MLflow decoded and the model accepted (for the log)."""
    try:
        return Rides(*(np.asarray(data[c]) for c in RIDE_COLUMNS))
    except Exception:  # noqa: BLE001 - an odd input shape: skip logging it, not the answer
        return None


def _mlflow_version() -> str:
    """MLflow's version without importing it: full ``mlflow`` here, ``mlflow-skinny`` in the
    images."""
    for distribution in ("mlflow", "mlflow-skinny"):
        try:
            return distribution_version(distribution)
        except PackageNotFoundError:
            continue
    return "unknown"


class Service:
    """The endpoints as plain functions of (body, content type) -> Response: no ASGI in here."""

    def __init__(self, holder: ModelHolder, metrics: Metrics, settings: WebSettings,
                 predlog: PredictionLog | None = None):
        self.holder = holder
        self.metrics = metrics
        self.settings = settings
        self.predlog = predlog
        self._version_counters: dict[str, object] = {}
        # Read once here: `import mlflow` on the event loop would wait for a background load
        # of MLflow (seconds) or do it itself.
        self._mlflow_version = _mlflow_version()

    def _record(self, endpoint: str, active: Active, rides: Rides | None,
                minutes: np.ndarray) -> None:
        counter = self._version_counters.get(active.version)
        if counter is None:
            counter = self._version_counters[active.version] = \
                self.metrics.predictions.labels(active.version)
        counter.inc(len(minutes))
        if self.predlog is not None and rides is not None:
            self.predlog.put(LoggedBatch(time.time(), endpoint, active.version, rides, minutes))

    def finish(self, job: Scoring, active: Active, minutes: np.ndarray) -> Response:
        """The answer to a scored request (counted, and logged if the log is on)."""
        check_finite(minutes, job.rides)
        body = job.answer(active, minutes)
        self._record(job.endpoint, active, job.rides, minutes)
        return Response(200, body)

    def score(self, job: Scoring) -> Response:
        """Predict one request on its own (no batching) and answer it."""
        active = self.holder.require()
        return self.finish(job, active, self._predict_rides(active, job.rides))

    def respond(self, handler: Callable, body: bytes, content_type: str | None) -> Response:
        """Run an endpoint to the end, predicting inline (for bodies scored off the event loop)."""
        out = handler(body, content_type)
        if isinstance(out, Deferred):
            return out.run()
        return self.score(out) if isinstance(out, Scoring) else out

    def predict(self, body: bytes, content_type: str | None) -> Scoring:
        """``POST /predict``: course-compatible rides in, minutes and model version out."""
        if media_type(content_type) != CONTENT_TYPE_JSON:
            raise UnsupportedMediaType(f"/predict takes {CONTENT_TYPE_JSON}, got {content_type!r}")
        payload = decode_json(body)
        rides, many = parse_predict(payload, self.settings.web_max_rows)
        self.holder.require()  # 503 before the first load, after the 4xx checks
        return Scoring("/predict", rides, _many_durations if many else _one_duration)

    def invocations(self, body: bytes, content_type: str | None) -> Scoring | Deferred:
        """``POST /invocations``: the MLflow scoring protocol, same bytes as MLflow on success."""
        mime = media_type(content_type)
        payload = decode_json(body) if mime == CONTENT_TYPE_JSON else body
        active = self.holder.require()
        rides = fast_rides(payload) if mime == CONTENT_TYPE_JSON else None
        if rides is not None:
            self._check_rows(len(rides))
            return Scoring("/invocations", rides, _mlflow_predictions)
        # Everything else takes MLflow's own parser and the pyfunc model, never batched.
        return Deferred(partial(self._mlflow_invocations, active, payload, mime))

    def _mlflow_invocations(self, active: Active, payload, mime: str) -> Response:
        """The slow path of /invocations, in a worker thread: MLflow's parser and pyfunc."""
        data = mlflow_rows(payload, mime, active.input_schema, self.settings.web_max_rows)
        if np.ndim(data) == 0:  # e.g. {"inputs": false}: MLflow decodes it to a scalar
            value = data.item() if isinstance(data, np.generic) else data
            raise InvalidInput(f"the input must be rows of rides, got the single value "
                               f"{value!r}"[:200])
        self._check_rows(len(data))
        try:
            minutes, out = mlflow_predict(active.loaded.pyfunc, data)
        except ModelFailed as e:
            raise self.model_failed(active, e.__cause__ or e) from e.__cause__
        check_finite(minutes, data)
        self._record("/invocations", active, _frame_rides(data), minutes)
        return Response(200, out)

    def _predict_rides(self, active: Active, rides: Rides) -> np.ndarray:
        try:
            return active.model.predict_rides(rides)
        except DurationError:
            raise
        except Exception as e:  # noqa: BLE001 - validated rides: the model is at fault
            raise self.model_failed(active, e) from e

    def model_failed(self, active: Active, cause: BaseException) -> ModelFailed:
        """Count and log (with its traceback) a failure of the model; the client gets a
        generic 500."""
        self.metrics.model_errors.labels(active.version).inc()
        log.error("model version %s failed on a request: %s: %s", active.version,
                  type(cause).__name__, cause, exc_info=cause)
        return ModelFailed(MODEL_FAILED)

    def _check_rows(self, n: int) -> None:
        if n > self.settings.web_max_rows:
            raise PayloadTooLarge(f"{n} rows in one request; the limit is "
                                  f"{self.settings.web_max_rows}")

    def health(self) -> Response:
        """Alive (the process answers), model or not."""
        return Response(200, b'{"status": "ok"}')

    def ready(self) -> Response:
        """200 once a model is loaded (and from then on), 503 before."""
        active = self.holder.require()
        return Response(200, json.dumps({"status": "ready", "model_version": active.version})
                        .encode())

    def version(self) -> Response:
        """Which model answers: name, version, run id, URIs, when it was loaded."""
        active = self.holder.require()
        ref = active.loaded.ref
        return Response(200, json.dumps({
            "model_uri": ref.uri, "pinned_uri": ref.pinned_uri, "name": ref.name,
            "version": active.version, "run_id": ref.run_id,
            "loaded_at": active.loaded.loaded_at.isoformat(),
            "mlflow_version": self._mlflow_version,
        }).encode())

    def metrics_page(self) -> Response:
        """Prometheus text format."""
        from prometheus_client import CONTENT_TYPE_LATEST

        if self.predlog is not None:
            self.metrics.log_dropped.set(self.predlog.dropped)
            self.metrics.log_failed.set(self.predlog.failed)
        return Response(200, self.metrics.render(), CONTENT_TYPE_LATEST.encode())
