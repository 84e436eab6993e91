"""Limits a public endpoint needs before it parses anything: the size of a request body, and how long it may take.

Without them a 64 MiB body was read and parsed whole, and a client that sent its body a byte a minute held a
connection (and its memory) forever. ``BodyLimit`` answers 413 (in the format of the API called) as soon as the
declared ``Content-Length`` or the bytes received so far pass the limit, and never holds more than the limit in
memory; it answers 408 when the whole body has not arrived within ``timeout`` seconds of the request's start. The
server and the fleet router both use it.
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from promptcache.api.errors import APIError, send_error

DEFAULT_MAX_BODY_MB = 16.0
DEFAULT_BODY_TIMEOUT = 30.0


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with a 413, and bodies slower than ``timeout``
    seconds with a 408."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float = DEFAULT_BODY_TIMEOUT):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send, self._too_large())
            return
        # Read the body here, counting (a chunked upload declares no length), then hand it on whole.
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await self._refuse(scope, send, self._too_slow(size))
                return
            if message["type"] != "http.request":
                break  # the client went away: let the app see it
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, send, self._too_large())
                return
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes",
                        code="request_too_large")  # fmt: skip

    def _too_slow(self, received: int) -> APIError:
        return APIError(408, f"the request body did not arrive within {self.timeout:g} s ({received} bytes came)",
                        code="request_timeout")  # fmt: skip

    @staticmethod
    async def _refuse(scope: Scope, send: Send, err: APIError) -> None:
        await send_error(scope, send, err)  # the connection closes: the rest of the body is not read
