"""Online service: ``python -m serve.web`` serves the production model over HTTP.

One uvicorn process (uvloop + httptools) running a small raw ASGI app: on this
machine class a multi-worker uvicorn stalls each keep-alive response by ~40 ms,
and Starlette's routing/request objects cost more than the ride model itself
(see README, section online, for the measurements). Endpoints:

* ``POST /predict``: one ride -> ``{"duration", "model_version"}``; ``{"rides": [...]}`` ->
  ``{"predictions": [{"duration"}, ...], "model_version"}`` (course-compatible);
* ``POST /invocations``: the MLflow scoring protocol (serve/scoring.py);
* ``GET /health`` (alive), ``/ping`` (same, as in MLflow), ``/ready`` (a model is loaded),
  ``/version`` (which model), ``/metrics`` (Prometheus).

A background thread polls the registry and swaps in a new production version
once it is loaded; a request reads the active model once, so requests in flight
finish on the version they started with.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import click
import numpy as np
import uvicorn
from pydantic import Field

from serve.config import Settings
from serve.errors import (
    DurationError,
    InvalidInput,
    MethodNotAllowed,
    ModelNotReady,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from serve.features import RIDE_COLUMNS, Rides, parse_ride, rides_from_rows
from serve.predlog import LoggedBatch, PredictionLog, open_sink
from serve.registry import LoadedModel, load_ref, resolve_model
from serve.scoring import (
    CONTENT_TYPE_JSON,
    decode_json,
    encode_predictions,
    fast_rides,
    media_type,
    mlflow_predict,
    mlflow_rows,
)

log = logging.getLogger("serve.web")

JSON = b"application/json"
# Bodies above this are decoded and scored in a thread so /health and small requests
# keep flowing while a big batch is parsed.
OFFLOAD_BYTES = 256 * 1024


class WebSettings(Settings):
    """Settings of the online service (env vars: the field names in upper case)."""

    web_host: str = Field("127.0.0.1", description="Interface the service binds.")
    web_port: int = Field(9696, description="Port the service listens on.")
    web_poll_interval: float = Field(
        30.0, description="Seconds between registry polls for a new production version.")
    web_max_body_bytes: int = Field(1 << 20, description="Largest request body accepted (413).")
    web_max_rows: int = Field(10_000, description="Most rides per request (413).")
    web_log_predictions: str | None = Field(
        None, description="Prediction log: .jsonl file, parquet folder or SQLAlchemy URL.")


# -- metrics ---------------------------------------------------------------------------------
class Metrics:
    """The service's Prometheus metrics, in their own registry (one per app)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("duration_http_requests", "HTTP requests by endpoint and status.",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram(
            "duration_http_request_duration_seconds",
            "Time from the first byte of the request to the last byte of the response.",
            ["endpoint", "status"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self.predictions = Counter("duration_predictions", "Rides predicted, by model version.",
                                   ["model_version"], registry=self.registry)
        self.model_info = Gauge("duration_model_info", "The model being served (value 1).",
                                ["name", "version", "run_id"], registry=self.registry)
        self.reloads = Counter("duration_model_reloads",
                               "Models loaded and swapped in (the first load included).",
                               registry=self.registry)
        self.poll_failures = Counter("duration_registry_poll_failures",
                                     "Registry polls that failed (the loaded model keeps serving).",
                                     registry=self.registry)
        self.load_failures = Counter("duration_model_load_failures",
                                     "New versions that failed to load.", registry=self.registry)
        self.log_dropped = Gauge("duration_prediction_log_dropped_batches",
                                 "Prediction-log batches dropped because the writer fell behind.",
                                 registry=self.registry)
        self._children: dict[tuple[str, int], tuple] = {}

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one request and its latency (label children cached: labels() is not free)."""
        key = (endpoint, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = (self.requests.labels(endpoint, str(status)),
                                           self.latency.labels(endpoint, str(status)))
        child[0].inc()
        child[1].observe(seconds)

    def render(self) -> bytes:
        """The text exposition format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# -- the active model and its hot swap ---------------------------------------------------------
@dataclass(frozen=True)
class Active:
    """What a request needs from the loaded model, fetched once per swap, not per request."""

    loaded: LoadedModel
    model: object  # RideDurationModel: predict_rides(Rides) -> minutes
    input_schema: object  # mlflow Schema, for the MLflow-compatible slow path
    version: str


def activate(loaded: LoadedModel) -> Active:
    """Unwrap a loaded pyfunc once into what the request path uses."""
    return Active(loaded, loaded.python_model, loaded.pyfunc.metadata.get_input_schema(),
                  loaded.version)


class ModelHolder:
    """Holds the active model; a background thread polls the registry and swaps new versions in.

    The swap is one attribute assignment: a request that already read ``active``
    finishes on that model. A failing registry leaves the active model serving.
    """

    def __init__(self, uri: str, poll_interval: float, metrics: Metrics):
        self.uri = uri
        self.poll_interval = poll_interval
        self.metrics = metrics
        self.active: Active | None = None
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-poller", daemon=True)

    def require(self) -> Active:
        """The active model, or ModelNotReady (503) before the first load."""
        active = self.active
        if active is None:
            raise ModelNotReady(f"model {self.uri!r} is not loaded yet"
                                + (f" (last error: {self.last_error})" if self.last_error else ""))
        return active

    def poll(self) -> bool:
        """One registry poll: load and swap if the pinned version changed; True if swapped."""
        try:
            ref = resolve_model(self.uri)
        except Exception as e:  # noqa: BLE001 - unreachable registry, missing alias, ...
            self.metrics.poll_failures.inc()
            self.last_error = f"registry poll failed: {type(e).__name__}: {e}"
            log.warning("%s; still serving version %s", self.last_error,
                        self.active.version if self.active else None)
            return False
        current = self.active
        if current is not None and current.loaded.ref.pinned_uri == ref.pinned_uri:
            return False
        try:
            active = activate(load_ref(ref))
        except Exception as e:  # noqa: BLE001 - a broken version must not stop the old one
            self.metrics.load_failures.inc()
            self.last_error = f"loading {ref.pinned_uri} failed: {type(e).__name__}: {e}"
            log.error("%s; still serving version %s", self.last_error,
                      current.version if current else None)
            return False
        self.active = active  # the swap
        self.last_error = None
        self.metrics.reloads.inc()
        self.metrics.model_info.clear()
        self.metrics.model_info.labels(ref.name or "", active.version, ref.run_id or "").set(1)
        log.info("now serving %s version %s (was %s)", self.uri, active.version,
                 current.version if current else None)
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            # Until the first load succeeds, retry sooner than the regular interval.
            wait = self.poll_interval if self.active else min(self.poll_interval, 2.0)
            if self._stop.wait(wait):
                return

    def start(self) -> None:
        """Start polling (the first poll loads the model)."""
        self._thread.start()

    def stop(self) -> None:
        """Stop polling; a load in progress is abandoned with the daemon thread."""
        self._stop.set()


# -- request handling --------------------------------------------------------------------------
@dataclass(frozen=True)
class Response:
    """Status, body and content type of one answer."""

    status: int
    body: bytes
    content_type: bytes = JSON


def error_response(err: DurationError) -> Response:
    """The JSON ``{"error_code", "message"}`` body of a typed error."""
    return Response(err.status_code, json.dumps(err.to_dict()).encode())


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


def _frame_rides(data) -> Rides | None:
    """Ride columns of a DataFrame MLflow decoded and the model accepted (for the log)."""
    try:
        return Rides(*(np.asarray(data[c]) for c in RIDE_COLUMNS))
    except Exception:  # noqa: BLE001 - an odd input shape: skip logging it, not the answer
        return None


class Service:
    """The endpoints as plain functions of (body, content type) -> Response: no ASGI in here."""

    def __init__(self, holder: ModelHolder, metrics: Metrics, settings: WebSettings,
                 predlog: PredictionLog | None = None):
        self.holder = holder
        self.metrics = metrics
        self.settings = settings
        self.predlog = predlog
        self._version_counters: dict[str, object] = {}

    def _record(self, endpoint: str, active: Active, rides: Rides | None,
                minutes: np.ndarray) -> None:
        counter = self._version_counters.get(active.version)
        if counter is None:
            counter = self._version_counters[active.version] = \
                self.metrics.predictions.labels(active.version)
        counter.inc(len(minutes))
        if self.predlog is not None and rides is not None:
            self.predlog.put(LoggedBatch(time.time(), endpoint, active.version, rides, minutes))

    def predict(self, body: bytes, content_type: str | None) -> Response:
        """``POST /predict``: course-compatible rides in, minutes and model version out."""
        if media_type(content_type) != CONTENT_TYPE_JSON:
            raise UnsupportedMediaType(f"/predict takes {CONTENT_TYPE_JSON}, got {content_type!r}")
        payload = decode_json(body)
        rides, many = parse_predict(payload, self.settings.web_max_rows)
        active = self.holder.require()
        minutes = active.model.predict_rides(rides)
        self._record("/predict", active, rides, minutes)
        if many:
            out = {"predictions": [{"duration": m} for m in minutes.tolist()],
                   "model_version": active.version}
        else:
            out = {"duration": float(minutes[0]), "model_version": active.version}
        return Response(200, json.dumps(out).encode())

    def invocations(self, body: bytes, content_type: str | None) -> Response:
        """``POST /invocations``: the MLflow scoring protocol, same bytes as MLflow on success."""
        mime = media_type(content_type)
        payload = decode_json(body) if mime == CONTENT_TYPE_JSON else body
        active = self.holder.require()
        rides = fast_rides(payload) if mime == CONTENT_TYPE_JSON else None
        if rides is not None:
            self._check_rows(len(rides))
            minutes = active.model.predict_rides(rides)
            self._record("/invocations", active, rides, minutes)
            return Response(200, encode_predictions(minutes))
        data = mlflow_rows(payload, mime, active.input_schema)
        self._check_rows(len(data))
        minutes, out = mlflow_predict(active.loaded.pyfunc, data)
        self._record("/invocations", active, _frame_rides(data), minutes)
        return Response(200, out)

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
        import mlflow

        active = self.holder.require()
        ref = active.loaded.ref
        return Response(200, json.dumps({
            "model_uri": ref.uri, "pinned_uri": ref.pinned_uri, "name": ref.name,
            "version": active.version, "run_id": ref.run_id,
            "loaded_at": active.loaded.loaded_at.isoformat(), "mlflow_version": mlflow.__version__,
        }).encode())

    def metrics_page(self) -> Response:
        """Prometheus text format."""
        from prometheus_client import CONTENT_TYPE_LATEST

        if self.predlog is not None:
            self.metrics.log_dropped.set(self.predlog.dropped)
        return Response(200, self.metrics.render(), CONTENT_TYPE_LATEST.encode())


class WebApp:
    """Raw ASGI adapter: routing, body limits, timing, error rendering; lifespan starts the
    poller and the prediction log."""

    def __init__(self, service: Service):
        self.service = service
        s = service
        self.routes = {
            "/predict": ("POST", s.predict), "/invocations": ("POST", s.invocations),
            "/health": ("GET", s.health), "/ping": ("GET", s.health), "/ready": ("GET", s.ready),
            "/version": ("GET", s.version), "/metrics": ("GET", s.metrics_page),
        }

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.service.holder.start()
                if self.service.predlog is not None:
                    self.service.predlog.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.service.holder.stop()
                if self.service.predlog is not None:
                    await asyncio.to_thread(self.service.predlog.close)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def http(self, scope, receive, send) -> None:
        t0 = time.perf_counter()
        path = scope["path"]
        route = self.routes.get(path)
        endpoint = path if route else "other"
        try:
            if route is None:
                raise NotFound(f"no endpoint {path!r}; try POST /predict, POST /invocations, "
                               f"GET /health, /ready, /version, /metrics")
            method, handler = route
            if scope["method"] != method and not (method == "GET" and scope["method"] == "HEAD"):
                raise MethodNotAllowed(f"{path} takes {method}, got {scope['method']}")
            if method == "GET":
                response = handler()
            else:
                content_type, body = await self._read(scope, receive)
                if len(body) > OFFLOAD_BYTES:
                    response = await asyncio.to_thread(handler, body, content_type)
                else:
                    response = handler(body, content_type)
        except DurationError as e:
            response = error_response(e)
        except Exception:  # noqa: BLE001 - a bug: log it here, never send a traceback
            log.exception("unhandled error on %s %s", scope["method"], path)
            response = Response(500, b'{"error_code": "INTERNAL_ERROR", '
                                     b'"message": "internal error; see the service log"}')
        await send({"type": "http.response.start", "status": response.status,
                    "headers": [(b"content-type", response.content_type),
                                (b"content-length", str(len(response.body)).encode())]})
        await send({"type": "http.response.body", "body": response.body})
        self.service.metrics.observe(endpoint, response.status, time.perf_counter() - t0)

    async def _read(self, scope, receive) -> tuple[str | None, bytes]:
        """Content type and body, refusing bodies over the limit before reading them whole."""
        limit = self.service.settings.web_max_body_bytes
        content_type = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"content-length" and value.isdigit() and int(value) > limit:
                raise PayloadTooLarge(f"request body of {int(value)} bytes; the limit is {limit}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise InvalidInput("client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body over {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return content_type, chunks[0] if len(chunks) == 1 else b"".join(chunks)


def create_app(settings: WebSettings) -> WebApp:
    """The ASGI app for ``settings`` (nothing starts until the ASGI lifespan starts it)."""
    metrics = Metrics()
    holder = ModelHolder(settings.model_uri, settings.web_poll_interval, metrics)
    predlog = (PredictionLog(open_sink(settings.web_log_predictions))
               if settings.web_log_predictions else None)
    return WebApp(Service(holder, metrics, settings, predlog))


def _bounded_registry_calls() -> None:
    """Fail a registry call in seconds, not minutes: the next poll is the retry."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # Progress bars of artifact downloads are noise in a service log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")



@click.command()
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
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    overrides = {k: v for k, v in {
        "model_uri": model_uri, "web_host": host, "web_port": port,
        "web_poll_interval": poll_interval, "web_max_body_bytes": max_body_bytes,
        "web_max_rows": max_rows, "web_log_predictions": log_predictions}.items()
        if v is not None}
    settings = WebSettings(**overrides)
    os.environ.setdefault("MLFLOW_TRACKING_URI", settings.mlflow_tracking_uri)
    _bounded_registry_calls()
    # The *_created series double the /metrics page and no dashboard here uses them.
    import prometheus_client

    prometheus_client.disable_created_metrics()
    log.info("serving %s on http://%s:%d (registry %s, poll every %.0f s)", settings.model_uri,
             settings.web_host, settings.web_port, os.environ["MLFLOW_TRACKING_URI"],
             settings.web_poll_interval)
    config = uvicorn.Config(create_app(settings), host=settings.web_host, port=settings.web_port,
                            loop="uvloop", http="httptools", lifespan="on", access_log=False,
                            log_level=log_level, timeout_graceful_shutdown=10)
    # uvicorn re-raises the signal it stopped on after a graceful shutdown: a stop asked for
    # is a clean exit (0), as PID 1 of a container or under an init process alike.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    server = DrainingServer(config)
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl-C, re-raised by uvicorn after its graceful shutdown
        pass
    if not server.started:
        sys.exit(3)  # uvicorn's code for a failed start (port in use, ...)


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain between "stop listening" and "close idle connections".

    uvicorn's graceful shutdown closes the listening socket and, at once, every connection
    that has no request in progress, including one accepted a moment ago whose request is
    on the wire: that client gets a reset. Here the listening socket closes first, then
    requests already sent get ``DRAIN_SECONDS`` to arrive and are answered like any other.
    """

    DRAIN_SECONDS = 0.5

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:
            server.close()  # closing twice (again in uvicorn's shutdown) is a no-op
        for sock in sockets or []:
            sock.close()
        await asyncio.sleep(self.DRAIN_SECONDS)
        await super().shutdown(sockets)


if __name__ == "__main__":
    main()
