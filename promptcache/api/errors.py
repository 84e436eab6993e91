"""Errors with an HTTP status, rendered in the error format of the API that was called."""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("promptcache.server")

ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
}


class APIError(Exception):
    """An error to return to the client: status, message, and the OpenAI ``param`` / ``code`` where useful."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": OPENAI_TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def anthropic_body(self) -> dict[str, Any]:
        return {
            "type": "error",
            "error": {"type": ANTHROPIC_TYPES.get(self.status, "api_error"), "message": self.message},
        }


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def is_anthropic(path: str) -> bool:
    """Whether ``path`` is an Anthropic endpoint (its errors take Anthropic's format)."""
    return path.startswith("/v1/messages")


def error_body(path: str, err: APIError) -> dict[str, Any]:
    """``err`` in the error format of the API that ``path`` belongs to."""
    return err.anthropic_body() if is_anthropic(path) else err.openai_body()


async def send_error(scope: Scope, send: Send, err: APIError, close: bool = True) -> None:
    """Answer with ``err`` in the format of the API called (from below the app: a middleware)."""
    payload = json.dumps(error_body(str(scope.get("path", "")), err)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class ErrorBoundary:
    """ASGI middleware: an exception that escapes the app is logged and answered with a 500 in the API's format.

    NOTE: Starlette's own last resort re-raises once it has sent its 500, and uvicorn then closes the keep-alive
    connection: the client's next request on it failed with a reset. Here the exception stops, and the connection
    serves on. An exception after the response started can only end the response early.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as err:
            log.exception("unexpected error serving %s", scope.get("path"))
            if not started:
                await send_error(scope, send, APIError(500, f"internal error: {type(err).__name__}: {err}"), False)
