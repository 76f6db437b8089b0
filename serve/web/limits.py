"""What one request may cost the service: its body's size and read time.

* :func:`read_body` reads a request body under the size limit; a client that hangs up is a
  :class:`ClientDisconnected` (counted as 499, never as a 4xx it was not sent), one that is
  too slow a :class:`~serve.errors.RequestTimeout` (the deadline is kept by
  :mod:`serve.web.protocol`).
"""

from __future__ import annotations

from serve.errors import PayloadTooLarge, RequestTimeout
from serve.web.protocol import TIMED_OUT


class ClientDisconnected(Exception):
    """The client hung up before sending its whole request: nobody is left to answer."""


async def read_body(scope, receive, limit: int) -> tuple[str | None, bytes]:
    """Content type and body, refusing bodies over ``limit`` before reading them whole."""
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
            raise ClientDisconnected(f"client hung up after {size} bytes of the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return content_type, chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if TIMED_OUT in scope:
            raise RequestTimeout(f"the request body did not arrive in time ({size} bytes "
                                 f"received)")
