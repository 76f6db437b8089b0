"""The HTTP/1.1 layer under the app: uvicorn's httptools protocol with what it leaves out.

uvicorn answers requests it cannot parse (garbage, or smuggling attempts such as both
``Content-Length`` and ``Transfer-Encoding``) with a text/plain 400 the app never sees, and
waits forever for a request that trickles in. This subclass:

* answers unparseable requests like every other error of ours: 400 JSON
  ``{"error_code": "MALFORMED_HTTP_REQUEST", "message": <the parser's reason>}``, counted;
* gives each request ``request_timeout`` seconds from its first byte to its last: past it,
  before the headers are complete this layer answers 408 JSON and closes the connection;
  once the app is reading the body it is told (``scope[TIMED_OUT]``) and answers the 408;
* closes a new connection that sends nothing within the keep-alive timeout, as uvicorn
  already does with an idle keep-alive connection;
* stamps each request when its headers are complete (``scope[QUEUED_AT]``), so the app knows
  how long it waited for the event loop (load shedding, :mod:`serve.web.limits`).

The app hands its settings and a counter over through the ASGI lifespan state (``HOOKS``);
without them (lifespan off) the defaults apply and nothing is counted. The timer is armed
only when a request is still incomplete after the bytes at hand were parsed, so a request
that arrives whole (the common case) costs no timer at all, and a stamp is the only work
added per request.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from serve.errors import DurationError, InvalidInput, RequestTimeout

QUEUED_AT = "duration.queued_at"  # scope key: time.perf_counter() when the headers were in
TIMED_OUT = "duration.timed_out"  # scope key: set when the body did not arrive in time
HOOKS = "duration.http"  # lifespan-state key of the HttpHooks
DEFAULT_REQUEST_TIMEOUT = 30.0


class MalformedHttpRequest(InvalidInput):
    """Bytes that are not an HTTP/1.1 request we accept (answered before any routing)."""

    error_code = "MALFORMED_HTTP_REQUEST"


@dataclass(frozen=True)
class HttpHooks:
    """What the app gives the protocol: its read timeout and a counter of the answers given
    at this layer (called with the status)."""

    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    count: Callable[[int], None] | None = None


class DurationHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol + JSON errors, a request read timeout and queue stamps."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hooks: HttpHooks = self.app_state.get(HOOKS) or HttpHooks()
        self._read_timer = None
        self._timed_scope = None  # the scope of the request the timer was armed for

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        HttpToolsProtocol.data_received(self, data)
        if self._read_timer is None:
            cycle = self.cycle  # inlined first test of _incomplete(): false for whole requests
            if (cycle is None or cycle.scope is not self.scope or cycle.more_body) \
                    and self._incomplete():
                self._arm()

    def on_headers_complete(self) -> None:
        self.scope[QUEUED_AT] = time.perf_counter()
        HttpToolsProtocol.on_headers_complete(self)

    def send_400_response(self, msg: str) -> None:
        # Called by uvicorn inside its `except httptools.HttpParserError`: the parser's reason
        # ("Transfer-Encoding can't be present with Content-Length") is the exception at hand.
        reason = sys.exc_info()[1]
        self._answer(MalformedHttpRequest(
            f"not a valid HTTP/1.1 request: {reason or msg}; nothing of it was processed"))

    def _incomplete(self) -> bool:
        """A request has begun and is not all in (its headers, or its body, still coming)."""
        cycle, scope = self.cycle, self.scope
        return scope is not None and (cycle is None or cycle.scope is not scope
                                      or cycle.more_body) and not self.transport.is_closing()

    def _arm(self) -> None:
        # Armed when a request is found incomplete after the bytes that began it: its deadline
        # runs from then. Not cancelled when the request completes (no work per request): it
        # checks when it fires.
        self._timed_scope = self.scope
        self._read_timer = self.loop.call_later(self.hooks.request_timeout,
                                                self._request_timed_out)

    def _request_timed_out(self) -> None:
        self._read_timer = None
        if not self._incomplete():
            return
        if self.scope is not self._timed_scope:  # that request completed; this one began since
            self._arm()
            return
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # headers in: the app answers
            if cycle.response_started:  # answered already (e.g. 413): stop the trickle
                self.transport.close()
            else:
                self.scope[TIMED_OUT] = True
                cycle.message_event.set()  # wakes the app waiting for body bytes
            return
        self._answer(RequestTimeout(
            f"the request headers did not arrive within {self.hooks.request_timeout:g} s"))

    def _answer(self, err: DurationError) -> None:
        """Write ``err`` as our JSON error and close the connection (nothing else is read)."""
        body = json.dumps(err.to_dict()).encode()
        head = [STATUS_LINE[err.status_code]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
                 b"\r\nconnection: close\r\n\r\n", body]
        self.transport.write(b"".join(head))
        self.transport.close()
        if self.hooks.count is not None:
            self.hooks.count(err.status_code)
