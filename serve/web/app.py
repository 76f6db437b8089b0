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

from serve.errors import DurationError, MethodNotAllowed, NotFound, Overloaded
from serve.predlog import PredictionLog, open_sink
from serve.web.holder import ModelHolder
from serve.web.limits import (
    ClientDisconnected,
    ShuttingDown,
    WorkQueue,
    check_queue_wait,
    read_body,
)
from serve.web.metrics import Metrics
from serve.web.protocol import HOOKS, QUEUED_AT, HttpHooks
from serve.web.service import Response, Service, error_response
from serve.web.settings import WebSettings

log = logging.getLogger(__name__)

# JSON bodies above this, and every CSV or parquet body, are decoded and scored in a worker
# thread (limits.WorkQueue), so the event loop keeps reading sockets and accepting connections
# (uvloop accepts one per loop iteration) while they are; smaller JSON bodies (the fast path,
# at most ~0.5 ms of work) are answered on the loop at once.
OFFLOAD_BYTES = 16 * 1024
CLIENT_GONE = 499  # the status nginx logs for a client that hung up before the answer


class WebApp:
    """Raw ASGI adapter: routing, body reading, load shedding, timing, error rendering; the
    lifespan starts the poller and the prediction log and hands the HTTP layer its hooks."""

    def __init__(self, service: Service):
        self.service = service
        settings = service.settings
        self.max_body = settings.web_max_body_bytes
        self.max_queue_wait = settings.web_max_queue_wait
        self.work = WorkQueue(settings.web_max_queue, settings.web_max_queue_wait)
        # Requests handed to the app and responses it sent: equal at a clean stop (logged).
        self.received = self.answered = 0
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
                if service.predlog is not None:
                    service.predlog.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                log.info("stopped: %d requests received, %d answered", self.received,
                         self.answered)
                service.holder.stop()
                self.work.close()
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
                check_queue_wait(scope, t0, self.max_queue_wait)
                unread = True
                content_type, body = await read_body(scope, receive, self.max_body)
                unread = False
                if len(body) > OFFLOAD_BYTES or not _json(content_type):
                    response = await self.work.run(scope.get(QUEUED_AT, t0), handler, body,
                                                   content_type)
                else:
                    response = handler(body, content_type)
        except DurationError as e:
            if isinstance(e, Overloaded):
                self.service.metrics.shed.inc()
            response = error_response(e, close=unread)
        except ClientDisconnected:  # nobody to answer; counted as what it is, not as a 400
            self.service.metrics.observe(endpoint, CLIENT_GONE, time.perf_counter() - t0)
            return
        except asyncio.CancelledError:  # uvicorn's drain timeout: the one canceller of requests
            response = error_response(ShuttingDown(
                f"the service is shutting down and the request did not finish within "
                f"{self.service.settings.web_drain_timeout:g} s; retry"), close=True)
        except Exception:  # noqa: BLE001 - a bug: log it here, never send a traceback
            log.exception("unhandled error on %s %s", scope["method"], path)
            response = Response(500, b'{"error_code": "INTERNAL_ERROR", '
                                     b'"message": "internal error; see the service log"}')
        headers = [(b"content-type", response.content_type),
                   (b"content-length", str(len(response.body)).encode())]
        if response.headers:
            headers.extend(response.headers)
        await send({"type": "http.response.start", "status": response.status,
                    "headers": headers})
        await send({"type": "http.response.body", "body": response.body})
        self.answered += 1
        self.service.metrics.observe(endpoint, response.status, time.perf_counter() - t0)


def _json(content_type: str | None) -> bool:
    """Whether a body is (most likely) JSON, the one kind parsed on the event loop when small."""
    return content_type is not None and content_type.startswith("application/json")


def create_app(settings: WebSettings) -> WebApp:
    """The ASGI app for ``settings`` (nothing starts until the ASGI lifespan starts it)."""
    metrics = Metrics()
    holder = ModelHolder(settings.model_uri, settings.web_poll_interval, metrics)
    predlog = (PredictionLog(open_sink(settings.web_log_predictions))
               if settings.web_log_predictions else None)
    return WebApp(Service(holder, metrics, settings, predlog))
