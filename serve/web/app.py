"""The raw ASGI adapter: routing, body reading, load shedding, timing, error rendering; the
lifespan starts the registry poller and the prediction log, and hands the HTTP layer
(:mod:`serve.web.protocol`) its hooks.

Raw ASGI rather than a framework: Starlette's routing and request objects cost more than the
ride model itself (README, section online).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from serve.errors import DurationError, MethodNotAllowed, NotFound, Overloaded
from serve.predlog import PredictionLog, open_sink
from serve.web.batching import Batcher
from serve.web.holder import ModelHolder
from serve.web.limits import (
    ClientDisconnected,
    ShuttingDown,
    WorkQueue,
    check_queue_wait,
    read_body,
)
from serve.web.metrics import Metrics
from serve.web.openapi import openapi_json
from serve.web.protocol import HOOKS, QUEUED_AT, HttpHooks
from serve.web.service import Deferred, Response, Scoring, Service, error_response
from serve.web.settings import WebSettings
from serve.web.v2 import V2, v2_error_response

log = logging.getLogger(__name__)

# JSON bodies above this, and every CSV or parquet body, are decoded and scored in a worker
# thread (limits.WorkQueue), so the event loop keeps reading sockets and accepting connections
# (uvloop accepts one per loop iteration) while they are; smaller JSON bodies (the fast path,
# at most ~0.5 ms of work) are answered on the loop at once, unless they need MLflow's parser
# and pyfunc (service.Deferred), which never run on the loop.
OFFLOAD_BYTES = 16 * 1024
CLIENT_GONE = 499  # the status nginx logs for a client that hung up before the answer


class WebApp:
    """Raw ASGI adapter: routing, body reading, load shedding, timing, error rendering; the
    lifespan starts the poller and the prediction log and hands the HTTP layer its hooks."""

    def __init__(self, service: Service, batcher: Batcher | None = None):
        self.service = service
        self.batcher = batcher  # None: every request is predicted on its own
        self.v2 = V2(service)
        self._openapi = Response(200, openapi_json(service.settings.web_max_rows))
        settings = service.settings
        self.max_body = settings.web_max_body_bytes
        self.max_queue_wait = settings.web_max_queue_wait
        self.work = WorkQueue(settings.web_max_queue, settings.web_max_queue_wait)
        # Requests handed to the app and responses it sent: equal at a clean stop (logged).
        self.received = self.answered = 0
        s = service
        self.routes = {
            "/openapi.json": ("GET", lambda: self._openapi),
            "/predict": ("POST", s.predict), "/invocations": ("POST", s.invocations),
            "/health": ("GET", s.health), "/ping": ("GET", s.health), "/ready": ("GET", s.ready),
            "/version": ("GET", s.version), "/metrics": ("GET", s.metrics_page),
        }

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(scope, receive, send)

    async def lifespan(self, scope, receive, send) -> None:
        service = self.service
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if "state" in scope:  # the HTTP layer (serve.web.protocol) reads it
                    scope["state"][HOOKS] = HttpHooks(
                        service.settings.web_request_timeout,
                        lambda status: service.metrics.count("other", status))
                service.holder.start()
                if self.batcher is not None:
                    self.batcher.start()
                if service.predlog is not None:
                    service.predlog.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                log.info("stopped: %d requests received, %d answered", self.received,
                         self.answered)
                service.holder.stop()
                self.work.close()
                if self.batcher is not None:
                    await self.batcher.close()
                if service.predlog is not None:
                    await asyncio.to_thread(service.predlog.close)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def http(self, scope, receive, send) -> None:
        t0 = time.perf_counter()
        self.received += 1
        path = scope["path"]
        route = self.routes.get(path)
        endpoint = path if route else "other"
        unread = False  # an error while the body is unread closes the connection
        v2 = path.startswith("/v2") and (len(path) == 3 or path[3] == "/")
        try:
            if route is None and v2:
                endpoint, *route = self.v2.route(path)
            if route is None:
                raise NotFound(f"no endpoint {path!r}; try POST /predict, POST /invocations, "
                               f"GET /health, /ready, /version, /metrics, /v2: see /openapi.json")
            method, handler = route
            if scope["method"] != method and not (method == "GET" and scope["method"] == "HEAD"):
                raise MethodNotAllowed(f"{path} takes {method}, got {scope['method']}")
            if method == "GET":
                response = handler()
            else:
                check_queue_wait(scope, t0, self.max_queue_wait)
                unread = True
                content_type, body = await read_body(scope, receive, self.max_body)
                unread = False
                if len(body) > OFFLOAD_BYTES or not _json(content_type):
                    response = await self.work.run(scope.get(QUEUED_AT, t0), self.service.respond,
                                                   handler, body, content_type)
                else:
                    response = handler(body, content_type)
                    if type(response) is Scoring:
                        response = (self.service.score(response) if self.batcher is None else
                                    await self._batched(response))
                    elif type(response) is Deferred:
                        response = await self.work.run(scope.get(QUEUED_AT, t0), response.run)
        except DurationError as e:
            if isinstance(e, Overloaded):
                self.service.metrics.shed.inc()
            response = _error(e, v2, close=unread)
        except ClientDisconnected:  # nobody to answer; counted as what it is, not as a 400
            self.service.metrics.observe(endpoint, CLIENT_GONE, time.perf_counter() - t0)
            return
        except asyncio.CancelledError:  # uvicorn's drain timeout: the one canceller of requests
            response = _error(ShuttingDown(
                f"the service is shutting down and the request did not finish within "
                f"{self.service.settings.web_drain_timeout:g} s; retry"), v2, close=True)
        except Exception:  # noqa: BLE001 - a bug: log it here, never send a traceback
            log.exception("unhandled error on %s %s", scope["method"], path)
            response = _error(DurationError("internal error; see the service log"), v2)
        headers = [(b"content-type", response.content_type),
                   (b"content-length", str(len(response.body)).encode())]
        if response.headers:
            headers.extend(response.headers)
        await send({"type": "http.response.start", "status": response.status,
                    "headers": headers})
        await send({"type": "http.response.body", "body": response.body})
        self.answered += 1
        self.service.metrics.observe(endpoint, response.status, time.perf_counter() - t0)

    async def _batched(self, job: Scoring) -> Response:
        """Answer ``job`` with minutes predicted in company (the batcher); a model failure is a
        500 counted and logged like one outside a batch."""
        try:
            active, minutes = await self.batcher.predict(job.rides)
        except DurationError:
            raise
        except Exception as e:  # noqa: BLE001 - validated rides: the model is at fault
            raise self.service.model_failed(self.service.holder.require(), e) from e
        return self.service.finish(job, active, minutes)


def _json(content_type: str | None) -> bool:
    """Whether a body is (most likely) JSON, the one kind parsed on the event loop when small."""
    return content_type is not None and content_type.startswith("application/json")


def _error(err: DurationError, v2: bool, close: bool = False) -> Response:
    """The answer to a typed error, with its headers: the V2 spec's ``{"error"}`` body on the
    /v2 routes, ours (``error_code``, ``message``) everywhere else."""
    response = error_response(err, close)
    return replace(response, body=v2_error_response(err).body) if v2 else response


def create_app(settings: WebSettings) -> WebApp:
    """The ASGI app for ``settings`` (nothing starts until the ASGI lifespan starts it)."""
    metrics = Metrics()
    holder = ModelHolder(settings.model_uri, settings.web_poll_interval, metrics)
    predlog = (PredictionLog(open_sink(settings.web_log_predictions))
               if settings.web_log_predictions else None)
    batcher = (Batcher(holder, metrics, settings.web_max_batch_size,
                       settings.web_max_batch_delay_ms / 1000, settings.web_max_batch_queue)
               if settings.web_max_batch_size > 0 else None)
    return WebApp(Service(holder, metrics, settings, predlog), batcher)
