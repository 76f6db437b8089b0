"""The raw ASGI adapter: routing, body limits, timing, error rendering; the lifespan starts the
registry poller and the prediction log.

Raw ASGI rather than a framework: Starlette's routing and request objects cost more than the
ride model itself (README, section online).
"""

from __future__ import annotations

import asyncio
import logging
import time

from serve.errors import DurationError, InvalidInput, MethodNotAllowed, NotFound, PayloadTooLarge
from serve.predlog import PredictionLog, open_sink
from serve.web.holder import ModelHolder
from serve.web.metrics import Metrics
from serve.web.service import Response, Service, error_response
from serve.web.settings import WebSettings

log = logging.getLogger(__name__)

# Bodies above this are decoded and scored in a thread so /health and small requests
# keep flowing while a big batch is parsed.
OFFLOAD_BYTES = 256 * 1024


class WebApp:
    """Raw ASGI adapter: routing, body limits, timing, error rendering; lifespan starts the
    poller and the prediction log."""

    def __init__(self, service: Service):
        self.service = service
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
                log.info("stopped: %d requests received, %d answered", self.received,
                         self.answered)
                self.service.holder.stop()
                if self.service.predlog is not None:
                    await asyncio.to_thread(self.service.predlog.close)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def http(self, scope, receive, send) -> None:
        t0 = time.perf_counter()
        self.received += 1
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
        self.answered += 1
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
